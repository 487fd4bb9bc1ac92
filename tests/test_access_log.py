"""The access log: one line per request, formatted in C and written in batches.

    [2025-04-25 10:00:00] Request: GET / from 127.0.0.1, Status: 200 OK, Latency: 1.234ms

With log_dir every process appends to log_dir/YYYY-MM-DD.log (local date),
server events next to the access lines as `[...] [pid] [LEVEL] message`;
without it access lines go to stderr.  Each worker buffers its lines and
appends them in large writes (buffer full, about once a second, at exit),
never splitting a line.  Nothing buffered is lost on SIGTERM, HUP, TTOU or
max_requests recycling.  access_log = false turns the lines off.
BLAZEWSGI_CLOCK_OFFSET shifts the log's clock (tests of midnight); SIGUSR1
reopens the files in the master and the workers.

Every server here also answers the conftest start-up probe, `GET /__probe__`,
which is logged like any other request.
"""
import collections
import datetime
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time

import pytest

from apps_log import Client, expected_status, log_files, parse, request_bytes
from apps_reload import Load, alive
from conftest import free_port, read_response, wait_until

APP = "apps_log:app"
PROBE = ("GET", "/__probe__", "127.0.0.1", "200 OK")
FLUSH = 2.5        # the periodic flush is about once a second: lines show up within this
COMPLETE = re.compile(r"(?i)reload complete")
BAD_HEADER = (b"GET /malformed?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
              ("GET", "/malformed?x=1", "127.0.0.1", "400 Bad Request"))


@pytest.fixture
def make_server(server_factory):
    """Like server_factory, but each server gets its own directory (config, output, logs/)."""
    def make(app=APP, log=True, name="s", **kw):
        extra = dict(kw.pop("extra", {}) or {})
        if log:
            extra["log_dir"] = "logs"        # relative to the server's own directory
        srv = server_factory(app, own_dir=name, extra=extra, **kw)
        os.makedirs(os.path.join(srv.tmp, "logs"))
        srv.log_dir = os.path.join(srv.tmp, "logs") if log else None
        return srv
    return make



# ---------------------------------------------------------------- helpers

def whole_lines(srv):
    """Every log file's lines: each one an access line or an event line, dated like its
    file.  Returns (access Lines, event lines) over all files."""
    files = log_files(srv.log_dir)
    assert files, f"no *.log file in {srv.log_dir}; server output:\n{output(srv)[-3000:]}"
    access, events = [], []
    for name, text in files.items():
        a, e, other = parse(text)
        assert not other, (f"{name}: {len(other)} line(s) neither access nor event lines (split, "
                           f"interleaved or mis-formatted):\n" + "\n".join(map(repr, other[:10])))
        day = name[:-4]
        wrong = [x.raw for x in a if x.date != day] + [x for x in e if x[1:11] != day]
        assert not wrong, f"{name} holds lines of another date: {wrong[:5]}"
        access += a
        events += e
    return access, events


def access_count(srv):
    """Access lines written so far (no format check: for polling)."""
    return sum(len(parse(t)[0]) for t in log_files(srv.log_dir).values())


def logged_targets(srv):
    return collections.Counter(x.target for t in log_files(srv.log_dir).values() for x in parse(t)[0])


def _short(key):
    return tuple(f"{v[:50]}...({len(v)} bytes)...{v[-20:]}" if isinstance(v, str) and len(v) > 100 else v
                 for v in key)


def assert_exactly(access, expected):
    """The access lines are exactly the expected (method, target, client, status) keys."""
    got = collections.Counter(x.key for x in access)
    want = collections.Counter(expected)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(got.values())} access lines for {sum(want.values())} requests; "
        f"missing {[(_short(k), n) for k, n in list(missing.items())[:10]]}, "
        f"unexpected {[(_short(k), n) for k, n in list(extra.items())[:10]]}")


