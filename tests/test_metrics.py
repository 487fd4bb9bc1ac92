"""The Prometheus metrics endpoint and /healthz, served by the master on metrics_bind:metrics_port.

Worker-side series are written by each worker's C loop into shared memory and summed by
the master (a dead worker's counts are kept: counters never go backwards); master-side
series count what the master did (worker starts/exits, scaling, reloads).

The server's start-up probe (conftest.http_probe) is one request of its own, so the tests
take a baseline scrape and compare deltas.  A counter is read with bounded polling until
it reaches the expected value (a worker bumps it just after handing the response to the
kernel), then compared exactly.  Every scrape is parsed with prometheus_client's parser.
"""
import collections
import http.client
import math
import os
import re
import signal
import socket
import struct
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

import blazewsgi
from conftest import read_response, request, wait_until

APP = "apps_metrics:app"

REQ = "blazewsgi_requests_total"
DUR = "blazewsgi_request_duration_seconds"
REQ_BYTES = "blazewsgi_request_bytes_total"
RESP_BYTES = "blazewsgi_response_bytes_total"
CONNS = "blazewsgi_connections_open"
IN_FLIGHT = "blazewsgi_requests_in_flight"
PARSE_ERRORS = "blazewsgi_parse_errors_total"
RATE_LIMITED = "blazewsgi_rate_limited_total"
WORKERS = "blazewsgi_workers"
STARTS = "blazewsgi_worker_starts_total"
EXITS = "blazewsgi_worker_exits_total"
SCALING = "blazewsgi_scaling_events_total"
RELOADS = "blazewsgi_reloads_total"
GENERATION = "blazewsgi_config_generation"
BUILD = "blazewsgi_build_info"

METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER"}
CLASSES = {"1xx", "2xx", "3xx", "4xx", "5xx"}
CAUSES = {"crash", "hung", "recycled", "retired", "stopped"}
BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, math.inf]

TYPES = {REQ: "counter", DUR: "histogram", REQ_BYTES: "counter", RESP_BYTES: "counter", CONNS: "gauge",
         IN_FLIGHT: "gauge", PARSE_ERRORS: "counter", RATE_LIMITED: "counter", WORKERS: "gauge",
         STARTS: "counter", EXITS: "counter", SCALING: "counter", RELOADS: "counter", GENERATION: "gauge",
         BUILD: "gauge"}


# ---------------------------------------------------------------- scraping

class Scrape:
    """One parsed exposition.  value(): one exact series (0 when absent: a counter cell that
    has not moved may be left out); total(): the sum of a name's series matching labels."""

    def __init__(self, text):
        self.text = text
        self.values = {}
        self.kind = {}
        self.declared = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)\s*$", text))
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.values, f"duplicate series {s.name}{s.labels}:\n{text}"
                self.values[key] = s.value
                self.kind[s.name] = fam.type

    def has(self, name, **labels):
        return (name, frozenset(labels.items())) in self.values

    def value(self, name, **labels):
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def series(self, name):
        return {labels: v for (n, labels), v in self.values.items() if n == name}

    def total(self, name, **labels):
        want = set(labels.items())
        return sum(v for labels_, v in self.series(name).items() if want <= labels_)

    def cells(self, name, *keys):
        out = collections.Counter()
        for labels, v in self.series(name).items():
            d = dict(labels)
            out[tuple(d.get(k) for k in keys)] += v
        return out

    def buckets(self, name=DUR):
        return sorted((float(dict(labels)["le"]), v) for labels, v in self.series(name + "_bucket").items())

    def show(self):
        return "\n".join(line for line in self.text.splitlines() if line.startswith("blazewsgi_"))


def metrics_server(server_factory, workers=1, extra=None, env=None, start=True, bind=None):
    """A server of apps_metrics:app with metrics_port set; started, and its endpoint answering."""
    with socket.socket() as hold:           # held while conftest picks the app port: never the same
        hold.bind(("127.0.0.1", 0))
        mport = hold.getsockname()[1]
        settings = {"metrics_port": mport}
        if bind:
            settings["metrics_bind"] = bind
        settings.update(extra or {})
        srv = server_factory(app=APP, workers=workers, extra=settings, env=env)
    srv.mport, srv.mhost = mport, bind or "127.0.0.1"
    if start:
        srv.start()
        wait_until(lambda: _answers(srv), 5, what=f"the metrics endpoint on port {mport}:\n{srv.output()}")
    return srv


