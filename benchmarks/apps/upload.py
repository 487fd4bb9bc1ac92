"""Reads the whole request body (1 MiB from wrk/post_1mib.lua) and answers its length."""


def application(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    received = 0
    while received < length:
        chunk = stream.read(min(65536, length - received))
        if not chunk:
            break
        received += len(chunk)
    body = b"received %d" % received
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
