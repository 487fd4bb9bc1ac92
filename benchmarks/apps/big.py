"""A 1 MiB response body, built once (the server's framing and sending is what is measured)."""

BODY = b"x" * (1024 * 1024)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BODY)))])
    return [BODY]
