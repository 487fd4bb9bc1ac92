"""systemd integration: sd_notify (READY / RELOADING / STOPPING) and socket activation.

NOTIFY_SOCKET: the master sends "READY=1" with "MAINPID=<pid>" once the first
workers are ready, "RELOADING=1" when a HUP starts, "READY=1" again when it
completes, "STOPPING=1" on SIGTERM.
LISTEN_FDS / LISTEN_PID: descriptors 3.. are listening sockets the server
serves on instead of binding `sockets`; it neither re-binds nor unlinks
them, and the variables do not reach the workers.
"""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from apps_reload import SLOW_BOOT, alive, children
from conftest import free_port, request, server_env, wait_until

APP = "apps_reload:app"


class Notifications(threading.Thread):
    """Collects the datagrams sent to a NOTIFY_SOCKET: [(monotonic time, {key: value})]."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)   # @name: abstract namespace
        self.sock.settimeout(0.2)
        self.messages = []
        self.raw = []
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.raw.append(data)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key, value="1"):
        return [t for t, m in self.messages if m.get(key) == value]

    def close(self):
        self.done.set()
        self.join(5)
        self.sock.close()


@pytest.fixture
def shortdir():
    d = tempfile.mkdtemp(prefix="bzs-", dir="/tmp")     # Unix socket paths: at most 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notifications(shortdir):
    n = Notifications(os.path.join(shortdir, "notify"))
    yield n
    n.close()


def get(connect, path="/"):
    with connect() as s:
        return request(s, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), timeout=10)


# ---------------------------------------------------------------- sd_notify

def test_notify_ready_reloading_stopping(server_factory, tmp_path, notifications):
    with open(os.path.join(tmp_path, "slowboot.py"), "w") as f:
        f.write(SLOW_BOOT.format(seconds=1.5))
    srv = server_factory(app="slowboot:application", workers=2, env={"NOTIFY_SOCKET": notifications.path})
    t0 = time.monotonic()
    srv.start(wait=False)
    ready = wait_until(lambda: notifications.times("READY"), 15,
                       what=f"READY=1 (got {notifications.raw}):\n{srv.output()}")[0]
    assert ready - t0 >= 1.5, "READY=1 before any worker had imported the app"
    # ready means serving: a request is answered at once
    with srv.connect(timeout=2) as s:
        status, _, body = request(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=2)
    assert status == 200
    first_ready = next(m for t, m in notifications.messages if m.get("READY") == "1")
    mainpids = [m["MAINPID"] for t, m in notifications.messages if "MAINPID" in m and t <= ready]
    assert mainpids and mainpids[-1] == str(srv.proc.pid), notifications.raw
    assert "MAINPID" in first_ready, f"READY=1 goes with MAINPID=<pid>: {notifications.raw}"
    assert not notifications.times("RELOADING") and not notifications.times("STOPPING"), notifications.raw

    # HUP: RELOADING=1 at once, READY=1 only when the new workers (1.5 s to import) serve
    n = len(notifications.messages)
    srv.send(signal.SIGHUP)
    reloading = wait_until(lambda: notifications.times("RELOADING"), 10,
                           what=f"RELOADING=1 (got {notifications.raw})")[0]
    again = wait_until(lambda: [t for t in notifications.times("READY") if t > reloading], 15,
                       what=f"READY=1 after the reload (got {notifications.raw}):\n{srv.output()}")[0]
    assert again - reloading >= 1.2, "READY=1 sent before the new workers had imported the app"
    assert [m for _, m in notifications.messages[n:]][0].get("RELOADING") == "1", notifications.raw[n:]
    assert not notifications.times("STOPPING")

    # SIGTERM: STOPPING=1
    assert srv.stop() == 0
    wait_until(lambda: notifications.times("STOPPING"), 5, what=f"STOPPING=1 (got {notifications.raw})")
    assert notifications.times("STOPPING")[0] > again


def test_notify_abstract_socket(server_factory):
    """NOTIFY_SOCKET=@name is a socket in the abstract namespace (sd_notify(3))."""
    n = Notifications(f"@blazewsgi-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        srv = server_factory(app=APP, workers=1, env={"NOTIFY_SOCKET": n.path}).start()
        wait_until(lambda: n.times("READY"), 10, what=f"READY=1 on {n.path} (got {n.raw}):\n{srv.output()}")
        assert srv.stop() == 0
        wait_until(lambda: n.times("STOPPING"), 5, what=f"STOPPING=1 (got {n.raw})")
    finally:
        n.close()


def test_no_notify_socket_no_problem(server_factory):
    srv = server_factory(app=APP, workers=1, env={"NOTIFY_SOCKET": "/nonexistent/notify"}).start()
    status, _, _ = get(srv.connect)
    assert status == 200
    srv.send(signal.SIGHUP)
    wait_until(lambda: "Reload complete" in srv.output() or srv.proc.poll() is not None, 10,
               what="the reload")
    assert srv.proc.poll() is None, srv.output()
    assert srv.stop() == 0


# ---------------------------------------------------------------- socket activation

WRAPPER = r"""
import fcntl, os, sys
# what systemd does: the listening sockets at fds 3.., LISTEN_FDS / LISTEN_PID for this process
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)          # inheritable
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(["web"] * len(fds))
os.execv(sys.executable, [sys.executable, "-m", "blazewsgi"] + sys.argv[2:])
"""


class Activated:
    """The server started by a systemd-like wrapper with already listening sockets."""

    def __init__(self, tmp_path, socks, config_port):
        self.tmp = str(tmp_path)
        self.socks = socks
        self.config = os.path.join(self.tmp, "config.ini")
        with open(self.config, "w") as f:
            f.write(f"[server]\nwsgi_path = {APP}\nsockets = 127.0.0.1:{config_port}\nmin_workers = 2\n"
                    "graceful_timeout = 5\n")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.proc = None

    def start(self):
        env = server_env()
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(k, None)
        fds = [s.fileno() for s in self.socks]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), self.config],
                                     cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     pass_fds=fds, start_new_session=True)
        return self

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"the server did not stop:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_socket_activation(tmp_path, shortdir):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    port = tcp.getsockname()[1]
    path = os.path.join(shortdir, "activated.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen(64)
    inode = os.stat(path).st_ino
    config_port = free_port()

    def tcp_connect(timeout=10):
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def unix_connect(timeout=10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return s

    servers = []
    try:
        for round in range(2):          # and again with the same sockets, as after `systemctl restart`
            srv = Activated(tmp_path, [tcp, unix], config_port).start()
            servers.append(srv)
            # the sockets already listen: the first request waits in the backlog until a worker serves it
            status, _, body = get(tcp_connect)
            assert status == 200, body
            assert srv.proc.poll() is None, srv.output()
            workers = children(srv.proc.pid)
            assert int(body.split()[1]) in workers, (body, workers, srv.output())
            status, _, body = get(unix_connect)
            assert status == 200 and int(body.split()[1]) in children(srv.proc.pid), body
            status, _, body = get(unix_connect, "/env")
            env = json.loads(body)
            assert env == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}, \
                f"the activation variables must not reach the workers: {env}"
            # the `sockets` setting is not bound: the activated sockets replace it
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", config_port), timeout=2).close()
            assert os.stat(path).st_ino == inode, "the activated Unix socket was re-bound"
            out = srv.output()
            assert srv.stop() == 0, out
            out = srv.output()
            assert "Traceback" not in out, out
            # the socket is systemd's: the file stays and still leads to the listening socket
            assert os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode), \
                f"the server removed the activated socket file:\n{out}"
            assert os.stat(path).st_ino == inode
            unix_connect(timeout=2).close()      # the listening socket (held by "systemd") still accepts
    finally:
        for srv in servers:
            srv.kill()
            srv.log.close()
        tcp.close()
        unix.close()


def test_listen_pid_of_another_process_is_ignored(server_factory):
    """LISTEN_FDS meant for another process (LISTEN_PID differs): bind `sockets` as usual."""
    srv = server_factory(app=APP, workers=1, env={"LISTEN_FDS": "1", "LISTEN_PID": "1"}).start()
    status, _, body = get(srv.connect)
    assert status == 200
    assert int(body.split()[1]) in srv.worker_pids()
    assert alive(srv.proc.pid)
    assert srv.stop() == 0
