"""Configuration: one-line errors with exit code 2, the generated example, the command line.

Every error case uses a config that would otherwise start a real server on
a free port with an app whose import leaves a marker file: a worker that
starts although the configuration is wrong leaves evidence.
"""
import configparser
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, free_port, http_probe, server_env, stop_process, wait_until

from blazewsgi.config import SETTINGS

BIN = os.path.dirname(sys.executable)
BLAZE = os.path.join(BIN, "blazewsgi")
EXAMPLE = os.path.join(ROOT, "config.ini.example")

MARKER_APP = '''
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "IMPORTED"), "w").close()

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"marker"]
'''


def run(args, cwd, timeout=20):
    """Run the CLI to completion (a config error must exit at once)."""
    return subprocess.run(args, cwd=cwd, env=server_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "marker_app.py").write_text(MARKER_APP)
    return tmp_path


VALID = {"wsgi_path": "marker_app:application", "min_workers": "1"}


def write_config(directory, settings=None, text=None, name="config.ini"):
    path = os.path.join(str(directory), name)
    if text is None:
        s = dict(VALID, sockets=f"127.0.0.1:{free_port()}")
        s.update(settings or {})
        text = "[server]\n" + "".join(f"{k} = {v}\n" for k, v in s.items() if v is not None)
    with open(path, "w") as f:
        f.write(text)
    return path


def assert_one_line_error(proc, workdir, *fragments):
    assert proc.returncode == 2, f"exit code {proc.returncode}, stderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    for frag in fragments:
        assert frag in line, f"{frag!r} missing from the error line: {line!r}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert not os.path.exists(os.path.join(str(workdir), "IMPORTED")), "a worker imported the app"
    return line


# (id, settings to add to a valid config (None removes the key), fragments the one line must contain)
ERROR_CASES = [
    ("unknown-key", {"frobnicate_level": "3"}, ["frobnicate_level", "unknown setting"]),
    ("unknown-key-near-miss", {"min-workers": "2"}, ["min-workers", "unknown setting", "min_workers"]),
    ("wrong-type-int", {"min_workers": "two"}, ["min_workers", "'two'", "whole number"]),
    ("wrong-type-bool", {"access_log": "maybe"}, ["access_log", "'maybe'", "true or false"]),
    ("wrong-type-float", {"graceful_timeout": "soon"}, ["graceful_timeout", "'soon'", "not a number"]),
    ("below-minimum", {"min_workers": "0"}, ["min_workers", "0", "minimum"]),
    ("bad-size", {"max_body_size": "lots"}, ["max_body_size", "'lots'", "not a size"]),
    ("bad-choice", {"log_level": "chatty"}, ["log_level", "'chatty'", "not one of"]),
    ("min-greater-than-max", {"min_workers": "4", "max_workers": "2"},
     ["min_workers", "4", "greater than", "max_workers", "2"]),
    ("missing-wsgi-path", {"wsgi_path": None}, ["wsgi_path", "missing"]),
    ("empty-wsgi-path", {"wsgi_path": ""}, ["wsgi_path", "missing"]),
    ("bad-wsgi-path-syntax", {"wsgi_path": "not a module!"}, ["wsgi_path", "'not a module!'"]),
    ("socket-no-port", {"sockets": "localhost"}, ["sockets", "'localhost'"]),
    ("socket-port-range", {"sockets": "127.0.0.1:99999"}, ["sockets", "127.0.0.1:99999", "port"]),
    ("socket-port-not-number", {"sockets": "127.0.0.1:http"}, ["sockets", "127.0.0.1:http", "port"]),
    ("socket-v6-no-brackets", {"sockets": "[::1]8000"}, ["sockets", "[::1]8000"]),
    ("socket-empty-item", {"sockets": "127.0.0.1:8000,,/tmp/x.sock"}, ["sockets", "empty"]),
    ("socket-mode-not-octal", {"socket_mode": "0999"}, ["socket_mode", "'0999'", "octal"]),
    ("socket-mode-words", {"socket_mode": "rw-rw-rw-"}, ["socket_mode", "'rw-rw-rw-'", "octal"]),
    ("socket-mode-too-big", {"socket_mode": "7777"}, ["socket_mode", "7777"]),
    ("ssl-true-without-cert", {"ssl": "true"}, ["ssl_certfile", "missing", "ssl = true"]),
    ("ssl-yes-without-cert", {"ssl": "yes"}, ["ssl_certfile", "missing", "ssl = true"]),
]


