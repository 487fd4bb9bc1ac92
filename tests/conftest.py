"""Start the real server as a subprocess and talk to it with real clients.

`server_factory(app=..., **settings)` writes a config.ini into a temp dir,
starts `python -m blazewsgi config.ini`, waits until the socket answers an
HTTP request (polling, never a fixed sleep) and stops it at teardown
(SIGTERM, then SIGKILL if it hangs).  Test apps live in tests/apps.py.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def server_env():
    """The environment of a server or CLI process the tests start: tests/ and
    the repository first on PYTHONPATH, and for sanitizer runs the sanitizer
    runtimes preloaded (BLAZE_SERVER_LD_PRELOAD; only these processes get it,
    not pytest, which an ASan-built module could not load into).  ROOT comes
    first, so a sanitizer run starts pytest from the sanitizer-built copy of
    the tree (as tests/fuzz_campaign.py says); from this checkout the servers
    would load its plain module with only the sanitizers' allocator."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if os.environ.get("BLAZE_SERVER_LD_PRELOAD"):
        env["LD_PRELOAD"] = os.environ["BLAZE_SERVER_LD_PRELOAD"]
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_probe(connect):
    """True once a GET over a fresh connection gets any HTTP status line."""
    try:
        with connect() as s:
            s.settimeout(2.0)
            s.sendall(b"GET /__probe__ HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


class Server:
    def __init__(self, tmp_path, app, workers=1, bind=None, extra=None, env=None, config_text=None):
        self.tmp = tmp_path
        self.port = free_port()
        self.bind = bind or [f"127.0.0.1:{self.port}"]
        settings = {"wsgi_path": app, "sockets": ",".join(self.bind), "min_workers": str(workers),
                    "graceful_timeout": "10"}
        if os.environ.get("BLAZE_TEST_THREADS"):   # run a suite again with the thread pool on
            settings["threads"] = os.environ["BLAZE_TEST_THREADS"]
        settings.update({k: str(v) for k, v in (extra or {}).items()})
        self.config = os.path.join(tmp_path, "config.ini")
        with open(self.config, "w") as f:
            if config_text is not None:
                f.write(config_text)
            else:
                f.write("[server]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.log_path = os.path.join(tmp_path, "server.log")
        self.env = server_env()
        self.env.update(env or {})
        self.proc = None

    @property
    def unix_paths(self):
        return [b[5:] if b.startswith("unix:") else b for b in self.bind if "/" in b]

    def start(self, wait=True):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "blazewsgi", self.config], cwd=self.tmp,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        if wait:
            wait_until(lambda: self.proc.poll() is not None or http_probe(self.connect), 15,
                       what="the server to answer")
            assert self.proc.poll() is None, f"server exited early:\n{self.output()}"
        return self

    def connect(self, timeout=10.0):
        if self.bind[0].startswith("127.0.0.1:") or ":" in self.bind[0] and "/" not in self.bind[0]:
            return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.unix_paths[0])
        return s

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def worker_pids(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(x) for x in out.stdout.split())

    def send(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:
            if not stop_process(self.proc, sig, timeout):
                raise AssertionError(f"server did not stop within {timeout}s:\n{self.output()}")
            return self.proc.returncode
        finally:
            self.log.close()


    def close(self):
        """Teardown: stop it, and kill what is left of its process group whatever happened."""
        try:
            self.stop()
        except AssertionError:
            pass
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    """make(app, **Server kwargs); own_dir="name" gives the server a directory of its own
    (its config, output and relative paths), for tests that run several servers."""
    servers = []

    def make(app="apps:echo_app", own_dir=None, **kw):
        d = str(tmp_path)
        if own_dir is not None:
            d = os.path.join(d, f"{own_dir}{len(servers)}")
            os.makedirs(d, exist_ok=True)
        s = Server(d, app, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def server(server_factory):
    """One worker serving tests/apps.py:echo_app on TCP."""
    return server_factory().start()


def stop_process(p, sig, timeout):
    """Send sig and wait; past timeout, kill its process group.  True if it stopped in time."""
    p.send_signal(sig)
    try:
        p.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return False


def read_to_close(sock, data=b""):
    """Everything sock sends until the peer closes, after data."""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def request(sock, data, timeout=10.0):
    """Send raw bytes; read one response; returns (status, headers dict lower-cased, body)."""
    sock.settimeout(timeout)
    if data:
        sock.sendall(data)
    return read_response(sock)


_leftover = weakref.WeakKeyDictionary()   # bytes read past one response (pipelining)


def _keep(sock, data):
    if data:
        _leftover[sock] = data


def read_response(sock, head_only=False):
    """One response from sock; bytes of the next response are kept for the next call."""
    buf = _leftover.pop(sock, b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode("latin-1")
    if head_only or status in (204, 304) or 100 <= status < 200:
        _keep(sock, rest)
        return status, headers, b""
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        _keep(sock, rest[n:])
        return status, headers, rest[:n]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed inside a chunk")
                rest += chunk
            if size == 0:
                while not rest.startswith(b"\r\n") and b"\r\n\r\n" not in rest:  # trailers
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                _keep(sock, rest[2:] if rest.startswith(b"\r\n") else rest.partition(b"\r\n\r\n")[2])
                return status, headers, body
            body += rest[:size]
            rest = rest[size + 2:]
    return status, headers, read_to_close(sock, rest)   # close-delimited


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets: their paths are limited to 107 bytes."""
    d = tempfile.mkdtemp(prefix="bz-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def start_nginx(d, conf_text, port):
    """Run a real nginx (as the current user, config, pid and logs in d) until it listens on port."""
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    with open(os.path.join(d, "nginx-stdout.log"), "wb") as log:
        p = subprocess.Popen([NGINX, "-p", d, "-e", os.path.join(d, "nginx-startup.log"), "-c", conf,
                              "-g", f"daemon off; pid {d}/nginx.pid;"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up():
        if p.poll() is not None:
            return True
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    try:
        wait_until(up, 15, what="nginx to listen")
    except AssertionError:
        stop_nginx(p)
        raise
    if p.poll() is not None:
        logs = [os.path.join(d, n) for n in ("nginx-startup.log", "nginx-error.log", "error.log")]
        raise AssertionError("nginx exited:\n" + "".join(open(x).read() for x in logs if os.path.exists(x)))
    return p


def stop_nginx(p):
    if p.poll() is None:
        stop_process(p, signal.SIGQUIT, 10)
