"""HTTP/1.1 mechanics on raw sockets: keep-alive, pipelining, HEAD/204/304,
response framing (chunked, close-delimited, Content-Length added, too long,
too short), Date/Server, 100-continue.  Apps: tests/apps_wsgi.py."""
import datetime
import email.utils
import hashlib
import http.client
import json
import os
import re
import threading
import time
from urllib.parse import quote

import pytest
from apps_wsgi import HTTPConn, get, pattern_chunk
from conftest import Server

VALIDATOR_COMPLAINTS = ("WSGIWarning", "without being closed", "in assert_\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("http11")), "apps_wsgi:app",
               extra={"keepalive_timeout": 60}).start()   # an EOF seen by at_eof() is the server's choice
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _validator_watch(srv):
    off = os.path.getsize(srv.log_path)
    yield
    with open(srv.log_path, "rb") as f:
        f.seek(off)
        text = f.read().decode("utf-8", "replace")
    for needle in VALIDATOR_COMPLAINTS:
        assert needle not in text, f"wsgiref.validate complained ({needle!r}):\n{text[-4000:]}"


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "f.bin"
    data = os.urandom(300_000)
    path.write_bytes(data)
    return path, data


def q(path):
    return quote(str(path), safe="")


def post(path, body, version="1.1", chunked=False, headers=()):
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    if chunked:
        framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return (f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Type: a/b\r\n{extra}"
                f"Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Type: a/b\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def body_json(r):
    assert r.status == 200, r
    return json.loads(r.body)


# ---------------------------------------------------------------- keep-alive

def test_keepalive_many_requests(srv):
    with HTTPConn.connect(srv) as c:
        for i in range(200):
            if i % 3 == 2:
                data = os.urandom(i * 37)
                r = c.request(post("/body", data))
                assert body_json(r)["sha256"] == hashlib.sha256(data).hexdigest()
            else:
                r = c.request(get(f"/k{i}"))
                assert (r.status, r.body) == (200, f"GET /k{i}".encode())
            assert r.get("connection") is None or r.get("connection").lower() != "close"


def test_keepalive_with_http_client(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/one")
    assert conn.getresponse().read() == b"GET /one"
    sock = conn.sock
    for i in range(5):
        conn.request("POST", "/body", body=b"x" * i, headers={"Content-Type": "a/b"})
        assert json.loads(conn.getresponse().read())["length"] == i
    conn.request("GET", "/gen?c=a&c=b")
    assert conn.getresponse().read() == b"ab"
    assert conn.sock is sock, "http.client had to reconnect: keep-alive broke"
    conn.close()


def test_http10_without_keepalive_closes(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(b"GET /ten HTTP/1.0\r\n\r\n")
        assert (r.status, r.body) == (200, b"GET /ten")
        assert r.get("content-length") == "8"
        assert (r.get("connection") or "").lower() != "keep-alive"
        assert c.at_eof(5), "HTTP/1.0 without keep-alive must close after the response"


def test_http10_with_keepalive_stays_open(srv):
    with HTTPConn.connect(srv) as c:
        for i in range(3):
            r = c.request(f"GET /ka{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            assert (r.status, r.body) == (200, f"GET /ka{i}".encode())
            assert r.get("connection", "").lower() == "keep-alive"
        r = c.request(post("/body", b"abc", version="1.0", headers=[("Connection", "Keep-Alive")]))
        assert body_json(r)["length"] == 3
        assert r.get("connection", "").lower() == "keep-alive"
        r = c.request(b"GET /last HTTP/1.0\r\n\r\n")
        assert r.body == b"GET /last"
        assert c.at_eof(5)


def test_http10_keepalive_with_unknown_length_is_close_delimited(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(b"GET /gen?c=abc&c=def HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert r.status == 200
        assert r.get("content-length") is None and r.get("transfer-encoding") is None
        assert (r.get("connection") or "").lower() != "keep-alive"
        assert r.body == b"abcdef"     # read to EOF


def test_http11_connection_close(srv):
    with HTTPConn.connect(srv) as c:
        # a second request pipelined behind the close must not be answered
        c.send(get("/bye", headers=[("Connection", "close")]) + get("/never"))
        r = c.response()
        assert (r.status, r.body) == (200, b"GET /bye")
        assert r.get("connection", "").lower() == "close"
        assert c.at_eof(5)


def test_app_connection_close_header_closes(srv):
    with HTTPConn.connect(srv) as c:
        c.send(get("/conn-close") + get("/never"))
        r = c.response()
        assert r.body == b"bye"
        assert [v.lower() for v in r.all("connection")] == ["close"], r.headers
        assert c.at_eof(5)


def test_http11_connection_close_chunked(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/gen?c=x&c=y", headers=[("Connection", "close")]))
        assert r.body == b"xy" and r.complete
        assert r.get("connection", "").lower() == "close"
        assert c.at_eof(5)


# ---------------------------------------------------------------- pipelining

def test_pipelining_20_requests_in_order(srv):
    with HTTPConn.connect(srv) as c:
        c.send(b"".join(get(f"/pipe/{i}") for i in range(20)))
        for i in range(20):
            r = c.response()
            assert (r.status, r.body) == (200, f"GET /pipe/{i}".encode())
        assert c.request(get("/after")).body == b"GET /after"


def test_an_answer_is_not_held_while_the_app_is_slow(srv, tmp_path):
    """Small answers wait for the end of the loop's pass and go out together
    (corking), but not while requests take long on average: then each goes
    out before the app is called again.  The answer to the first request (a
    plain one-item list, which can be held) must arrive while the app still
    waits on the request pipelined behind it."""
    go = tmp_path / "go"
    with HTTPConn.connect(srv, timeout=5) as c:
        for _ in range(8):          # requests now average over 10 ms
            assert c.request(get("/hold?ms=20")).body == b"held"
        c.send(get("/raw/list?body=first") + get(f"/hold?go={quote(str(go))}"))
        assert c.response().body == b"first"           # `go` does not exist yet
        go.write_text("go")
        assert c.response().body == b"held"
        assert c.request(get("/after")).body == b"GET /after"


def test_pipelining_beyond_the_head_buffer(srv):
    """600 requests (~20 KiB, more than the 16 KiB head buffer) in one write."""
    with HTTPConn.connect(srv) as c:
        c.send(b"".join(get(f"/many/{i}") for i in range(600)))
        for i in range(600):
            r = c.response()
            assert (r.status, r.body) == (200, f"GET /many/{i}".encode())


def test_pipelining_with_bodies(srv):
    bodies = [os.urandom(n) for n in (10, 0, 1_100_000, 1, 5000)]
    smuggle = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    trailer = (b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Type: a/b\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;x=y\r\nabc\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n")
    reqs = [post("/body", bodies[0]),
            trailer,
            get("/p1"),
            post("/body", bodies[2], chunked=True),
            post("/body", smuggle),                      # a request-looking body is just a body
            post("/body", bodies[3], chunked=True),
            post("/body", bodies[1], chunked=True),
            get("/p2"),
            post("/body", bodies[4]),
            post("/body", smuggle, chunked=True)]
    expected = [bodies[0], b"abc", b"GET /p1", bodies[2], smuggle, bodies[3], bodies[1], b"GET /p2",
                bodies[4], smuggle]
    with HTTPConn.connect(srv) as c:
        c.send(b"".join(reqs))
        for exp in expected:
            r = c.response()
            assert r.status == 200
            if exp.startswith(b"GET /p"):
                assert r.body == exp
            else:
                got = json.loads(r.body)
                assert (got["length"], got["sha256"]) == (len(exp), hashlib.sha256(exp).hexdigest())
        assert c.request(get("/end")).body == b"GET /end"


def test_a_body_read_straight_from_the_socket_then_a_pipelined_request(srv):
    """Once nothing of a Content-Length body waits in the head buffer, the
    body is read from the socket into its own buffer (http_body_direct),
    never past its end: sent in uneven pieces, the last one in the same write
    as the next request, both come out whole and in order."""
    body = os.urandom(700_001)
    head = f"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    cuts = [0, 10, 65_537, 300_000, 699_990]
    with HTTPConn.connect(srv) as c:
        c.send(head + body[:cuts[1]])
        for a, b in zip(cuts[1:], cuts[2:]):
            time.sleep(0.05)           # separate segments, so separate reads
            c.send(body[a:b])
        time.sleep(0.05)
        c.send(body[cuts[-1]:] + get("/after") + get("/after2"))
        got = json.loads(c.response().body)
        assert (got["length"], got["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        assert c.response().body == b"GET /after"
        assert c.response().body == b"GET /after2"


def test_pipelined_small_answers_to_a_client_that_reads_late(srv):
    """Small answers are corked (held to the end of the loop's pass: in the
    connection's flat buffer up to BLAZE_CORK_FLAT, then its evbuffer).  3000
    pipelined requests, answers of ~150 and ~1,000 bytes mixed, sent while
    the client does not read yet: the socket fills, answers queue behind the
    corked ones and go out when it drains; every answer arrives, in order,
    and the connection lives on.  (It was reset: a corked connection whose
    output had already been written looked broken.)"""
    pad = "x" * 850
    reqs = [get(f"/raw/list?body=s{i}") if i % 3 else get(f"/raw/list?body=m{i}{pad}") for i in range(3000)]
    with HTTPConn.connect(srv, timeout=30) as c:
        sender = threading.Thread(target=c.send, args=(b"".join(reqs),))
        sender.start()
        time.sleep(0.5)            # let the answers pile up unread (no readiness to wait for)
        for i in range(3000):
            r = c.response()
            assert (r.status, r.body) == (200, (f"s{i}" if i % 3 else f"m{i}{pad}").encode()), i
        sender.join(10)
        assert c.request(get("/after")).body == b"GET /after"


def test_pipelining_large_responses(srv):
    """Responses bigger than the socket buffers: each waits for the previous one."""
    expected = b"".join(pattern_chunk(i, 1024) for i in range(400))
    with HTTPConn.connect(srv, timeout=20) as c:
        c.send(b"".join(get(f"/text?kb=400&n={i}") + get(f"/gen?big=300000&c=n{i}") + get("/big?mib=1")
                        for i in range(6)))
        for i in range(6):
            r = c.response()
            assert r.body == expected and r.get("content-length") == str(len(expected))
            r = c.response()
            assert r.body == f"n{i}".encode() + b"x" * 300000 and r.complete
            r = c.response()
            assert r.body == b"".join(pattern_chunk(k) for k in range(16)) and r.complete


# ---------------------------------------------------------------- HEAD, 204, 304

def test_head_has_get_headers_and_no_body(srv, small_file):
    path, _ = small_file
    targets = ["/text?body=same-for-head", "/raw/list?body=list-body",
               f"/raw/sendfile?path={q(path)}&log={q(str(path) + '.log')}"]
    with HTTPConn.connect(srv) as c:
        for t in targets:
            g = c.request(get(t))
            assert g.status == 200 and len(g.body) > 0
            # HEAD then GET in one write: the GET's response must follow the
            # HEAD's head directly, so the HEAD sent no body bytes.
            c.send(f"HEAD {t} HTTP/1.1\r\nHost: t\r\n\r\n".encode() + get("/next"))
            h = c.response("HEAD")
            assert h.status == 200
            assert h.get("content-length") == g.get("content-length") == str(len(g.body)), t
            assert h.get("content-type") == g.get("content-type")
            assert h.get("transfer-encoding") is None
            n = c.response()
            assert (n.status, n.body) == (200, b"GET /next"), t


@pytest.mark.parametrize("target", ["/gen?c=abc&c=def", "/write?mode=mixed", "/write?mode=cl",
                                    "/big?mib=1", "/file?bio=300"])
def test_head_of_a_streamed_response(srv, target):
    with HTTPConn.connect(srv) as c:
        c.send(f"HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode() + get("/next"))
        h = c.response("HEAD")
        assert h.status == 200
        n = c.response()
        assert (n.status, n.body) == (200, b"GET /next"), "the HEAD response carried body bytes"


def test_head_http10_keepalive(srv):
    with HTTPConn.connect(srv) as c:
        h = c.request(b"HEAD /text HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "HEAD")
        assert h.get("content-length") == str(len(b"HEAD /text"))
        assert c.request(get("/again")).body == b"GET /again"


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(srv, code):
    with HTTPConn.connect(srv) as c:
        c.send(get(f"/status?code={code}") + get(f"/status?code={code}&body=oops") +
               get("/next") + get(f"/status?code={code}"))
        for _ in range(2):
            r = c.response()
            assert r.status == code
            assert r.get("transfer-encoding") is None
            if code == 204:
                assert r.get("content-length") is None, "204 must not carry Content-Length"
            else:
                assert r.get("etag") == '"v1"'
        n = c.response()
        assert (n.status, n.body) == (200, b"GET /next"), "a body leaked after the 204/304"
        assert c.response().status == code
        assert c.request(get("/last")).body == b"GET /last"


# ---------------------------------------------------------------- framing

def test_chunked_framing_exact(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/gen?c=hello&c=&c=world!"))
        assert r.get("transfer-encoding") == "chunked"
        assert r.get("content-length") is None
        assert r.raw_body == b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"
        r = c.request(get("/gen?c=a&big=300000"))
        assert r.raw_body == b"1\r\na\r\n493e0\r\n" + b"x" * 300000 + b"\r\n0\r\n\r\n"
        assert c.request(get("/next")).body == b"GET /next"


def test_empty_generator_response(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/gen?c=&c="))
        assert r.status == 200 and r.body == b"" and r.complete
        assert (r.get("content-length") == "0") != (r.get("transfer-encoding") == "chunked")
        assert c.request(get("/next")).body == b"GET /next"


def test_http10_response_without_length_is_close_delimited(srv):
    with HTTPConn.connect(srv) as c:
        c.send(b"GET /gen?c=abc&c=&c=def HTTP/1.0\r\n\r\n")
        r = c.read_head()
        assert r.get("content-length") is None and r.get("transfer-encoding") is None
        assert c.read_to_eof() == b"abcdef"


@pytest.mark.parametrize("target, version, body", [
    ("/raw/list?body=one-block", "1.1", b"one-block"),        # head and body in one call
    ("/raw/items?c=ab&c=cd&c=ef", "1.1", b"abcdef"),          # chunked: the last block, then 0
    ("/raw/items?c=ab&c=cd&c=ef&cl=6", "1.1", b"abcdef"),
    ("/raw/items?c=ab&c=cd&c=ef", "1.0", b"abcdef"),          # the close ends the body
    ("/gen?c=ab&c=cd", "1.1", b"abcd"),
    ("/status?code=204", "1.1", b""),
])
def test_an_answer_that_ends_the_connection_arrives_whole(srv, target, version, body):
    """The last bytes of an answer that closes the connection go with the FIN
    (MSG_MORE, then the write side shut): nothing of it may be cut off."""
    with HTTPConn.connect(srv) as c:
        c.send(get(target, version=version, headers=[("Connection", "close")] if version == "1.1" else ()))
        r = c.response()
        if version == "1.0":
            assert r.body + c.read_to_eof() == body
        else:
            assert r.complete is not False and r.body == body, (r.raw_head, r.body)
            assert c.at_eof(5), "the connection must close after the answer"


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_one_item_list_gets_content_length(srv, version):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/raw/list?body=exactly-this", version=version))
        assert r.body == b"exactly-this"
        assert r.get("content-length") == "12"
        assert r.get("transfer-encoding") is None
        if version == "1.1":
            assert c.request(get("/next")).body == b"GET /next"


@pytest.mark.parametrize("target", ["/raw/list?body=short&cl=100", "/gen?c=sh&c=ort&cl=100",
                                    "/raise-after?cl=100"])
def test_content_length_larger_than_body_closes(srv, target):
    with HTTPConn.connect(srv) as c:
        c.send(get(target) + get("/never"))
        r = c.response()
        assert r.get("content-length") == "100"
        assert r.complete is False
        assert r.body in (b"short", b"partial")
        assert c.at_eof(5), "the connection must close after a short body"


@pytest.mark.parametrize("target", ["/raw/list?body=helloEXTRA&cl=5", "/gen?c=hel&c=loEXTRA&c=EXTRA&cl=5"])
def test_content_length_smaller_than_body_truncates(srv, target):
    with HTTPConn.connect(srv) as c:
        c.send(get(target) + get("/next"))
        r = c.response()
        assert r.body == b"hello"
        n = c.response()
        assert (n.status, n.body) == (200, b"GET /next")
        assert b"EXTRA" not in n.raw_head
        assert c.request(get("/again")).body == b"GET /again"


# ---------------------------------------------------------------- Date, Server

DATE_RE = re.compile(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                     r"\d{4} \d\d:\d\d:\d\d GMT")


def check_date(value):
    assert DATE_RE.fullmatch(value), value
    when = email.utils.parsedate_to_datetime(value)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - when).total_seconds()) < 5, value


@pytest.mark.parametrize("target", ["/text", "/raw/list", "/gen?c=a", "/status?code=204",
                                    "/write?mode=mixed", "/raise-before"])
def test_date_and_server_headers(srv, target):
    with HTTPConn.connect(srv) as c:
        r = c.request(get(target))
    assert r.all("server") == ["BlazeWSGI"], r.headers
    dates = r.all("date")
    assert len(dates) == 1, r.headers
    check_date(dates[0])


def test_app_server_and_date_headers_are_kept_once(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/server-header"))
        assert r.all("server") == ["MyApp/1.0"], r.headers
        assert len(r.all("date")) == 1
        r = c.request(get("/server-header?date=1"))
        assert r.all("server") == ["MyApp/1.0"], r.headers
        assert r.all("date") == ["Tue, 01 Jan 2030 00:00:00 GMT"], r.headers


def test_many_large_response_headers(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/many-headers?n=300&size=700"))
        assert r.body == b"many"
        for i in (0, 150, 299):
            assert r.get(f"x-h-{i}") == (f"{i}-" * 700)[:700]
        assert len([k for k, _ in r.headers if k.startswith("X-H-")]) == 300
        assert c.request(get("/next")).body == b"GET /next"


def test_latin1_header_value_is_sent_as_is(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/latin1"))
    assert b"\r\nX-Latin: caf\xe9\r\n" in r.raw_head


# ---------------------------------------------------------------- 100-continue

@pytest.mark.parametrize("chunked", [False, True])
def test_expect_100_continue(srv, chunked):
    data = os.urandom(100_000)
    full = post("/body", data, chunked=chunked, headers=[("Expect", "100-continue")])
    head, _, rest = full.partition(b"\r\n\r\n")
    with HTTPConn.connect(srv, timeout=5) as c:
        c.send(head + b"\r\n\r\n")
        interim = c.read_head()
        assert interim.raw_head.startswith(b"HTTP/1.1 100 Continue\r\n")
        assert interim.status == 100
        c.send(rest)
        r = c.response()
        got = body_json(r)
        assert (got["length"], got["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert c.request(get("/next")).body == b"GET /next"


def test_expect_100_continue_ignored_for_http10(srv):
    """RFC 9110 10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request
    (an HTTP/1.0 client cannot parse an interim response)."""
    with HTTPConn.connect(srv, timeout=5) as c:
        c.send(b"POST /body HTTP/1.0\r\nContent-Type: a/b\r\nExpect: 100-continue\r\n"
               b"Content-Length: 3\r\n\r\n")
        c.sock.settimeout(0.5)                 # a 100 would come at once; wait briefly for none
        try:
            early = c.sock.recv(100)
        except TimeoutError:
            early = b""
        c.sock.settimeout(5)
        assert early == b"", f"the server answered an HTTP/1.0 request with {early!r}"
        c.send(b"abc")
        r = c.response()
        assert body_json(r)["length"] == 3


def test_expect_100_continue_with_http_client_style_flow(srv):
    """Without waiting for 100 (the body follows the head at once) the final
    response still arrives, after at most one 100 Continue."""
    data = b"q" * 1000
    with HTTPConn.connect(srv, timeout=5) as c:
        c.send(post("/body", data, headers=[("Expect", "100-continue")]))
        r = c.response()
        if r.status == 100:
            r = c.response()
        assert body_json(r)["length"] == len(data)
        assert c.request(get("/next")).body == b"GET /next"


def test_each_byte_in_a_host_value(srv):
    """RFC 9112 3.2 / RFC 3986: a Host value holds letters, digits,
    -._~!$&'()*+,;=%, the IP literal's [] and the port's ":"; any other byte
    in it is a 400 (CR and LF end the line, so they are left out here)."""
    allowed = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:%[]")
    wrong = []
    for b in range(256):
        if b in b"\r\n":
            continue
        with HTTPConn.connect(srv) as c:
            r = c.request(b"GET /h HTTP/1.1\r\nHost: a" + bytes([b]) + b"a\r\n\r\n")
            if r.status != (200 if b in allowed else 400):
                wrong.append((b, r.status))
    assert wrong == []
