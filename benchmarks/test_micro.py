"""Microbenchmarks of the in-process pieces (pytest-benchmark), and one real
request's round trip.

* config loading: config.ini.example through blazewsgi.config (every
  setting parsed and validated), what a start or a HUP reload pays;
* response header framing: blazewsgi.wsgi._header_block, run once per
  response in the worker (the C side frames the block it returns);
* the C environ builder runs only inside a worker, so it is measured through
  a real request: one GET/response round trip on a kept-alive loopback
  connection, for ours and (as the yardstick) bjoern. That includes the
  kernel's loopback and this client's Python, identical for both.

    pytest benchmarks/test_micro.py --benchmark-json=/tmp/micro.json
"""

import socket

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
