"""Benchmark harness: start a WSGI server, load it with wrk, measure it from /proc.

Three tables drive everything and are meant to grow:

* WORKLOADS: name -> function preparing an app (an AppSpec) in a scratch dir;
* LAUNCHERS: name -> how to start a server for an AppSpec with N workers
  (directly on 127.0.0.1, or behind nginx on a Unix socket);
* comparisons (test files): "ours and peers P on workload W with N workers and
  C connections, targets T", where a target is a ratio ours/reference on one
  metric and the reference is the fastest of some peers in the same run.

A measurement is a flat, JSON-friendly dict (see Server.measure); results of a
session are collected in RESULTS and summarized into ratios by summarize().
Linux only (/proc), loopback only.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import http.client
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_VENV = Path(os.environ.get("BLAZE_PEERS_VENV", BENCH_DIR / ".peers-venv"))
# ours: the non-editable install setup_peers.sh makes (as a wheel would be), else the
# project's editable .venv (whose import hook adds ~1.5 MiB to every worker's RSS)
BLAZE_VENV = Path(os.environ.get("BLAZE_VENV") or (BENCH_DIR / ".blaze-venv" if (BENCH_DIR / ".blaze-venv" / "bin"
                                                                                   / "blazewsgi").exists()
                                                   else REPO_ROOT / ".venv"))
HOST = "127.0.0.1"  # loopback only, by design
CLK_TCK = os.sysconf("SC_CLK_TCK")

RESULTS: list[dict] = []  # every case of the session, including "not installed" ones


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def bench_seconds() -> int:
    return env_int("BLAZE_BENCH_SECONDS", 10)


def warmup_seconds() -> int:
    return env_int("BLAZE_BENCH_WARMUP", 1)


class Unavailable(Exception):
    """A server or workload that cannot run here (e.g. a peer not installed)."""


class ServerError(Exception):
    """The server did not start, crashed, or answered wrongly."""


# --------------------------------------------------------------------------
# Workloads

MiB = 1024 * 1024


@dataclass
class AppSpec:
    app: str  # "module:callable", importable from cwd / pythonpath
    cwd: Path
    pythonpath: list[Path]
    path: str = "/"
    expect_body: bytes = b""  # readiness check: the body must contain this
    wrk_args: tuple[str, ...] = ()  # per-workload wrk flags: a Lua script (POST body), a header
    db_pid: int | None = None  # a database server the app uses (its CPU is measured apart from "other")


def peers_site_packages() -> Path:
    return Path(_run_python(PEERS_VENV / "bin" / "python", "import sysconfig; print(sysconfig.get_paths()['purelib'])"))


def _bench_app(module: str, expect: bytes, **kw) -> AppSpec:
    return AppSpec(f"benchmarks.apps.{module}:application", REPO_ROOT, [REPO_ROOT], expect_body=expect, **kw)


def hello_workload(scratch: Path) -> AppSpec:
    return _bench_app("hello", b"Hello, World!")


def hello_close_workload(scratch: Path) -> AppSpec:
    """hello-world, but every request on a new connection (the client asks to close)."""
    return _bench_app("hello", b"Hello, World!", wrk_args=("-H", "Connection: close"))


def sleep_workload(scratch: Path) -> AppSpec:
    """A view that waits 10 ms without using CPU: stands for a database round trip."""
    return _bench_app("sleep", b"slept")


def closing_workload(scratch: Path) -> AppSpec:
    """An iterable that counts its close() calls (test_conformance.py)."""
    return _bench_app("closing", b"ok")


def big_response_workload(scratch: Path) -> AppSpec:
    return _bench_app("big", b"x" * 64)


def post_workload(scratch: Path) -> AppSpec:
    """1 MiB request bodies (wrk Lua script); the app reads them whole."""
    return _bench_app("upload", b"received", wrk_args=("-s", str(BENCH_DIR / "wrk" / "post_1mib.lua")))


DJANGO_VIEWS = '''\
from django.contrib.auth.models import User
from django.http import HttpResponse


def hello(request):
    return HttpResponse("Hello")


def orm(request):
    # one indexed row read per request (SQLite or PostgreSQL, the row made at setup)
    return HttpResponse(User.objects.only("username").get(pk=1).username)
'''

# The Django app as a server that never calls the response's close() runs it
# (fastwsgi 0.0.9; test_conformance.py measures which servers do): the
# response is iterated, close() is not called, so Django's request_finished
# (closing old database connections, among others) never runs.
DJANGO_NOCLOSE = '''\
"""The Django app without the response's close(): what a server that skips it runs."""
from myproject.wsgi import application as django_application


def application(environ, start_response):
    return list(django_application(environ, start_response))
'''

DJANGO_URLS = '''\
from django.urls import path

from myproject.views import hello, orm

