"""Request limits and timeouts, each with a small configured limit, over raw sockets.

Sizes: limit_request_line (414), limit_request_fields, limit_request_field_size
and head_buffer_size (431), max_body_size (413 before the body is read, with no
100 Continue).  Time: header_timeout (slowloris), keepalive_timeout, io_timeout,
measured with bounded waits (behaviour checks, not benchmarks).  Plus
Expect: 100-continue and max_connections.  After every 4xx the server must
close the connection.

The counting app (tests/apps_limits.py) appends "METHOD PATH BODYLEN" to
$BLAZE_TEST_HITS for each request it serves: that file proves whether the
app ran.
"""
import os
import select
import socket
import time

import pytest

from conftest import read_response, request

GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


# ---- helpers ----

def start(server_factory, tmp_path, app="apps_limits:counting_app", **settings):
    hits = os.path.join(str(tmp_path), "hits.txt")
    srv = server_factory(app=app, workers=1, extra=settings, env={"BLAZE_TEST_HITS": hits})
    srv.hits_file = hits
    return srv.start()


def hits(srv, path):
    """The requests for `path` that reached the app."""
    try:
        with open(srv.hits_file) as f:
            return [line.split() for line in f if line.split()[1] == path]
    except FileNotFoundError:
        return []


def wait_closed(sock, timeout):
    """Read until EOF (or reset); returns (seconds waited, bytes received). Fails after timeout."""
    t0 = time.monotonic()
    data = b""
    while True:
        left = timeout - (time.monotonic() - t0)
        assert left > 0, f"connection still open after {timeout}s (received {data!r})"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0, data
        if not chunk:
            return time.monotonic() - t0, data
        data += chunk


def assert_error_and_closed(sock, data, status):
    """Send data (the server may stop reading early), expect `status`, then EOF."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got, headers, body = read_response(sock)
    assert got == status, f"expected {status}, got {got}: {body!r}"
    assert headers.get("connection") == "close"
    _, rest = wait_closed(sock, 5)
    assert rest == b"", f"bytes after the {status} response: {rest!r}"
    return body


def fresh_ok(srv):
    """The server still answers (the worker survived the previous abuse)."""
    with srv.connect() as s:
        status, _, _ = request(s, GET)
        assert status == 200


def head_with_fields(n_fields, value_len=5):
    lines = [b"GET /ok HTTP/1.1", b"Host: x"]
    lines += [b"X-F%d: %s" % (i, b"v" * value_len) for i in range(n_fields - 1)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ---- request line ----

def test_request_line_limit(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, limit_request_line=100)
    pad = 100 - len(b"GET / HTTP/1.1")
    at_limit = b"GET /" + b"a" * pad + b" HTTP/1.1"
    assert len(at_limit) == 100
    with srv.connect() as s:
        status, _, _ = request(s, at_limit + b"\r\nHost: x\r\n\r\n")
        assert status == 200
    over = b"GET /" + b"a" * (pad + 1) + b" HTTP/1.1"
    with srv.connect() as s:
        assert_error_and_closed(s, over + b"\r\nHost: x\r\n\r\n", 414)
    assert hits(srv, "/" + "a" * (pad + 1)) == []


def test_request_line_limit_before_line_ends(server_factory, tmp_path):
    """A request line that never ends gets its 414 once it passes the limit."""
    srv = start(server_factory, tmp_path, limit_request_line=100)
    with srv.connect() as s:
        assert_error_and_closed(s, b"GET /" + b"a" * 300, 414)
    fresh_ok(srv)


# ---- header fields ----

def test_request_fields_limit(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, limit_request_fields=5)
    with srv.connect() as s:
        status, _, _ = request(s, head_with_fields(5))
        assert status == 200
    with srv.connect() as s:
        assert_error_and_closed(s, head_with_fields(6), 431)
    assert len(hits(srv, "/ok")) == 1


def test_request_field_size_limit(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, limit_request_field_size=100)
    at_limit = b"X-Long: " + b"v" * (100 - len(b"X-Long: "))
    assert len(at_limit) == 100
    with srv.connect() as s:
        status, _, _ = request(s, b"GET /ok HTTP/1.1\r\nHost: x\r\n" + at_limit + b"\r\n\r\n")
        assert status == 200
    with srv.connect() as s:
        assert_error_and_closed(s, b"GET /ok HTTP/1.1\r\nHost: x\r\n" + at_limit + b"v\r\n\r\n", 431)
    assert len(hits(srv, "/ok")) == 1


def test_request_field_size_limit_before_line_ends(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, limit_request_field_size=100)
    with srv.connect() as s:
        assert_error_and_closed(s, b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 300, 431)
    assert hits(srv, "/ok") == []
    fresh_ok(srv)


def test_head_buffer_size(server_factory, tmp_path):
    """A head bigger than head_buffer_size: 431, even while it is still arriving."""
    srv = start(server_factory, tmp_path, head_buffer_size=1024, limit_request_line=256)
    big = head_with_fields(30, value_len=60)     # ~2 KB, every line within the line limits
    assert len(big) > 2 * 1024 - 100
    with srv.connect() as s:
        assert_error_and_closed(s, big, 431)
    with srv.connect() as s:                     # never terminated: must not wait for the end
        assert_error_and_closed(s, big[:-4] + b"\r\nX-More: ", 431)
    assert hits(srv, "/ok") == []
    fresh_ok(srv)


def test_head_smaller_than_head_buffer_size_is_served(server_factory, tmp_path):
    """head_buffer_size is "the largest request head": a head well inside it is served."""
    srv = start(server_factory, tmp_path, head_buffer_size=1024, limit_request_line=256)
    head = head_with_fields(10, value_len=80)    # ~900 bytes < 1024
    assert 800 < len(head) < 1000
    with srv.connect() as s:
        status, _, body = request(s, head)
        assert status == 200, f"a {len(head)}-byte head with head_buffer_size=1024: {body!r}"


def test_head_buffer_size_above_80k_is_honoured(server_factory, tmp_path):
    """A configured head_buffer_size is the limit, not http-parser's built-in 80 KiB."""
    srv = start(server_factory, tmp_path, head_buffer_size="256K", limit_request_field_size=200000)
    head = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 100_000 + b"\r\n\r\n"
    with srv.connect() as s:
        status, _, body = request(s, head)
        assert status == 200, f"a 100 KB head with head_buffer_size=256K: {body!r}"