def http_get(host, port, path, timeout=5.0):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def _answers(srv, path="/metrics"):
    try:
        return http_get(srv.mhost, srv.mport, path, timeout=2)[0] > 0
    except OSError:
        return False


def scrape(srv, path="/metrics"):
    status, headers, body = http_get(srv.mhost, srv.mport, path)
    assert status == 200, (path, status, body[:500])
    return Scrape(body.decode())


def healthz(srv):
    return http_get(srv.mhost, srv.mport, "/healthz")[0]


def wait_scrape(srv, pred, timeout=10, what="the metrics"):
    """Scrape until pred(scrape) holds; the last scrape is shown on timeout."""
    last = []

    def probe():
        s = scrape(srv)
        last[:] = [s]
        return s if pred(s) else None
    try:
        return wait_until(probe, timeout, interval=0.05, what=what)
    except AssertionError as e:
        shown = last[0].show() if last else "(no scrape)"
        raise AssertionError(f"{e}\nlast scrape:\n{shown}\n--- server log tail:\n{srv.output()[-2000:]}") from None


def baseline(srv):
    """A scrape once the start-up probe is counted and nothing is in flight."""
    return wait_scrape(srv, lambda s: s.total(REQ) >= 1 and s.value(IN_FLIGHT) == 0,
                       what="the start-up probe to be counted")


def delta(after, before, name, **labels):
    return after.total(name, **labels) - before.total(name, **labels)


def settle_requests(srv, before, n, timeout=10):
    """Wait until requests_total moved by n; then it must be exactly n."""
    after = wait_scrape(srv, lambda s: delta(s, before, REQ) >= n, timeout,
                        what=f"{REQ} to grow by {n}")
    assert delta(after, before, REQ) == n, \
        f"{REQ} grew by {delta(after, before, REQ)}, {n} requests were made:\n{after.show()}"
    return after


class Scraper(threading.Thread):
    """Scrapes continuously (to check that counters never go backwards meanwhile)."""

    def __init__(self, srv, interval=0.02):
        super().__init__(daemon=True)
        self.srv, self.interval = srv, interval
        self.scrapes, self.errors = [], []
        self.halt = threading.Event()
        self.start()

    def run(self):
        while not self.halt.is_set():
            try:
                self.scrapes.append(scrape(self.srv))
            except Exception as e:   # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
            self.halt.wait(self.interval)

    def wait_for(self, more=1, timeout=10):
        """Until `more` further scrapes are done (so the state of now is seen)."""
        n = len(self.scrapes) + len(self.errors)
        wait_until(lambda: len(self.scrapes) + len(self.errors) >= n + more, timeout, what="the scraper thread")

    def finish(self):
        self.wait_for(2)
        self.halt.set()
        self.join(10)
        return self.scrapes


def assert_monotonic(scrapes):
    """No counter series (nor histogram bucket/_count/_sum) is ever lower than in an earlier scrape."""
    assert len(scrapes) >= 3, f"only {len(scrapes)} scrapes"
    for i in range(1, len(scrapes)):
        prev, cur = scrapes[i - 1], scrapes[i]
        for (name, labels), v in prev.values.items():
            if prev.kind.get(name) not in ("counter", "histogram"):
                continue
            now = cur.values.get((name, labels), 0.0)
            assert now >= v, (f"{name}{dict(labels)} went backwards: {v} -> {now} (scrape {i} of {len(scrapes)})"
                              f"\nbefore:\n{prev.show()}\nafter:\n{cur.show()}")


def check_histogram(s):
    """Buckets exactly as specified, cumulative, +Inf == _count == responses in requests_total."""
    b = s.buckets()
    assert [le for le, _ in b] == BUCKETS, f"buckets: {[le for le, _ in b]}"
    counts = [v for _, v in b]
    assert counts == sorted(counts), f"buckets are not cumulative: {b}"
    count = s.value(DUR + "_count")
    assert counts[-1] == count, f"+Inf bucket {counts[-1]} != _count {count}"
    assert count == s.total(REQ), f"_count {count} != sum of {REQ} {s.total(REQ)}:\n{s.show()}"
    assert s.has(DUR + "_sum") and s.value(DUR + "_sum") >= 0


# ---------------------------------------------------------------- raw HTTP

