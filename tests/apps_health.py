"""Apps for the health tests: a request that hangs, one that streams slowly, a pid echo."""
import os
import time
from wsgiref.validate import validator


def stuck_in_sleepy_view(seconds):
    time.sleep(seconds)          # the stack dump must name this function


@validator
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/hang":
        stuck_in_sleepy_view(60)
    if path == "/trickle":       # sends a chunk every 0.4 s for ~3 s: progress, not a hang
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen():
            for i in range(8):
                time.sleep(0.4)
                yield b"%d\n" % i
        return gen()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
