"""The app tests/test_metrics.py serves (wrapped in wsgiref.validate.validator like tests/apps.py).

  /status/NNN       answers status NNN ("404 Not Found", "500 Internal Server Error", ...)
                    with a short body (none for 1xx/204/304)
  /raise            the app raises: the server itself answers 500
  /sleep?s=X&mark=F writes "<pid>" to file F (when given) as soon as the request reaches
                    the app, sleeps X seconds, answers "slept <pid>"
  /hang             sleeps 60 s (the master's `timeout` kills the worker)
  /big?n=N          answers N bytes
  /body             reads the whole request body, answers its length
  /stream?n=N&fail=1  streams N chunks of 64 KiB (no Content-Length), pausing 10 ms between
                    them; with fail=1 the iterable raises after the 3rd chunk
  /order            the REMOTE_PORTs of the last 1000 "anything else" requests this worker
                    served, in order, one per line
  anything else     answers the worker's pid

Import-time switches (environment, set per server by the test):
  BLAZE_TEST_BOOT_SLEEP=S   the import sleeps S seconds (a worker that never gets ready)
  BLAZE_TEST_FAIL_FILE=F    the import raises while file F exists (a reload whose new
                            workers cannot import the app)
"""
import os
import time
from collections import deque
from urllib.parse import parse_qs
from wsgiref.validate import validator

_boot = float(os.environ.get("BLAZE_TEST_BOOT_SLEEP") or 0)
if _boot:
    time.sleep(_boot)
_fail = os.environ.get("BLAZE_TEST_FAIL_FILE")
if _fail and os.path.exists(_fail):
    raise RuntimeError("metrics test: this import is made to fail")

_served = deque(maxlen=1000)   # REMOTE_PORTs, for /order

REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
           304: "Not Modified", 400: "Bad Request", 404: "Not Found", 418: "I'm a teapot",
           500: "Internal Server Error", 503: "Service Unavailable"}


def _answer(start_response, body, status="200 OK", extra=()):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))] + list(extra))
    return [body]


def _read_all(environ):
    inp = environ["wsgi.input"]
    n = 0
    while True:
        chunk = inp.read(65536)
        if not chunk:
            return n
        n += len(chunk)


@validator
def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = parse_qs(environ.get("QUERY_STRING", ""))
    pid = os.getpid()
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        status = f"{code} {REASONS.get(code, 'Whatever')}"
        _read_all(environ)
        if code in (204, 304):
            start_response(status, [])
            return []
        extra = [("Location", "/")] if 300 <= code < 400 else []
        return _answer(start_response, f"status {code}".encode(), status, extra)
    if path == "/raise":
        raise RuntimeError("metrics test: the app fails")
    if path == "/sleep":
        mark = q.get("mark", [None])[0]
        if mark:
            with open(mark + ".tmp", "w") as f:
                f.write(str(pid))
            os.replace(mark + ".tmp", mark)     # never read half-written
        time.sleep(float(q.get("s", ["1"])[0]))
        return _answer(start_response, f"slept {pid}".encode())
    if path == "/hang":
        time.sleep(60)
        return _answer(start_response, b"hung")
    if path == "/big":
        n = int(q.get("n", ["1048576"])[0])
        return _answer(start_response, b"x" * n)
    if path == "/body":
        return _answer(start_response, str(_read_all(environ)).encode())
    if path == "/stream":
        n = int(q.get("n", ["100"])[0])
        fail = q.get("fail", ["0"])[0] == "1"
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def gen():
            for i in range(n):
                if fail and i == 3:
                    raise RuntimeError("metrics test: the stream fails")
                if i:
                    time.sleep(0.01)
                yield b"s" * 65536
        return gen()
    if path == "/order":
        return _answer(start_response, "\n".join(_served).encode())
    _served.append(environ["REMOTE_PORT"])
    _read_all(environ)
    return _answer(start_response, str(pid).encode())
