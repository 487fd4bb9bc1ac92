"""Zero-downtime reloads (SIGHUP) and binary upgrades (SIGUSR2).

HUP: the master re-reads the config file, starts new workers that import the
app anew, and once they are ready retires the old ones gracefully: in-flight
requests finish, pipelined ones are answered, keep-alive connections get
`Connection: close` on their next response (idle ones are closed after
keepalive_timeout).  The listening sockets never close, so no client sees a
refused connection, a reset or an EOF without a preceding Connection: close.
A config error or an app that no longer imports leaves the old workers serving.

USR2: a new master (same command line) inherits the listening sockets, and
once its workers are ready stops the old master, which leaves the socket
files and the pid_file (now the new master's) alone.
"""
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time

import pytest

from apphelp import read_mark
from apps_reload import BROKEN, VERSIONED, Load, alive, children, read_pid
from conftest import free_port, request, wait_until

RELOADING = re.compile(r"(?i)\breloading\b")
COMPLETE = re.compile(r"(?i)reload complete")
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}     # a rewritten module is always recompiled


def write_app(tmp_path, version, source=None):
    path = os.path.join(tmp_path, "reload_app.py")
    with open(path + ".tmp", "w") as f:
        f.write(source if source is not None else VERSIONED.format(version=version))
    os.replace(path + ".tmp", path)


def versioned_server(server_factory, tmp_path, version="v1", workers=2, extra=None, **kw):
    write_app(tmp_path, version)
    env = dict(NO_PYC, **kw.pop("env", {}))
    return server_factory(app="reload_app:application", workers=workers, extra=extra, env=env, **kw)


def get(srv, path="/", timeout=10):
    """GET on a fresh connection: (status, body)."""
    with srv.connect(timeout=timeout) as s:
        status, _, body = request(s, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
                                  timeout=timeout)
    return status, body.decode()


def served(srv):
    """(version, pid) of a fresh request."""
    status, body = get(srv)
    assert status == 200, body
    version, pid = body.split()
    return version, int(pid)


def count(pattern, text):
    return len(pattern.findall(text))


def reload_and_wait(srv, timeout=15):
    n = count(COMPLETE, srv.output())
    srv.send(signal.SIGHUP)
    wait_until(lambda: count(COMPLETE, srv.output()) > n, timeout,
               what=f"'Reload complete' after SIGHUP:\n{srv.output()[-3000:]}")


def new_version_served(srv, version, timeout=5):
    """Fresh connections reach the new workers (an old worker may still be noticing its SIGTERM)."""
    return wait_until(lambda: served(srv)[0] == version, timeout,
                      what=f"fresh requests to be answered by {version}")


def wait_workers(srv, n, timeout=15, exclude=()):
    return wait_until(lambda: (lambda w: len(w) == n and not set(w) & set(exclude) and w)(srv.worker_pids()),
                      timeout, what=f"{n} worker(s) (excluding {list(exclude)}), have {srv.worker_pids()}")


def assert_clean_log(out):
    assert "Traceback" not in out, out
    assert not re.search(r"Worker \d+ (was killed|exited with code)", out), out


class Raw(threading.Thread):
    """Send `data` on a new connection and read `n` responses, then what follows."""

    def __init__(self, sock, data, n=1):
        super().__init__(daemon=True)
        self.sock, self.data, self.n = sock, data, n
        self.responses, self.error, self.after = [], None, None
        self.start()

    def run(self):
        try:
            self.sock.sendall(self.data)
            for _ in range(self.n):
                self.responses.append(request(self.sock, b"", timeout=30))
            self.sock.settimeout(10)
            self.after = self.sock.recv(1)
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.sock.close()


# ---------------------------------------------------------------- HUP under load