def output(srv):
    """The server's stdout + stderr (also after stop(), which closes srv.log)."""
    with open(srv.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def stop_clean(srv):
    rc = srv.stop()
    assert rc == 0, f"exit code {rc}:\n{output(srv)[-3000:]}"


def events_text(srv):
    return "\n".join(whole_lines(srv)[1])


def mixed_plan(n):
    """n (method, target, body) requests: methods, paths with queries, statuses."""
    shapes = [("GET", "/"), ("GET", "/a/b?x=1&y=two"), ("POST", "/submit"), ("PUT", "/items/7"),
              ("DELETE", "/items/7?force=1"), ("HEAD", "/head"), ("PATCH", "/items/8"),
              ("OPTIONS", "/opts"), ("GET", "/status/404"), ("GET", "/status/201"),
              ("POST", "/status/204"), ("GET", "/status/302"), ("GET", "/status/418"),
              ("GET", "/status/503"), ("GET", "/reason?text=Fine+Thanks"), ("GET", "/p%20q?z=%2F")]
    plan = []
    for i in range(n):
        method, target = shapes[i % len(shapes)]
        body = b"x" * (i % 7 * 100) if method in ("POST", "PUT", "PATCH") else b""
        plan.append((method, target, body))
    return plan


def run_threads(n, fn):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert not any(t.is_alive() for t in threads), "a client thread hangs"


def send_plan(client, plan, threads=8):
    """The plan from `threads` clients: even ones on fresh connections, odd ones keep-alive."""
    def worker(k):
        items = plan[k::threads]
        if k % 2 == 0:
            for method, target, body in items:
                client.one(method, target, body)
        else:
            with client.connect() as s:
                for method, target, body in items:
                    client.one(method, target, body, sock=s)
    run_threads(threads, worker)


def syscw(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/io")


def gone(pid, timeout=10):
    wait_until(lambda: not alive(pid), timeout, what=f"worker {pid} to exit")


# ---------------------------------------------------------------- every request, once, whole

def test_every_request_is_logged_once_in_the_exact_format(make_server):
    srv = make_server(workers=2).start()
    t0 = time.time()
    client = Client(srv.connect)
    send_plan(client, mixed_plan(197))
    client.raw(*BAD_HEADER)                                   # the server's own 400
    client.raw(b"G@T /junk HTTP/1.1\r\nHost: x\r\n\r\n", (None, None, "127.0.0.1", "400 Bad Request"))
    client.one("GET", "/sleep?ms=150")
    n = len(client.sent)
    assert n == 200
    pids = {p for _, p in client.sent if p}
    assert len(pids) == 2, f"the requests should reach both workers, got {pids}"
    # while the server runs: the periodic flush writes them all within about a second
    wait_until(lambda: access_count(srv) >= n + 1, FLUSH,
               what=f"{n + 1} access lines while the server runs (have {access_count(srv)})")
    stop_clean(srv)
    t1 = time.time()
    access, events = whole_lines(srv)
    assert len(access) == n + 1, f"{len(access)} access lines for {n} requests + the probe"
    known = {k[1] for k, _ in client.sent} | {PROBE[1]}
    garbage = [x for x in access if x.target not in known]
    assert len(garbage) == 1 and garbage[0].status == "400 Bad Request" and garbage[0].client == "127.0.0.1", \
        f"the malformed request line must be logged once as a 400: {garbage}"
    assert_exactly([x for x in access if x is not garbage[0]],
                   [k for k, _ in client.sent if k[0] is not None] + [PROBE])
    for x in access:   # local time, now
        stamp = time.mktime(time.strptime(x.raw[1:20], "%Y-%m-%d %H:%M:%S"))
        assert t0 - 3 <= stamp <= t1 + 2, f"timestamp not the local time of the request: {x.raw}"
    slow = [x for x in access if x.target == "/sleep?ms=150"]
    assert 150.0 <= slow[0].latency < 5000, f"latency of a 150 ms request: {slow[0].raw}"
    assert all(x.latency < 5000 for x in access), max(access, key=lambda x: x.latency)
    assert events, "server events (start, stop) go to the same file"
    assert not [e for e in events if "Traceback" in e or "[ERROR]" in e or "[CRITICAL]" in e], events


def test_reason_phrase_is_logged_as_sent_and_server_500s_with_theirs(make_server):
    """The status text is the reason phrase the response carried, however long (150
    bytes here); a 500 the server makes when the app raises is logged with its own."""
    srv = make_server(workers=1).start()
    client = Client(srv.connect)
    client.one("GET", "/reason?text=Fine+Thanks")
    client.one("GET", "/reason?text=Custom+" + "reason-" * 20 + "end")
    with srv.connect() as s:
        s.sendall(b"GET /raise?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, _ = read_response(s)
    assert status == 500
    stop_clean(srv)
    # the traceback is logged too (several lines): only the access lines are compared here
    access = [x for t in log_files(srv.log_dir).values() for x in parse(t)[0]]
    assert_exactly(access, client.keys() + [PROBE, ("GET", "/raise?x=1", "127.0.0.1", "500 Internal Server Error")])


def test_pipelined_streamed_and_large_responses_are_logged_with_their_own_request(make_server):
    """Seven requests in one write on one connection (a streamed response and one
    larger than the socket buffer among them): each line names its own request."""
    srv = make_server(workers=1).start()
    reqs = [("GET", "/pipe/0", b""), ("POST", "/pipe/1?b=1", b"p" * 3000), ("GET", "/stream?n=3", b""),
            ("GET", "/big?kb=512", b""), ("HEAD", "/pipe/4", b""), ("GET", "/status/404?p=5", b""),
            ("GET", "/pipe/6", b"")]
    data = b"".join(request_bytes(m, t, b, close=False) for m, t, b in reqs)
    with srv.connect() as s:
        s.sendall(data)
        statuses = [read_response(s, head_only=(m == "HEAD"))[0] for m, _, _ in reqs]
    assert statuses == [200, 200, 200, 200, 200, 404, 200], statuses
    stop_clean(srv)
    access, _ = whole_lines(srv)
    assert_exactly(access, [(m, t, "127.0.0.1", expected_status(t)) for m, t, _ in reqs] + [PROBE])


def test_server_made_errors_are_logged_with_the_reason_they_carried(make_server):
    """Requests the server refuses itself are logged once each, with the status line's
    reason phrase; when the request line was read, with its method and target."""
    srv = make_server(workers=1, extra={"max_body_size": 1024}).start()
    exact = {   # the request line was complete and valid
        "bad Content-Length": b"GET /e/cl?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "body too large": b"POST /e/big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000,
        "no Host": b"GET /e/nohost HTTP/1.1\r\n\r\n",
        "unsupported Expect": b"PUT /e/expect HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n"
                              b"Content-Length: 1\r\n\r\nz",
    }
    loose = {   # the method / target may not be known: status and client only
        "request line too long": b"GET /" + b"l" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "header section too large": b"GET /e/hdrs HTTP/1.1\r\nHost: x\r\n"
                                    + b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 200) for i in range(200)) + b"\r\n",
        "HTTP/2.0": b"GET /e/v2 HTTP/2.0\r\nHost: x\r\n\r\n",
        "garbage": b"\x01\x02 nonsense\r\n\r\n",
    }
    carried = {}
    for name, data in {**exact, **loose}.items():
        with srv.connect() as s:
            try:
                s.sendall(data)
            except OSError:
                pass                        # refused mid-send: the answer is still there to read
            line = b""
            while b"\r\n" not in line:
                chunk = s.recv(4096)
                assert chunk, f"{name}: no response ({line!r})"
                line += chunk
        status_line = line.split(b"\r\n")[0].decode("latin-1")
        assert re.fullmatch(r"HTTP/1\.1 [45]\d\d .+", status_line), (name, status_line)
        carried[name] = status_line[9:]
    stop_clean(srv)
    access, _ = whole_lines(srv)
    by_target = {x.target: x for x in access}
    for name, data in exact.items():
        method, target = data.split(b" ")[:2]
        x = by_target.get(target.decode())
        assert x is not None, f"{name}: no line for {target.decode()}: {[a.raw[:150] for a in access]}"
        assert x.key == (method.decode(), target.decode(), "127.0.0.1", carried[name]), (name, x.raw)
    rest = sorted(x.status for x in access if x is not by_target.get(PROBE[1])
                  and x.target not in {d.split(b" ")[1].decode() for d in exact.values()})
    assert rest == sorted(carried[n] for n in loose), (f"lines of the loose cases {[x.raw[:200] for x in access]}"
                                                       f" vs responses {carried}")
    assert all(x.client == "127.0.0.1" for x in access)
    assert len(access) == len(exact) + len(loose) + 1


def test_long_request_target_is_logged_whole(make_server):
    """The target as sent, however long within limit_request_line (default 8190)."""
    srv = make_server(workers=1).start()
    client = Client(srv.connect)
    client.one("GET", "/long/" + "t" * 3000 + "?q=" + "v" * 1000)      # 4009 bytes
    client.one("GET", "/long/" + "u" * 8000)                              # 8006 bytes
    stop_clean(srv)
    access, _ = whole_lines(srv)
    assert_exactly(access, client.keys() + [PROBE])


def test_stderr_without_log_dir(make_server):
    srv = make_server(log=False, workers=2).start()
    client = Client(srv.connect)
    send_plan(client, mixed_plan(40), threads=4)
    client.raw(*BAD_HEADER)
    stop_clean(srv)
    out = output(srv)
    lines = out.split("\n")
    access, _, _ = parse("\n".join(x for x in lines if " Request: " in x) + "\n")
    mangled = [x for x in lines if " Request: " in x and not parse(x + "\n")[0]]
    assert not mangled, f"access lines split or interleaved on stderr: {mangled[:5]}"
    assert_exactly(access, client.keys() + [PROBE])
    assert not os.listdir(os.path.join(srv.tmp, "logs")), "no log files without log_dir"


def test_unix_socket_peer_is_logged_as_local(make_server, sockdir):
    port = free_port()
    path = os.path.join(sockdir, "app.sock")
    srv = make_server(workers=1, bind=[f"unix:{path}", f"127.0.0.1:{port}"])
    srv.port = port
    srv.start()                                  # the probe goes over the Unix socket
    unix = Client(srv.connect, client="local")
    for i in range(5):
        unix.one("GET", f"/over-unix/{i}?q={i}")
    unix.one("GET", "/status/404")
    tcp = Client(lambda: socket.create_connection(("127.0.0.1", port), timeout=10))
    for i in range(3):
        tcp.one("GET", f"/over-tcp/{i}")
    stop_clean(srv)
    access, _ = whole_lines(srv)
    assert_exactly(access, unix.keys() + tcp.keys() + [("GET", "/__probe__", "local", "200 OK")])


def test_access_log_false_writes_no_access_lines(make_server):
    srv = make_server(workers=1, extra={"access_log": "false"}).start()
    client = Client(srv.connect)
    send_plan(client, mixed_plan(20), threads=2)
    client.raw(*BAD_HEADER)
    srv.send(signal.SIGHUP)                                   # an event after the requests
    wait_until(lambda: COMPLETE.search(events_text(srv)), 15, what="'Reload complete' in the log file")
    stop_clean(srv)
    access, events = whole_lines(srv)
    assert access == [], access[:5]
    assert events and COMPLETE.search("\n".join(events)), "server events are still logged"
    assert " Request: " not in output(srv), output(srv)[-2000:]


# ---------------------------------------------------------------- batching

def test_lines_are_batched_and_flushed_about_once_a_second(make_server):
    """Evidence without strace: a line is not in the file the moment its response is read
    (it waits in the worker's buffer), it is there within ~2 s while the server runs,
    and logging 300 requests costs the worker only a few write syscalls more than
    serving them with access_log = false."""
    on = make_server(workers=1, name="on").start()
    off = make_server(workers=1, name="off", extra={"access_log": "false"}).start()
    wait_until(lambda: access_count(on) == 1, FLUSH, what="the probe's line (periodic flush)")

    # 1. buffered: right after each response its line is (almost always) not written yet
    seen_at_once = 0
    with on.connect() as s:
        client = Client(on.connect)
        for i in range(10):
            client.one("GET", f"/batched/{i}", sock=s)
            seen_at_once += logged_targets(on)[f"/batched/{i}"]
    t = time.monotonic()
    wait_until(lambda: access_count(on) == 11, FLUSH,
               what=f"the 10 lines within {FLUSH} s while the server runs (have {access_count(on) - 1})")
    assert seen_at_once <= 2, (f"{seen_at_once} of 10 lines were in the file as soon as the response "
                               f"arrived: written per request, not batched")
    assert time.monotonic() - t < FLUSH

    # 2. few writes: syscalls of 300 logged requests vs 300 unlogged ones
    def cost(srv, wait_lines):
        (pid,) = srv.worker_pids()
        before = syscw(pid)
        with srv.connect() as s:
            c = Client(srv.connect)
            for i in range(300):
                c.one("GET", f"/cost/{i}", sock=s)
        if wait_lines:
            wait_until(lambda: access_count(srv) == 311, FLUSH, what="the 300 lines")
        return syscw(pid) - before

    logged, unlogged = cost(on, True), cost(off, False)
    assert logged - unlogged <= 15, (f"300 logged requests took {logged} write syscalls, 300 unlogged "
                                     f"ones {unlogged}: the log is not written in large appends")
    stop_clean(on)
    stop_clean(off)
    access, _ = whole_lines(on)
    assert len(access) == 311


# ---------------------------------------------------------------- nothing lost

def test_nothing_lost_across_reload(make_server):
    srv = make_server(workers=2).start()
    old = srv.worker_pids()
    assert len(old) == 2
    client = Client(srv.connect)
    send_plan(client, mixed_plan(60), threads=6)
    load = Load(srv.connect, conns=4, keepalive=True, path="/during-reload", name="load")
    try:
        wait_until(lambda: load.ok > 200, 10, what="the load to run")
        srv.send(signal.SIGHUP)
        wait_until(lambda: COMPLETE.search(events_text(srv)), 15, what="'Reload complete' in the log file")
        for p in old:
            gone(p)
        # the old workers are gone: everything they served is in the file already
        lost = collections.Counter([k[1] for k in client.keys()] + [PROBE[1]]) - logged_targets(srv)
        assert not lost, f"lines of the retired workers lost: {dict(lost)}"
        ok = load.ok
        wait_until(lambda: load.ok > ok + 200, 10, what="the load to go on after the reload")
    finally:
        load.stop()
    assert not load.failures, load.report()
    send_plan(client, mixed_plan(30), threads=3)
    stop_clean(srv)
    access, events = whole_lines(srv)
    assert_exactly(access, client.keys() + [PROBE] + [("GET", "/during-reload", "127.0.0.1", "200 OK")] * load.ok)


def test_nothing_lost_when_ttou_retires_a_worker(make_server):
    srv = make_server(workers=1, extra={"max_workers": 2, "scale_threshold_high": 1000000,
                                        "scale_threshold_low": 0}).start()
    (first,) = srv.worker_pids()
    srv.send(signal.SIGTTIN)
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    client = Client(srv.connect)
    served = collections.defaultdict(list)
    for i in range(400):                 # fresh connections until both workers served some
        pid = client.one("GET", f"/ttou/{i}")
        served[pid].append(f"/ttou/{i}")
        if i >= 20 and all(len(served[p]) >= 5 for p in pids):
            break
    assert all(len(served[p]) >= 5 for p in pids), {p: len(v) for p, v in served.items()}
    load = Load(srv.connect, conns=2, keepalive=True, path="/during-ttou", name="load")
    try:
        wait_until(lambda: load.ok > 100, 10, what="the load to run")
        srv.send(signal.SIGTTOU)
        retired = wait_until(lambda: [p for p in pids if not alive(p)], 15, what="a worker to retire")
        (retired,) = retired
        got = logged_targets(srv)   # at once: the retired worker wrote its buffer when it exited
        lost = [t for t in served[retired] if got[t] != 1]
        assert not lost, f"{len(lost)} of {len(served[retired])} lines of the retired worker {retired} lost"
        ok = load.ok
        wait_until(lambda: load.ok > ok + 100, 10, what="the load to go on after TTOU")
    finally:
        load.stop()
    assert not load.failures, load.report()
    # the remaining worker's lines arrive with its periodic flush
    want = len(client.sent) + 1 + load.ok
    wait_until(lambda: access_count(srv) == want, FLUSH,
               what=f"{want} access lines while the server runs (have {access_count(srv)})")
    stop_clean(srv)
    access, _ = whole_lines(srv)
    assert_exactly(access, client.keys() + [PROBE] + [("GET", "/during-ttou", "127.0.0.1", "200 OK")] * load.ok)
    assert first in pids


def test_nothing_lost_when_max_requests_recycles(make_server):
    srv = make_server(workers=1, extra={"max_requests": 10}).start()
    client = Client(srv.connect)
    served = collections.defaultdict(list)
    current = None
    checked = []
    for i in range(35):
        pid = client.one("GET", f"/mr/{i}")
        served[pid].append(f"/mr/{i}")
        if current is not None and pid != current:
            gone(current)
            got = logged_targets(srv)     # at once: written when the recycled worker exited
            lost = [t for t in served[current] if got[t] != 1]
            assert not lost, f"recycled worker {current}: {len(lost)} of its lines lost: {lost}"
            checked.append(current)
        current = pid
    assert len(checked) >= 2, f"expected recycling every 10 requests: {dict(served)}"
    stop_clean(srv)
    access, _ = whole_lines(srv)
    assert_exactly(access, client.keys() + [PROBE])


# ---------------------------------------------------------------- midnight, reopen

def test_lines_land_in_the_file_of_their_own_date_across_midnight(make_server):
    now = time.time()
    lt = time.localtime(now)
    to_midnight = 86400 - (lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec) - (now % 1)
    offset = int(to_midnight) - 3          # the server's clock starts ~3 s before midnight
    before = datetime.date.fromtimestamp(now + offset)
    after = before + datetime.timedelta(days=1)
    srv = make_server(workers=2, env={"BLAZEWSGI_CLOCK_OFFSET": str(offset)}).start()
    next_file = os.path.join(srv.log_dir, f"{after.isoformat()}.log")
    client = Client(srv.connect)
    deadline = time.monotonic() + 10
    i = 0
    while " Request: " not in read(next_file):
        assert time.monotonic() < deadline, f"no {after}.log with access lines after 10 s: {os.listdir(srv.log_dir)}"
        client.one("GET", f"/seq/{i}")
        i += 1
        time.sleep(0.02)          # pacing: ~40 requests/s across the switch
    for _ in range(20):
        client.one("GET", f"/seq/{i}")
        i += 1
    srv.send(signal.SIGHUP)       # events after midnight too
    wait_until(lambda: COMPLETE.search(events_text(srv)), 15, what="'Reload complete' in the log file")
    stop_clean(srv)
    files = log_files(srv.log_dir)
    assert sorted(files) == [f"{before.isoformat()}.log", f"{after.isoformat()}.log"], sorted(files)
    access, events = whole_lines(srv)         # every line in the file of its own date
    assert_exactly(access, client.keys() + [PROBE])
    first, second = (parse(files[f"{d.isoformat()}.log"])[0] for d in (before, after))
    assert [x for x in first if x.target.startswith("/seq/")], "no request logged before midnight"
    assert len([x for x in second if x.target.startswith("/seq/")]) >= 20
    assert all(x.raw[12:20] >= "23:59:5" for x in first), [x.raw for x in first if x.raw[12:20] < "23:59:5"][:3]
    assert all(x.raw[12:20] <= "00:01:00" for x in second), [x.raw for x in second][:3]
    assert COMPLETE.search(files[f"{after.isoformat()}.log"]), "events after midnight go to the new day's file"
    # requests went one after another: each file holds a contiguous run of them
    seq = [int(x.target.split("/")[2]) for x in first if x.target.startswith("/seq/")]
    assert sorted(seq) == list(range(len(seq))), f"lines of after midnight in the day before: {sorted(seq)}"


def test_usr1_reopens_the_log_file_in_master_and_workers(make_server):
    srv = make_server(workers=2).start()
    client = Client(srv.connect)
    send_plan(client, mixed_plan(20), threads=4)
    wait_until(lambda: access_count(srv) == 21, FLUSH, what="the first lines")
    (name,) = log_files(srv.log_dir)
    path = os.path.join(srv.log_dir, name)
    moved = path + ".1"
    os.rename(path, moved)
    size = os.path.getsize(moved)
    srv.send(signal.SIGUSR1)
    wait_until(lambda: parse(read(path))[1], 10, what=f"a new {name} with the master's event about USR1")
    later = Client(srv.connect)
    send_plan(later, [("GET", f"/after-usr1/{i}", b"") for i in range(40)], threads=8)
    assert len({p for _, p in later.sent}) == 2, "both workers should have served after USR1"
    wait_until(lambda: access_count(srv) == 40, FLUSH,
               what=f"the 40 new lines in the new {name} (have {access_count(srv)}; old file "
                    f"grew by {os.path.getsize(moved) - size} bytes)")
    assert os.path.getsize(moved) == size, "lines after USR1 were appended to the renamed file"
    stop_clean(srv)
    access, events = whole_lines(srv)           # the new file only (*.log)
    assert_exactly(access, later.keys())
    assert os.stat(path).st_ino != os.stat(moved).st_ino
    old_access, _, other = parse(read(moved))
    assert not other and len(old_access) == 21