def exchange(srv, data, timeout=10):
    """Send data on a fresh connection, read until the server closes it: (status, all bytes read)."""
    with srv.connect(timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 "), got[:200]
    return int(got.split(b" ", 2)[1]), got


def get(srv, path="/", timeout=10):
    with srv.connect(timeout=timeout) as s:
        status, _, body = request(s, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
                                  timeout=timeout)
    return status, body


def raw(method, path, body=b"", close=False):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def status_class(code):
    return f"{code // 100}xx"


# ---------------------------------------------------------------- /proc: who listens where

def _decode(addr):
    if len(addr) == 8:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(addr, 16)))
    return socket.inet_ntop(socket.AF_INET6, b"".join(struct.pack("<I", int(addr[i:i + 8], 16))
                                                      for i in range(0, 32, 8)))


def listening(pid):
    """[(address, port)] of the TCP sockets process pid listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr, port = fields[1].split(":")
                out.append((_decode(addr), int(port, 16)))
    return sorted(out)


def refused(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


# ================================================================ format, series, bind

def test_exposition_format_series_types_and_master_values(server_factory):
    srv = metrics_server(server_factory, workers=2)
    status, headers, body = http_get(srv.mhost, srv.mport, "/metrics")
    assert status == 200
    ctype = headers.get("content-type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    s = Scrape(body.decode())
    # GET / is the same exposition
    status, headers, body = http_get(srv.mhost, srv.mport, "/")
    assert status == 200 and "version=0.0.4" in headers.get("content-type", ""), (status, headers)
    root = Scrape(body.decode())
    assert {n for n, _ in root.values} == {n for n, _ in s.values}
    # every family declared with its type
    for name, kind in TYPES.items():
        got = s.declared.get(name) or s.declared.get(name[:-len("_total")] if name.endswith("_total") else name)
        assert got == kind, f"# TYPE of {name}: {got!r}, want {kind}:\n{s.text}"
    for name in (REQ_BYTES, RESP_BYTES, CONNS, IN_FLIGHT, PARSE_ERRORS, RATE_LIMITED, WORKERS, STARTS,
                 GENERATION, DUR + "_count", DUR + "_sum"):
        assert s.has(name), f"no series {name}:\n{s.show()}"
    assert s.has(RATE_LIMITED) and s.value(RATE_LIMITED) == 0
    assert s.series(BUILD) == {frozenset({("version", blazewsgi.__version__)}): 1.0}, s.series(BUILD)
    # master-side values at start: two workers started, alive, nothing exited
    s = wait_scrape(srv, lambda x: x.value(WORKERS) == 2, what="2 workers")
    assert s.value(STARTS) == 2, s.show()
    assert s.total(EXITS) == 0 and s.total(SCALING) == 0 and s.total(RELOADS) == 0, s.show()
    for name, key, allowed in ((EXITS, "cause", CAUSES), (SCALING, "direction", {"up", "down"}),
                               (RELOADS, "result", {"ok", "failed"})):
        for labels in s.series(name):
            assert set(dict(labels)) == {key} and dict(labels)[key] in allowed, (name, labels)
    check_histogram(s)
    assert healthz(srv) == 200
    # not a request of the app: the app port still serves the app
    status, body = get(srv, "/metrics")
    assert status == 200 and body.isdigit(), body[:200]
    # bound to metrics_bind's default, 127.0.0.1, by the master only
    master = listening(srv.proc.pid)
    assert ("127.0.0.1", srv.mport) in master, master
    assert [a for a, p in master if p == srv.mport] == ["127.0.0.1"], master
    for pid in srv.worker_pids():
        assert srv.mport not in [p for _, p in listening(pid)], f"worker {pid} holds the metrics socket"
    assert srv.stop() == 0


def test_metrics_bind_is_honoured(server_factory):
    srv = metrics_server(server_factory, bind="127.0.0.2")
    assert scrape(srv).has(WORKERS)
    assert [a for a, p in listening(srv.proc.pid) if p == srv.mport] == ["127.0.0.2"], listening(srv.proc.pid)
    assert refused("127.0.0.1", srv.mport), "metrics_bind = 127.0.0.2 must not listen on 127.0.0.1"


def test_metrics_port_zero_serves_nothing(server_factory):
    with socket.socket() as hold:
        hold.bind(("127.0.0.1", 0))
        unused = hold.getsockname()[1]
    srv = server_factory(app=APP, workers=1, extra={"metrics_port": 0}).start()
    assert get(srv)[0] == 200
    assert listening(srv.proc.pid) == [("127.0.0.1", srv.port)], \
        f"the master listens on more than the app socket: {listening(srv.proc.pid)}"
    assert refused("127.0.0.1", unused)
    assert srv.stop() == 0


# ================================================================ worker-side counters

KEEPALIVE_MIX = [   # (method, path, body, expected status) on one keep-alive connection
    ("GET", "/status/200", b"", 200),
    ("GET", "/status/200", b"", 200),
    ("GET", "/", b"", 200),
    ("HEAD", "/status/200", b"", 200),
    ("POST", "/body", b"hello", 200),
    ("POST", "/status/201", b"abc", 201),
    ("PUT", "/body", b"x" * 100, 200),
    ("PATCH", "/status/500", b"{}", 500),
    ("DELETE", "/status/404", b"", 404),
    ("OPTIONS", "/status/204", b"", 204),
    ("GET", "/status/404", b"", 404),
    ("GET", "/status/404", b"", 404),
    ("GET", "/status/500", b"", 500),
    ("GET", "/status/301", b"", 301),
]
OWN_CONNECTION = [  # (raw request, expected status, method label): one connection each
    (raw("GET", "/raise", close=True), 500, "GET"),                       # the server answers the app's error
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "OTHER"),                 # malformed method: unparsed
    (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "OTHER"),                # unknown method
]


def test_requests_total_counts_each_response_in_its_method_and_status_cell(server_factory):
    srv = metrics_server(server_factory)
    before = baseline(srv)
    expected = collections.Counter()
    with srv.connect() as s:
        for method, path, body, want in KEEPALIVE_MIX:
            if method == "HEAD":
                s.sendall(raw(method, path))
                status, headers, _ = read_response(s, head_only=True)
            else:
                status, headers, _ = request(s, raw(method, path, body))
            assert status == want, (method, path, status)
            assert headers.get("connection", "").lower() != "close", (method, path, headers)
            expected[(method, status_class(want))] += 1
    for data, want, method in OWN_CONNECTION:
        status, _ = exchange(srv, data)
        assert status == want, (data, status)
        expected[(method, status_class(want))] += 1
    n = sum(expected.values())
    after = settle_requests(srv, before, n)
    moved = after.cells(REQ, "method", "status")
    moved.subtract(before.cells(REQ, "method", "status"))
    assert {k: v for k, v in moved.items() if v} == dict(expected), after.show()
    for labels in after.series(REQ):
        d = dict(labels)
        assert set(d) == {"method", "status"} and d["method"] in METHODS and d["status"] in CLASSES, d
    assert delta(after, before, PARSE_ERRORS) == 2, after.show()
    assert delta(after, before, DUR + "_count") == n, after.show()
    check_histogram(after)


PARSE_ERROR_CASES = [   # (raw request, status) with the limits below
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n\r\n", 417),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 300 + b"\r\n\r\n", 431),
    (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
]


def test_parse_errors_count_every_rejected_request(server_factory):
    srv = metrics_server(server_factory, extra={"limit_request_line": 128, "limit_request_field_size": 128,
                                                "max_body_size": 1024})
    before = baseline(srv)
    for data, want in PARSE_ERROR_CASES:
        status, _ = exchange(srv, data)
        assert status == want, (data[:40], status)
    n = len(PARSE_ERROR_CASES)
    after = settle_requests(srv, before, n)
    assert delta(after, before, PARSE_ERRORS) == n, after.show()
    assert delta(after, before, REQ, status="4xx") == 5, after.show()
    assert delta(after, before, REQ, status="5xx") == 2, after.show()
    assert delta(after, before, REQ, method="OTHER", status="4xx") >= 1, "the malformed method is OTHER"
    assert delta(after, before, REQ, method="OTHER", status="5xx") >= 1, "the unknown method is OTHER"
    assert delta(after, before, DUR + "_count") == n
    # good requests do not count as parse errors
    assert get(srv, "/status/404")[0] == 404
    again = settle_requests(srv, after, 1)
    assert delta(again, after, PARSE_ERRORS) == 0


def test_duration_histogram_is_cumulative_and_in_seconds(server_factory):
    srv = metrics_server(server_factory)
    before = baseline(srv)
    check_histogram(before)
    with srv.connect() as s:
        for _ in range(20):
            assert request(s, raw("GET", "/"))[0] == 200
    fast = settle_requests(srv, before, 20)
    check_histogram(fast)
    assert delta(fast, before, DUR + "_count") == 20
    spent = delta(fast, before, DUR + "_sum")
    assert 0 < spent < 20 * 0.25, f"20 trivial requests took {spent} s in total?"
    # one request that spends 0.6 s in the app: in a bucket between 0.5 and 2.5 s, _sum + >= 0.6
    t0 = time.monotonic()
    assert get(srv, "/sleep?s=0.6")[0] == 200
    took = time.monotonic() - t0
    slow = settle_requests(srv, fast, 1)
    check_histogram(slow)
    moved = {le: v - dict(fast.buckets())[le] for le, v in slow.buckets()}
    assert moved[0.5] == 0 and moved[2.5] == 1 and moved[math.inf] == 1, \
        f"bucket deltas {moved} for one request of {took:.2f} s"
    spent = delta(slow, fast, DUR + "_sum")
    assert 0.6 <= spent <= max(took, 0.6) + 0.05, f"_sum grew by {spent} for a request of {took:.3f} s"


def test_byte_counters_cover_payloads(server_factory):
    srv = metrics_server(server_factory)
    before = baseline(srv)
    n = 1024 * 1024
    post = b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n + b"a" * n
    status, got1 = exchange(srv, post, timeout=20)
    assert status == 200 and got1.endswith(b"\r\n\r\n%d" % n), got1[-200:]
    big = raw("GET", f"/big?n={n}", close=True)
    status, got2 = exchange(srv, big, timeout=20)
    assert status == 200 and len(got2) > n
    sent, received = len(post) + len(big), len(got1) + len(got2)
    after = wait_scrape(srv, lambda s: delta(s, before, REQ_BYTES) >= n and delta(s, before, RESP_BYTES) >= n,
                        what=f"{REQ_BYTES} and {RESP_BYTES} to grow by >= {n}")
    assert delta(after, before, REQ_BYTES) <= sent, f"more bytes received than the client sent ({sent})"
    assert delta(after, before, RESP_BYTES) <= received, f"more bytes sent than the client read ({received})"
    assert delta(after, before, REQ) == 2


# ================================================================ gauges

def test_in_flight_and_open_connections(server_factory, tmp_path):
    srv = metrics_server(server_factory)
    wait_scrape(srv, lambda s: s.value(CONNS) == 0 and s.value(IN_FLIGHT) == 0,
                what="no connection open after the start-up probe")
    idle = srv.connect()
    mark = os.path.join(tmp_path, "busy")
    result = {}
    try:
        assert request(idle, raw("GET", "/"))[0] == 200          # now idle, kept alive
        # the response leaves before the worker counts it done: in_flight drops right after
        wait_scrape(srv, lambda s: s.value(CONNS) >= 1 and s.value(IN_FLIGHT) == 0,
                    what="the idle keep-alive connection, no request in flight")

        def slow():
            result["r"] = get(srv, f"/sleep?s=1.5&mark={mark}")
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        wait_until(lambda: os.path.exists(mark), 10, what="the slow request to reach the app")
        s = scrape(srv)           # the only worker is in the app: the master still answers
        assert s.value(IN_FLIGHT) >= 1, s.show()
        assert s.value(CONNS) >= 2, s.show()
        t.join(10)
        assert result.get("r", (None,))[0] == 200, result
        wait_scrape(srv, lambda s: s.value(IN_FLIGHT) == 0, what="in_flight back to 0")
    finally:
        idle.close()
    wait_scrape(srv, lambda s: s.value(CONNS) == 0, what="connections_open back to 0 after every close")


def test_gauges_return_to_zero_after_aborted_and_failed_requests(server_factory):
    srv = metrics_server(server_factory)
    baseline(srv)
    # the client goes away in the middle of a long streamed response
    with srv.connect() as s:
        s.sendall(raw("GET", "/stream?n=400"))
        got = b""
        while len(got) < 200000:
            got += s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a reset
    # the app's iterable raises after the headers went out: the server can only close
    status, got = exchange(srv, raw("GET", "/stream?n=10&fail=1"))
    assert status == 200 and len(got) < 10 * 65536
    # the client sends part of a body and leaves
    with srv.connect() as s:
        s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 1000)
        wait_scrape(srv, lambda x: x.value(CONNS) >= 1, what="the half-sent request's connection")
    # the client sends a request and closes before the answer
    with srv.connect() as s:
        s.sendall(raw("GET", "/sleep?s=0.3"))
    wait_scrape(srv, lambda x: x.value(IN_FLIGHT) == 0 and x.value(CONNS) == 0, 10,
                what="in_flight and connections_open back to 0")
    assert get(srv)[0] == 200, "the worker still serves"
    check_histogram(wait_scrape(srv, lambda x: x.value(IN_FLIGHT) == 0 and x.value(CONNS) == 0,
                                what="idle again"))


def test_hung_worker_exit_and_its_gauges_gone(server_factory):
    srv = metrics_server(server_factory, extra={"timeout": 1})
    before = baseline(srv)
    old = srv.worker_pids()
    with srv.connect(timeout=15) as s:
        s.sendall(raw("GET", "/hang"))
        s2 = wait_scrape(srv, lambda x: x.value(IN_FLIGHT) >= 1, 5, what="the hanging request in flight")
        assert s.recv(100) == b""          # killed under it
    after = wait_scrape(srv, lambda x: delta(x, before, EXITS, cause="hung") >= 1 and x.value(WORKERS) == 1
                        and delta(x, before, STARTS) >= 1, what="the hung worker counted and replaced")
    assert [p for p in srv.worker_pids() if p not in old], "a new worker"
    assert delta(after, before, EXITS, cause="hung") == 1, after.show()
    assert delta(after, before, EXITS, cause="crash") == 0, after.show()
    assert delta(after, before, STARTS) == 1
    assert delta(after, before, REQ) == 0, "a request that was never answered is not a completed response"
    assert s2.value(CONNS) >= 1
    # a dead worker's gauges are not kept: nothing is in flight or open any more
    wait_scrape(srv, lambda x: x.value(IN_FLIGHT) == 0 and x.value(CONNS) == 0, 5,
                what="in_flight and connections_open of the killed worker to be gone")


# ================================================================ counters across worker deaths, reloads

def test_kill_9_keeps_counts_and_counts_a_crash(server_factory):
    srv = metrics_server(server_factory, workers=2)
    before = wait_scrape(srv, lambda s: s.value(WORKERS) == 2 and s.total(REQ) >= 1, what="2 workers")
    served = collections.Counter()
    for _ in range(12):
        status, body = get(srv)
        assert status == 200
        served[int(body)] += 1
    mid = settle_requests(srv, before, 12)
    victim = served.most_common(1)[0][0]
    watcher = Scraper(srv)
    try:
        watcher.wait_for(1)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2, 10,
                   what="the killed worker to be replaced")
        after = wait_scrape(srv, lambda s: delta(s, mid, EXITS, cause="crash") >= 1 and s.value(WORKERS) == 2
                            and delta(s, mid, STARTS) >= 1, what="the crash counted and a worker started")
        assert after.total(REQ) == mid.total(REQ), \
            f"the killed worker's {served[victim]} responses must stay counted:\n{after.show()}"
        for name in (DUR + "_count", REQ_BYTES, RESP_BYTES):
            assert after.value(name) == mid.value(name), name
        assert delta(after, mid, EXITS, cause="crash") == 1 and delta(after, mid, EXITS) == 1, after.show()
        assert delta(after, mid, STARTS) == 1
        # the new worker's requests add on
        pids = set()
        for _ in range(10):
            status, body = get(srv)
            pids.add(int(body))
        assert victim not in pids
        final = settle_requests(srv, mid, 10)
        check_histogram(final)
    finally:
        scrapes = watcher.finish()
    assert not watcher.errors, watcher.errors[:5]
    assert_monotonic(scrapes)


def test_reload_keeps_counts_and_counts_reloads(server_factory, tmp_path):
    fail = os.path.join(tmp_path, "fail-import")
    srv = metrics_server(server_factory, workers=2, env={"BLAZE_TEST_FAIL_FILE": fail})
    for _ in range(10):
        assert get(srv)[0] == 200
    before = wait_scrape(srv, lambda s: s.value(WORKERS) == 2 and s.total(REQ) >= 11, what="2 workers, 11 requests")
    old = srv.worker_pids()
    watcher = Scraper(srv)
    try:
        watcher.wait_for(1)
        n = srv.output().count("Reload complete")
        srv.send(signal.SIGHUP)
        wait_until(lambda: srv.output().count("Reload complete") > n, 15, what="the reload to complete")
        ok = wait_scrape(srv, lambda s: delta(s, before, EXITS, cause="retired") >= 2 and s.value(WORKERS) == 2
                         and delta(s, before, RELOADS, result="ok") >= 1,
                         what="the reload counted, the two old workers retired")
        wait_until(lambda: (lambda w: len(w) == 2 and not set(w) & set(old))(srv.worker_pids()), 10,
                   what="two new workers")
        assert ok.total(REQ) == before.total(REQ), ok.show()
        assert delta(ok, before, RELOADS, result="ok") == 1 and delta(ok, before, RELOADS, result="failed") == 0
        assert delta(ok, before, GENERATION) == 1, ok.show()
        assert delta(ok, before, STARTS) == 2
        assert delta(ok, before, EXITS) == 2 and delta(ok, before, EXITS, cause="retired") == 2, ok.show()
        for _ in range(10):
            assert get(srv)[0] == 200
        ok = settle_requests(srv, ok, 10)

        # a reload whose new workers cannot import the app: failed, the generation stays
        with open(fail, "w"):
            pass
        current = srv.worker_pids()
        m = srv.output().count("Reload failed")
        srv.send(signal.SIGHUP)
        wait_until(lambda: srv.output().count("Reload failed") > m, 15, what="the reload to fail")
        bad = wait_scrape(srv, lambda s: delta(s, ok, RELOADS, result="failed") >= 1, what="the failed reload")
        assert delta(bad, ok, RELOADS, result="failed") == 1 and delta(bad, ok, RELOADS, result="ok") == 0
        assert delta(bad, ok, GENERATION) == 0, bad.show()
        wait_until(lambda: srv.worker_pids() == current, 10, what="only the serving workers")
        for _ in range(5):
            assert get(srv)[0] == 200
        settle_requests(srv, bad, 5)
    finally:
        scrapes = watcher.finish()
    assert not watcher.errors, watcher.errors[:5]
    assert_monotonic(scrapes)


def test_counters_never_go_backwards_under_worker_churn(server_factory):
    """max_requests = 2: workers are recycled all the time while two clients scrape."""
    srv = metrics_server(server_factory, workers=2, extra={"max_requests": 2})
    before = baseline(srv)
    watchers = [Scraper(srv, interval=0), Scraper(srv, interval=0.003)]
    try:
        for w in watchers:
            w.wait_for(1)
        for _ in range(40):
            status, _ = get(srv)
            assert status == 200
        after = settle_requests(srv, before, 40)
    finally:
        series = [w.finish() for w in watchers]
    for w in watchers:
        assert not w.errors, w.errors[:5]
    for scrapes in series:
        assert_monotonic(scrapes)
    total = after.total(REQ)
    final = wait_scrape(srv, lambda s: s.value(WORKERS) == 2 and 2 * s.total(EXITS, cause="recycled") >= total - 2,
                        what=f"the recycled workers of {total} requests counted")
    assert 2 * final.total(EXITS, cause="recycled") <= total, final.show()
    assert final.total(EXITS) == final.total(EXITS, cause="recycled"), final.show()
    assert final.value(STARTS) == 2 + final.total(EXITS), final.show()
    check_histogram(final)


def test_ttin_ttou_count_starts_and_a_retired_exit(server_factory):
    srv = metrics_server(server_factory, workers=1, extra={"max_workers": 2, "scale_threshold_high": 1000000,
                                                            "scale_down_delay": 3600})
    before = wait_scrape(srv, lambda s: s.value(WORKERS) == 1, what="1 worker")
    srv.send(signal.SIGTTIN)
    up = wait_scrape(srv, lambda s: s.value(WORKERS) == 2, what="2 workers after TTIN")
    assert delta(up, before, STARTS) == 1 and delta(up, before, EXITS) == 0, up.show()
    wait_until(lambda: len(srv.worker_pids()) == 2, 10, what="2 worker processes")
    srv.send(signal.SIGTTOU)
    down = wait_scrape(srv, lambda s: s.value(WORKERS) == 1 and delta(s, before, EXITS) >= 1,
                       what="1 worker after TTOU")
    assert delta(down, before, EXITS, cause="retired") == 1 and delta(down, before, EXITS) == 1, down.show()
    assert delta(down, before, STARTS) == 1


def test_autoscaling_counts_scaling_events(server_factory):
    srv = metrics_server(server_factory, workers=1, extra={
        "max_workers": 2, "scale_window": 0.5, "scale_down_delay": 0.5,
        "scale_threshold_high": 20, "scale_threshold_low": 5})
    before = baseline(srv)
    stop = threading.Event()
    done = []

    def load():
        with srv.connect() as s:
            while not stop.is_set():
                request(s, raw("GET", "/"))
                done.append(1)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        up = wait_scrape(srv, lambda s: delta(s, before, SCALING, direction="up") >= 1 and s.value(WORKERS) == 2,
                         10, what="a scale-up under load")
        assert delta(up, before, SCALING, direction="down") == 0
    finally:
        stop.set()
        t.join(10)
    down = wait_scrape(srv, lambda s: delta(s, before, SCALING, direction="down") >= 1 and s.value(WORKERS) == 1
                       and delta(s, before, EXITS, cause="retired") >= 1, 10, what="a scale-down when idle")
    assert delta(down, before, SCALING, direction="up") == 1, down.show()
    assert delta(down, before, SCALING, direction="down") == 1, down.show()
    assert delta(down, before, EXITS) == 1 and delta(down, before, STARTS) == 1, down.show()
    settle_requests(srv, before, len(done))


def test_max_requests_recycles_are_counted_and_counts_kept(server_factory):
    srv = metrics_server(server_factory, workers=1, extra={"max_requests": 3})
    before = baseline(srv)
    for _ in range(8):
        assert get(srv)[0] == 200
    after = settle_requests(srv, before, 8)
    total = int(after.total(REQ))           # every worker answers exactly 3, then is recycled
    after = wait_scrape(srv, lambda s: s.total(EXITS, cause="recycled") == total // 3
                        and s.value(STARTS) == 1 + total // 3 and s.value(WORKERS) == 1,
                        what=f"{total // 3} recycled workers for {total} requests")
    assert after.total(EXITS) == total // 3, after.show()
    assert after.total(REQ) == total
    check_histogram(after)


def test_graceful_stop_counts_stopped_workers(server_factory, tmp_path):
    """While a SIGTERM stop waits for an in-flight request, the master still answers: the idle
    worker's exit is counted as stopped."""
    srv = metrics_server(server_factory, workers=2)
    before = wait_scrape(srv, lambda s: s.value(WORKERS) == 2, what="2 workers")
    mark = os.path.join(tmp_path, "busy")
    result = {}

    def slow():
        result["r"] = get(srv, f"/sleep?s=2.5&mark={mark}")
    t = threading.Thread(target=slow, daemon=True)
    t.start()
    wait_until(lambda: os.path.exists(mark), 10, what="the slow request to reach the app")
    srv.send(signal.SIGTERM)
    during = wait_scrape(srv, lambda s: delta(s, before, EXITS, cause="stopped") >= 1, 5,
                         what="the idle worker counted as stopped during the graceful stop")
    assert delta(during, before, EXITS) == 1 and during.value(WORKERS) == 1, during.show()
    assert during.value(IN_FLIGHT) >= 1, during.show()
    t.join(10)
    assert result.get("r", (None,))[0] == 200, result
    assert srv.proc.wait(10) == 0