@pytest.mark.parametrize("settings,fragments", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_config_error_is_one_line_exit_2(workdir, settings, fragments):
    cfg = write_config(workdir, settings)
    t0 = time.monotonic()
    proc = run([BLAZE, cfg], cwd=workdir)
    assert time.monotonic() - t0 < 10
    assert_one_line_error(proc, workdir, cfg, *fragments)


def test_wsgi_path_file_that_does_not_exist(workdir):
    cfg = write_config(workdir, {"wsgi_path": "project/mysite/wsgi.py"})
    proc = run([BLAZE, cfg], cwd=workdir)
    # relative paths are resolved against the config file's directory, and the message shows where it looked
    assert_one_line_error(proc, workdir, cfg, "wsgi_path", os.path.join(str(workdir), "project/mysite/wsgi.py"),
                          "no such file")


def test_wsgi_path_file_with_callable_that_does_not_exist(workdir):
    cfg = write_config(workdir, {"wsgi_path": "/nonexistent/dir/wsgi.py:app"})
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "wsgi_path", "/nonexistent/dir/wsgi.py", "no such file")


def test_log_dir_that_does_not_exist(workdir):
    cfg = write_config(workdir, {"log_dir": "logs/nowhere"})
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "log_dir", os.path.join(str(workdir), "logs/nowhere"),
                          "no such directory")
    assert not os.path.exists(os.path.join(str(workdir), "logs"))


def test_log_dir_that_is_a_file(workdir):
    (workdir / "afile").write_text("x")
    cfg = write_config(workdir, {"log_dir": "afile"})
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "log_dir", "afile")
    assert (workdir / "afile").read_text() == "x"


def test_pid_file_in_missing_directory(workdir):
    sock = os.path.join(str(workdir), "s.sock")
    cfg = write_config(workdir, {"pid_file": "nodir/blaze.pid", "sockets": sock})
    proc = run([BLAZE, cfg], cwd=workdir)
    # like log_dir: a problem of the configuration, found before anything is bound or forked
    assert_one_line_error(proc, workdir, cfg, "pid_file", os.path.join(str(workdir), "nodir"))
    assert not os.path.exists(sock), "socket file left behind"


def test_duplicate_key(workdir):
    cfg = write_config(workdir, text="[server]\nwsgi_path = marker_app:application\n"
                                     "min_workers = 1\nmin_workers = 2\n")
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "min_workers", "already exists")


def test_no_server_section(workdir):
    cfg = write_config(workdir, text="[app]\nwsgi_path = marker_app:application\n")
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "[server]")


def test_empty_file(workdir):
    cfg = write_config(workdir, text="")
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "[server]")


def test_keys_outside_any_section(workdir):
    cfg = write_config(workdir, text="wsgi_path = marker_app:application\n")
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg)


