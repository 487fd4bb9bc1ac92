"""The app the access-log tests serve (tests/test_access_log.py), and their client helpers.

Server side (imported by the workers):
  app    every response's body is "<pid>" (and an X-Pid header), so a test can tell
         which worker served a request:
           /status/<code>            that status with its usual reason phrase
           /reason?text=Fine+Thanks  "200 <text>": a reason phrase of the app's own
           /sleep?ms=100             answers after that many milliseconds
           /raise                    raises: the server answers 500 (and logs a traceback)
           /stream?n=3               n chunks from a generator (chunked, no Content-Length)
           /big?kb=256               a body that large (more than a socket buffer)
           anything else             200 OK (POST/PUT/PATCH bodies are read)

Test side (only the test process uses these; conftest is imported lazily so the
workers never import pytest):
  ACCESS, EVENT      the line formats of the contract
  log_files(dir)     {file name: text} of every *.log in log_dir
  parse(text)        (access tuples, event lines, other lines) of a log text
  Client             sends requests (fresh connection or keep-alive) and records
                     what each one should be logged as
"""
import os
import re
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

REASONS = {200: "OK", 201: "Created", 204: "No Content", 302: "Found", 404: "Not Found",
           418: "I'm a teapot", 503: "Service Unavailable"}


@validator
def app(environ, start_response):
    path = environ["PATH_INFO"]
    pid = str(os.getpid())
    q = parse_qs(environ.get("QUERY_STRING", ""))
    inp = environ["wsgi.input"]
    while inp.read(65536):
        pass
    status = "200 OK"
    headers = [("X-Pid", pid)]
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        status = f"{code} {REASONS[code]}"
        if code == 302:
            headers.append(("Location", "/elsewhere"))
    elif path == "/reason":
        status = "200 " + q["text"][0]
    elif path == "/raise":
        raise RuntimeError("apps_log: raised on purpose")
    elif path == "/sleep":
        time.sleep(int(q["ms"][0]) / 1000.0)
    elif path == "/stream":
        start_response(status, headers + [("Content-Type", "text/plain")])
        return (f"{pid} chunk {i}\n".encode() for i in range(int(q["n"][0])))
    elif path == "/big":
        body = b"b" * (int(q["kb"][0]) * 1024)
        start_response(status, headers + [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    body = b"" if status.startswith("204") else pid.encode()
    if not status.startswith("204"):
        headers += [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [body] if body else []


# ---------------------------------------------------------------- test side

ACCESS = re.compile(r"^\[(\d{4}-\d\d-\d\d) \d\d:\d\d:\d\d\] Request: (\S+) (\S+) from (\S+), "
                    r"Status: (\d{3}) ?(.*), Latency: (\d+\.\d{3})ms$")
EVENT = re.compile(r"^\[(\d{4}-\d\d-\d\d) \d\d:\d\d:\d\d\] \[\d+\] \[[A-Z]+\] ")


class Line:
    """One access line: .key = (method, target, client, "code reason")."""
    __slots__ = ("raw", "date", "method", "target", "client", "status", "latency")

    def __init__(self, raw, m):
        self.raw = raw
        self.date, self.method, self.target, self.client = m.group(1), m.group(2), m.group(3), m.group(4)
        self.status = (m.group(5) + " " + m.group(6)).strip()
        self.latency = float(m.group(7))

    @property
    def key(self):
        return (self.method, self.target, self.client, self.status)

    def __repr__(self):
        return repr(self.raw)


def log_files(log_dir):
    out = {}
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(".log"):
            with open(os.path.join(log_dir, name), "rb") as f:
                out[name] = f.read().decode("utf-8", "replace")
    return out


def parse(text):
    """(access Lines, event lines, other lines) of one log text; a last line without
    its newline counts as 'other' (a split line)."""
    access, events, other = [], [], []
    lines = text.split("\n")
    tail = lines.pop()              # "" when the text ends with a newline
    for raw in lines:
        m = ACCESS.match(raw)
        if m:
            access.append(Line(raw, m))
        elif EVENT.match(raw):
            events.append(raw)
        else:
            other.append(raw)
    if tail:
        other.append(tail + "  <-- no newline at the end of the file")
    return access, events, other


def request_bytes(method, target, body=b"", close=True):
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def expected_status(target):
    if target.startswith("/status/"):
        code = int(target.split("?")[0].split("/")[2])
        return f"{code} {REASONS[code]}"
    if target.startswith("/reason?text="):
        return "200 " + target.split("=", 1)[1].replace("+", " ")
    return "200 OK"


class Client:
    """Sends requests and keeps the access-log key each one must produce.

    .sent: list of (key, pid or None) in the order the responses came back."""

    def __init__(self, connect, client="127.0.0.1"):
        self.connect = connect
        self.client = client
        self.sent = []

    def one(self, method, target, body=b"", sock=None):
        from conftest import read_response        # test process only
        own = sock is None
        s = self.connect() if own else sock
        try:
            s.settimeout(10)
            s.sendall(request_bytes(method, target, body, close=own))
            status, headers, _ = read_response(s, head_only=(method == "HEAD"))
        finally:
            if own:
                s.close()
        exp = expected_status(target)
        assert status == int(exp[:3]), (method, target, status)
        pid = int(headers["x-pid"]) if "x-pid" in headers else None
        self.sent.append(((method, target, self.client, exp), pid))
        return pid

    def raw(self, data, key):
        """A raw request (malformed): the response must be `key`'s status and the line logged."""
        with self.connect() as s:
            s.settimeout(10)
            s.sendall(data)
            got = b""
            while b"\r\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        assert got.startswith(b"HTTP/1.1 " + key[3].encode() + b"\r\n"), got[:200]
        self.sent.append((key, None))

    def keys(self):
        return [k for k, _ in self.sent]
