"""Unix sockets (and TCP next to them): modes, cleanup, stale files, refusing to steal."""
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import free_port, request, wait_until

APP = "apps_process:pid_app"



@pytest.fixture
def make_server(server_factory):
    """Like server_factory, but each server gets its own directory (config + log)."""
    def make(app=APP, name="s", **kw):
        return server_factory(app, own_dir=name, **kw)
    return make


def unix_get(path, target="/"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        return request(s, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    finally:
        s.close()


def curl_unix(path, target="/"):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--unix-socket", path, "-w", "\n%{http_code}",
                          f"http://localhost{target}"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def tcp_get(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((host, port))
        return request(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        s.close()


def unix_refused(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        s.close()
    return False


def make_stale_socket(path):
    """A socket file bound (and listened on) by a process that then exited."""
    code = ("import os, socket, sys\n"
            "os.umask(0o022)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "s.bind(sys.argv[1]); s.listen(1)\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=20)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert unix_refused(path)


def wait_exit(srv, timeout=15):
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server still running after {timeout}s:\n{srv.output()}")


@pytest.mark.parametrize("mode", [0o666, 0o600, 0o660], ids=["0666", "0600", "0660"])
def test_two_unix_sockets(make_server, sockdir, mode):
    a = os.path.join(sockdir, "a.sock")
    b = os.path.join(sockdir, "b.sock")
    srv = make_server(bind=[a, "unix:" + b], workers=2, extra={"socket_mode": "%04o" % mode}).start()
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    for path in (a, b):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode, f"{path}: {oct(stat.S_IMODE(st.st_mode))}"
        status, headers, body = unix_get(path)
        assert status == 200 and int(body) in pids
        code, text = curl_unix(path)
        assert code == 200 and int(text) in pids
        # keep-alive over a Unix socket
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            for _ in range(3):
                assert request(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert srv.stop() == 0
    assert not os.path.exists(a) and not os.path.exists(b)
    assert os.listdir(sockdir) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_socket_files_removed_after_fast_stop(make_server, sockdir, sig):
    a = os.path.join(sockdir, "a.sock")
    srv = make_server(bind=[a]).start()
    assert srv.stop(sig) == 0
    assert not os.path.exists(a)


def test_socket_files_removed_when_app_cannot_be_imported(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    srv = make_server(app="no_such_module_abc:application", bind=[a]).start(wait=False)
    assert wait_exit(srv) == 3
    assert not os.path.exists(a)


def test_post_body_over_unix_socket(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    srv = make_server(bind=[a]).start()
    body = os.urandom(1024 * 1024 + 17)
    with srv.connect() as s:
        status, _, resp = request(s, b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                                  + body)
    assert status == 200
    assert resp.split()[1] == str(len(body)).encode()


def test_environ_for_unix_socket(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    srv = make_server(app="apps:echo_app", bind=[a]).start()
    with srv.connect() as s:
        status, _, body = request(s, b"GET /json HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n")
    env = json.loads(body)
    assert status == 200
    assert env["HTTP_HOST"] == "example.org"
    assert env["wsgi.url_scheme"] == "http"
    assert isinstance(env.get("SERVER_NAME"), str) and env["SERVER_NAME"]
    assert isinstance(env.get("SERVER_PORT"), str) and env["SERVER_PORT"]


def test_stale_socket_file_is_replaced(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    make_stale_socket(a)
    assert stat.S_IMODE(os.lstat(a).st_mode) == 0o755     # created under umask 022
    srv = make_server(bind=[a], extra={"socket_mode": "0666"}).start()
    assert unix_get(a)[0] == 200
    assert curl_unix(a)[0] == 200
    st = os.lstat(a)
    assert stat.S_IMODE(st.st_mode) == 0o666             # a new file, made by the server
    assert srv.stop() == 0
    assert not os.path.exists(a)


def test_socket_left_by_killed_server_is_reused(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    first = make_server(bind=[a], workers=2).start()
    os.killpg(first.proc.pid, signal.SIGKILL)      # master and workers, no cleanup possible
    first.proc.wait(10)
    wait_until(lambda: first.worker_pids() == [] and unix_refused(a), 10, what="the killed server to be gone")
    assert stat.S_ISSOCK(os.lstat(a).st_mode)       # the file is left behind
    second = make_server(bind=[a]).start()
    assert unix_get(a)[0] == 200
    assert second.stop() == 0
    assert not os.path.exists(a)


def test_path_of_a_live_server_is_not_stolen(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    c = os.path.join(sockdir, "c.sock")
    first = make_server(bind=[a]).start()
    first_pid = int(unix_get(a)[2])
    ino = os.lstat(a).st_ino
    # the second server binds c.sock first, then fails on a.sock
    second = make_server(bind=[c, a]).start(wait=False)
    rc = wait_exit(second)
    out = second.output()
    assert rc == 1, f"exit code {rc}:\n{out}"
    assert a in out and "in use" in out, out
    assert "Traceback" not in out
    assert "Worker" not in out, "no worker may start"
    assert not os.path.exists(c), "the second server must clean up what it bound"
    # the first keeps serving on the same file
    assert os.lstat(a).st_ino == ino
    for _ in range(5):
        status, _, body = unix_get(a)
        assert status == 200 and int(body) == first_pid
    assert curl_unix(a)[0] == 200
    assert first.proc.poll() is None
    assert first.stop() == 0
    assert not os.path.exists(a)


def test_regular_file_at_socket_path_is_left_alone(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    with open(a, "w") as f:
        f.write("precious data\n")
    os.chmod(a, 0o640)
    srv = make_server(bind=[a]).start(wait=False)
    rc = wait_exit(srv)
    out = srv.output()
    assert rc == 1, f"exit code {rc}:\n{out}"
    assert a in out and "not a socket" in out, out
    assert "Traceback" not in out and "Worker" not in out
    st = os.lstat(a)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    with open(a) as f:
        assert f.read() == "precious data\n"


def test_directory_at_socket_path_is_left_alone(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    os.mkdir(a)
    srv = make_server(bind=[a]).start(wait=False)
    rc = wait_exit(srv)
    out = srv.output()
    assert rc == 1, out
    assert a in out and "Traceback" not in out
    assert os.path.isdir(a)


def test_missing_parent_directory(make_server, sockdir):
    a = os.path.join(sockdir, "nodir", "a.sock")
    srv = make_server(bind=[a]).start(wait=False)
    rc = wait_exit(srv)
    out = srv.output()
    assert rc == 1, out
    assert a in out and "Traceback" not in out and "Worker" not in out


def test_relative_unix_path_is_relative_to_config_file(make_server, tmp_path):
    srv = make_server(bind=["unix:rel.sock"])
    path = os.path.join(srv.tmp, "rel.sock")
    assert len(path) < 100, path
    srv.bind = [path]          # conftest connects to bind[0]; the config file keeps unix:rel.sock
    srv.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert unix_get(path)[0] == 200
    assert srv.stop() == 0
    assert not os.path.exists(path)


def test_mixed_tcp_and_unix(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    b = os.path.join(sockdir, "b.sock")
    port = free_port()
    srv = make_server(bind=[a, f"127.0.0.1:{port}", "unix:" + b], workers=2,
                      extra={"socket_mode": "0666"}).start()
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    assert int(unix_get(a)[2]) in pids
    assert int(unix_get(b)[2]) in pids
    status, _, body = tcp_get("127.0.0.1", port)
    assert status == 200 and int(body) in pids
    out = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and int(out.stdout) in pids
    assert f"Listening at unix:{a}" in srv.output()
    assert f"Listening at 127.0.0.1:{port}" in srv.output()
    assert srv.stop() == 0
    assert not os.path.exists(a) and not os.path.exists(b)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def test_hup_keeps_the_socket_files(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    srv = make_server(bind=[a], extra={"socket_mode": "0666"}).start()
    old = srv.worker_pids()
    ino = os.lstat(a).st_ino
    srv.send(signal.SIGHUP)
    new = wait_until(lambda: (lambda w: len(w) == 1 and w != old and w)(srv.worker_pids()), 10,
                     what="the new worker")
    wait_until(lambda: int(unix_get(a)[2]) == new[0], 10, what="the new worker to serve")
    st = os.lstat(a)
    assert st.st_ino == ino and stat.S_IMODE(st.st_mode) == 0o666
    assert srv.stop() == 0
    assert not os.path.exists(a)


def test_ipv6_loopback(make_server):
    # .ci/setup turns IPv6 on for the loopback interface if it is off
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    srv = make_server(bind=[f"[::1]:{port}"], workers=1)
    srv.start(wait=False)
    wait_until(lambda: srv.proc.poll() is not None or _v6_answers(port), 15, what="the server on [::1]")
    assert srv.proc.poll() is None, srv.output()
    status, _, body = tcp_get("::1", port, socket.AF_INET6)
    assert status == 200 and int(body) in srv.worker_pids()
    out = subprocess.run(["curl", "-sS", "-g", "--max-time", "10", f"http://[::1]:{port}/"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and int(out.stdout) in srv.worker_pids(), out.stderr
    assert f"Listening at [::1]:{port}" in srv.output()
    with socket.socket() as s:      # IPv6 only: nothing on IPv4 127.0.0.1
        assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    assert srv.stop() == 0


def _v6_answers(port):
    try:
        return tcp_get("::1", port, socket.AF_INET6)[0] == 200
    except OSError:
        return False


def test_shutdown_does_not_remove_a_file_that_is_no_longer_ours(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    first = make_server(bind=[a]).start()
    first_pid = int(unix_get(a)[2])
    os.unlink(a)                                   # an operator removed it; another server took the path
    second = make_server(bind=[a]).start()
    second_pid = int(unix_get(a)[2])
    assert second_pid != first_pid
    assert first.stop() == 0
    assert stat.S_ISSOCK(os.lstat(a).st_mode), "the first server removed the second one's socket file"
    assert int(unix_get(a)[2]) == second_pid
    assert second.stop() == 0
    assert not os.path.exists(a)


def test_tcp_port_in_use_fails_cleanly(make_server, sockdir):
    a = os.path.join(sockdir, "a.sock")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        srv = make_server(bind=[a, f"127.0.0.1:{port}"]).start(wait=False)
        rc = wait_exit(srv)
    out = srv.output()
    assert rc == 1, out
    assert f"127.0.0.1:{port}" in out and "address already in use" in out, out
    assert "Traceback" not in out and "Worker" not in out
    assert not os.path.exists(a), "the Unix socket bound before the failure must be removed"


def test_unix_peer_environ(make_server, tmp_path):
    """A Unix socket peer has no address: REMOTE_ADDR is empty, REMOTE_PORT absent."""
    path = os.path.join(str(tmp_path), "env.sock")
    srv = make_server(app="apps:echo_app", bind=[path], extra={"socket_mode": "0600"}).start()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        status, _, body = request(s, b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
    env = json.loads(body)
    assert status == 200
    assert env["REMOTE_ADDR"] == "" and "REMOTE_PORT" not in env
    assert env["SERVER_NAME"] == "localhost"
