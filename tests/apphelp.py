"""Pieces the test apps share."""
import os
import time
from urllib.parse import parse_qs


def slow_with_mark(environ):
    """/slow?s=N&mark=FILE: write this worker's pid to FILE (atomically, so a test never
    reads it half-written) once the request reached the app, then sleep N seconds."""
    q = parse_qs(environ.get("QUERY_STRING", ""))
    mark = q.get("mark", [None])[0]
    if mark:
        with open(mark + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(mark + ".tmp", mark)
    time.sleep(float(q.get("s", ["2"])[0]))


def read_mark(path):
    """The pid slow_with_mark wrote, or None while there is none."""
    try:
        with open(path) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def drain_input(environ, h=None):
    """Read wsgi.input to the end in 64 KiB pieces (feeding hash h); returns the length."""
    n = 0
    inp = environ["wsgi.input"]
    while True:
        chunk = inp.read(65536)
        if not chunk:
            return n
        if h is not None:
            h.update(chunk)
        n += len(chunk)