def test_ten_reloads_under_keepalive_load_lose_nothing(server_factory, tmp_path):
    srv = versioned_server(server_factory, tmp_path, "v1", workers=2).start()
    master = srv.proc.pid
    assert served(srv)[0] == "v1"
    keep = Load(srv.connect, conns=32, keepalive=True, name="keep-alive")
    fresh = Load(srv.connect, conns=2, keepalive=False, name="new-connection")
    try:
        wait_until(lambda: len(keep.last) == 32, 10, what="all 32 connections to get a response")
        for i in range(2, 12):                      # 10 reloads, each with edited code
            version = f"v{i}"
            write_app(tmp_path, version)
            old = srv.worker_pids()
            reload_and_wait(srv)
            new_version_served(srv, version)
            ok = keep.ok
            wait_until(lambda: keep.ok > ok + 50, 10, what=f"requests to flow after reload {i - 1}")
            assert not keep.failures and not fresh.failures, \
                f"{keep.report()}\n{fresh.report()}\n{srv.output()[-3000:]}"
            assert srv.proc.poll() is None
        final = "v11"
        # every keep-alive client ends up on the new code: the old workers said Connection: close
        wait_until(lambda: all(b.split()[0].decode() == final for b in list(keep.last.values())), 15,
                   what=f"every client to be served by {final}: {sorted(set(keep.last.values()))}")
    finally:
        keep.stop()
        fresh.stop()
    out = srv.output()
    assert keep.failures == [], keep.report() + "\n" + out[-3000:]
    assert fresh.failures == [], fresh.report() + "\n" + out[-3000:]
    assert keep.ok > 1000 and fresh.ok > 20, (keep.report(), fresh.report())
    assert keep.closes >= 32, f"the retired workers must close keep-alive connections: {keep.report()}"
    versions = {b.split()[0].decode() for _, b in keep.bodies}
    assert versions >= {"v1", "v11"}, versions
    assert count(RELOADING, out) >= 10 and count(COMPLETE, out) == 10, out[-3000:]
    # old generations all gone (gracefully), the configured number of workers left, same master
    wait_workers(srv, 2, timeout=20, exclude=old)
    assert srv.proc.pid == master and srv.proc.poll() is None
    assert_clean_log(out)
    assert srv.stop() == 0


