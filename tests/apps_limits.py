"""Apps for tests/test_requests_corpus.py and tests/test_limits.py.

environ_app: for every path, the environ as JSON plus the request body
(latin-1) under "_body", so a corpus file can check any target and the
decoded body at once.

counting_app: appends "METHOD PATH" to the file named by the environment
variable BLAZE_TEST_HITS for every request, reads the whole body and
answers its length; tests read that file to prove the app did (not) run.

Both are wrapped in wsgiref.validate.validator like tests/apps.py.
"""
import json
import os
from wsgiref.validate import validator


def _jsonable(environ):
    out = {}
    for k, v in environ.items():
        if isinstance(v, (str, bool, int, tuple)):
            out[k] = v
    return out


def _read_all(environ):
    inp = environ["wsgi.input"]
    chunks = []
    while True:
        chunk = inp.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@validator
def environ_app(environ, start_response):
    out = _jsonable(environ)
    out["_body"] = _read_all(environ).decode("latin-1")
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@validator
def counting_app(environ, start_response):
    data = _read_all(environ)
    path = os.environ.get("BLAZE_TEST_HITS")
    if path:
        with open(path, "a") as f:
            f.write(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {len(data)}\n")
    body = f"{len(data)}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
