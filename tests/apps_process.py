"""WSGI apps for the process-management tests (test_process.py, test_unix_sockets.py).

pid_app answers with the pid of the worker that served the request, so a
test can tell workers apart:
  /            -> "<pid>"
  /slow?s=2&mark=/tmp/f
               -> writes "<pid>" to the mark file (when given) as soon as
                  the request reaches the app, sleeps s seconds, answers
                  "slow <pid>"
  /body        -> "<pid> <length of the request body>"
"""
import os
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator


def _answer(start_response, body, status="200 OK"):
    body = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@validator
def pid_app(environ, start_response):
    path = environ["PATH_INFO"]
    pid = os.getpid()
    if path == "/slow":
        q = parse_qs(environ.get("QUERY_STRING", ""))
        mark = q.get("mark", [None])[0]
        if mark:
            with open(mark + ".tmp", "w") as f:
                f.write(str(pid))
            os.replace(mark + ".tmp", mark)      # the test never reads a half-written file
        time.sleep(float(q.get("s", ["2"])[0]))
        return _answer(start_response, f"slow {pid}")
    if path == "/body":
        n = 0
        inp = environ["wsgi.input"]
        while True:
            chunk = inp.read(65536)
            if not chunk:
                break
            n += len(chunk)
        return _answer(start_response, f"{pid} {n}")
    return _answer(start_response, str(pid))
