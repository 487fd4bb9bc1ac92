"""Big one-item responses (threads = 1, keep-alive) are held until the
loop's pass ends with the body referred to in place (conn_lend_last): what
a client could not take at that flush is copied before Python lets the
body go.  These check every byte, with bodies that are new objects each
request, so memory freed too early is reused by the next response and
shows up as wrong bytes."""
import hashlib
import time

from apps_wsgi import HTTPConn, pattern_chunk

APP = "apps_lend:app"
MiB = 1024 * 1024


def get_big(i, kb):
    return f"GET /big?kb={kb}&i={i} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def check(r, i, kb):
    assert r.status == 200, r
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(pattern_chunk(i, kb * 1024)).hexdigest(), \
        f"response {i}: {len(r.body)} bytes, not pattern {i}"


def test_many_big_responses_in_one_pass(server_factory):
    """3 clients pipeline 4 responses of 3 MiB each: more than the 8 MiB a
    pass holds (BLAZE_LEND_MAX), so some are flushed early."""
    srv = server_factory(APP).start()
    conns = [HTTPConn.connect(srv, timeout=30) for _ in range(3)]
    try:
        for k, c in enumerate(conns):
            c.send(b"".join(get_big(10 * k + j, 3 * 1024) for j in range(4)))
        for k, c in enumerate(conns):
            for j in range(4):
                check(c.response(), 10 * k + j, 3 * 1024)
    finally:
        for c in conns:
            c.close()


def test_slow_reader_gets_its_bytes_after_the_body_is_gone(server_factory):
    """A client with a small receive buffer pipelines three 2 MiB responses
    and reads late: at each flush most of a response is left over, copied,
    and Python drops the body.  Another client meanwhile asks for bodies of
    the same size, which reuse that memory."""
    srv = server_factory(APP).start()
    with HTTPConn.connect(srv, timeout=30, rcvbuf=16384) as slow, HTTPConn.connect(srv, timeout=30) as other:
        slow.send(b"".join(get_big(100 + j, 2048) for j in range(3)))
        for j in range(6):
            other.send(get_big(200 + j, 2048))
            check(other.response(), 200 + j, 2048)
        time.sleep(0.2)                         # pacing: the slow client reads late
        for j in range(3):
            check(slow.response(), 100 + j, 2048)
        other.send(get_big(300, 64))            # the worker is fine
        check(other.response(), 300, 64)