def test_slow_request_in_flight_during_reload_completes(server_factory, tmp_path):
    srv = versioned_server(server_factory, tmp_path, "v1", workers=1).start()
    mark = os.path.join(tmp_path, "inflight")
    slow = Raw(srv.connect(timeout=30), f"GET /slow?s=2&mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    busy = wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    t0 = time.monotonic()
    write_app(tmp_path, "v2")
    reload_and_wait(srv)
    new_version_served(srv, "v2")                 # new workers serve while the old one finishes
    slow.join(20)
    assert slow.error is None, f"{slow.error!r}\n{srv.output()}"
    status, headers, body = slow.responses[0]
    assert status == 200 and body == f"slow v1 {busy}".encode(), (status, body)
    assert headers.get("connection", "").lower() == "close", headers
    assert slow.after == b"", "the retired worker closes the connection after the response"
    assert time.monotonic() - t0 < 8
    wait_until(lambda: busy not in srv.worker_pids(), 10, what="the old worker to exit")
    assert_clean_log(srv.output())


def test_pipelined_requests_are_answered_by_the_retiring_worker(server_factory, tmp_path):
    srv = versioned_server(server_factory, tmp_path, "v1", workers=1).start()
    mark = os.path.join(tmp_path, "inflight")
    data = (f"GET /slow?s=1.5&mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /b HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    conn = Raw(srv.connect(timeout=30), data, n=3)
    busy = wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    write_app(tmp_path, "v2")
    reload_and_wait(srv)
    conn.join(20)
    assert conn.error is None, f"{conn.error!r} after {len(conn.responses)} response(s)\n{srv.output()}"
    assert [r[0] for r in conn.responses] == [200, 200, 200]
    assert [r[2] for r in conn.responses] == [f"slow v1 {busy}".encode(), f"v1 {busy}".encode(),
                                              f"v1 {busy}".encode()]
    assert conn.responses[-1][1].get("connection", "").lower() == "close", conn.responses[-1][1]
    assert conn.after == b""
    assert served(srv)[0] == "v2"


def test_idle_keepalive_connections_live_until_keepalive_timeout(server_factory, tmp_path):
    """After a reload an idle keep-alive connection to an old worker may still be used until
    keepalive_timeout: its next request is answered, with Connection: close.  One left idle
    is closed by the server after keepalive_timeout, not after graceful_timeout."""
    srv = versioned_server(server_factory, tmp_path, "v1", workers=1,
                           extra={"keepalive_timeout": 4, "graceful_timeout": 20}).start()
    a, b = srv.connect(), srv.connect()
    try:
        for s in (a, b):
            status, headers, body = request(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200 and headers.get("connection", "").lower() != "close"
        old = int(body.split()[1])
        t_last = time.monotonic()
        write_app(tmp_path, "v2")
        reload_and_wait(srv)
        reloaded = time.monotonic()
        assert reloaded - t_last < 2.5, f"the reload took {reloaded - t_last:.1f} s"
        new_version_served(srv, "v2")
        # a deliberate idle period, shorter than keepalive_timeout (the point of the test)
        time.sleep(max(0.0, t_last + 2.2 - time.monotonic()))
        b.setblocking(False)
        try:
            early = b.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            early = None                             # still open: right
        except OSError as e:
            early = repr(e)
        assert early is None, (f"an idle keep-alive connection was closed {time.monotonic() - t_last:.1f} s "
                               f"after its last response (keepalive_timeout is 4): {early!r}")
        status, headers, body = request(a, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, f"v1 {old}".encode())
        assert headers.get("connection", "").lower() == "close", headers
        a.settimeout(5)
        assert a.recv(1) == b""
        b.setblocking(True)
        b.settimeout(10)
        try:
            assert b.recv(1) == b""
        except ConnectionResetError:
            pass
        closed = time.monotonic() - t_last
        assert 3.0 <= closed < 4 + 3, f"the idle connection was closed {closed:.1f} s after its last response"
        wait_until(lambda: old not in srv.worker_pids(), 5, what="the old worker to exit")
        assert time.monotonic() - t_last < 4 + 5, "the old worker waited for graceful_timeout"
    finally:
        a.close()
        b.close()
    assert_clean_log(srv.output())


# ---------------------------------------------------------------- HUP that cannot apply

BAD_CONFIGS = {
    "unknown-key": ("bogus_reload_key = 1\n", r"bogus_reload_key"),
    "invalid-value": ("min_workers = many\n", r"min_workers"),
    "not-ini": (None, r""),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_error_on_reload_keeps_old_workers(server_factory, tmp_path, case):
    srv = versioned_server(server_factory, tmp_path, "v1", workers=1, extra={"max_workers": 2}).start()
    old = srv.worker_pids()
    assert len(old) == 1
    with open(srv.config) as f:
        good = f.read()
    line, names = BAD_CONFIGS[case]
    bad = good + line if line else "this is { not an INI file\n" + good
    if case == "invalid-value":
        bad = re.sub(r"(?m)^min_workers = .*\n", "", good) + line
    with open(srv.config, "w") as f:
        f.write(bad)
    write_app(tmp_path, "v2")       # would be served if the reload went ahead anyway
    before = len(srv.output())
    srv.send(signal.SIGHUP)
    wait_until(lambda: re.search(r"\[(ERROR|WARNING|CRITICAL)\].*" + names, srv.output()[before:]), 10,
               what=f"the config error to be logged:\n{srv.output()[before:]}")
    for _ in range(20):
        assert served(srv) == ("v1", old[0])
    assert srv.worker_pids() == old
    assert srv.proc.poll() is None, srv.output()
    assert not COMPLETE.search(srv.output()[before:]), srv.output()[before:]
    # fixed, and changed: the next HUP reads it and applies it (two workers now)
    with open(srv.config, "w") as f:
        f.write(re.sub(r"(?m)^min_workers = .*$", "min_workers = 2", good))
    reload_and_wait(srv)
    new = wait_workers(srv, 2, exclude=old)
    new_version_served(srv, "v2")
    assert served(srv)[1] in new
    assert srv.stop() == 0


def test_app_import_error_on_reload_keeps_old_workers(server_factory, tmp_path):
    srv = versioned_server(server_factory, tmp_path, "v1", workers=2).start()
    old = wait_workers(srv, 2)
    before = len(srv.output())
    write_app(tmp_path, None, source=BROKEN)
    srv.send(signal.SIGHUP)
    wait_until(lambda: "reload boom" in srv.output()[before:], 10,
               what=f"the import error to be logged:\n{srv.output()[before:]}")
    # the failed generation goes away; the old one never stopped
    wait_until(lambda: srv.worker_pids() == old, 10,
               what=f"only the old workers {old}, have {srv.worker_pids()}")
    seen = set()
    for _ in range(30):
        version, pid = served(srv)
        assert version == "v1"
        seen.add(pid)
    assert seen <= set(old)
    out = srv.output()[before:]
    assert not COMPLETE.search(out), out
    assert "Traceback (most recent call last)" in out
    assert out.count("reload boom") <= 2 * 2 + 2, f"new workers keep being forked:\n{out}"
    assert srv.proc.poll() is None, "the master must not exit when a reload cannot import the app"
    assert srv.worker_pids() == old
    # the code is fixed: the next HUP goes through
    write_app(tmp_path, "v3")
    reload_and_wait(srv)
    new_version_served(srv, "v3")
    wait_workers(srv, 2, exclude=old)
    assert srv.stop() == 0


# ---------------------------------------------------------------- USR2: a new master


@pytest.fixture
def session_reaper():
    """Kills whatever is left of the sessions registered (the new master is not our child)."""
    sids = []
    yield sids.append
    for sid in sids:
        pids = [p for p in _session(sid) if p != os.getpid()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            try:
                wait_until(lambda: not [p for p in pids if alive(p)], 10, what="leftover processes to exit")
                break
            except AssertionError:
                continue


def _session(sid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def test_usr2_upgrades_the_master_without_downtime(server_factory, tmp_path, sockdir, session_reaper):
    port = free_port()
    path = os.path.join(sockdir, "app.sock")
    srv = versioned_server(server_factory, tmp_path, "v1", workers=2,
                           bind=[f"127.0.0.1:{port}", f"unix:{path}"],
                           extra={"pid_file": "master.pid", "socket_mode": "0666"})
    srv.port = port
    srv.start()
    session_reaper(srv.proc.pid)
    pid_file = os.path.join(tmp_path, "master.pid")
    old_master = srv.proc.pid
    assert read_pid(pid_file) == old_master
    inode = os.stat(path).st_ino

    def unix_connect(timeout=10.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return s

    loads = [Load(srv.connect, conns=4, keepalive=True, name="tcp keep-alive"),
             Load(srv.connect, conns=1, keepalive=False, name="tcp new-connection"),
             Load(unix_connect, conns=4, keepalive=True, name="unix keep-alive"),
             Load(unix_connect, conns=1, keepalive=False, name="unix new-connection")]
    new_master = None
    try:
        wait_until(lambda: all(ld.ok > 10 for ld in loads), 10, what="the clients to run")
        write_app(tmp_path, "v2")
        srv.send(signal.SIGUSR2)
        new_master = wait_until(lambda: (lambda p: p if p and p != old_master else None)(read_pid(pid_file)),
                                15, what=f"the pid_file to name a new master:\n{srv.output()}")
        try:
            srv.proc.wait(15)
        except Exception:
            raise AssertionError(f"the old master did not exit after the upgrade:\n{srv.output()}") from None
        assert srv.proc.returncode == 0, srv.output()
        assert alive(new_master), srv.output()
        new_workers = wait_until(lambda: children(new_master), 10, what="the new master's workers")
        for ld in loads:
            ok = ld.ok
            wait_until(lambda: ld.ok > ok + 20, 10, what=f"{ld.name} to go on after the upgrade")
        # the clients ended up on the new master's workers (running the new code)
        wait_until(lambda: all(b.split()[0] == b"v2" for ld in loads for b in list(ld.last.values())), 15,
                   what="every client to be served by the new master's workers")
    finally:
        for ld in loads:
            ld.stop()
    out = srv.output()
    for ld in loads:
        assert ld.failures == [], ld.report() + "\n" + out[-3000:]
    assert os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode), "the socket file must stay"
    assert os.stat(path).st_ino == inode, "the Unix socket was re-bound, not inherited"
    assert read_pid(pid_file) == new_master
    _, pid = served(srv)
    assert pid in children(new_master) or pid in new_workers
    status, _, body = request(unix_connect(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and int(body.split()[1]) in children(new_master)
    assert not [p for p in _session(old_master) if p not in [new_master] + children(new_master)], \
        "the old master's workers must be gone"
    # the new master is the server now: SIGTERM stops it and it cleans up
    os.kill(new_master, signal.SIGTERM)
    wait_until(lambda: not alive(new_master), 20, what=f"the new master to stop:\n{srv.output()[-3000:]}")
    assert not os.path.exists(path), "the new master removes its socket file when it stops"
    assert not os.path.exists(pid_file), "the new master removes its pid_file when it stops"
    wait_until(lambda: not _session(old_master), 10, what="every worker to exit")
    assert "Traceback" not in srv.output(), srv.output()
