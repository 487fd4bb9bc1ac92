"""The app tests/test_threads.py serves (threads > 1).

  /sleep?s=X        sleeps X seconds, answers the app thread's name
  /wait?f=F&mark=M  writes M when it starts, waits (up to 20 s) until file F exists,
                    then yields two chunks; its iterable's close() appends "closed <path>"
                    to $BLAZE_TEST_EVENTS
  /gen?n=N&kb=K     yields N chunks of K KiB, checksum-friendly (byte i is i % 251)
  /write?n=N        the legacy write() callable, N chunks of 1 KiB, then returns []
  /raise            raises before start_response
  /raise-after      yields one chunk, then raises
  /file?size=N      a wsgi.file_wrapper over a temporary file of N bytes
  /echo             answers the request body
  /env              answers a few environ keys as JSON
Every call appends "called <path>" to $BLAZE_TEST_EVENTS (when set).
"""
import json
import os
import tempfile
import threading
import time
from urllib.parse import parse_qs

EVENTS = os.environ.get("BLAZE_TEST_EVENTS")
_lock = threading.Lock()


def event(text):
    if EVENTS:
        with _lock, open(EVENTS, "a") as f:
            f.write(text + "\n")


def pattern(n):
    return bytes(i % 251 for i in range(n))


class Closing:
    """An iterable whose close() is recorded."""

    def __init__(self, chunks, path, fail_after=None):
        self.chunks, self.path, self.fail_after = chunks, path, fail_after

    def __iter__(self):
        for i, c in enumerate(self.chunks()):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("raise-after: the app fails mid-body")
            yield c

    def close(self):
        event(f"closed {self.path}")


def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    event(f"called {path}")
    text = [("Content-Type", "text/plain")]
    if path == "/sleep":
        time.sleep(float(q.get("s", "0.2")))
        start_response("200 OK", text)
        return [threading.current_thread().name.encode()]
    if path == "/wait":
        if q.get("mark"):
            with open(q["mark"], "w") as f:
                f.write("started")
        deadline = time.monotonic() + 20
        while not os.path.exists(q["f"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        start_response("200 OK", text)
        return Closing(lambda: iter([b"one,", b"two"]), path)
    if path == "/tick":              # a block, then a wait for the client's go, then the end
        def ticks():
            yield b"first"
            deadline = time.monotonic() + 20
            while not os.path.exists(q["f"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            yield b"second"
        start_response("200 OK", text)
        return Closing(ticks, path)
    if path == "/gen":
        n, kb = int(q.get("n", "10")), int(q.get("kb", "64"))
        start_response("200 OK", text)
        return Closing(lambda: (pattern(kb * 1024) for _ in range(n)), path)
    if path == "/write":
        write = start_response("200 OK", text)
        for _ in range(int(q.get("n", "4"))):
            write(pattern(1024))
        return []
    if path == "/raise":
        raise RuntimeError("the app fails before start_response")
    if path == "/raise-after":
        start_response("200 OK", text)
        return Closing(lambda: iter([b"first", b"never"]), path, fail_after=1)
    if path == "/file":
        f = tempfile.TemporaryFile()
        f.write(pattern(int(q.get("size", "100000"))))
        f.seek(0)
        start_response("200 OK", text)
        return environ["wsgi.file_wrapper"](f)
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", text)
        return [body]
    if path == "/sched":             # how the app thread is scheduled
        start_response("200 OK", text)
        return [f"{os.sched_getscheduler(0)} {threading.current_thread().name}".encode()]
    if path == "/env":
        keys = ("wsgi.multithread", "wsgi.multiprocess", "REMOTE_ADDR", "PATH_INFO")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({k: environ.get(k) for k in keys}).encode()]
    start_response("200 OK", text)
    return [b"hello"]
