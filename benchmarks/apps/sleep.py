"""A view that waits 10 ms without using CPU: stands for a database round trip."""

import time


def application(environ, start_response):
    time.sleep(0.010)
    body = b"slept 10 ms"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