urlpatterns = [path("", hello), path("orm/", orm)]
'''


def _django_project(scratch: Path, name: str = "djangoproj", databases: str = "") -> Path:
    """`django-admin startproject`, DEBUG off, `migrate` and one user row (SQLite,
    unless `databases` is a DATABASES assignment appended to the settings).

    Django comes from the peers venv and is put on every server's PYTHONPATH,
    so that all servers run the very same Django.
    """
    python = PEERS_VENV / "bin" / "python"
    if not _importable(python, "django"):
        raise Unavailable(f"django not installed in {PEERS_VENV} (run benchmarks/setup_peers.sh)")
    root = scratch / name
    if (root / "ready").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), "-m", "django", "startproject", "myproject", str(root)], check=True)
    settings = root / "myproject" / "settings.py"
    text = settings.read_text()
    for old, new in (("DEBUG = True", "DEBUG = False"), ("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['*']")):
        if old not in text:
            raise RuntimeError(f"unexpected startproject settings: {old!r} not found")
        text = text.replace(old, new)
    settings.write_text(text + databases)
    (root / "myproject" / "views.py").write_text(DJANGO_VIEWS)
    (root / "myproject" / "urls.py").write_text(DJANGO_URLS)
    manage = [str(python), str(root / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=root, check=True)
    subprocess.run([*manage, "shell", "-c",
                    "from django.contrib.auth.models import User; User.objects.create(pk=1, username='bench-user')"],
                   cwd=root, check=True)
    (root / "ready").touch()
    return root


def django_workload(scratch: Path) -> AppSpec:
    """A Django view returning HttpResponse("Hello") through the default middleware."""
    root = _django_project(scratch)
    return AppSpec("myproject.wsgi:application", root, [root, peers_site_packages()], expect_body=b"Hello")


def django_noclose_workload(scratch: Path) -> AppSpec:
    """The Django hello view, its response iterated but never closed (see DJANGO_NOCLOSE)."""
    root = _django_project(scratch)
    (root / "myproject" / "noclose.py").write_text(DJANGO_NOCLOSE)
    return AppSpec("myproject.noclose:application", root, [root, peers_site_packages()], expect_body=b"Hello")


def django_orm_workload(scratch: Path) -> AppSpec:
    """A Django view reading one row through the ORM from SQLite."""
    root = _django_project(scratch)
    return AppSpec("myproject.wsgi:application", root, [root, peers_site_packages()], path="/orm/",
                   expect_body=b"bench-user")


# The PostgreSQL server of django-orm-pg. Connections it must accept at once:
# ours 2 workers x BLAZE_THREADS threads (one persistent connection per thread,
# CONN_MAX_AGE), gevent one per greenlet serving a client connection (64 or so
# under wrk -c64), gthread 2 x GTHREADS, plus backends of the previous server
# still exiting.
PG_MAX_CONNECTIONS = 400
PG_USER = "bench"
PG_CONN_MAX_AGE = 60


def _pg_program(name: str) -> Path | None:
    """initdb / pg_ctl: Debian keeps them off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1]
    on_path = shutil.which(name)
    return Path(on_path) if on_path else None


class Postgres:
    """A throwaway PostgreSQL cluster: `initdb` into a fresh dir under /tmp, `pg_ctl start`
    listening only on a Unix socket in that dir, `pg_ctl stop` at session end.

    As root, initdb and the server run as the `postgres` user (initdb refuses root), who
    cannot reach pytest's 0700 tmp dirs: hence a dir of its own in /tmp. Trust auth
    (only the socket, in a 0700 dir, is reachable).
    """

    def __init__(self) -> None:
        initdb, self.pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            raise Unavailable("PostgreSQL server not installed: no initdb/pg_ctl in /usr/lib/postgresql/*/bin "
                              "or on PATH (benchmarks/setup_peers.sh apt-installs postgresql)")
        self.as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="blaze-bench-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            try:
                shutil.chown(self.dir, "postgres", "postgres")
            except LookupError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise Unavailable("running as root and there is no `postgres` user for initdb") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log = self.dir / "data", self.dir / "postgres.log"
        self.port = 5432  # only names the socket file: no TCP listener
        self.pid: int | None = None
        try:
            self._pg([str(initdb), "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.dir}'\nport = {self.port}\n"
                           f"max_connections = {PG_MAX_CONNECTIONS}\n")
            self._pg([str(self.pg_ctl), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])
            atexit.register(self.stop)
            self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except BaseException:
            self.stop()
            raise

    def _pg(self, argv: list[str]) -> None:
        proc = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, cwd=self.dir)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")

    def django_settings(self) -> str:
        return (f"\nDATABASES = {{'default': {{'ENGINE': 'django.db.backends.postgresql', 'NAME': 'postgres', "
                f"'USER': {PG_USER!r}, 'HOST': {str(self.dir)!r}, 'PORT': {self.port}, "
                f"'CONN_MAX_AGE': {PG_CONN_MAX_AGE}}}}}\n")

    def stop(self) -> None:
        """`pg_ctl stop -m fast` (idempotent), then the dir goes."""
        if self.dir is None:
            return
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.pg_ctl), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


@functools.cache
def postgres() -> Postgres:
    """The session's PostgreSQL server, started on first use (a failed start is retried)."""
    return Postgres()


def django_orm_pg_workload(scratch: Path) -> AppSpec:
    """The django-orm view against a real PostgreSQL (psycopg 3, a persistent connection per thread)."""
    if not _importable(PEERS_VENV / "bin" / "python", "psycopg"):
        raise Unavailable(f"psycopg not installed in {PEERS_VENV} (run benchmarks/setup_peers.sh psycopg)")
    pg = postgres()
    root = _django_project(scratch, "djangoproj-pg", pg.django_settings())
    return AppSpec("myproject.wsgi:application", root, [root, peers_site_packages()], path="/orm/",
                   expect_body=b"bench-user", db_pid=pg.pid)


WORKLOADS: dict[str, Callable[[Path], AppSpec]] = {
    "hello": hello_workload,
    "hello-close": hello_close_workload,
    "django": django_workload,
    "django-noclose": django_noclose_workload,
    "closing": closing_workload,
    "django-orm": django_orm_workload,
    "django-orm-pg": django_orm_pg_workload,
    "sleep10ms": sleep_workload,
    "get-1mib": big_response_workload,
    "post-1mib": post_workload,
}
# nginx's `return 200` can only stand in for these
STATIC_WORKLOADS = ("hello", "hello-close")


# --------------------------------------------------------------------------
# Launchers


@dataclass
class Run:
    """What a launcher needs to build one server's command line."""

    spec: AppSpec
    workers: int
    bind: str  # "127.0.0.1:PORT", or a Unix socket path when behind nginx
    dir: Path  # this run's scratch dir (config files, logs)

    @property
    def unix(self) -> bool:
        return self.bind.startswith("/")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host, int(port)


@dataclass
class Launcher:
    name: str
    python: Path  # the interpreter the server runs on
    argv: Callable[[Run], list[str]]
    requires: tuple[str, ...]  # modules that must import with `python`
    dist: str  # distribution name, for the version
    executable: Path | None = None  # must exist, if given
    packages: tuple[str, ...] = ()  # setup_peers.sh names, to find why an install failed
    max_workers: int | None = None  # None: any
    workloads: tuple[str, ...] | None = None  # None: any
    via_nginx: bool = False  # served through nginx, to the server's Unix socket
    tls: bool = False  # clients speak HTTPS to it (with via_nginx: nginx terminates TLS, over TCP)
    version_fn: Callable[[], str] | None = None
    note: str = ""  # how it is configured, for the report

    def unavailable(self) -> str | None:
        """Why this server cannot run here (not installed, and why), or None."""
        missing = []
        if self.executable is not None and not self.executable.exists():
            missing.append(f"{self.executable} not found")
        elif not self.python.exists():
            missing.append(f"{self.python} not found")
        else:
            missing += [f"cannot import {m}" for m in self.requires if not _importable(self.python, m)]
        if self.via_nginx and not NGINX.exists():
            missing.append(f"{NGINX} not found")
        if not missing:
            return None
        # setup_peers.sh keeps the reason of a failed pip install
        reasons = [(PEERS_VENV / "install-failed" / f"{p}.txt") for p in self.packages]
        found = [r.read_text().strip() for r in reasons if r.exists()]
        return "; ".join(found or missing)

    def unsupported(self, workload: str, workers: int) -> str | None:
        if self.max_workers is not None and workers > self.max_workers:
            return f"{self.name} runs {self.max_workers} process at most"
        if self.workloads is not None and workload not in self.workloads:
            return f"{self.name} only serves {', '.join(self.workloads)}"
        return None

    def version(self) -> str:
        try:
            if self.version_fn is not None:
                return self.version_fn()
            return _run_python(self.python, f"import importlib.metadata as m; print(m.version({self.dist!r}))")
        except Exception:
            return "unknown"


NGINX = Path(shutil.which("nginx") or "/usr/sbin/nginx")
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
BLAZE_PYTHON = BLAZE_VENV / "bin" / "python"


def _blaze(settings: dict[str, Callable[[Run], str] | str] | None = None) -> Callable[[Run], list[str]]:
    """Our server; `settings` go into an INI file (for keys without a flag)."""

    def argv(run: Run) -> list[str]:
        # BLAZE_SERVER_ARGS: extra flags to try options without editing this file
        extra = shlex.split(os.environ.get("BLAZE_SERVER_ARGS", ""))
        cmd = [str(BLAZE_VENV / "bin" / "blazewsgi")]
        if settings:
            ini = run.dir / "blaze.ini"
            values = {k: v(run) if callable(v) else v for k, v in settings.items()}
            ini.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
            cmd.append(str(ini))
        return cmd + ["--app", run.spec.app, "--bind", run.bind, "--workers", str(run.workers), *extra]

    return argv


def _log_dir(run: Run) -> str:
    (run.dir / "logs").mkdir(exist_ok=True)
    return str(run.dir / "logs")


# issue 4: everything observable on (rate_limit: a limit no client reaches, so
# the per-client table is consulted on every request but never refuses) ...
BLAZE_OBSERVED = {"access_log": "true", "log_dir": _log_dir, "metrics_port": lambda run: str(free_port()),
                  "rate_limit": "100000000"}
# ... against everything off
BLAZE_BARE = {"access_log": "false", "metrics_port": "0", "rate_limit": "0"}


def _serve_py(server: str) -> Callable[[Run], list[str]]:
    """bjoern, fastwsgi, meinheld: no command line of their own (peers/serve.py)."""

    def argv(run: Run) -> list[str]:
        return [str(PEERS_PYTHON), str(BENCH_DIR / "peers" / "serve.py"), server,
                "--app", run.spec.app, "--bind", run.bind, "--workers", str(run.workers)]

    return argv


def _gunicorn(worker_class: str, *flags: str) -> Callable[[Run], list[str]]:
    def argv(run: Run) -> list[str]:
        bind = f"unix:{run.bind}" if run.unix else run.bind
        return [str(PEERS_VENV / "bin" / "gunicorn"), "-w", str(run.workers), "-k", worker_class, *flags,
                "-b", bind, run.spec.app]

    return argv


def _uwsgi(run: Run) -> list[str]:
    # --http-socket closes every connection, as gunicorn's sync worker does: a
    # sync worker on a keep-alive socket (--http11-socket) serves one connection
    # until it closes while the other 63 wait unserved, and wrk, which only
    # times completed requests, then shows a tiny latency. --die-on-term:
    # SIGTERM stops (uWSGI's default is to reload). uWSGI closes without saying
    # so, which wrk counts as a read error per request: say it in a header.
    return [str(PEERS_VENV / "bin" / "uwsgi"), "--http-socket", run.bind, "--wsgi", run.spec.app,
            "--master", "--processes", str(run.workers), "--die-on-term", "--disable-logging",
            "--need-app", "--home", str(PEERS_VENV), "--buffer-size", "16384", "--add-header", "Connection: close"]


def _granian(run: Run) -> list[str]:
    host, port = run.host_port
    return [str(PEERS_VENV / "bin" / "granian"), "--interface", "wsgi", "--host", host, "--port", str(port),
            "--workers", str(run.workers), "--no-ws", run.spec.app]


def _sleep_ceiling(run: Run) -> list[str]:
    host, port = run.host_port
    return [str(PEERS_VENV / "bin" / "sleep-ceiling"), host, str(port), str(run.workers)]


def _waitress(run: Run) -> list[str]:
    return [str(PEERS_VENV / "bin" / "waitress-serve"), f"--listen={run.bind}", run.spec.app]


NGINX_CONF = """\
{user}worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 10m;
    keepalive_requests 10000000;
    default_type text/plain;
    {upstream}
    server {{
        listen {listen} backlog=4096;
        location / {{
            {location}
        }}
    }}
}}
"""


def nginx_argv(run_dir: Path, listen: str, workers: int, upstream: str = "", location: str = "") -> list[str]:
    """Write an nginx.conf into run_dir; the command line that runs it in the foreground."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # as root nginx would switch its workers to `nobody`, who cannot reach our
    # 0700 scratch dirs: keep them root (this nginx only ever listens on loopback)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = run_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, workers=workers, dir=run_dir, listen=listen,
                                      upstream=upstream, location=location))
    return [str(NGINX), "-p", str(run_dir), "-e", str(run_dir / "nginx-startup.log"), "-c", str(conf),
            "-g", "daemon off;"]


def _nginx_return_200(run: Run) -> list[str]:
    return nginx_argv(run.dir / "nginx", run.bind, run.workers, location='return 200 "Hello, World!";')


def nginx_front_argv(run_dir: Path, port: int, backend: str, tls: bool = False) -> list[str]:
    """nginx on 127.0.0.1:port proxying to a server's Unix socket (or, terminating TLS, to
    its loopback port), with upstream keep-alive.

    One nginx worker: on 2 cores the app server gets the other one.
    """
    server = backend if tls else f"unix:{backend}"
    upstream = f"upstream app {{ server {server}; keepalive 64; }}"
    listen = f"{HOST}:{port}"
    if tls:
        cert, key = tls_files()
        upstream += f" ssl_certificate {cert}; ssl_certificate_key {key};"
        listen += " ssl"
    location = ('proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; '
                "proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr;")
    return nginx_argv(run_dir / "nginx", listen, 1, upstream=upstream, location=location)


def _nginx_version() -> str:
    out = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True).stderr
    return out.strip().rpartition("/")[2] or "unknown"


def _peer(name: str, argv: Callable[[Run], list[str]], requires: tuple[str, ...], dist: str,
          packages: tuple[str, ...] | None = None, executable: str | None = None, **kw) -> Launcher:
    return Launcher(name, PEERS_PYTHON, argv, requires, dist, packages=packages or (dist,),
                    executable=PEERS_VENV / "bin" / executable if executable else None, **kw)


def _ours(name: str, settings: dict | None = None, **kw) -> Launcher:
    return Launcher(name, BLAZE_PYTHON, _blaze(settings), (), "blazewsgi",
                    executable=BLAZE_VENV / "bin" / "blazewsgi", **kw)


GTHREADS = 4  # gunicorn's gthread worker: threads per worker
BLAZE_THREADS = 128  # ours on the waiting (10 ms sleep) view: app threads per worker


@functools.cache
def tls_files() -> tuple[Path, Path]:
    """(certificate, key): one self-signed ECDSA P-256 certificate, made with `openssl req`
    once per session, for every HTTPS server."""
    d = Path(tempfile.mkdtemp(prefix="blaze-bench-tls-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


BLAZE_TLS = {"ssl": "true", "ssl_certfile": lambda run: str(tls_files()[0]),
             "ssl_keyfile": lambda run: str(tls_files()[1])}


def _uwsgi_tls(option: str) -> Callable[[Run], list[str]]:
    """uWSGI's own TLS.  --https-socket: the workers speak HTTPS but close the connection
    after every response (each request pays a handshake).  --https: uWSGI's router process
    terminates TLS with keep-alive and forwards each request to the workers."""
    def argv(run: Run) -> list[str]:
        cert, key = tls_files()
        return [str(PEERS_VENV / "bin" / "uwsgi"), option, f"{run.bind},{cert},{key}", "--http-keepalive",
                "--wsgi", run.spec.app, "--master", "--processes", str(run.workers), "--die-on-term",
                "--disable-logging", "--need-app", "--home", str(PEERS_VENV)]
    return argv

LAUNCHERS: dict[str, Launcher] = {l.name: l for l in [
    _ours("blazewsgi", note="defaults: access log on (to stderr, i.e. the harness's log file), metrics off"),
    _ours("blazewsgi-observed", BLAZE_OBSERVED, note="access log to log_dir, metrics_port, rate_limit=100000000"),
    _ours("blazewsgi-bare", BLAZE_BARE, note="access_log=false, metrics_port=0, rate_limit=0"),
    _ours("blazewsgi+nginx", {"socket_mode": "0666"}, via_nginx=True,
          note="nginx (1 worker) -> Unix socket, upstream keep-alive"),
    _peer("bjoern", _serve_py("bjoern"), ("bjoern",), "bjoern", note="pre-forked by peers/serve.py"),
    _peer("fastwsgi", _serve_py("fastwsgi"), ("fastwsgi",), "fastwsgi",
          note="its own fork per worker; never calls the response's close() (test_conformance.py), "
               "so Django's request_finished does not run: see django-noclose"),
    _peer("meinheld", _serve_py("meinheld"), ("meinheld",), "meinheld", note="pre-forked by peers/serve.py"),
    _peer("granian", _granian, (), "granian", executable="granian", note="--interface wsgi, default threads"),
    _peer("uwsgi", _uwsgi, (), "uwsgi", executable="uwsgi",
          note="--http-socket (no keep-alive), --master, no request log"),
    _peer("gunicorn-sync", _gunicorn("sync"), ("gunicorn",), "gunicorn", note="no keep-alive (by design)"),
    _peer("gunicorn-gthread", _gunicorn("gthread", "--threads", str(GTHREADS)), ("gunicorn",), "gunicorn",
          note=f"--threads {GTHREADS}"),
    _peer("gunicorn-gevent", _gunicorn("gevent"), ("gunicorn", "gevent"), "gunicorn",
          packages=("gunicorn", "gevent"), note="1000 greenlets per worker (default); on PostgreSQL, psycopg 3 "
          "waits green under gevent's monkey-patching (no psycogreen), a connection per greenlet"),
    _peer("waitress", _waitress, ("waitress",), "waitress", max_workers=1, note="1 process, 4 threads (default)"),
    _peer("gunicorn-sync+nginx", _gunicorn("sync"), ("gunicorn",), "gunicorn", via_nginx=True,
          note="nginx (1 worker) -> Unix socket"),
    _ours("blazewsgi-threads", {"threads": str(BLAZE_THREADS)}, note=f"threads = {BLAZE_THREADS} per worker"),
    _ours("blazewsgi-threads8", {"threads": "8"}, note="threads = 8 (the thread pool's cost on a fast view)"),
    # HTTPS (issue 5): ours terminates TLS in its C loop ...
    _ours("blazewsgi-tls", BLAZE_TLS, tls=True, note="ssl = true (TLS in the worker's C loop)"),
    # ... the usual alternatives: nginx terminating TLS in front, or uWSGI's own TLS
    _peer("nginx-tls+bjoern", _serve_py("bjoern"), ("bjoern",), "bjoern", via_nginx=True, tls=True,
          note="nginx (1 worker) terminates TLS -> loopback TCP, upstream keep-alive"),
    _peer("nginx-tls+gunicorn-sync", _gunicorn("sync"), ("gunicorn",), "gunicorn", via_nginx=True, tls=True,
          note="nginx (1 worker) terminates TLS -> loopback TCP"),
    _peer("uwsgi-https-socket", _uwsgi_tls("--https-socket"), (), "uwsgi", executable="uwsgi", tls=True,
          note="--https-socket: closes after every response (a handshake per request)"),
    _peer("uwsgi-https-router", _uwsgi_tls("--https"), (), "uwsgi", executable="uwsgi", tls=True,
          note="--https router with --http-keepalive, forwarding to the workers"),
    Launcher("nginx", Path(sys.executable), _nginx_return_200, (), "nginx", executable=NGINX,
             packages=("nginx",), workloads=STATIC_WORKLOADS, version_fn=_nginx_version,
             note='`return 200 "Hello, World!"`: the machine\'s ceiling, not a peer'),
    Launcher("sleep-ceiling", Path(sys.executable), _sleep_ceiling, (), "sleep-ceiling",
             executable=PEERS_VENV / "bin" / "sleep-ceiling", packages=("sleep-ceiling",),
             workloads=("sleep10ms",), version_fn=lambda: "peers/sleep_ceiling.c",
             note="C, libevent: answers 10 ms after each request, no Python: the machine's ceiling, not a peer"),
]}
CEILINGS = {"nginx", "sleep-ceiling"}  # never "the fastest peer"


@functools.cache
def _importable(python: Path, module: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


@functools.cache
def _run_python(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# --------------------------------------------------------------------------
# /proc: process tree, CPU time, memory


@dataclass
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    state: str
    ticks: int  # utime + stime + cutime + cstime


def _read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17
    return ProcStat(pid, int(fields[1]), int(fields[2]), fields[0], sum(int(f) for f in fields[11:15]))


def _all_stats() -> list[ProcStat]:
    stats = (_read_stat(int(d)) for d in os.listdir("/proc") if d.isdigit())
    return [s for s in stats if s is not None]


def process_tree(root: int) -> list[ProcStat]:
    """root, its descendants, and anything else in its process group.

    Zombies are kept: their CPU time is still readable and not yet in a parent's cutime.
    cutime/cstime of the live processes hold the time of reaped children, so summing
    all four fields over the tree is the total CPU spent by the server since start.
    """
    stats = _all_stats()
    children: dict[int, list[ProcStat]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    found = {s.pid: s for s in stats if s.pid == root or s.pgrp == root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child.pid] = child
            todo.append(child.pid)
    return list(found.values())


def tree_cpu_ticks(root: int) -> dict[int, int]:
    return {s.pid: s.ticks for s in process_tree(root)}


def _status_kb(pid: int, key: str, filename: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{filename}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kb(root: int) -> dict:
    """Peak RSS (VmHWM) per process, and current PSS (shares counted once) total.

    RSS per worker is the mean peak RSS of the processes other than the root
    (master, arbiter, forking parent) when there are any, else the root's: a
    single-process server is its own worker.
    """
    pids = [s.pid for s in process_tree(root) if s.state != "Z"]
    hwm = {pid: _status_kb(pid, "VmHWM") for pid in pids}
    workers = [kb for pid, kb in hwm.items() if pid != root] or [hwm.get(root, 0)]
    return {
        "rss_per_worker_kb": round(statistics.fmean(workers)),
        "rss_hwm_kb": hwm,
        "rss_hwm_kb_total": sum(hwm.values()),
        "rss_hwm_kb_max": max(hwm.values(), default=0),
        "pss_kb_total": sum(_status_kb(pid, "Pss", "smaps_rollup") for pid in pids),
        "nprocs": len(pids),
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def group_alive(pgid: int) -> bool:
    return any(s.pgrp == pgid and s.state != "Z" for s in _all_stats())


# --------------------------------------------------------------------------
# wrk

_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_MS[unit]


def parse_wrk(text: str) -> dict:
    """Parse `wrk --latency` output into a dict (missing counters are 0)."""
    out: dict = {"socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx_3xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    out["requests"] = int(m.group(1))
    out["duration_s"] = _to_ms(m.group(2), m.group(3)) / 1e3
    out["rps"] = float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1))
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        out[f"latency_p{pct}_ms"] = round(_to_ms(value, unit), 4)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx_3xx"] = int(m.group(1))
    return out


def run_wrk(url: str, seconds: int, threads: int = 1, connections: int = 64, extra: tuple[str, ...] = ()) -> dict:
    """Run wrk; also report its own CPU use, to spot a saturated load generator."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            *extra, url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    result = parse_wrk(proc.stdout)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["wrk_cpu_util"] = round(wrk_cpu / wall, 3)  # 1.0 = one core busy
    result["wrk_argv"] = " ".join(argv)
    return result


# --------------------------------------------------------------------------
# Server lifecycle


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own session / process group (pgid == pid).

    Behind nginx (launcher.via_nginx) there are two groups: the server on a Unix
    socket and nginx in front of it; both count for CPU, the server for memory.
    """

    def __init__(self, launcher: Launcher, spec: AppSpec, workers: int, log_path: Path, connections: int = 64):
        self.launcher, self.spec, self.workers, self.log_path = launcher, spec, workers, log_path
        self.connections = connections
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []  # [server] or [server, nginx]
        self.stop_info: dict = {}
        self.sockdir: str | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.procs[0] if self.procs else None

    @property
    def url(self) -> str:
        scheme = "https" if self.launcher.tls else "http"
        return f"{scheme}://{HOST}:{self.port}{self.spec.path}"

    def __enter__(self) -> Server:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, argv: list[str], log_path: Path, env: dict) -> None:
        with open(log_path, "wb") as log:
            self.procs.append(subprocess.Popen(argv, cwd=self.spec.cwd, env=env, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        env = dict(os.environ)
        # a fresh PYTHONPATH: nothing from the test runner's environment leaks in
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in self.spec.pythonpath)
        if self.launcher.python == BLAZE_PYTHON and BLAZE_VENV != REPO_ROOT / ".venv":
            # the installed blazewsgi, not the source tree the apps' PYTHONPATH also holds
            site = _run_python(BLAZE_PYTHON, "import sysconfig; print(sysconfig.get_paths()['platlib'])")
            env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("VIRTUAL_ENV", None)
        run_dir = self.log_path.parent
        if self.launcher.via_nginx and self.launcher.tls:
            bind = f"{HOST}:{free_port()}"   # nginx terminates TLS in front of a TCP port
        elif self.launcher.via_nginx:
            # AF_UNIX paths are limited to 107 bytes: pytest's tmp paths can be longer
            self.sockdir = tempfile.mkdtemp(prefix="bzb-", dir="/tmp")
            bind = f"{self.sockdir}/app.sock"
        else:
            bind = f"{HOST}:{self.port}"
        self.argv = self.launcher.argv(Run(self.spec, self.workers, bind, run_dir))
        self._spawn(self.argv, self.log_path, env)
        if self.launcher.via_nginx:
            self.front_argv = nginx_front_argv(run_dir, self.port, bind, tls=self.launcher.tls)
            self._spawn(self.front_argv, run_dir / "nginx-front.log", env)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = float(os.environ.get("BLAZE_BENCH_START_TIMEOUT", 30))) -> None:
        """Poll until a GET succeeds with the expected body (no fixed sleeps).

        Behind nginx, 502 means "the server is not listening yet": poll on.
        """
        deadline = time.monotonic() + timeout
        last_error: object = None
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    last_line = (self.log_tail(1) or "no output").strip()
                    raise ServerError(f"{self.launcher.name} exited with {proc.returncode} before ready: "
                                      f"{last_line}\n$ {' '.join(proc.args)}\n{self.log_tail()}")
            try:
                status, body = http_get(self.port, self.spec.path, tls=self.launcher.tls)
            except OSError as e:  # refused / reset while starting up
                last_error = e
                time.sleep(0.02)
                continue
            if status == 502 and self.launcher.via_nginx:
                last_error = "nginx: 502"
                time.sleep(0.02)
                continue
            if status != 200 or self.spec.expect_body not in body:
                raise ServerError(f"{self.launcher.name}: GET {self.spec.path} -> {status} {body[:200]!r}\n"
                                  f"{self.log_tail()}")
            return
        raise ServerError(f"{self.launcher.name}: no HTTP answer within {timeout}s "
                          f"(last: {last_error})\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM each group (nginx first), wait for it to empty, SIGKILL what is left."""
        if not self.procs or self.stop_info:
            return self.stop_info
        t0 = time.monotonic()
        graceful = True
        for proc in reversed(self.procs):
            pgid = proc.pid
            _killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout)
                # workers may outlive the master for a moment: wait for the group to empty
                while group_alive(pgid) and time.monotonic() - t0 < timeout:
                    time.sleep(0.02)
            except subprocess.TimeoutExpired:
                pass
            if group_alive(pgid):
                graceful = False
                _killpg(pgid, signal.SIGKILL)
                proc.wait()
        if self.sockdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)
        self.stop_info = {"stopped_by_sigterm": graceful, "stop_seconds": round(time.monotonic() - t0, 3),
                          "exit_code": self.proc.returncode}
        return self.stop_info

    def warmup(self, seconds: int) -> None:
        if seconds > 0:
            run_wrk(self.url, seconds, connections=self.connections, extra=self.spec.wrk_args)

    def _ticks(self) -> dict[int, int]:
        ticks: dict[int, int] = {}
        for proc in self.procs:
            ticks.update(tree_cpu_ticks(proc.pid))
        return ticks

    def measure(self, seconds: int, threads: int = 1) -> dict:
        """One wrk run; server CPU is the /proc delta of the process tree(s) around it."""
        db = self.spec.db_pid
        ticks0, busy0 = self._ticks(), machine_busy_seconds()
        db0 = tree_cpu_ticks(db) if db else {}
        result = run_wrk(self.url, seconds, threads, self.connections, extra=self.spec.wrk_args)
        ticks1, busy = self._ticks(), machine_busy_seconds() - busy0
        db1 = tree_cpu_ticks(db) if db else {}
        cpu = (sum(ticks1.values()) - sum(ticks0.values())) / CLK_TCK
        # per process, to see how the load spread over workers (keep-alive
        # connections stay with the worker that accepted them)
        result["cpu_util_by_proc"] = sorted(
            (round((t - ticks0.get(pid, 0)) / CLK_TCK / result["duration_s"], 2) for pid, t in ticks1.items()),
            reverse=True)
        for proc in self.procs:
            if proc.poll() is not None:
                raise ServerError(f"{self.launcher.name} died during the run:\n{self.log_tail()}")
        result.update(memory_kb(self.proc.pid))
        if self.launcher.via_nginx:
            result["front_cpu_s"] = round(sum(t - ticks0.get(pid, 0) for pid, t in tree_cpu_ticks(
                self.procs[1].pid).items()) / CLK_TCK, 3)
        result["cpu_s"] = round(cpu, 3)
        result["server_cpu_util"] = round(cpu / result["duration_s"], 3)  # 1.0 = one core busy
        # the app's database server (postmaster and its backends), when the workload has one
        db_cpu = (sum(db1.values()) - sum(db0.values())) / CLK_TCK
        if db:
            result["db_cpu_util"] = round(db_cpu / result["duration_s"], 3)
            result["db_cpu_us_per_req"] = round(db_cpu * 1e6 / result["requests"], 3) if result["requests"] else None
        # cores busy with neither server, its database nor wrk (other jobs, unattributed
        # kernel time): a high value flags a run disturbed by the shared machine
        result["other_cpu_util"] = round((busy - db_cpu) / result["duration_s"] - result["server_cpu_util"]
                                         - result["wrk_cpu_util"], 3)
        result["cpu_us_per_req"] = round(cpu * 1e6 / result["requests"], 3) if result["requests"] else None
        result["errors"] = sum(result["socket_errors"].values()) + result["non_2xx_3xx"]
        return result


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def http_get(port: int, path: str, timeout: float = 2.0, tls: bool = False) -> tuple[int, bytes]:
    if tls:
        import ssl
        conn = http.client.HTTPSConnection(HOST, port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Comparisons, targets and summaries

# metric -> (result key, higher is better)
METRICS = {
    "rps": ("rps", True),
    "cpu": ("cpu_us_per_req", False),
    "p99": ("latency_p99_ms", False),
    "rss": ("rss_per_worker_kb", False),
}
METRIC_LABEL = {"rps": "req/s", "cpu": "CPU/req", "p99": "p99 latency", "rss": "RSS/worker"}


@dataclass(frozen=True)
class Target:
    """A bar from the issue: ours/reference on one metric.

    The reference is the fastest (highest mean req/s) of `against` that ran
    (empty: every peer of the comparison but the nginx ceiling). For "rps" the
    ratio must be >= bound, for the others (lower is better) <= bound.
    """

    metric: str
    bound: float
    against: tuple[str, ...] = ()

    def describe(self) -> str:
        who = " / ".join(self.against) if self.against else "fastest peer"
        if len(self.against) > 1:
            who = f"fastest of {who}"
        op = "≥" if METRICS[self.metric][1] else "≤"
        return f"{METRIC_LABEL[self.metric]} {op} {self.bound}× {who}"


@dataclass(frozen=True)
class Comparison:
    """Ours and its peers on one workload, run interleaved; ratios are ours/peer."""

    workload: str
    workers: int
    ours: str
    peers: tuple[str, ...]
    connections: int = 64
    targets: tuple[Target, ...] = ()
    title: str = ""

    @property
    def id(self) -> str:
        suffix = "" if self.ours == "blazewsgi" else f"-{self.ours}"
        return f"{self.workload}-{self.workers}w-c{self.connections}{suffix}"

    @property
    def servers(self) -> tuple[str, ...]:
        return (self.ours, *self.peers)


def base_result(comparison: Comparison, server: str, round_: int) -> dict:
    """Fields every result carries, so that a JSON file is self-describing."""
    return {
        "comparison": comparison.id, "title": comparison.title, "workload": comparison.workload,
        "server": server, "role": "ours" if server == comparison.ours else "peer", "ours": comparison.ours,
        "peers": list(comparison.peers), "workers": comparison.workers, "connections": comparison.connections,
        "round": round_, "targets": [dataclasses.asdict(t) for t in comparison.targets],
        "note": LAUNCHERS[server].note if server in LAUNCHERS else "",
    }


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _by_comparison(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["comparison"], []).append(r)
    return out


def server_stats(rs: list[dict]) -> dict[str, dict]:
    """Per server of one comparison: means over its ok rounds, or why it has none."""
    stats: dict[str, dict] = {}
    for r in rs:
        stats.setdefault(r["server"], {"server": r["server"], "rounds": [], "problems": [],
                                       "note": r.get("note", ""), "version": r.get("server_version")})
        s = stats[r["server"]]
        if r.get("status") == "ok":
            s["rounds"].append(r)
        else:
            s["problems"].append(f"{r.get('status')}: {r.get('reason', '')}")
    for s in stats.values():
        ok = s.pop("rounds")
        s["ok_rounds"] = len(ok)
        for key in ("rps", "cpu_us_per_req", "latency_p50_ms", "latency_p99_ms", "rss_per_worker_kb",
                    "pss_kb_total", "server_cpu_util", "wrk_cpu_util", "other_cpu_util"):
            s[key] = _mean(ok, key)
        s["other_cpu_max"] = max((r["other_cpu_util"] for r in ok if r.get("other_cpu_util") is not None),
                                 default=None)
        s["errors"] = sum(r.get("errors", 0) for r in ok)
        s["requests"] = sum(r.get("requests", 0) for r in ok)
        s["status"] = "ok" if ok else (sorted(set(s["problems"]))[0] if s["problems"] else "no data")
    return stats


def summarize(results: list[dict]) -> list[dict]:
    """One row per (comparison, server): means and the ratios ours/that server."""
    rows = []
    for cid, rs in _by_comparison(results).items():
        first = rs[0]
        stats = server_stats(rs)
        ours = stats.get(first["ours"], {})
        for name, s in stats.items():
            row = {"comparison": cid, "title": first.get("title", ""), "workload": first["workload"],
                   "workers": first["workers"], "connections": first.get("connections", 64),
                   "ours": first["ours"], "role": "ours" if name == first["ours"] else "peer", **s}
            for metric, (key, _) in METRICS.items():
                row[f"{metric}_ratio"] = _ratio(ours.get(key), s.get(key))
            rows.append(row)
    return rows


def evaluate_targets(results: list[dict]) -> list[dict]:
    """Each target of each comparison: reference server, both values, ratio, verdict."""
    rows = []
    for cid, rs in _by_comparison(results).items():
        first = rs[0]
        stats = server_stats(rs)
        ours = stats.get(first["ours"], {})
        for t in first.get("targets", []):
            target = Target(t["metric"], t["bound"], tuple(t["against"]))
            against = target.against or tuple(p for p in first["peers"] if p not in CEILINGS)
            ran = [stats[p] for p in against if p in stats and stats[p]["rps"] is not None]
            missing = [f"{p} {_short_status(stats[p]['status']) if p in stats else 'not run'}" for p in against
                       if p not in stats or stats[p]["rps"] is None]
            key, higher_better = METRICS[target.metric]
            row = {"comparison": cid, "title": first.get("title", ""), "workload": first["workload"],
                   "workers": first["workers"], "connections": first.get("connections", 64),
                   "target": target.describe(),
                   "reference": None, "ours_value": ours.get(key), "ref_value": None, "ratio": None,
                   "missing": missing}
            if ran:
                ref = max(ran, key=lambda s: s["rps"])
                row.update(reference=ref["server"], ref_value=ref[key], ratio=_ratio(ours.get(key), ref[key]),
                           round_ratios=_round_ratios(rs, first["ours"], ref["server"], key))
                others = [v for v in (ours.get("other_cpu_max"), ref["other_cpu_max"]) if v is not None]
                row["other_cpu_max"] = max(others, default=None)
            if row["ratio"] is None:
                row["verdict"] = "n/a"
            else:
                meets = (lambda r: r >= target.bound) if higher_better else (lambda r: r <= target.bound)
                row["verdict"] = "PASS" if meets(row["ratio"]) else "FAIL"
                # The same servers, interleaved, gave either verdict round by round: a draw of
                # this shared machine more than a lead (RESULTS.md, "How much to trust one run").
                row["split"] = len({meets(r) for r in row.get("round_ratios", [])}) > 1
            rows.append(row)
    return rows


def _round_ratios(rs: list[dict], ours: str, ref: str, key: str) -> list[float]:
    """ours/ref on one metric, round by round (the two ran back to back in each)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in rs:
        if r.get("status") == "ok" and r.get(key) is not None and r["server"] in (ours, ref):
            by_round.setdefault(r["round"], {})[r["server"]] = r[key]
    pairs = [by_round[n] for n in sorted(by_round)]
    return [p[ours] / p[ref] for p in pairs if ours in p and ref in p and p[ref]]


def _fmt(value, spec: str = ".0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def case_title(row: dict) -> str:
    title = row.get("title") or row["workload"]
    return f"{title}, {row['workers']}w, c{row.get('connections', 64)}"


SUMMARY_HEADER = ["case", "server", "status", "req/s", "ours/peer req/s", "µs CPU/req", "ours/peer CPU",
                  "p50 ms", "p99 ms", "ours/peer p99", "RSS/worker MiB", "ours/peer RSS", "errors",
                  "other CPU (max)"]
# cores busy with neither the server nor wrk above which a run was disturbed by the shared machine
DISTURBED = 0.3
TARGET_HEADER = ["case", "target", "reference", "ours", "reference value", "ratio", "by round", "verdict"]
RUN_HEADER = ["case", "server", "round", "status", "req/s", "p50 ms", "p99 ms", "errors",
              "µs CPU/req", "server CPU", "wrk CPU", "other CPU", "CPU by proc", "peak RSS MiB (sum/max)",
              "RSS/worker MiB", "PSS MiB", "procs"]


def _short_status(status: str) -> str:
    return status.split(":", 1)[0]  # "not installed", "unsupported", "error": the reason is in the servers table


def _summary_row(s: dict) -> list[str]:
    ours = s["role"] == "ours"
    ratio = (lambda v: "1.00x" if ours and v is not None else _fmt(v, ".2f", "x"))
    status = s["status"]
    if status != "ok":
        status = _short_status(status)
    elif s["problems"]:
        status = f"ok in {s['ok_rounds']} rounds ({_short_status(s['problems'][0])} in others)"
    name = f"**{s['server']}**" if ours else s["server"]
    return [case_title(s), name, status, _fmt(s["rps"]), ratio(s["rps_ratio"]),
            _fmt(s["cpu_us_per_req"], ".1f"), ratio(s["cpu_ratio"]),
            _fmt(s["latency_p50_ms"], ".2f"), _fmt(s["latency_p99_ms"], ".2f"), ratio(s["p99_ratio"]),
            _fmt(s["rss_per_worker_kb"] and s["rss_per_worker_kb"] / 1024, ".1f"), ratio(s["rss_ratio"]),
            str(s["errors"]) if s["status"] == "ok" else "—", _fmt(s["other_cpu_max"], ".2f")]


SERVER_HEADER = ["server", "version", "configuration", "status"]


def servers_table(results: list[dict]) -> list[list[str]]:
    """One row per server of the session: version, how it was run, why it did not."""
    rows: dict[str, list[str]] = {}
    for r in results:
        row = rows.setdefault(r["server"], [r["server"], "—", r.get("note", ""), "ok"])
        if r.get("server_version"):
            row[1] = r["server_version"]
        if r.get("status") in ("not installed", "error") and row[3] == "ok":
            row[3] = f"{r['status']}: {r.get('reason', '')}".replace("|", "/")[:300]
        elif r.get("status") == "unsupported" and row[3] == "ok":
            row[3] = f"ok where it applies ({r.get('reason', '')})"
    return list(rows.values())


def _target_row(t: dict) -> list[str]:
    spec = ".1f" if "CPU" in t["target"] or "RSS" in t["target"] else ".2f" if "p99" in t["target"] else ".0f"
    scale = (lambda v: v / 1024 if v is not None else None) if "RSS" in t["target"] else (lambda v: v)
    verdict = t["verdict"]
    if t.get("split"):
        verdict += ", rounds split"
    if (t.get("other_cpu_max") or 0) > DISTURBED:
        verdict += f", disturbed (other CPU up to {t['other_cpu_max']:.2f})"
    if t["missing"]:
        verdict += " (" + ", ".join(t["missing"]) + ")"
    return [case_title(t), t["target"], t["reference"] or "—", _fmt(scale(t["ours_value"]), spec),
            _fmt(scale(t["ref_value"]), spec), _fmt(t["ratio"], ".2f", "x"),
            " / ".join(f"{r:.2f}" for r in t.get("round_ratios", [])) or "—", verdict]


def _run_row(r: dict) -> list[str]:
    row = [case_title(r), r["server"], str(r["round"]), r.get("status", "?")]
    if r.get("status") != "ok":  # the reason spans the measurement columns
        return row + [r.get("reason", "").replace("|", "/")[:100]] + [""] * (len(RUN_HEADER) - len(row) - 1)
    return row + [
        _fmt(r["rps"]), _fmt(r.get("latency_p50_ms"), ".2f"), _fmt(r.get("latency_p99_ms"), ".2f"),
        str(r.get("errors", 0)), _fmt(r["cpu_us_per_req"], ".1f"),
        # the database's share, when the app has one, next to the server's
        _fmt(r["server_cpu_util"], ".2f") + (f" (+{r['db_cpu_util']:.2f} db)" if "db_cpu_util" in r else ""),
        _fmt(r["wrk_cpu_util"], ".2f"), _fmt(r.get("other_cpu_util"), ".2f"),
        " / ".join(f"{c:.2f}" for c in r.get("cpu_util_by_proc", [])[:6]),
        f"{r['rss_hwm_kb_total'] / 1024:.1f} / {r['rss_hwm_kb_max'] / 1024:.1f}",
        _fmt(r.get("rss_per_worker_kb") and r["rss_per_worker_kb"] / 1024, ".1f"),
        f"{r['pss_kb_total'] / 1024:.1f}", str(r["nprocs"]),
    ]


def render_markdown(results: list[dict], runs: bool = True) -> str:
    """Targets, servers, ratios per case and server, then one line per run (in the order they ran)."""
    parts = []
    targets = evaluate_targets(results)
    if targets:
        parts.append(_table(TARGET_HEADER, [_target_row(t) for t in targets]))
    parts.append(_table(SERVER_HEADER, servers_table(results)))
    parts.append(_table(SUMMARY_HEADER, [_summary_row(s) for s in summarize(results)]))
    if runs:
        ran = [r for r in results if r.get("status") not in ("not installed", "unsupported")]
        parts.append(_table(RUN_HEADER, [_run_row(r) for r in ran]))
    return "\n\n".join(parts) + "\n"
