-- wrk script: every request is a POST with a 1 MiB body (Content-Length framed).
wrk.method = "POST"
wrk.body = string.rep("x", 1024 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
