"""Apps for the reload / scaling / systemd tests, and the client load those tests run.

Server side (imported by the workers):
  make_app(version) -> a WSGI app answering
      /             "<version> <pid>"
      /slow?s=2&mark=/tmp/f
                    writes "<pid>" to the mark file as soon as the request reaches
                    the app, sleeps s seconds, answers "slow <version> <pid>"
      /env          JSON of the socket-activation variables the worker sees
  app             make_app("static")
  VERSIONED       source of a module whose VERSION the reload tests rewrite
  BROKEN          source of a module that cannot be imported
  SLOW_BOOT       source of a module that takes `seconds` to import

Test side (only the test process calls these; conftest is imported lazily
so the workers never import pytest):
  Load            threads keeping connections busy and counting every failure
  alive(pid)      the process exists and is not a zombie
  children(pid)   its child processes
"""
import json
import os
import subprocess
import threading
import time
from wsgiref.validate import validator

from apphelp import slow_with_mark

ENV_KEYS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _answer(start_response, body, status="200 OK"):
    body = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def make_app(version):
    @validator
    def application(environ, start_response):
        path = environ["PATH_INFO"]
        pid = os.getpid()
        if path == "/slow":
            slow_with_mark(environ)
            return _answer(start_response, f"slow {version} {pid}")
        if path == "/env":
            return _answer(start_response, json.dumps({k: os.environ.get(k) for k in ENV_KEYS}))
        return _answer(start_response, f"{version} {pid}")
    return application


app = make_app("static")

VERSIONED = """\
VERSION = {version!r}
from apps_reload import make_app
application = make_app(VERSION)
"""

BROKEN = """\
import os
raise RuntimeError('reload boom: the new code is broken')
"""

SLOW_BOOT = """\
import time
time.sleep({seconds})
from apps_reload import app as application
"""


# ---------------------------------------------------------------- test side

def alive(pid):
    """True while pid runs (a zombie counts as gone: PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(p for p in (int(x) for x in out.stdout.split()) if alive(p))


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class Load:
    """`conns` client threads, each on its own connection, sending GET `path` until stop().

    keepalive=True: one connection carries request after request; the client
    reconnects only after a response said `Connection: close` (allowed).  Any
    other end of a connection (EOF, reset, timeout, refused connect, a status
    other than 200) is recorded in .failures with the time it happened.
    keepalive=False: a new connection (Connection: close) for every request.
    rate: requests/second per thread (None: back to back).
    """

    def __init__(self, connect, conns=1, keepalive=True, rate=None, path="/", timeout=10.0, name="load"):
        self.connect = connect
        self.keepalive = keepalive
        self.interval = 1.0 / rate if rate else 0.0
        self.path = path
        self.timeout = timeout
        self.name = name
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.closes = 0                 # connections the server ended with Connection: close
        self.failures = []              # (monotonic time, thread, description)
        self.bodies = []                # (monotonic time, body) of every 200
        self.last = {}                  # thread index -> last body
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"{name}-{i}")
                        for i in range(conns)]
        for t in self.threads:
            t.start()

    def _fail(self, i, what):
        with self.lock:
            self.failures.append((time.monotonic(), i, what))

    def _run(self, i):
        from conftest import read_response     # test process only
        req = (f"GET {self.path} HTTP/1.1\r\nHost: x\r\n"
               + ("" if self.keepalive else "Connection: close\r\n") + "\r\n").encode()
        sock = None
        on_conn, last = 0, None          # responses on this connection, the last one's body
        next_at = time.monotonic()
        while not self.stopping.is_set():
            if self.interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)     # pacing the load, not waiting for readiness
                    if self.stopping.is_set():
                        break
                next_at = max(next_at + self.interval, time.monotonic() - 1.0)
            if sock is None:
                try:
                    sock = self.connect(timeout=self.timeout)
                except OSError as e:
                    self._fail(i, f"connect: {e!r}")
                    sock = None
                    self.stopping.wait(0.05)
                    continue
                on_conn, last = 0, None
            try:
                sock.settimeout(self.timeout)
                sock.sendall(req)
                status, headers, body = read_response(sock)
            except Exception as e:   # noqa: BLE001 - every way a request can fail is counted
                self._fail(i, f"request {on_conn + 1} on its connection: {e!r}"
                              + (f" (previous response: {last!r})" if last is not None else ""))
                sock.close()
                sock = None
                continue
            on_conn += 1
            last = body[:60]
            close = headers.get("connection", "").lower() == "close"
            if status != 200:
                self._fail(i, f"status {status}: {body[:200]!r}")
            else:
                now = time.monotonic()
                with self.lock:
                    self.ok += 1
                    self.bodies.append((now, body))
                    self.last[i] = body
            if close or not self.keepalive:
                if close and self.keepalive:
                    with self.lock:
                        self.closes += 1
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), f"{self.name}: a client thread hangs"
        return self

    def report(self):
        return (f"{self.name}: {self.ok} ok, {len(self.failures)} failed, {self.closes} Connection: close; "
                f"first failures: {self.failures[:5]}")
