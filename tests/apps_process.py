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
from wsgiref.validate import validator

from apphelp import drain_input, slow_with_mark


def _answer(start_response, body, status="200 OK"):
    body = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@validator
def pid_app(environ, start_response):
    path = environ["PATH_INFO"]
    pid = os.getpid()
    if path == "/slow":
        slow_with_mark(environ)
        return _answer(start_response, f"slow {pid}")
    if path == "/body":
        return _answer(start_response, f"{pid} {drain_input(environ)}")
    return _answer(start_response, str(pid))
