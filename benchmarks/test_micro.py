"""Microbenchmarks of the in-process pieces (pytest-benchmark), and one real
request's round trip.

* config loading: config.ini.example through blazewsgi.config (every
  setting parsed and validated), what a start or a HUP reload pays;
* response header framing: blazewsgi.wsgi._header_block, run once per
  response in the worker (the C side frames the block it returns);
* environ building, its Python half: a key set's compiled builder making a
  request's environ from C's values block (a connection's first request,
  or one whose values keep changing), and a kept-alive connection's next
  request, the remembered environ with one changed value stored and copied
  (csrc/blaze_http.c, env_delta; wsgi._memo_update);
* the C half runs only inside a worker, so it is measured through a real
  request: one GET/response round trip on a kept-alive loopback
  connection, for ours and (as the yardstick) bjoern. That includes the
  kernel's loopback and this client's Python, identical for both; on this
  machine the median is mostly the wake-ups (min ~10 us, median ~80 us).
  Instructions per request inside the worker: benchmarks/callgrind.sh.

    pytest benchmarks/test_micro.py --benchmark-json=/tmp/micro.json
"""

import socket
import types

import pytest

import harness

pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

HEADERS_SMALL = [("Content-Type", "text/plain"), ("Content-Length", "13")]
# what a Django HttpResponse sends (DEBUG off, default middleware)
HEADERS_DJANGO = [("Content-Type", "text/html; charset=utf-8"), ("X-Frame-Options", "DENY"),
                  ("Content-Length", "5"), ("Vary", "Cookie"), ("X-Content-Type-Options", "nosniff"),
                  ("Referrer-Policy", "same-origin"), ("Cross-Origin-Opener-Policy", "same-origin")]


def test_micro_config_load(benchmark):
    config = pytest.importorskip("blazewsgi.config")
    example = harness.REPO_ROOT / "config.ini.example"
    benchmark.group = "micro"
    benchmark.extra_info["what"] = "Config.load(config.ini.example): parse + validate every setting"
    cfg = benchmark(config.Config.load, str(example))
    assert cfg.min_workers >= 1


@pytest.mark.parametrize("headers", [HEADERS_SMALL, HEADERS_DJANGO], ids=["2-headers", "django-7-headers"])
def test_micro_header_block(benchmark, headers):
    wsgi = pytest.importorskip("blazewsgi.wsgi")
    benchmark.group = "micro"
    benchmark.extra_info["what"] = f"wsgi._header_block of {len(headers)} response headers"
    block = benchmark(wsgi._header_block, headers)
    assert block.count(b"\0") == 2 * len(headers) - 1


# the CGI names C sends for wrk's GET / (values in this order), as in a worker
ENV_KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "PATH_INFO", "HTTP_HOST", "HTTP_USER_AGENT", "HTTP_ACCEPT")
ENV_VALUES = ("127.0.0.1", "50412", "/", "127.0.0.1:8000", "Mozilla/5.0 (X11; Linux x86_64) micro", "*/*")
ENV_BLOCK = "\0".join(ENV_VALUES).encode("latin-1")     # C's values block for them


def _environ_base(wsgi):
    """The listener's base environ, as a worker's wsgi.setup makes it."""
    wsgi.setup(None, [types.SimpleNamespace(kind="tcp", server_name="127.0.0.1", server_port="8000")], True)
    return wsgi._bases[0]


def test_micro_environ_whole(benchmark):
    wsgi = pytest.importorskip("blazewsgi.wsgi")
    base, build = _environ_base(wsgi), wsgi._compiled_builder(ENV_KEYS)
    benchmark.group = "micro"
    benchmark.extra_info["what"] = f"an environ built whole: a compiled builder, {len(ENV_KEYS)} values from C's block"
    environ = benchmark(build, base, ENV_BLOCK)
    assert environ["PATH_INFO"] == "/" and environ["HTTP_ACCEPT"] == "*/*" and environ["SERVER_PORT"] == "8000"


@pytest.mark.parametrize("changed", [0, 1], ids=["unchanged", "one-changed"])
def test_micro_environ_remembered(benchmark, changed):
    """A kept-alive connection's next request: C sent delta = changed (0: the
    same values again, as wrk and most API clients send; 1: one value, here the
    path, whose index and new value make the block)."""
    wsgi = pytest.importorskip("blazewsgi.wsgi")
    remembered = wsgi._compiled_builder(ENV_KEYS)(_environ_base(wsgi), ENV_BLOCK)
    delta = bytes([ENV_KEYS.index("PATH_INFO")]) + b"/other"

    def next_request():            # as blaze_py_request does it
        if changed:
            wsgi._memo_update(remembered, ENV_KEYS, changed, delta)
        return remembered.copy()

    benchmark.group = "micro"
    benchmark.extra_info["what"] = (f"a kept-alive connection's next environ: {changed} changed value(s) stored, "
                                    "then the remembered environ copied")
    environ = benchmark(next_request)
    assert environ["PATH_INFO"] == ("/other" if changed else "/") and environ is not remembered
    assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ["SERVER_PORT"] == "8000"


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: micro\r\nAccept: */*\r\n\r\n"
BODY = b"Hello, World!"


@pytest.fixture(scope="module", params=["blazewsgi", "bjoern"])
def hello_server(request, app_specs, tmp_path_factory):
    launcher = harness.LAUNCHERS[request.param]
    reason = launcher.unavailable()
    if reason:
        pytest.skip(f"{request.param}: not installed: {reason}")
    log = tmp_path_factory.mktemp(f"micro-{request.param}") / "server.log"
    with harness.Server(launcher, app_specs.get("hello"), 1, log) as server:
        yield request.param, server


def test_micro_request_round_trip(benchmark, hello_server):
    name, server = hello_server
    sock = socket.create_connection((harness.HOST, server.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip():
        sock.sendall(REQUEST)
        data = b""
        while not data.endswith(BODY):  # one small response: usually one recv
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    benchmark.group = "micro"
    benchmark.extra_info["what"] = f"{name}: one keep-alive GET / (hello) round trip on loopback"
    try:
        response = benchmark.pedantic(round_trip, rounds=2000, iterations=1, warmup_rounds=200)
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 200")