# ---- body size ----

def test_content_length_over_max_body_size(server_factory, tmp_path):
    """413 answered from the head alone (no body sent), the app never runs."""
    srv = start(server_factory, tmp_path, max_body_size=1000)
    with srv.connect() as s:   # at the limit: fine
        status, _, body = request(s, b"POST /fits HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
        assert (status, body) == (200, b"1000")
    with srv.connect() as s:
        s.settimeout(5)
        s.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        status, headers, _ = read_response(s)    # no body was sent: the answer comes anyway
        assert status == 413
        assert headers.get("connection") == "close"
        _, rest = wait_closed(s, 5)
        assert rest == b""
    assert hits(srv, "/big") == []
    assert len(hits(srv, "/fits")) == 1


def test_content_length_over_max_body_size_with_expect_100(server_factory, tmp_path):
    """With Expect: 100-continue the first and only answer is the 413: no 100 Continue."""
    srv = start(server_factory, tmp_path, max_body_size=1000)
    with srv.connect() as s:
        s.settimeout(5)
        s.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
        _, data = wait_closed(s, 5)
    assert data.startswith(b"HTTP/1.1 413 "), data
    assert b"100 Continue" not in data
    assert b"\r\nconnection: close\r\n" in data.lower()
    assert hits(srv, "/big") == []


def test_chunked_body_over_max_body_size(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, max_body_size=1000)
    head = b"POST /%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with srv.connect() as s:   # exactly the limit, in two chunks
        status, _, body = request(s, head % b"fits" + b"258\r\n" + b"a" * 600 + b"\r\n190\r\n" +
                                  b"b" * 400 + b"\r\n0\r\n\r\n")
        assert (status, body) == (200, b"1000")
    with srv.connect() as s:   # 600 + 401: the second chunk crosses the limit
        s.settimeout(5)
        s.sendall(head % b"big" + b"258\r\n" + b"a" * 600 + b"\r\n")
        assert_error_and_closed(s, b"191\r\n" + b"b" * 401 + b"\r\n0\r\n\r\n", 413)
    with srv.connect() as s:   # many small chunks growing past the limit
        assert_error_and_closed(s, head % b"big" + b"64\r\n" + b"c" * 100 + b"\r\n" * 1 +
                                (b"64\r\n" + b"c" * 100 + b"\r\n") * 10 + b"0\r\n\r\n", 413)
    assert hits(srv, "/big") == []
    assert len(hits(srv, "/fits")) == 1


# ---- timeouts ----

def test_slowloris_header_timeout(server_factory, tmp_path):
    """header_timeout is a deadline for the whole head: trickling bytes does not extend it."""
    srv = start(server_factory, tmp_path, header_timeout=1, keepalive_timeout=30, io_timeout=30)
    with srv.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        closed_after, data = None, b""
        while time.monotonic() - t0 < 5:
            readable, _, _ = select.select([s], [], [], 0.3)
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed_after = time.monotonic() - t0
                    break
                data += chunk
                continue
            try:
                s.sendall(b"a")           # one more header byte every 0.3 s
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
    assert closed_after is not None, "the trickling client was never cut off"
    assert 0.8 <= closed_after <= 2.5, f"closed after {closed_after:.2f}s with header_timeout=1"
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    assert hits(srv, "/slow") == []
    fresh_ok(srv)


def test_keepalive_timeout(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, keepalive_timeout=1, header_timeout=30, io_timeout=30)
    with srv.connect() as s:
        assert request(s, GET)[0] == 200
        t0 = time.monotonic()
        elapsed, data = wait_closed(s, 5)
        assert data == b""
        assert 0.7 <= elapsed <= 2.5, f"idle keep-alive connection closed after {elapsed:.2f}s, timeout 1s"
        assert time.monotonic() - t0 >= 0.7


def test_keepalive_timeout_restarts_per_request(server_factory, tmp_path):
    """The keep-alive timeout is per idle period, not per connection."""
    srv = start(server_factory, tmp_path, keepalive_timeout=1, header_timeout=30, io_timeout=30)
    with srv.connect() as s:
        for _ in range(3):
            assert request(s, GET)[0] == 200
            time.sleep(0.6)               # idle, but less than keepalive_timeout (pacing, not readiness)
        assert request(s, GET)[0] == 200  # 1.8 s after the first request: still open
    assert len(hits(srv, "/ok")) == 4


BIG = 300_000   # over BLAZE_LOWAT_MIN (64 KiB): the worker asks the kernel not to wake it per piece


@pytest.mark.parametrize("length, sent, longest", [
    (100, 10, 2.5),
    # A big body: bytes the worker was not woken for are found when the timer
    # fires, and the timer starts again: closed io_timeout to twice it after
    # the last byte.
    (BIG, 5000, 3.5),
], ids=["small", "big"])
def test_io_timeout_mid_body(server_factory, tmp_path, length, sent, longest):
    srv = start(server_factory, tmp_path, io_timeout=1, header_timeout=30, keepalive_timeout=30)
    with srv.connect() as s:
        s.sendall(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
        s.sendall(b"x" * sent)                  # then nothing
        elapsed, data = wait_closed(s, longest + 2.5)
    assert 0.7 <= elapsed <= longest, f"stalled body closed after {elapsed:.2f}s with io_timeout=1"
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    assert hits(srv, "/stalled") == []
    fresh_ok(srv)


def test_io_timeout_is_per_progress(server_factory, tmp_path):
    """A slow body that keeps making progress is not cut off by io_timeout."""
    srv = start(server_factory, tmp_path, io_timeout=1, header_timeout=30, keepalive_timeout=30)
    with srv.connect() as s:
        s.sendall(b"POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        for b in b"abcd":
            time.sleep(0.4)               # pacing: 2 s in total, never 1 s without progress
            s.sendall(bytes([b]))
        time.sleep(0.4)
        status, _, body = request(s, b"e")
        assert (status, body) == (200, b"5")


def test_a_big_body_trickled_slowly_is_read_whole(server_factory, tmp_path):
    """A body big enough to be read in large steps (SO_RCVLOWAT) still counts
    small pieces as progress: none of them wakes the worker, the io timer
    finds them."""
    srv = start(server_factory, tmp_path, io_timeout=1, header_timeout=30, keepalive_timeout=30)
    piece = b"t" * 1000
    with srv.connect() as s:
        s.sendall(b"POST /trickle-big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG + piece)
        sent = len(piece)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.2:      # three io_timeouts of pieces far below the mark
            time.sleep(0.3)                     # pacing: never 1 s without progress
            s.sendall(piece)
            sent += len(piece)
        status, _, body = request(s, b"t" * (BIG - sent))
        assert (status, body) == (200, b"%d" % BIG)
        status, _, _ = request(s, GET)          # and the connection reads heads as before
        assert status == 200
    assert hits(srv, "/trickle-big") == [["POST", "/trickle-big", str(BIG)]]


def test_a_head_after_a_big_body_wakes_the_worker(server_factory, tmp_path):
    """After a big body the next request's few bytes must wake the worker
    again (the low-water mark is put back), on the same connection."""
    srv = start(server_factory, tmp_path, keepalive_timeout=30, header_timeout=30, io_timeout=30)
    with srv.connect() as s:
        for i in range(3):
            status, _, body = request(s, b"POST /big-%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                      % (i, BIG) + b"b" * BIG)
            assert (status, body) == (200, b"%d" % BIG)
            status, _, _ = request(s, GET, timeout=5)
            assert status == 200
    assert len(hits(srv, "/ok")) == 3


def test_a_client_leaving_mid_big_body(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, keepalive_timeout=30, header_timeout=30, io_timeout=30)
    t0 = time.monotonic()
    with srv.connect() as s:
        s.sendall(b"POST /left-big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG + b"l" * 100_000)
        s.shutdown(socket.SHUT_WR)              # the rest never comes
        elapsed, data = wait_closed(s, 5)       # the worker is woken by the close, not by io_timeout
    assert data == b"", data
    assert elapsed < 5 and time.monotonic() - t0 < 10
    assert hits(srv, "/left-big") == []
    fresh_ok(srv)


# ---- Expect: 100-continue ----

def test_expect_100_continue(server_factory, tmp_path):
    srv = start(server_factory, tmp_path)
    with srv.connect() as s:
        s.settimeout(5)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:   # the 100 comes before we send the body
            chunk = s.recv(1)
            assert chunk, f"closed before 100 Continue: {interim!r}"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 ") and interim.endswith(b"\r\n\r\n"), interim
        assert hits(srv, "/upload") == []
        status, _, body = request(s, b"hello")
        assert (status, body) == (200, b"5")
        # The connection stays usable, and a 100 is not repeated for a request without Expect.
        status, _, body = request(s, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert (status, body) == (200, b"2")
    assert [h[2] for h in hits(srv, "/upload")] == ["5", "2"]


def test_expect_100_continue_ignored_for_http10(server_factory, tmp_path):
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request."""
    srv = start(server_factory, tmp_path)
    with srv.connect() as s:
        s.sendall(b"POST /old HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        readable, _, _ = select.select([s], [], [], 0.5)
        early = s.recv(65536) if readable else b""
        assert early == b"", f"an HTTP/1.0 client got an interim response: {early!r}"
        s.sendall(b"hello")
        _, data = wait_closed(s, 5)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\n5"), data


# ---- max_connections ----

def test_max_connections(server_factory, tmp_path):
    srv = start(server_factory, tmp_path, max_connections=2, keepalive_timeout=30, header_timeout=30)
    c1, c2 = srv.connect(), srv.connect()
    try:
        for c in (c1, c2):                 # both accepted and idle (keep-alive)
            assert request(c, GET)[0] == 200
        with srv.connect() as c3:          # the kernel completes the handshake; the worker must not accept
            c3.sendall(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
            readable, _, _ = select.select([c3], [], [], 0.7)
            assert not readable, "a third connection was served while max_connections=2 were open"
            assert hits(srv, "/third") == []
            c1.close()
            status, _, body = request(c3, b"", timeout=5)
            assert (status, body) == (200, b"0")
        assert len(hits(srv, "/third")) == 1
        assert request(c2, GET)[0] == 200   # the other idle connection was left alone
    finally:
        c1.close()
        c2.close()
