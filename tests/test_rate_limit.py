"""Per-client rate limiting (rate_limit) and who the client is (forwarded_allow_ips).

rate_limit = N: a client may make N requests in a burst, then one every 60/N s
(GCRA over a table shared by every worker of every generation).  Over the limit
the server answers 429 Too Many Requests with Retry-After (whole seconds, >= 1)
before reading a body or calling the app; a body-less request keeps its
connection, a request with a body gets Connection: close (and no 100 Continue).

The client is the TCP peer, unless the peer is trusted (forwarded_allow_ips,
default 127.0.0.1,::1; Unix socket peers always): then X-Forwarded-For, read
right to left past trusted entries (an unparseable entry ends the walk at the
last good one), or else X-Real-IP, names it.  The resolved client is
REMOTE_ADDR (no REMOTE_PORT when it came from a header), the access log's
`from <client>` and the limiter's key.  A Unix peer without a forwarded header
is `local` in the log, REMOTE_ADDR "", and is not limited.

Distinct clients come from 127.0.0.2, 127.0.0.3, ... (a client socket bound to
that source address; Linux routes all of 127/8 to lo).  Only 127.0.0.1 is a
trusted proxy by default.  The conftest start-up probe (GET /__probe__ from
127.0.0.1) counts against 127.0.0.1, so limits are exercised with other clients.

The app (written to the test's directory) appends one line per call to
$RL_CALLS, so a test can count exactly which requests reached it.
"""
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apphelp import read_mark
from apps_log import ACCESS
from conftest import (free_port, http_probe, read_response, request, server_env, start_nginx, stop_nginx,
                      wait_until)

TOO_MANY = b"429 Too Many Requests: rate limit exceeded\n"
COMPLETE = re.compile(r"(?i)reload complete")