def test_extra_section(workdir):
    cfg = write_config(workdir, text="[server]\nwsgi_path = marker_app:application\n[workers]\ncount = 2\n")
    proc = run([BLAZE, cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "[workers]")


def test_nonexistent_config_file(workdir):
    missing = os.path.join(str(workdir), "nope.ini")
    proc = run([BLAZE, missing], cwd=workdir)
    assert_one_line_error(proc, workdir, missing, "no such config file")


def test_no_config_and_no_app(workdir):
    proc = run([BLAZE], cwd=workdir)
    assert_one_line_error(proc, workdir, "--app")


def test_bad_command_line_value(workdir):
    cfg = write_config(workdir)
    proc = run([BLAZE, cfg, "--workers", "two"], cwd=workdir)
    assert_one_line_error(proc, workdir, "command line", "min_workers", "'two'")


def test_command_line_min_greater_than_max(workdir):
    cfg = write_config(workdir)
    proc = run([BLAZE, cfg, "--workers", "3", "--max-workers", "2"], cwd=workdir)
    assert_one_line_error(proc, workdir, "min_workers", "greater than", "max_workers")


def test_check_config_reports_errors_too(workdir):
    cfg = write_config(workdir, {"min_workers": "two"})
    proc = run([BLAZE, "--check-config", cfg], cwd=workdir)
    assert_one_line_error(proc, workdir, cfg, "min_workers")


def test_check_config_ok_starts_nothing(workdir):
    port = free_port()
    cfg = write_config(workdir, {"sockets": f"127.0.0.1:{port}"})
    proc = run([BLAZE, "--check-config", cfg], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    assert proc.stderr == ""
    assert not (workdir / "IMPORTED").exists()
    with socket.socket() as s:           # nothing was left bound
        s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------- config.ini.example

def test_example_is_generated_from_settings():
    out = subprocess.run([sys.executable, "-m", "blazewsgi.config"], capture_output=True, text=True,
                         timeout=20, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    with open(EXAMPLE) as f:
        assert out.stdout == f.read(), "config.ini.example is stale: regenerate with python -m blazewsgi.config"


def test_example_passes_check_config(tmp_path):
    proc = run([BLAZE, "--check-config", EXAMPLE], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"blazewsgi: {EXAMPLE}: configuration OK"
    assert proc.stderr == ""


def test_example_has_every_setting_once():
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), strict=True)
    with open(EXAMPLE) as f:
        parser.read_file(f)        # strict: a duplicated key is an error
    assert parser.sections() == ["server"]
    assert list(parser["server"]) == [s.name for s in SETTINGS]
    with open(EXAMPLE) as f:
        text = f.read()
    for st in SETTINGS:
        assert len(re.findall(rf"^{st.name} = ", text, re.M)) == 1, st.name


CONCEPT_KEYS = {
    "sockets": None,     # filled in with a free port
    "min_workers": "2",
    "max_workers": "3",
    "ssl": "false",
    "metrics_port": "9191",
    "rate_limit": "120",
    "scale_threshold_high": "500",
    "scale_threshold_low": "50.5",
    "wsgi_path": "marker_app:application",
    "log_dir": "logs",
}


def test_concept_document_keys_are_settings():
    names = {s.name for s in SETTINGS}
    assert set(CONCEPT_KEYS) <= names


def test_concept_document_keys_are_accepted(workdir, launched):
    (workdir / "logs").mkdir()
    port = free_port()
    metrics_port = free_port()
    settings = dict(CONCEPT_KEYS, sockets=f"127.0.0.1:{port}", metrics_port=str(metrics_port))
    cfg = write_config(workdir, text="[server]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    proc = run([BLAZE, "--check-config", cfg], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    # and the server actually starts with them
    p = launched([BLAZE, cfg], workdir, port)
    assert get(port) == (200, b"marker")
    wait_until(lambda: len(children(p.pid)) == 2, 10, what="2 workers")
    logs = os.listdir(workdir / "logs")
    assert len(logs) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d\.log", logs[0]), logs
    text = (workdir / "logs" / logs[0]).read_text()
    assert "Listening at 127.0.0.1:%d" % port in text
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert b"blazewsgi_requests_total" in r.read()


# ---------------------------------------------------------------- running from the command line

def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(int(x) for x in out.stdout.split())


def get(port, path="/", host="127.0.0.1"):
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return r.status, r.read()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def launched(tmp_path):
    procs = []

    def launch(args, cwd, port):
        log = open(os.path.join(str(tmp_path), f"launched-{len(procs)}.log"), "wb")
        p = subprocess.Popen(args, cwd=str(cwd), env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log_path = log.name
        procs.append((p, log))
        wait_until(lambda: p.poll() is not None or http_probe(
            lambda: socket.create_connection(("127.0.0.1", port), timeout=2)), 15, what="the server to answer")
        assert p.poll() is None, f"server exited with {p.returncode}:\n{open(log.name).read()}"
        return p

    yield launch
    for p, log in procs:
        if p.poll() is None:
            stop_process(p, signal.SIGTERM, 20)
        log.close()


def stop(p):
    p.send_signal(signal.SIGTERM)
    return p.wait(20)


def test_app_and_bind_without_a_file(workdir, launched):
    port = free_port()
    p = launched([BLAZE, "--app", "apps_process:pid_app", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
                 workdir, port)
    pids = wait_until(lambda: len(children(p.pid)) == 2 and children(p.pid), 10, what="2 workers")
    status, body = get(port)
    assert status == 200 and int(body) in pids
    assert stop(p) == 0
    assert refused(port)


def test_python_dash_m(workdir, launched):
    port = free_port()
    p = launched([sys.executable, "-m", "blazewsgi", "--app", "marker_app:application", "-b", f"127.0.0.1:{port}"],
                 workdir, port)
    assert get(port) == (200, b"marker")
    assert len(children(p.pid)) == 1
    assert stop(p) == 0


def test_bind_is_repeatable(workdir, launched):
    p1, p2 = free_port(), free_port()
    p = launched([BLAZE, "--app", "marker_app", "-b", f"127.0.0.1:{p1}", "-b", f"127.0.0.1:{p2}"], workdir, p1)
    assert get(p1) == (200, b"marker")
    assert get(p2) == (200, b"marker")
    assert stop(p) == 0


def test_command_line_overrides_file(workdir, launched):
    file_port, cli_port = free_port(), free_port()
    cfg = write_config(workdir, {"sockets": f"127.0.0.1:{file_port}", "min_workers": "1",
                                 "wsgi_path": "marker_app:application"})
    p = launched([BLAZE, cfg, "--bind", f"127.0.0.1:{cli_port}", "-w", "3", "--app", "apps_process:pid_app"],
                 workdir, cli_port)
    pids = wait_until(lambda: len(children(p.pid)) == 3 and children(p.pid), 10, what="3 workers")
    status, body = get(cli_port)
    assert status == 200 and int(body) in pids      # --app replaced the file's wsgi_path
    assert refused(file_port)                        # --bind replaced the file's sockets
    assert not (workdir / "IMPORTED").exists()
    assert stop(p) == 0


def test_file_values_apply_when_no_flag(workdir, launched):
    port = free_port()
    cfg = write_config(workdir, {"sockets": f"127.0.0.1:{port}", "min_workers": "2",
                                 "wsgi_path": "apps_process:pid_app"})
    p = launched([BLAZE, cfg], workdir, port)
    wait_until(lambda: len(children(p.pid)) == 2, 10, what="2 workers")
    assert stop(p) == 0


def test_example_serves_the_demo_page(tmp_path, launched):
    port = free_port()
    with open(EXAMPLE) as f:
        text = f.read()
    assert "sockets = 127.0.0.1:8000\n" in text
    cfg = tmp_path / "config.ini"
    cfg.write_text(text.replace("sockets = 127.0.0.1:8000\n", f"sockets = 127.0.0.1:{port}\n"))
    p = launched([BLAZE, str(cfg)], tmp_path, port)
    status, body = get(port, "/")
    page = body.decode()
    assert status == 200
    assert "BlazeWSGI" in page and "is serving" in page
    assert "blazewsgi.demo:application" in page
    assert "of 2 worker(s)" in page                  # min_workers = 2 in the example
    assert get(port, "/hello") == (200, b"Hello, World!")
    assert len(children(p.pid)) == 2
    assert stop(p) == 0
    log = open(p.log_path).read()
    assert "WARNING" not in log and "Traceback" not in log, log


def test_every_flag_is_accepted_by_check_config(workdir):
    (workdir / "logs").mkdir()
    proc = run([BLAZE, "--check-config", "--app", "marker_app:application", "--bind", "127.0.0.1:0",
                "-b", "unix:x.sock", "--workers", "2", "--max-workers", "4", "--log-level", "debug",
                "--timeout", "5", "--graceful-timeout", "3", "--keepalive", "2", "--threads", "1",
                "--pid", "p.pid", "--log-dir", "logs"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blazewsgi: <command line>: configuration OK"
    assert not (workdir / "p.pid").exists() and not (workdir / "x.sock").exists()


def test_version(workdir):
    import blazewsgi
    proc = run([BLAZE, "--version"], cwd=workdir)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"BlazeWSGI {blazewsgi.__version__}"


def test_log_level_flag_overrides_file(workdir, launched):
    port = free_port()
    cfg = write_config(workdir, {"sockets": f"127.0.0.1:{port}", "log_level": "info"})
    p = launched([BLAZE, cfg, "--log-level", "warning", "--timeout", "5"], workdir, port)
    assert get(port) == (200, b"marker")
    assert stop(p) == 0
    log = open(p.log_path).read()
    assert "[INFO]" not in log, log
