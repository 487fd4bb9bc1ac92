"""The master's process management: import failures, signals, dead workers, pid_file."""
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from apphelp import read_mark
from conftest import request, wait_until

APP = "apps_process:pid_app"


def session_pids(sid):
    """Every live process of the server's session (master + workers, also orphaned ones)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True)
    pids = []
    for line in out.stdout.splitlines():
        pid, s, st = line.split()
        if int(s) == sid and not st.startswith("Z"):
            pids.append(int(pid))
    return pids


def get_pid(server, path="/"):
    with server.connect() as s:
        status, _, body = request(s, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200, body
    return int(body.split()[-1])


def refused(server):
    try:
        server.connect(timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class SlowRequest(threading.Thread):
    """GET /slow on its own connection; records (status, body) or the exception."""

    def __init__(self, server, seconds, mark, keepalive=False):
        super().__init__(daemon=True)
        self.sock = server.connect(timeout=seconds + 30)
        self.req = (f"GET /slow?s={seconds}&mark={mark} HTTP/1.1\r\nHost: x\r\n"
                    + ("" if keepalive else "Connection: close\r\n") + "\r\n").encode()
        self.result = self.error = None
        self.after = None
        self.start()

    def run(self):
        try:
            self.result = request(self.sock, self.req)
            self.sock.settimeout(10)
            self.after = self.sock.recv(1)       # what follows the response: b"" once the server closes
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.sock.close()


# ---------------------------------------------------------------- an app that cannot be imported

BROKEN = {
    "raise-in-module-body": ("broken_mod.py", "import os\nraise RuntimeError('boom at import time')\n",
                             "broken_mod:application", "RuntimeError: boom at import time"),
    "missing-module": (None, None, "no_such_module_xyz:application",
                       "No module named 'no_such_module_xyz'"),
    "missing-attribute": ("noattr_mod.py", "x = 1\n", "noattr_mod:application",
                          "has no attribute 'application'"),
    "not-callable": ("noattr_mod.py", "application = 42\n", "noattr_mod:application", "not callable"),
    "syntax-error": ("syntax_mod.py", "def application(:\n", "syntax_mod:application", "SyntaxError"),
    "sys-exit-in-module-body": ("exit_mod.py", "import sys\nsys.exit('settings missing')\n",
                                "exit_mod:application", "SystemExit: settings missing"),
    "file-path-raises": ("pkgless/wsgi.py", "raise ImportError('cannot find settings')\n",
                         "pkgless/wsgi.py", "ImportError: cannot find settings"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_app_import_failure_stops_master(server_factory, tmp_path, case):
    filename, source, app, expected = BROKEN[case]
    if filename:
        os.makedirs(os.path.dirname(os.path.join(tmp_path, filename)), exist_ok=True)
        with open(os.path.join(tmp_path, filename), "w") as f:
            f.write(source)
    if app.startswith("pkgless/"):
        app = os.path.join(str(tmp_path), app)
    srv = server_factory(app=app, workers=2, extra={"pid_file": "master.pid"})
    t0 = time.monotonic()
    srv.start(wait=False)
    try:
        rc = srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"master still running 15 s after an import failure:\n{srv.output()}") from None
    took = time.monotonic() - t0
    out = srv.output()
    assert rc == 3, f"exit code {rc}:\n{out}"
    assert took < 10, f"took {took:.1f}s"
    assert "Traceback (most recent call last)" in out
    assert expected in out
    # at most one boot attempt per configured worker: no fork loop
    # (one "[ERROR] Cannot import" line per worker that tried; the traceback is printed once)
    boots = len(re.findall(r"\[ERROR\] Cannot import the application", out))
    assert 1 <= boots <= 2, f"{boots} worker boot attempts:\n{out}"
    assert out.count("Traceback (most recent call last)") == boots, out
    assert not re.search(r"Worker \d+ (ready|exited|was killed)", out), out
    assert session_pids(srv.proc.pid) == [], "processes left behind"
    assert refused(srv)
    assert not os.path.exists(os.path.join(tmp_path, "master.pid"))


def test_app_import_failure_with_log_dir(server_factory, tmp_path):
    os.mkdir(os.path.join(tmp_path, "logs"))
    with open(os.path.join(tmp_path, "broken_mod.py"), "w") as f:
        f.write("raise RuntimeError('boom with log_dir')\n")
    srv = server_factory(app="broken_mod:application", workers=1, extra={"log_dir": "logs"})
    srv.start(wait=False)
    try:
        rc = srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"master still running:\n{srv.output()}") from None
    assert rc == 3
    logs = os.listdir(os.path.join(tmp_path, "logs"))
    assert len(logs) == 1, logs
    with open(os.path.join(tmp_path, "logs", logs[0])) as f:
        text = f.read()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom with log_dir" in text
    assert "cannot be imported" in text
    assert "RuntimeError: boom with log_dir" in srv.output()     # and on stderr for the operator


def test_app_crashing_the_interpreter_at_import_stops_master(server_factory, tmp_path):
    """A C extension that segfaults at import: no worker can ever start, so the master must
    give up (non-zero exit) instead of forking crashing workers forever."""
    with open(os.path.join(tmp_path, "segv_mod.py"), "w") as f:
        f.write("import ctypes\nctypes.string_at(0)\n")
    srv = server_factory(app="segv_mod:application", workers=2)
    srv.start(wait=False)
    try:
        rc = srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        out = srv.output()
        n = len(re.findall(r"Worker \d+ was killed by SIGSEGV", out))
        raise AssertionError(f"master still running 15 s after every worker crashed at import "
                             f"({n} workers forked and crashed):\n{out}") from None
    out = srv.output()
    assert rc != 0, out
    assert len(re.findall(r"Worker \d+ was killed by SIGSEGV", out)) <= 4, out
    assert session_pids(srv.proc.pid) == []
    assert refused(srv)


# ---------------------------------------------------------------- graceful stop

def test_sigterm_finishes_in_flight_request(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=1).start()
    mark = os.path.join(tmp_path, "inflight")
    slow = SlowRequest(srv, 2, mark, keepalive=True)
    wpid = wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    t0 = time.monotonic()
    srv.send(signal.SIGTERM)
    rc = srv.proc.wait(20)
    took = time.monotonic() - t0
    slow.join(15)
    assert slow.error is None, f"{slow.error!r}\n{srv.output()}"
    status, headers, body = slow.result
    assert status == 200
    assert body == f"slow {wpid}".encode()
    assert slow.after == b"", "the keep-alive connection must be closed after the last response"
    assert rc == 0, srv.output()
    assert 1.0 <= took < 10, took          # waited for the request, not for graceful_timeout
    assert refused(srv), "a new connection was accepted after the stop"
    assert session_pids(srv.proc.pid) == []
    assert "Traceback" not in srv.output()


def test_sigterm_idle_server_exits_0_quickly(server_factory):
    srv = server_factory(app=APP, workers=2).start()
    # an idle keep-alive connection must not hold the stop for graceful_timeout (10 s)
    idle = srv.connect()
    request(idle, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    t0 = time.monotonic()
    assert srv.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    idle.settimeout(5)
    try:
        assert idle.recv(1) == b""
    except ConnectionResetError:
        pass
    idle.close()
    assert refused(srv)
    assert session_pids(srv.proc.pid) == []


def test_sigterm_is_bounded_by_graceful_timeout(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=1, extra={"graceful_timeout": 1}).start()
    mark = os.path.join(tmp_path, "inflight")
    slow = SlowRequest(srv, 60, mark)
    wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    t0 = time.monotonic()
    srv.send(signal.SIGTERM)
    try:
        rc = srv.proc.wait(20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"graceful stop ignored graceful_timeout = 1:\n{srv.output()}") from None
    took = time.monotonic() - t0
    assert took < 1 + 7, took
    assert rc == 0
    slow.join(10)
    assert slow.result is None
    assert session_pids(srv.proc.pid) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_fast_stop_is_prompt(server_factory, sig):
    srv = server_factory(app=APP, workers=2).start()
    assert get_pid(srv) in srv.worker_pids()
    t0 = time.monotonic()
    assert srv.stop(sig) == 0
    assert time.monotonic() - t0 < 3
    assert refused(srv)
    assert session_pids(srv.proc.pid) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_fast_stop_does_not_wait_for_a_long_request(server_factory, tmp_path, sig):
    srv = server_factory(app=APP, workers=1, extra={"graceful_timeout": 60}).start()
    mark = os.path.join(tmp_path, "inflight")
    slow = SlowRequest(srv, 60, mark)
    wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    t0 = time.monotonic()
    srv.send(sig)
    try:
        rc = srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fast stop took over 15 s:\n{srv.output()}") from None
    assert time.monotonic() - t0 < 8
    assert rc == 0
    slow.join(10)
    assert slow.result is None, "a fast stop must not wait for the 60 s request"
    assert session_pids(srv.proc.pid) == []


def test_sigint_during_graceful_stop_turns_fast(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=1, extra={"graceful_timeout": 60}).start()
    mark = os.path.join(tmp_path, "inflight")
    SlowRequest(srv, 60, mark)
    wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    srv.send(signal.SIGTERM)
    wait_until(lambda: "graceful stop" in srv.output(), 5, what="the graceful stop to begin")
    t0 = time.monotonic()
    srv.send(signal.SIGINT)
    try:
        srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGINT did not cut the graceful stop short:\n{srv.output()}") from None
    assert time.monotonic() - t0 < 8
    assert session_pids(srv.proc.pid) == []


# ---------------------------------------------------------------- dead workers

def test_killed_worker_is_replaced(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=2).start()
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    mark = os.path.join(tmp_path, "inflight")
    slow = SlowRequest(srv, 2, mark)
    busy = wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    assert busy in pids
    victim = [p for p in pids if p != busy][0]
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: (lambda w: len(w) == 2 and victim not in w and w)(srv.worker_pids()), 10,
                     what="a replacement worker")
    assert busy in new
    replacement = [p for p in new if p != busy][0]
    # the request in flight on the other worker is unaffected
    slow.join(15)
    assert slow.error is None, repr(slow.error)
    assert slow.result[0] == 200 and slow.result[2] == f"slow {busy}".encode()
    # and requests keep being served, by live workers only
    served = {get_pid(srv) for _ in range(20)}
    assert served <= set(new)
    wait_until(lambda: f"Worker {replacement} ready" in srv.output(), 10, what="the replacement to be ready")
    assert re.search(rf"Worker {victim} was killed by SIGKILL", srv.output())
    assert srv.proc.poll() is None
    assert srv.stop() == 0


def test_all_workers_killed_repeatedly_still_recovers(server_factory):
    srv = server_factory(app=APP, workers=2).start()
    for _ in range(3):
        old = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
        for p in old:
            os.kill(p, signal.SIGKILL)
        wait_until(lambda: (lambda w: len(w) == 2 and not set(w) & set(old))(srv.worker_pids()), 15,
                   what="replacement workers")
    wait_until(lambda: (lambda p: p if p in srv.worker_pids() else None)(get_pid(srv)), 10,
               what="a request served by a replacement")
    assert srv.proc.poll() is None
    assert srv.stop() == 0


def test_workers_exit_when_master_is_killed(server_factory):
    srv = server_factory(app=APP, workers=2).start()
    workers = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(5)
    wait_until(lambda: not any(p in session_pids(srv.proc.pid) for p in workers), 10,
               what="orphaned workers to exit")


# ---------------------------------------------------------------- TTIN / TTOU

def test_ttin_ttou_within_bounds(server_factory):
    srv = server_factory(app=APP, workers=1, extra={"max_workers": 3}).start()

    def count(n):
        pids = wait_until(lambda: len(srv.worker_pids()) == n and srv.worker_pids(), 10,
                          what=f"{n} worker(s), have {srv.worker_pids()}")
        for p in pids:     # all booted (retiring a booting worker is tested below)
            wait_until(lambda: f"Worker {p} ready" in srv.output(), 10, what=f"worker {p} to be ready")
        assert get_pid(srv) in srv.worker_pids()

    def log_count(text):
        return srv.output().count(text)

    count(1)
    srv.send(signal.SIGTTIN)
    count(2)
    srv.send(signal.SIGTTIN)
    count(3)
    n = log_count("already at max_workers")
    srv.send(signal.SIGTTIN)
    wait_until(lambda: log_count("already at max_workers") == n + 1, 5, what="the TTIN at the ceiling")
    assert len(srv.worker_pids()) == 3
    srv.send(signal.SIGTTOU)
    count(2)
    srv.send(signal.SIGTTOU)
    count(1)
    n = log_count("already at min_workers")
    srv.send(signal.SIGTTOU)
    wait_until(lambda: log_count("already at min_workers") == n + 1, 5, what="the TTOU at the floor")
    assert len(srv.worker_pids()) == 1
    srv.send(signal.SIGTTIN)
    count(2)
    # workers removed by TTOU stop cleanly: not counted as deaths
    assert "was killed" not in srv.output() and "exited with code" not in srv.output(), srv.output()
    assert srv.stop() == 0


SLOW_BOOT = """
import time
time.sleep(1.0)       # a slow import (a big Django project)
from apps_process import pid_app as application
"""


def test_ttou_while_worker_is_booting_is_a_clean_stop(server_factory, tmp_path):
    with open(os.path.join(tmp_path, "slowboot.py"), "w") as f:
        f.write(SLOW_BOOT)
    srv = server_factory(app="slowboot:application", workers=1, extra={"max_workers": 2}).start()
    first = srv.worker_pids()
    srv.send(signal.SIGTTIN)
    booting = wait_until(lambda: (lambda w: len(w) == 2 and [p for p in w if p not in first])(srv.worker_pids()),
                         5, what="the second worker")[0]
    srv.send(signal.SIGTTOU)          # retire it while it still imports the app
    wait_until(lambda: srv.worker_pids() == first, 10, what="back to one worker")
    wait_until(lambda: f"Worker {booting} " in srv.output(), 5, what="the master to report the worker")
    out = srv.output()
    assert f"Worker {booting} ready" not in out
    # it was stopped on purpose: not a crash, not counted towards the restart backoff
    assert f"Worker {booting} stopped" in out, out
    assert "was killed" not in out and "exited with code" not in out, out
    assert get_pid(srv) == first[0]
    assert srv.stop() == 0


def test_ttou_retires_worker_gracefully(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=1, extra={"max_workers": 2}).start()
    srv.send(signal.SIGTTIN)
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    # keep both workers busy, then shrink: whichever worker is retired finishes its request
    marks = [os.path.join(tmp_path, f"m{i}") for i in range(2)]
    slows = []
    for m in marks:
        slows.append(SlowRequest(srv, 2, m))
        try:
            wait_until(lambda: read_mark(m), 10, what="a slow request to reach the app")
        except AssertionError as e:
            raise AssertionError(f"{e}: marks {[read_mark(x) for x in marks]}, workers {pids} (now "
                                 f"{srv.worker_pids()}), client errors {[x.error for x in slows]}\n"
                                 f"{srv.output()}") from None
    assert {read_mark(m) for m in marks} == set(pids)
    srv.send(signal.SIGTTOU)
    for s in slows:
        s.join(15)
        assert s.error is None and s.result[0] == 200, (s.error, s.result)
    wait_until(lambda: len(srv.worker_pids()) == 1, 10, what="1 worker")
    assert srv.stop() == 0


# ---------------------------------------------------------------- HUP

VERSIONED = '''
import os
VERSION = {v!r}

def application(environ, start_response):
    body = ("%s %d" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def get_text(server):
    with server.connect() as s:
        status, _, body = request(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200, body
    return body.decode()


def test_hup_replaces_workers_and_reloads_code(server_factory, tmp_path):
    with open(os.path.join(tmp_path, "versioned.py"), "w") as f:
        f.write(VERSIONED.format(v="one"))
    srv = server_factory(app="versioned:application", workers=2).start()
    old = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    assert get_text(srv).startswith("one ")
    with open(os.path.join(tmp_path, "versioned.py"), "w") as f:
        f.write(VERSIONED.format(v="two"))
    srv.send(signal.SIGHUP)
    new = wait_until(lambda: (lambda w: len(w) == 2 and not set(w) & set(old) and w)(srv.worker_pids()), 15,
                     what=f"2 new workers replacing {old}")
    for _ in range(10):
        version, pid = get_text(srv).split()
        assert version == "two" and int(pid) in new
    assert srv.proc.poll() is None
    out = srv.output()
    for p in old:
        assert f"Worker {p} stopped" in out, out
    assert "was killed" not in out and "exited with code" not in out
    assert srv.stop() == 0


def test_hup_lets_old_worker_finish_its_request(server_factory, tmp_path):
    srv = server_factory(app=APP, workers=1).start()
    mark = os.path.join(tmp_path, "inflight")
    slow = SlowRequest(srv, 2, mark)
    old = wait_until(lambda: read_mark(mark), 10, what="the slow request to reach the app")
    srv.send(signal.SIGHUP)
    slow.join(15)
    assert slow.error is None, repr(slow.error)
    assert slow.result[0] == 200 and slow.result[2] == f"slow {old}".encode()
    new = wait_until(lambda: (lambda w: len(w) == 1 and old not in w and w)(srv.worker_pids()), 10,
                     what="the new worker")
    assert get_pid(srv) == new[0]
    assert srv.stop() == 0


def test_hup_with_broken_code_keeps_old_workers_serving(server_factory, tmp_path):
    path = os.path.join(tmp_path, "versioned.py")
    with open(path, "w") as f:
        f.write(VERSIONED.format(v="good"))
    srv = server_factory(app="versioned:application", workers=1).start()
    old = get_text(srv).split()[1]
    with open(path, "w") as f:
        f.write("raise RuntimeError('deploy went wrong')\n")
    srv.send(signal.SIGHUP)
    wait_until(lambda: "deploy went wrong" in srv.output(), 10, what="the new worker's import failure")
    # the master keeps running and the old worker keeps serving the old code
    for _ in range(5):
        assert get_text(srv) == f"good {old}"
    assert srv.proc.poll() is None
    assert "Reload failed" in srv.output()
    # the failed reload is over: a fixed deploy is picked up by the next HUP
    with open(path, "w") as f:
        f.write(VERSIONED.format(v="fixed"))
    srv.send(signal.SIGHUP)
    wait_until(lambda: get_text(srv).startswith("fixed "), 20, interval=0.2, what="the fixed code to be served")
    wait_until(lambda: len(srv.worker_pids()) == 1, 10, what="the old worker to retire")
    assert srv.stop() == 0


# ---------------------------------------------------------------- pid_file

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pid_file_written_and_removed(server_factory, tmp_path, sig):
    srv = server_factory(app=APP, workers=1, extra={"pid_file": "run.pid"}).start()
    pid_file = os.path.join(tmp_path, "run.pid")   # relative to the config file's directory
    with open(pid_file) as f:
        assert f.read() == f"{srv.proc.pid}\n"
    assert srv.stop(sig) == 0
    assert not os.path.exists(pid_file)


def test_pid_file_absolute_path(server_factory, tmp_path):
    os.mkdir(os.path.join(tmp_path, "run"))
    pid_file = os.path.join(tmp_path, "run", "blaze.pid")
    srv = server_factory(app=APP, workers=1, extra={"pid_file": pid_file}).start()
    with open(pid_file) as f:
        assert int(f.read()) == srv.proc.pid
    srv.send(signal.SIGHUP)      # a reload keeps the pid file
    wait_until(lambda: "Worker" in srv.output() and srv.output().count(" ready") >= 2, 10, what="reload")
    assert os.path.exists(pid_file)
    assert srv.stop() == 0
    assert not os.path.exists(pid_file)