APP_SOURCE = r'''
import json
import os
import time
from urllib.parse import parse_qs

CALLS = os.environ["RL_CALLS"]


def application(environ, start_response):
    path = environ["PATH_INFO"]
    addr = environ.get("REMOTE_ADDR")
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:                      # one short O_APPEND write per call: lines never interleave
        os.write(fd, ("%d\t%s\t%s\t%s\n" % (os.getpid(), addr, environ["REQUEST_METHOD"], path)).encode())
    finally:
        os.close(fd)
    if path == "/hold":       # keep this worker busy until the release file exists
        q = parse_qs(environ.get("QUERY_STRING", ""))
        mark, release = q["mark"][0], q["release"][0]
        with open(mark + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(mark + ".tmp", mark)
        deadline = time.monotonic() + 20
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)
    n = 0
    inp = environ["wsgi.input"]
    while True:
        chunk = inp.read(65536)
        if not chunk:
            break
        n += len(chunk)
    body = json.dumps({"pid": os.getpid(), "addr": addr, "port": environ.get("REMOTE_PORT"),
                       "has_port": "REMOTE_PORT" in environ, "path": path,
                       "method": environ["REQUEST_METHOD"], "length": n}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


# ---------------------------------------------------------------- helpers

def make_server(server_factory, tmp_path, name, rate_limit=0, workers=1, extra=None, **kw):
    """A server of the counting app in a directory of its own (not started)."""
    d = os.path.join(str(tmp_path), name)
    os.makedirs(d, exist_ok=True)
    app = os.path.join(d, "rl_app.py")
    with open(app, "w") as f:
        f.write(APP_SOURCE)
    settings = {"rate_limit": rate_limit}
    settings.update(extra or {})
    calls = os.path.join(d, "calls.txt")
    srv = server_factory(app=app, workers=workers, extra=settings, env={"RL_CALLS": calls},
                         own_dir=name, **kw)
    srv.calls_path = calls
    return srv


def start_all(*servers):
    """Start several servers at once, then wait for each (start-up dominates the runtime)."""
    for s in servers:
        s.start(wait=False)
    for s in servers:
        wait_until(lambda: s.proc.poll() is not None or http_probe(s.connect), 15, what="the server to answer")
        assert s.proc.poll() is None, f"server exited early:\n{s.output()}"
    return servers


def calls(srv, addr=None):
    """The app's calls so far, but the start-up probe's: [(pid, REMOTE_ADDR, method, path)],
    optionally of one client."""
    try:
        with open(srv.calls_path) as f:
            rows = [line.split("\t") for line in f.read().splitlines()]
    except FileNotFoundError:
        rows = []
    rows = [(int(r[0]), r[1], r[2], r[3]) for r in rows]
    return [r for r in rows if r[3] != "/__probe__" and (addr is None or r[1] == addr)]


def connect(port, src, timeout=10.0):
    """A TCP connection to 127.0.0.1:port originating from source address src."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(src, 0))


def req(method="GET", target="/", headers=(), body=b"", close=False):
    lines = [f"{method} {target} HTTP/1.1", "Host: x"] + [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(port, src, target="/", headers=(), method="GET"):
    """One request on a fresh connection from src: (status, headers, body)."""
    with connect(port, src) as s:
        return request(s, req(method, target, headers, close=True))


def info(resp):
    """The app's JSON of a 200 response."""
    status, _, body = resp
    assert status == 200, resp
    return json.loads(body)


def assert_429(resp, rate, keepalive=None):
    """A rate-limit refusal: 429, Retry-After whole seconds in 1..ceil(60/rate), text body."""
    status, headers, body = resp
    assert status == 429, f"expected 429, got {resp!r}"
    ra = headers.get("retry-after", "")
    assert re.fullmatch(r"[0-9]+", ra), f"Retry-After must be whole seconds, got {ra!r} in {headers}"
    assert 1 <= int(ra) <= math.ceil(60 / rate), f"Retry-After {ra} outside 1..{math.ceil(60 / rate)}"
    assert headers.get("content-type", "").startswith("text/plain"), headers
    assert body == TOO_MANY, body
    if keepalive is True:
        assert headers.get("connection", "").lower() != "close", f"a body-less 429 must keep the connection: {headers}"
    elif keepalive is False:
        assert headers.get("connection", "").lower() == "close", f"a 429 before a body must close: {headers}"
    return int(ra)


def access(srv):
    """The access lines so far (stderr): [(method, target, client, status code)]."""
    out = []
    for line in srv.output().splitlines():
        m = ACCESS.match(line)
        if m:
            out.append((m.group(2), m.group(3), m.group(4), int(m.group(5))))
    return out


def wait_access(srv, pred, what):
    """Access lines are flushed about once a second: poll until pred(lines)."""
    last = []

    def probe():
        last[:] = [access(srv)]
        return pred(last[0])
    try:
        wait_until(probe, 8, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}\naccess lines: {last[0] if last else None}\n{srv.output()[-2000:]}") from None
    return last[0]


class Hold:
    """GET /hold from 127.0.0.1: keeps the worker that takes it busy until released."""

    def __init__(self, srv, tmp_path, name):
        self.mark = os.path.join(str(tmp_path), f"mark-{name}")
        self.release_path = os.path.join(str(tmp_path), f"release-{name}")
        self.sock = connect(srv.port, "127.0.0.1", timeout=20)
        self.sock.sendall(req("GET", f"/hold?mark={self.mark}&release={self.release_path}", close=True))
        self.pid = wait_until(lambda: read_mark(self.mark), 10, what=f"/hold {name} to reach the app")
        self.released = False

    def release(self):
        if not self.released:
            self.released = True
            open(self.release_path, "w").close()
            status, _, _ = read_response(self.sock)
            self.sock.close()
            assert status == 200


def burst(port, src, fresh, keepalive=()):
    """`fresh` requests on new connections, then one keep-alive connection per item of
    `keepalive` carrying that many requests.  Returns the responses in order."""
    out = []
    for i in range(fresh):
        out.append(get(port, src, f"/f{i}"))
    for j, n in enumerate(keepalive):
        with connect(port, src) as s:
            for i in range(n):
                out.append(request(s, req("GET", f"/k{j}-{i}")))
    return out


# ---------------------------------------------------------------- 1, 2: the limit itself

def test_burst_is_shared_by_two_workers_then_429_and_app_not_called(server_factory, tmp_path):
    """rate_limit=100, 2 workers: 50 requests served by one worker, 50 by the other
    (the other one is kept busy by /hold from 127.0.0.1 each time, so which worker
    serves is certain), then 20 more: all 429 and never seen by the app.

    GCRA refills one request every 60/100 = 0.6 s, so a slow run could legitimately
    see floor(elapsed / 0.6) extra successes: the bound allows exactly that.  The
    sending takes a few hundred ms, so the assertion is in practice exact (100)."""
    srv = make_server(server_factory, tmp_path, "s", rate_limit=100, workers=2)
    start_all(srv)
    holds = []
    try:
        holds.append(Hold(srv, tmp_path, "a"))
        pid_a = holds[0].pid
        t0 = time.monotonic()
        first = burst(srv.port, "127.0.0.2", fresh=30, keepalive=(10, 10))
        holds.append(Hold(srv, tmp_path, "b"))      # A is busy: the other worker takes it
        pid_b = holds[1].pid
        holds[0].release()                           # now only A accepts
        second = burst(srv.port, "127.0.0.2", fresh=30, keepalive=(10, 10))
        over = burst(srv.port, "127.0.0.2", fresh=10, keepalive=(10,))
        elapsed = time.monotonic() - t0
        others = [get(srv.port, "127.0.0.3", f"/other{i}") for i in range(5)]
    finally:
        for h in holds:
            h.release()

    assert pid_a != pid_b
    assert [r[0] for r in first + second] == [200] * 100, [r[0] for r in first + second]
    assert {info(r)["pid"] for r in first} == {pid_b}, "the first 50 must come from the worker not held"
    assert {info(r)["pid"] for r in second} == {pid_a}, "the second 50 must come from the other worker"
    assert {info(r)["addr"] for r in first + second} == {"127.0.0.2"}

    allowed = math.floor(elapsed / 0.6)              # GCRA refill during the run (normally 0)
    ok_over = [r for r in over if r[0] == 200]
    assert len(ok_over) <= allowed, (f"{len(ok_over)} of 20 requests over the burst of 100 were served "
                                     f"in {elapsed:.3f}s (at most {allowed} may be refilled)")
    for r in over:
        if r[0] != 200:
            # fresh connections sent Connection: close; the keep-alive ones must stay open
            assert_429(r, 100)
            assert int(r[1]["retry-after"]) == 1, r[1]     # 0.6 s, rounded up
    for r in over[10:]:
        if r[0] == 429:
            assert r[1].get("connection", "").lower() != "close", r[1]
    n_calls = len(calls(srv, "127.0.0.2"))
    assert n_calls == 100 + len(ok_over), f"the app was called {n_calls} times for 127.0.0.2"
    if allowed == 0:
        assert n_calls == 100
    # another client is not affected while 127.0.0.2 is limited
    assert [info(r)["addr"] for r in others] == ["127.0.0.3"] * 5


def test_other_client_has_its_own_budget(server_factory, tmp_path):
    srv = make_server(server_factory, tmp_path, "s", rate_limit=3)
    start_all(srv)
    t0 = time.monotonic()
    a = [get(srv.port, "127.0.0.2", f"/a{i}") for i in range(4)]
    elapsed = time.monotonic() - t0
    assert [r[0] for r in a[:3]] == [200] * 3
    # the next request is allowed 60/3 = 20 s after the first one: Retry-After is what is left
    ra = assert_429(a[3], 3)
    assert 20 - math.ceil(elapsed) <= ra <= 20, f"Retry-After {ra}, {elapsed:.3f}s after the first request"
    b = [get(srv.port, "127.0.0.3", f"/b{i}") for i in range(4)]
    assert [info(r)["addr"] for r in b[:3]] == ["127.0.0.3"] * 3, b[:3]
    assert_429(b[3], 3)                  # per client, not one global budget
    assert_429(get(srv.port, "127.0.0.2", "/a-again"), 3)
    assert sorted(r[3] for r in calls(srv, "127.0.0.2")) == ["/a0", "/a1", "/a2"]
    assert sorted(r[3] for r in calls(srv, "127.0.0.3")) == ["/b0", "/b1", "/b2"]


def test_ipv6_clients_are_limited_by_their_64(server_factory, tmp_path):
    """Addresses of one /64 share a budget (one host usually holds the whole /64); the next
    /64 has its own.  IPv6 clients arrive forwarded from the trusted 127.0.0.1."""
    srv = make_server(server_factory, tmp_path, "s", rate_limit=3)
    start_all(srv)
    fwd = lambda a: [("X-Forwarded-For", a)]
    same64 = [get(srv.port, "127.0.0.1", f"/v{i}", fwd(f"2001:db8:0:7::{i + 1:x}")) for i in range(4)]
    assert [r[0] for r in same64[:3]] == [200] * 3
    assert [info(r)["addr"] for r in same64[:3]] == ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7::3"]
    assert_429(same64[3], 3)
    assert get(srv.port, "127.0.0.1", "/w", fwd("2001:db8:0:8::1"))[0] == 200
    assert_429(get(srv.port, "127.0.0.1", "/v-again", fwd("2001:db8:0:7:ffff:ffff:ffff:ffff")), 3)


# ---------------------------------------------------------------- 3: spoofing from an untrusted peer

def test_forwarded_headers_from_untrusted_peer_are_ignored(server_factory, tmp_path):
    srv = make_server(server_factory, tmp_path, "s", rate_limit=4)
    start_all(srv)
    spoofs = [[("X-Forwarded-For", "1.2.3.4")], [("X-Real-IP", "10.9.9.9")],
              [("X-Forwarded-For", "10.0.0.1, 10.0.0.2"), ("X-Real-IP", "10.0.0.3")],
              [("X-Forwarded-For", "127.0.0.1")],
              [("X-Forwarded-For", "5.5.5.5")], [("X-Real-IP", "6.6.6.6")], [("X-Forwarded-For", "::1")]]
    results = []
    for i, headers in enumerate(spoofs):
        with connect(srv.port, "127.0.0.2") as s:
            local_port = s.getsockname()[1]
            results.append((local_port, request(s, req("GET", f"/spoof{i}", headers, close=True))))
    for local_port, r in results[:4]:
        body = info(r)
        assert body["addr"] == "127.0.0.2", body
        assert body["port"] == str(local_port), body
    for _, r in results[4:]:
        assert_429(r, 4)                 # a different spoofed address each time buys nothing
    assert len(calls(srv, "127.0.0.2")) == 4 and len(calls(srv)) == 4, calls(srv)
    lines = wait_access(srv, lambda a: sum(1 for x in a if x[1].startswith("/spoof")) == len(spoofs),
                        "the access lines of the spoofed requests")
    got = [(x[1], x[2], x[3]) for x in lines if x[1].startswith("/spoof")]
    want = [(f"/spoof{i}", "127.0.0.2", 200 if i < 4 else 429) for i in range(len(spoofs))]
    assert sorted(got) == sorted(want), got


# ---------------------------------------------------------------- 4: resolution from trusted peers

# (headers, expected REMOTE_ADDR; None: the peer itself, 127.0.0.1 with its REMOTE_PORT)
TRUSTED_CASES = [
    ([("X-Forwarded-For", "1.2.3.4")], "1.2.3.4"),
    ([("x-forwarded-for", "1.2.3.5")], "1.2.3.5"),
    ([("X-Forwarded-For", "6.6.6.6, 1.2.3.4")], "1.2.3.4"),                 # rightmost untrusted
    ([("X-Forwarded-For", "1.2.3.4, 127.0.0.1")], "1.2.3.4"),               # trusted entries skipped
    ([("X-Forwarded-For", "1.2.3.6,::1 ,  127.0.0.1")], "1.2.3.6"),
    ([("X-Forwarded-For", "garbage, 1.2.3.4")], "1.2.3.4"),
    ([("X-Forwarded-For", "1.2.3.4, garbage")], None),                       # the walk stops: the peer
    ([("X-Forwarded-For", "1.2.3.4, garbage, 127.0.0.1")], "127.0.0.1"),     # ... at the last good entry
    ([("X-Forwarded-For", "")], None),
    ([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "1.2.3.7")], "1.2.3.7"),   # one list
    ([("X-Forwarded-For", "1.2.3.8"), ("X-Forwarded-For", "127.0.0.1")], "1.2.3.8"),
    ([("X-Forwarded-For", "[2001:db8::1]:443")], "2001:db8::1"),
    ([("X-Forwarded-For", "2001:db8::2")], "2001:db8::2"),
    ([("X-Forwarded-For", "1.2.3.4:80")], "1.2.3.4"),
    ([("X-Forwarded-For", "::ffff:1.2.3.9")], "1.2.3.9"),
    ([("X-Real-IP", "9.8.7.6")], "9.8.7.6"),
    ([("X-Real-IP", "9.8.7.6"), ("X-Forwarded-For", "1.2.3.4")], "1.2.3.4"),  # XFF wins
    ([("X-Forwarded-For", "1.2.3.4"), ("X-Real-IP", "9.8.7.6")], "1.2.3.4"),
    ([("X-Forwarded-For", "garbage"), ("X-Real-IP", "9.8.7.6")], None),      # XFF present: X-Real-IP unused
    ([("X-Real-IP", "garbage")], None),
    ([("X_Forwarded_For", "1.2.3.4")], None),                                # underscore: not the header
    ([("X_Real_IP", "9.8.7.6")], None),
]


def check_cases(srv, src, cases, tag):
    """Each case on a fresh connection from src; returns a list of mismatches and the
    (target, expected client) pairs for the log check."""
    bad, expect_log = [], []
    for i, (headers, want) in enumerate(cases):
        target = f"/{tag}{i}"
        with connect(srv.port, src) as s:
            local_port = s.getsockname()[1]
            status, _, body = request(s, req("GET", target, headers, close=True))
        if status != 200:
            bad.append((headers, want, f"status {status} {body!r}"))
            continue
        got = json.loads(body)
        exp = (want or src, None if want else str(local_port), want is None)
        if (got["addr"], got["port"], got["has_port"]) != exp:
            bad.append((headers, exp, (got["addr"], got["port"], got["has_port"])))
        expect_log.append((target, want or src))
    return bad, expect_log


def assert_logged(srv, expect_log):
    n = len(expect_log)
    targets = {t for t, _ in expect_log}
    lines = wait_access(srv, lambda a: sum(1 for x in a if x[1] in targets) >= n, f"{n} access lines")
    got = sorted((x[1], x[2]) for x in lines if x[1] in targets)
    assert got == sorted(expect_log), [(g, w) for g, w in zip(got, sorted(expect_log)) if g != w]


def test_client_resolution_from_trusted_peer(server_factory, tmp_path):
    port, port6 = free_port(), free_port()
    srv = make_server(server_factory, tmp_path, "s", rate_limit=1000, bind=[f"127.0.0.1:{port}", f"[::1]:{port6}"])
    srv.port = port                      # conftest's probe and connect() use the first socket
    start_all(srv)
    bad, expect_log = check_cases(srv, "127.0.0.1", TRUSTED_CASES, "case")
    assert not bad, "\n".join(f"{h!r}: expected (addr, port, has_port) {w!r}, got {g!r}" for h, w, g in bad)

    # the client is per request: on one keep-alive connection it follows each request's headers,
    # and a request the HTTP layer refuses after a forwarded one is logged as the peer
    with connect(srv.port, "127.0.0.1") as s:
        local_port = str(s.getsockname()[1])
        seq = [info(request(s, req("GET", f"/ka{i}", h))) for i, h in
               enumerate([[("X-Forwarded-For", "1.2.3.4")], [], [("X-Real-IP", "9.8.7.6")], []])]
        info(request(s, req("GET", "/ka4", [("X-Forwarded-For", "1.2.3.4")])))
        assert request(s, b"GET /ka5 HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")[0] == 400
    assert [(x["addr"], x["port"]) for x in seq] == [("1.2.3.4", None), ("127.0.0.1", local_port),
                                                    ("9.8.7.6", None), ("127.0.0.1", local_port)], seq
    expect_log += [("/ka0", "1.2.3.4"), ("/ka1", "127.0.0.1"), ("/ka2", "9.8.7.6"), ("/ka3", "127.0.0.1"),
                   ("/ka4", "1.2.3.4"), ("/ka5", "127.0.0.1")]

    # an IPv6 peer: ::1 is trusted by default; without a header it is the client
    with socket.create_connection(("::1", port6), timeout=10) as s:
        v6_port = str(s.getsockname()[1])
        v6 = [info(request(s, req("GET", f"/v6-{i}", h))) for i, h in
              enumerate([[("X-Forwarded-For", "1.2.3.4, ::1")], [], [("X-Real-IP", "2001:db8::5")]])]
    assert [(x["addr"], x["port"]) for x in v6] == [("1.2.3.4", None), ("::1", v6_port), ("2001:db8::5", None)], v6
    expect_log += [("/v6-0", "1.2.3.4"), ("/v6-1", "::1"), ("/v6-2", "2001:db8::5")]
    assert_logged(srv, expect_log)


def test_forwarded_allow_ips_networks_and_star(server_factory, tmp_path):
    net = make_server(server_factory, tmp_path, "net", rate_limit=2,
                      extra={"forwarded_allow_ips": "127.0.0.0/8"})
    star = make_server(server_factory, tmp_path, "star", extra={"forwarded_allow_ips": "*"})
    other = make_server(server_factory, tmp_path, "other",
                        extra={"forwarded_allow_ips": "10.0.0.0/8, 127.0.0.2/31"})   # .2 and .3, not .1 or .4
    start_all(net, star, other)

    # 127.0.0.0/8: 127.0.0.2 and 127.0.0.3 are proxies now (and entries in 127/8 are skipped)
    bad, log_net = check_cases(net, "127.0.0.2", [
        ([("X-Forwarded-For", "1.2.3.4")], "1.2.3.4"),
        ([("X-Forwarded-For", "1.2.3.5, 127.0.0.9")], "1.2.3.5"),
        ([("X-Real-IP", "9.9.9.9")], "9.9.9.9"),
        ([], None),
    ], "net")
    b2, l2 = check_cases(net, "127.0.0.3", [([("X-Forwarded-For", "127.0.0.77")], "127.0.0.77")], "net3-")
    bad += b2
    log_net += l2
    # the limiter counts the forwarded client, whichever proxy it came through
    r = [get(net.port, src, f"/lim{i}", [("X-Forwarded-For", "5.5.5.5")])
         for i, src in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.2"])]
    assert [info(x)["addr"] for x in r[:2]] == ["5.5.5.5"] * 2, r[:2]
    assert_429(r[2], 2)
    assert_429(get(net.port, "127.0.0.3", "/lim3", [("X-Real-IP", "5.5.5.5")]), 2)
    assert info(get(net.port, "127.0.0.2", "/lim4", [("X-Forwarded-For", "5.5.5.6")]))["addr"] == "5.5.5.6"
    log_net += [("/lim0", "5.5.5.5"), ("/lim1", "5.5.5.5"), ("/lim2", "5.5.5.5"), ("/lim3", "5.5.5.5"),
                ("/lim4", "5.5.5.6")]

    # *: every peer is trusted; when every entry is trusted the leftmost one is the client
    b3, log_star = check_cases(star, "127.0.0.2", [
        ([("X-Forwarded-For", "1.2.3.4")], "1.2.3.4"),
        ([("X-Forwarded-For", "6.6.6.6, 1.2.3.4")], "6.6.6.6"),
        ([("X-Forwarded-For", "1.2.3.4, garbage")], None),
        ([("X-Real-IP", "9.9.9.9")], "9.9.9.9"),
        ([], None),
    ], "star")
    b4, l4 = check_cases(star, "127.0.0.3", [([("X-Forwarded-For", "1.2.3.4")], "1.2.3.4")], "star3-")
    bad += b3 + b4
    log_star += l4

    # a list of its own replaces the default: 127.0.0.1 is no longer trusted; a /31 is two addresses
    b5, log_other = check_cases(other, "127.0.0.1", [([("X-Forwarded-For", "1.2.3.4")], None),
                                                     ([("X-Real-IP", "9.9.9.9")], None)], "o1-")
    b6, l6 = check_cases(other, "127.0.0.3", [([("X-Forwarded-For", "1.2.3.4, 10.1.2.3")], "1.2.3.4"),
                                              ([("X-Forwarded-For", "1.2.3.5, 127.0.0.2")], "1.2.3.5"),
                                              ([("X-Forwarded-For", "1.2.3.6, 127.0.0.4")], "127.0.0.4")], "o3-")
    b7, l7 = check_cases(other, "127.0.0.2", [([("X-Forwarded-For", "1.2.3.4")], "1.2.3.4")], "o2-")
    b8, l8 = check_cases(other, "127.0.0.4", [([("X-Forwarded-For", "1.2.3.4")], None),
                                              ([("X-Real-IP", "9.9.9.9")], None)], "o4-")
    bad += b5 + b6 + b7 + b8
    log_other += l6 + l7 + l8
    assert not bad, "\n".join(f"{h!r}: expected (addr, port, has_port) {w!r}, got {g!r}" for h, w, g in bad)
    assert_logged(net, log_net)
    assert_logged(star, log_star)
    assert_logged(other, log_other)


# ---------------------------------------------------------------- 5: behind real nginx

NGINX_CONF = '''
{user}
worker_processes 1;
error_log {d}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream blaze {{
        server unix:{sock};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://blaze;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_next_upstream off;
        }}
    }}
}}
'''



@pytest.fixture
def nginx(tmp_path):
    """start(sock) -> port: nginx (as the current user, its own conf/pid/logs) proxying to sock."""
    procs = []

    def start(sock):
        d = os.path.join(str(tmp_path), "nginx")
        os.makedirs(d)
        port = free_port()
        text = NGINX_CONF.format(user="user root;" if os.geteuid() == 0 else "", d=d, sock=sock, port=port)
        procs.append(start_nginx(d, text, port))
        return port

    yield start
    for p in procs:
        stop_nginx(p)


def unix_get(path, target, headers=(), sock=None):
    s = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if sock is None:
        s.settimeout(10)
        s.connect(path)
    try:
        return request(s, req("GET", target, headers, close=sock is None))
    finally:
        if sock is None:
            s.close()


def test_behind_nginx_over_unix_socket(server_factory, tmp_path, sockdir, nginx):
    sock = os.path.join(sockdir, "app.sock")
    srv = make_server(server_factory, tmp_path, "s", rate_limit=10, bind=[sock], extra={"socket_mode": "0666"})
    start_all(srv)                       # the probe came over the Unix socket: `local`, not limited
    port = nginx(sock)

    two = [get(port, "127.0.0.2", f"/n2-{i}") for i in range(10)]
    for r in two:
        body = info(r)
        assert (body["addr"], body["has_port"]) == ("127.0.0.2", False), body
    over = [get(port, "127.0.0.2", f"/n2-over{i}") for i in range(3)]
    for r in over:
        assert_429(r, 10)
    # a client's own X-Forwarded-For is to the left of what nginx appends: it changes nothing
    assert_429(get(port, "127.0.0.2", "/n2-spoof", [("X-Forwarded-For", "7.7.7.7")]), 10)
    three = [get(port, "127.0.0.3", f"/n3-{i}") for i in range(3)]
    assert [info(r)["addr"] for r in three] == ["127.0.0.3"] * 3, three
    # keep-alive through nginx: a body-less 429 leaves the connection usable
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0))
    try:
        for _ in range(2):
            c.request("GET", "/n2-ka")
            r = c.getresponse()
            assert r.status == 429 and r.read() == TOO_MANY
            assert 1 <= int(r.getheader("Retry-After")) <= 6
    finally:
        c.close()
    assert len(calls(srv, "127.0.0.2")) == 10, calls(srv, "127.0.0.2")

    # a Unix peer without a forwarded header: `local`, REMOTE_ADDR "", never limited
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        local = [unix_get(sock, f"/local-ka{i}", sock=s) for i in range(8)]
    local += [unix_get(sock, f"/local{i}") for i in range(8)]
    for r in local:
        body = info(r)
        assert body["addr"] == "" and not body["has_port"], body

    want = sorted([(f"/n2-{i}", "127.0.0.2", 200) for i in range(10)]
                  + [(f"/n2-over{i}", "127.0.0.2", 429) for i in range(3)]
                  + [("/n2-spoof", "127.0.0.2", 429)] + [("/n2-ka", "127.0.0.2", 429)] * 2
                  + [(f"/n3-{i}", "127.0.0.3", 200) for i in range(3)]
                  + [(f"/local-ka{i}", "local", 200) for i in range(8)]
                  + [(f"/local{i}", "local", 200) for i in range(8)])

    def mine(lines):
        return [(x[1], x[2], x[3]) for x in lines if x[1].startswith(("/n", "/local"))]
    lines = wait_access(srv, lambda a: len(mine(a)) >= len(want), f"{len(want)} access lines")
    assert sorted(mine(lines)) == want, mine(lines)


# ---------------------------------------------------------------- 6: metrics

def scrape(mport):
    c = http.client.HTTPConnection("127.0.0.1", mport, timeout=5)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        assert r.status == 200
        text = r.read().decode()
    finally:
        c.close()
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


def metric(values, name, **labels):
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def test_metrics_count_refusals(server_factory, tmp_path):
    with socket.socket() as hold:            # held while the app port is picked: never the same
        hold.bind(("127.0.0.1", 0))
        mport = hold.getsockname()[1]
        srv = make_server(server_factory, tmp_path, "s", rate_limit=3, extra={"metrics_port": mport})
    start_all(srv)

    def ready():
        try:
            return scrape(mport)
        except OSError:
            return None
    before = wait_until(lambda: (lambda v: v if v and metric(v, "blazewsgi_requests_total") >= 1 else None)(ready()),
                        10, what="the metrics endpoint and the start-up probe counted")

    oks = [get(srv.port, "127.0.0.2", f"/m{i}") for i in range(3)]
    assert [r[0] for r in oks] == [200] * 3
    refused = [get(srv.port, "127.0.0.2", f"/m-over{i}") for i in range(4)]
    with connect(srv.port, "127.0.0.2") as s:
        refused.append(request(s, req("POST", "/m-post", [("Content-Length", "5")], b"hello")))
    for r in refused:
        assert_429(r, 3)
    n429 = len(refused)

    def moved(v):
        return (metric(v, "blazewsgi_requests_total") - metric(before, "blazewsgi_requests_total") >= 3 + n429
                and v)
    after = wait_until(lambda: moved(scrape(mport)), 10, what="requests_total to count 8 requests")

    def d(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    assert d("blazewsgi_rate_limited_total") == n429
    assert d("blazewsgi_requests_total") == 3 + n429
    assert d("blazewsgi_requests_total", method="GET", status="4xx") == 4
    assert d("blazewsgi_requests_total", method="POST", status="4xx") == 1
    assert d("blazewsgi_requests_total", method="GET", status="2xx") == 3
    assert d("blazewsgi_parse_errors_total") == 0


# ---------------------------------------------------------------- 7: bodies, keep-alive

def test_refusal_before_a_body(server_factory, tmp_path):
    srv = make_server(server_factory, tmp_path, "s", rate_limit=2)
    start_all(srv)
    with connect(srv.port, "127.0.0.2") as s:
        assert [request(s, req("GET", f"/g{i}"))[0] for i in range(2)] == [200, 200]
        assert_429(request(s, req("GET", "/g-over1")), 2, keepalive=True)
        assert_429(request(s, req("GET", "/g-over2")), 2, keepalive=True)   # still answered

    # Expect: 100-continue, no body sent: 429 at once, no 100 Continue before it, then EOF
    with connect(srv.port, "127.0.0.2", timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(req("POST", "/upload", [("Content-Length", "100000"), ("Expect", "100-continue")]))
        first = read_response(s)        # a 100 Continue would be a response of its own, first
        assert first[0] == 429, f"no 100 Continue before the 429: got {first!r}"
        assert_429(first, 2, keepalive=False)
        assert time.monotonic() - t0 < 2.0
        assert s.recv(1) == b"", "the server must close the connection after a 429 with Connection: close"

    # a body sent slowly: 429 after the first piece; the rest is not needed
    with connect(srv.port, "127.0.0.2", timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(req("PUT", "/upload", [("Content-Length", "100000")], b"x" * 1000))
        assert_429(read_response(s), 2, keepalive=False)
        assert time.monotonic() - t0 < 2.0
        s.sendall(b"y" * 1000)           # discarded while the server lingers
        assert s.recv(1) == b""

    # chunked, nothing of the body sent
    with connect(srv.port, "127.0.0.2", timeout=5) as s:
        s.sendall(req("POST", "/upload", [("Transfer-Encoding", "chunked")]))
        assert_429(read_response(s), 2, keepalive=False)
        assert s.recv(1) == b""

    assert [r[3] for r in calls(srv, "127.0.0.2")] == ["/g0", "/g1"], calls(srv)

    # control: a client under its limit gets 100 Continue and its upload is read
    with connect(srv.port, "127.0.0.3", timeout=5) as s:
        s.sendall(req("POST", "/upload", [("Content-Length", "100000"), ("Expect", "100-continue")]))
        assert read_response(s)[0] == 100
        s.sendall(b"z" * 100000)
        body = info(read_response(s))
        assert body["length"] == 100000 and body["addr"] == "127.0.0.3"


# ---------------------------------------------------------------- 8: pipelining

def test_pipelined_requests_at_the_limit(server_factory, tmp_path):
    srv = make_server(server_factory, tmp_path, "s", rate_limit=3)
    start_all(srv)
    with connect(srv.port, "127.0.0.2") as s:
        s.sendall(b"".join(req("GET", f"/p{i}") for i in range(5)))
        got = [read_response(s) for _ in range(5)]
        assert [info(r)["path"] for r in got[:3]] == ["/p0", "/p1", "/p2"]
        for r in got[3:]:
            assert_429(r, 3, keepalive=True)
        # already at the limit: three in one send, a HEAD in the middle (a 429 without a body)
        s.sendall(req("GET", "/q0") + req("HEAD", "/q1") + req("GET", "/q2"))
        assert_429(read_response(s), 3, keepalive=True)
        status, headers, _ = read_response(s, head_only=True)
        assert status == 429 and "retry-after" in headers, headers
        assert_429(read_response(s), 3, keepalive=True)
        # nothing more was sent, and the connection still serves
        assert_429(request(s, req("GET", "/q3")), 3, keepalive=True)
    assert [r[3] for r in calls(srv, "127.0.0.2")] == ["/p0", "/p1", "/p2"]
    order = ["/p0", "/p1", "/p2", "/p3", "/p4", "/q0", "/q1", "/q2", "/q3"]
    lines = wait_access(srv, lambda a: sum(1 for x in a if x[1] in order) == len(order), "the pipelined lines")
    assert [(x[0], x[1], x[3]) for x in lines if x[1] in order] == \
        [("GET", "/p0", 200), ("GET", "/p1", 200), ("GET", "/p2", 200), ("GET", "/p3", 429),
         ("GET", "/p4", 429), ("GET", "/q0", 429), ("HEAD", "/q1", 429), ("GET", "/q2", 429),
         ("GET", "/q3", 429)]


# ---------------------------------------------------------------- 9: configuration

# (key, value, a fragment the one line must quote besides the key)
CONFIG_ERRORS = [
    ("rate_limit", "-1", "-1"),
    ("rate_limit", "abc", "'abc'"),
    ("rate_limit", "1000000001", "1000000001"),
    ("forwarded_allow_ips", "1.2.3.999", "'1.2.3.999'"),
    ("forwarded_allow_ips", "*,1.2.3.4", "'*'"),
    ("forwarded_allow_ips", "10.0.0.0/33", "'10.0.0.0/33'"),
    ("forwarded_allow_ips", "localhost", "'localhost'"),
]


def _cli(tmp_path, settings, *args):
    from test_config import BLAZE
    (tmp_path / "marker_app.py").write_text(
        "import os\nopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'IMPORTED'), 'w').close()\n"
        "def application(environ, start_response):\n    start_response('200 OK', [])\n    return [b'']\n")
    cfg = tmp_path / "config.ini"
    cfg.write_text("[server]\nwsgi_path = marker_app:application\nmin_workers = 1\n"
                   f"sockets = 127.0.0.1:{free_port()}\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return subprocess.run([BLAZE, *args, str(cfg)], cwd=tmp_path, env=server_env(), capture_output=True, text=True,
                          timeout=20)


@pytest.mark.parametrize("key,value,fragment", CONFIG_ERRORS, ids=[f"{k}={v}" for k, v, _ in CONFIG_ERRORS])
def test_config_error(tmp_path, key, value, fragment):
    proc = _cli(tmp_path, {key: value})
    assert proc.returncode == 2, f"exit code {proc.returncode}:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "IMPORTED").exists(), "a worker imported the app"


def test_config_accepts_networks_and_limits(tmp_path):
    for settings in ({"rate_limit": "1000000000", "forwarded_allow_ips": "10.0.0.0/8, ::1 ,192.168.1.5,fd00::/8"},
                     {"rate_limit": "0", "forwarded_allow_ips": "*"}):
        proc = _cli(tmp_path, settings, "--check-config")
        assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- 10: reload

def test_limit_survives_reload(server_factory, tmp_path):
    srv = make_server(server_factory, tmp_path, "s", rate_limit=2, workers=2)
    start_all(srv)
    t0 = time.monotonic()
    assert [get(srv.port, "127.0.0.2", f"/r{i}")[0] for i in range(2)] == [200, 200]
    ra = assert_429(get(srv.port, "127.0.0.2", "/r-before"), 2)         # 60/2 s after the first
    assert 30 - math.ceil(time.monotonic() - t0) <= ra <= 30, ra
    old = set(srv.worker_pids())
    n = len(COMPLETE.findall(srv.output()))
    srv.send(signal.SIGHUP)
    wait_until(lambda: len(COMPLETE.findall(srv.output())) > n, 15, what=f"'Reload complete':\n{srv.output()[-2000:]}")
    wait_until(lambda: (lambda w: len(w) == 2 and not set(w) & old)(set(srv.worker_pids())), 15,
               what="only new-generation workers")
    fresh = info(get(srv.port, "127.0.0.3", "/r-new"))
    assert fresh["pid"] not in old
    after = [get(srv.port, "127.0.0.2", f"/r-after{i}") for i in range(4)]
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"the reload took {elapsed:.1f}s: 127.0.0.2 may have earned a request back"
    for r in after:
        ra = assert_429(r, 2)
        assert 30 - math.ceil(elapsed) <= ra <= 30, (ra, elapsed)
    assert len(calls(srv, "127.0.0.2")) == 2
