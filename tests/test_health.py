"""Worker health: stuck requests are dumped and replaced, slow-but-progressing ones are not,
max_requests recycles workers without failing a request."""
import http.client
import re
import socket
import time

from conftest import request, wait_until


def get(srv, path, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_stuck_request_is_dumped_killed_and_replaced(server_factory):
    srv = server_factory(app="apps_health:app", workers=1, extra={"timeout": 1}).start()
    old = srv.worker_pids()
    assert len(old) == 1
    t0 = time.monotonic()
    with srv.connect(timeout=15) as s:
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100) == b""          # the worker died under it: closed, no response
    took = time.monotonic() - t0
    assert took < 6, f"a 1 s timeout took {took:.1f} s to act"
    new = wait_until(lambda: [p for p in srv.worker_pids() if p not in old], 10, what="a new worker")
    assert len(new) == 1
    status, body = get(srv, "/pid")
    assert status == 200 and int(body) == new[0]
    out = srv.output()
    assert re.search(rf"Worker {old[0]} is stuck: in one request for [\d.]+ s", out), out
    assert "stuck_in_sleepy_view" in out, "the stack dump must name the sleeping function:\n" + out
    assert "time.sleep" in out or "File" in out


def test_slow_streaming_response_is_not_killed(server_factory):
    srv = server_factory(app="apps_health:app", workers=1, extra={"timeout": 1}).start()
    old = srv.worker_pids()
    status, body = get(srv, "/trickle", timeout=20)
    assert status == 200 and body == b"".join(b"%d\n" % i for i in range(8))
    assert srv.worker_pids() == old
    assert "is stuck" not in srv.output()


def test_timeout_zero_disables_the_check(server_factory):
    srv = server_factory(app="apps_health:app", workers=1, extra={"timeout": 0, "graceful_timeout": 1}).start()
    old = srv.worker_pids()
    with srv.connect(timeout=5) as s:
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(2.5)
        try:
            data = s.recv(100)
        except socket.timeout:
            data = None
        assert data is None, "the request should still be running"
    assert srv.worker_pids() == old


def test_max_requests_recycles_without_failing_requests(server_factory):
    srv = server_factory(app="apps_health:app", workers=1, extra={"max_requests": 5}).start()
    first = srv.worker_pids()
    pids = []
    with srv.connect() as s:
        # Keep-alive until the server says close: the worker's 5th response (the
        # start-up probe was its first) carries Connection: close, and nothing is reset.
        for i in range(4):
            status, headers, body = request(s, b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200
            pids.append(int(body))
            assert (headers.get("connection") == "close") == (i == 3), (i, headers)
        assert s.recv(10) == b""
    for _ in range(12):                           # new connections: never refused, never failed
        status, body = get(srv, "/pid")
        assert status == 200
        pids.append(int(body))
    assert pids[0] == first[0]
    assert len(set(pids)) >= 3, pids              # recycled after every 5 requests
    out = srv.output()
    assert re.search(rf"Worker {first[0]} recycled after 5 requests", out), out
    assert len(re.findall(r"recycled after 5 requests", out)) >= 2, out
    assert "exited with code" not in out and "backoff" not in out
