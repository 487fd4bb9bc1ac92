"""WSGI apps the tests serve; each is wrapped in wsgiref.validate.validator."""
import hashlib
import json
import os
from wsgiref.validate import validator

from apphelp import drain_input

HERE = os.path.dirname(os.path.abspath(__file__))


def _json_environ(environ):
    out = {}
    for k, v in environ.items():
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, (bool, int, tuple)):
            out[k] = v
    return out


@validator
def echo_app(environ, start_response):
    """/json: the environ as JSON; /body: sha256 + length of the request body;
    anything else: method + path."""
    path = environ["PATH_INFO"]
    if path == "/json":
        body = json.dumps(_json_environ(environ)).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/body":
        h = hashlib.sha256()
        n = drain_input(environ, h)
        body = json.dumps({"sha256": h.hexdigest(), "length": n,
                           "content_length": environ.get("CONTENT_LENGTH")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/readline":
        inp = environ["wsgi.input"]
        lines = [inp.readline() for _ in range(2)] + [inp.read(3)] + list(inp)
        body = json.dumps([x.decode("latin-1") for x in lines]).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    body = f"{environ['REQUEST_METHOD']} {path}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