# ================================================================ /healthz

def test_healthz_is_503_while_no_worker_is_ready(server_factory):
    srv = metrics_server(server_factory, env={"BLAZE_TEST_BOOT_SLEEP": "30"}, start=False)
    srv.start(wait=False)
    wait_until(lambda: srv.proc.poll() is not None or _answers(srv, "/healthz"), 10,
               what=f"the metrics endpoint while the app imports:\n{srv.output()}")
    assert srv.proc.poll() is None, srv.output()
    assert healthz(srv) == 503
    assert scrape(srv).has(WORKERS), "metrics are served before any worker is ready"
    assert healthz(srv) == 503


def test_healthz_follows_the_worker_heartbeat(server_factory):
    srv = metrics_server(server_factory, extra={"timeout": 0})
    assert healthz(srv) == 200
    (pid,) = srv.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert healthz(srv) == 200, "the heartbeat is still fresh right after the stop"
        wait_until(lambda: healthz(srv) == 503, 10, interval=0.1,
                   what="/healthz 503 once the only worker's heartbeat is older than 5 s")
        stale = time.monotonic() - t0
        assert stale >= 3.0, f"/healthz went 503 {stale:.1f} s after the worker stopped (fresh is < 5 s)"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: healthz(srv) == 200, 5, what="/healthz 200 again once the worker runs")
    assert srv.worker_pids() == [pid]
