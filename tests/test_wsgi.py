"""PEP 3333 against the real server: environ, start_response/exc_info, write(),
streaming, close(), app errors, invalid responses, wsgi.file_wrapper and
request bodies.  Apps: tests/apps_wsgi.py (validated unless under /raw/)."""
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import time
import uuid
from urllib.parse import quote

import pytest
from apps_wsgi import CHUNK, INVALID, HTTPConn, get, pattern_chunk, pattern_sha256
from conftest import Server, wait_until
from conftest import request as raw_request

MiB = 1024 * 1024
# Longer than any at_eof() wait, so an EOF seen there is the server's decision.
KEEPALIVE = {"keepalive_timeout": 60}
VALIDATOR_COMPLAINTS = ("WSGIWarning", "without being closed", "in assert_\n")


# ------------------------------------------------------------------ fixtures

def _start(tmp_path_factory, name, **kw):
    s = Server(str(tmp_path_factory.mktemp(name)), "apps_wsgi:app", **kw)
    return s.start()


def _stop(s):
    s.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One worker, default limits (body_buffer_size 1 MiB)."""
    s = _start(tmp_path_factory, "wsgi", extra=KEEPALIVE)
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def spill_srv(tmp_path_factory):
    """body_buffer_size = 4096: anything bigger goes to a temporary file."""
    s = _start(tmp_path_factory, "spill", extra={"body_buffer_size": 4096, **KEEPALIVE})
    yield s
    _stop(s)


def log_from(server, offset):
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def assert_no_validator_complaints(text):
    for needle in VALIDATOR_COMPLAINTS:
        assert needle not in text, f"wsgiref.validate complained ({needle!r}):\n{text[-4000:]}"


@pytest.fixture(autouse=True)
def _validator_watch(request):
    """Each test on a shared server must leave no validator complaint in the log."""
    servers = [request.getfixturevalue(n) for n in ("srv", "spill_srv") if n in request.fixturenames]
    marks = [(s, os.path.getsize(s.log_path)) for s in servers]
    yield
    for s, off in marks:
        assert_no_validator_complaints(log_from(s, off))


def q(path):
    return quote(str(path), safe="")


def jget(server, path, version="1.1"):
    with HTTPConn.connect(server) as c:
        r = c.request(get(path, version=version))
    assert r.status == 200, r
    return json.loads(r.body)


# ------------------------------------------------------------------ environ

def test_environ_complete(srv):
    req = (b"POST /a%20b/%C3%A9%2Fx?q=1%202&r HTTP/1.1\r\n"
           b"Host: example.com:8080\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Length: 5\r\n"
           b"X-Environ: 1\r\n"
           b"X-Custom-Header: v1\r\n"
           b"Accept: */*\r\n"
           b"X-Custom-Header: v2\r\n"
           b"Cookie: a=1\r\n"
           b"Cookie: b=2\r\n"
           b"X_Underscore: dropped\r\n"
           b"\r\nhello")
    with HTTPConn.connect(srv) as c:
        r = c.request(req)
        local_port = c.sock.getsockname()[1]
    assert r.status == 200, r
    env = json.loads(r.body)
    expected = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/a b/\xc3\xa9/x",
        "QUERY_STRING": "q=1%202&r",
        "CONTENT_TYPE": "text/plain; charset=utf-8",
        "CONTENT_LENGTH": "5",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(srv.port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "example.com:8080",
        "HTTP_ACCEPT": "*/*",
        "HTTP_X_CUSTOM_HEADER": "v1, v2",
        "HTTP_COOKIE": "a=1; b=2",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(local_port),
        "wsgi.version": {"tuple": [1, 0]},
        "wsgi.url_scheme": "http",
        "wsgi.multithread": os.environ.get("BLAZE_TEST_THREADS", "1") != "1",
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    assert {k: env.get(k, "<missing>") for k in expected} == expected
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env
    assert not any("UNDERSCORE" in k for k in env), "a header name with '_' must be dropped"
    for k, v in env.items():
        if "." not in k:
            assert isinstance(v, str), (k, v)
    # wsgiref.validate wraps input/errors (and checked the server's objects
    # underneath); here: present with their methods
    assert set(env["wsgi.input"]["attrs"]) >= {"read", "readline", "readlines", "__iter__"}
    assert set(env["wsgi.errors"]["attrs"]) >= {"write", "writelines", "flush"}
    assert env["wsgi.file_wrapper"]["callable"] is True


@pytest.mark.parametrize("target, path_info, query", [
    ("/", "/", ""),
    ("/a%20b", "/a b", ""),
    ("/%C3%A9t%C3%A9", "/\xc3\xa9t\xc3\xa9", ""),         # UTF-8 bytes, as a latin-1 str
    ("/%ff%FEz", "/\xff\xfez", ""),
    ("/a%2Fb%2fc", "/a/b/c", ""),
    ("/100%25", "/100%", ""),
    ("/bad%zz%2", "/bad%zz%2", ""),
    ("/plus+sign", "/plus+sign", ""),
    ("/x?y=%20&z=%2F+", "/x", "y=%20&z=%2F+"),
    ("/q?", "/q", ""),
    ("/frag?a=1#frag", "/frag", "a=1"),
    ("/%C3%A9?%C3%A9=%FF", "/\xc3\xa9", "%C3%A9=%FF"),
    ("http://example.com/abs%41?q=1", "/absA", "q=1"),
])
def test_path_info_and_query(srv, target, path_info, query):
    """PATH_INFO percent-decoded, as latin-1; QUERY_STRING as sent."""
    with HTTPConn.connect(srv) as c:
        r = c.request(get(target, headers=[("X-Environ", "1")]))
    assert r.status == 200, r
    env = json.loads(r.body)
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["SCRIPT_NAME"]) == (path_info, query, "")


def test_environ_http10_and_no_leak_between_requests(srv):
    """A GET after a POST on the same connection sees nothing of the POST."""
    with HTTPConn.connect(srv) as c:
        post = (b"POST /environ?x=1 HTTP/1.1\r\nHost: h1\r\nContent-Type: text/x\r\n"
                b"X-Only-First: 1\r\nContent-Length: 3\r\n\r\nabc")
        env1 = json.loads(c.request(post).body)
        assert env1["REQUEST_METHOD"] == "POST" and env1["CONTENT_TYPE"] == "text/x"
        env2 = json.loads(c.request(b"GET /environ HTTP/1.1\r\nHost: h2\r\n\r\n").body)
    assert env2["REQUEST_METHOD"] == "GET"
    assert env2["QUERY_STRING"] == ""
    assert env2["HTTP_HOST"] == "h2"
    assert "HTTP_X_ONLY_FIRST" not in env2
    assert env2.get("CONTENT_TYPE", "") == ""
    assert env2.get("CONTENT_LENGTH", "") == ""

    env3 = jget(srv, "/environ", version="1.0")
    assert env3["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert env3["REQUEST_METHOD"] == "GET"
    assert env3["QUERY_STRING"] == ""
    assert env3["PATH_INFO"] == "/environ"
    assert env3.get("CONTENT_LENGTH", "") == ""


def test_environ_right_before_and_after_its_key_set_is_compiled(srv):
    """A set of header names is first made into an environ one way, and after
    wsgi.COMPILE_AFTER requests another (wsgi._compiled_builder): every request,
    on either side of the switch and with three sets interleaved, sees its own
    values under its own names, odd characters in the names included."""
    from blazewsgi.wsgi import COMPILE_AFTER
    many = "".join(f"X-Many-{k}: m{k}-{{i}}\r\n" for k in range(60))
    with HTTPConn.connect(srv) as c:
        for i in range(3 * COMPILE_AFTER):
            kind = i % 3
            extra = {0: "X-Even: e{i}\r\n", 1: "X-Odd'Name: q{i}\r\nX-B`ack: b{i}\r\n", 2: many}[kind]
            head = f"GET /environ?i={i} HTTP/1.1\r\nHost: h{i}\r\nX-Same: s{i}\r\n" + extra.format(i=i)
            env = json.loads(c.request(head.encode() + b"\r\n").body)
            assert (env["HTTP_HOST"], env["QUERY_STRING"], env["HTTP_X_SAME"]) == (f"h{i}", f"i={i}", f"s{i}")
            assert env["PATH_INFO"] == "/environ" and env["REMOTE_ADDR"] == "127.0.0.1"
            assert (env.get("HTTP_X_EVEN"), env.get("HTTP_X_ODD'NAME"), env.get("HTTP_X_B`ACK")) == \
                {0: (f"e{i}", None, None), 1: (None, f"q{i}", f"b{i}"), 2: (None, None, None)}[kind]
            many_seen = {k: v for k, v in env.items() if k.startswith("HTTP_X_MANY_")}
            assert many_seen == ({f"HTTP_X_MANY_{k}": f"m{k}-{i}" for k in range(60)} if kind == 2 else {})


def test_environ_of_a_head_at_every_limit(server_factory):
    """The environ block has a fixed room sized from the limits (BLAZE_ENV_HALF):
    a head that fills head_buffer_size with the most header fields and a
    target that is all query (PATH_INFO and QUERY_STRING both repeat it)
    arrives whole, and so does a small request after it."""
    srv = server_factory("apps_wsgi:app", extra={"head_buffer_size": 2048, "limit_request_line": 1536,
                                                 "limit_request_fields": 100}).start()
    names = [f"{a}{b}" for a in "ABCDEFGHIJ" for b in "0123456789"][:99]      # + Host
    fields = "".join(f"{n}: v\r\n" for n in names)
    line_room = 2048 - len(fields) - len("Host: t\r\n\r\n") - len("GET /environ? HTTP/1.1\r\n")
    query = "q" * min(line_room, 1536 - len("GET /environ? HTTP/1.1"))
    head = f"GET /environ?{query} HTTP/1.1\r\nHost: t\r\n{fields}\r\n".encode()
    assert 1900 < len(head) <= 2048
    with HTTPConn.connect(srv) as c:
        env = json.loads(c.request(head).body)
        assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_HOST"]) == ("/environ", query, "t")
        assert {k: v for k, v in env.items() if len(k) == 7 and k.startswith("HTTP_")} == \
            {f"HTTP_{n}": "v" for n in names}
        env = json.loads(c.request(get("/environ?small")).body)
        assert (env["QUERY_STRING"], env.get("HTTP_A0")) == ("small", None)


def test_response_heads_that_vary_each_get_their_own(srv):
    """Status lines and headers are remembered (wsgi._heads); an app whose head
    changes on every response gets each one right, past the table's size."""
    from blazewsgi.wsgi import HEADS_MAX
    with HTTPConn.connect(srv) as c:
        for i in range(HEADS_MAX + 50):
            r = c.request(get(f"/vary?i={i}"))
            assert (r.status, r.get("X-N"), r.body) == (201 if i % 3 == 0 else 200, str(i), b"vary")


def test_a_header_given_as_a_list_is_sent(srv):
    """A pair that is a list (unhashable, so never remembered) is sent like a tuple."""
    with HTTPConn.connect(srv) as c:
        for _ in range(3):
            r = c.request(get("/raw/list-header"))
            assert (r.status, r.get("X-List"), r.body) == (200, "yes", b"ok")


def test_one_header_list_changed_in_place_between_responses(srv):
    """The last head sent is remembered (wsgi._last, and C's blaze_head_memo):
    an app that hands over the same list object each time, changed in place,
    gets its current headers sent, also when they repeat or come back."""
    with HTTPConn.connect(srv) as c:
        for v in ("a", "b", "b", "c", "a", "a"):
            r = c.request(get(f"/shared-headers?v={v}"))
            assert (r.status, r.get("X-V"), r.body) == (200, v, b"ok")


def test_heads_too_long_to_remember_between_short_ones(srv):
    """C remembers a head of up to 1 KiB; longer ones are framed each time,
    and the short head before them is still right after them."""
    with HTTPConn.connect(srv) as c:
        for n in (10, 3000, 3000, 10, 1500, 10, 10):
            r = c.request(get(f"/long-head?n={n}"))
            assert (r.status, r.get("X-Long"), r.body) == (200, "L" * n, b"long")
            assert r.get("Server") and r.get("Date")


def test_a_remembered_connection_close_closes_each_time(srv):
    """The app's Connection: close is remembered with its head: the same head
    again still closes its connection, and a keep-alive head after it does not."""
    for _ in range(2):
        with HTTPConn.connect(srv) as c:
            c.send(get("/conn-close") + get("/never"))
            r = c.response()
            assert r.body == b"bye" and [v.lower() for v in r.all("connection")] == ["close"]
            assert c.at_eof(5)
    with HTTPConn.connect(srv) as c:
        for _ in range(2):
            r = c.request(get("/shared-headers?v=k"))
            assert (r.get("X-V"), r.get("Connection")) == ("k", None)


def test_environ_methods(srv):
    with HTTPConn.connect(srv) as c:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
            extra = f"Content-Length: {len(body)}\r\n" if body else ""
            r = c.request(f"{method} /environ HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode() + body)
            assert r.status == 200, (method, r)
            assert json.loads(r.body)["REQUEST_METHOD"] == method
        r = c.request(b"HEAD /environ HTTP/1.1\r\nHost: t\r\n\r\n")
        assert r.status == 200 and r.body == b""
        # the same connection still works after HEAD
        assert json.loads(c.request(get("/environ")).body)["REQUEST_METHOD"] == "GET"


def test_environ_with_http_client(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("PUT", "/environ?k=v", body=b"xyz", headers={"Content-Type": "a/b", "X-Thing": "t"})
    env = json.loads(conn.getresponse().read())
    conn.close()
    assert env["REQUEST_METHOD"] == "PUT"
    assert env["CONTENT_TYPE"] == "a/b" and env["CONTENT_LENGTH"] == "3"
    assert env["HTTP_X_THING"] == "t" and env["QUERY_STRING"] == "k=v"
    assert env["HTTP_HOST"] == f"127.0.0.1:{srv.port}"


def test_wsgi_errors_reaches_the_server_log(srv):
    token = "errors-marker-" + uuid.uuid4().hex
    jget(srv, f"/environ?errors={token}")
    wait_until(lambda: token in srv.output(), 5, what="the wsgi.errors line in the server log")


def test_multiprocess_true_with_several_workers(server_factory):
    s = server_factory("apps_wsgi:app", workers=2).start()
    wait_until(lambda: len(s.worker_pids()) == 2, 10, what="two workers")
    env = jget(s, "/environ")
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.multithread"] is (os.environ.get("BLAZE_TEST_THREADS", "1") != "1")
    assert env["wsgi.run_once"] is False
    assert_no_validator_complaints(s.output())


# ------------------------------------------------------ start_response/exc_info

def test_exc_info_replaces_status_before_anything_was_sent(srv):
    with HTTPConn.connect(srv) as c:
        for path, status, reason, body in [("/excinfo-replace", 500, "Handled Error", b"error page"),
                                           ("/excinfo-replace-gen", 503, "Replaced", b"replaced body")]:
            r = c.request(get(path))
            assert (r.status, r.reason, r.body) == (status, reason, body)
            assert r.get("x-before") is None
            assert r.get("x-after") == "1"
        # an ordinary response: the connection stays usable
        assert c.request(get("/text")).body == b"GET /text"


def test_exc_info_after_body_started_reraises_and_closes(srv, tmp_path):
    marker = tmp_path / "m"
    with HTTPConn.connect(srv) as c:
        c.send(get(f"/excinfo-late?marker={q(marker)}"))
        r = c.read_head()
        assert r.status == 200
        assert r.get("transfer-encoding") == "chunked"
        data = b"".join(c.iter_chunked(r))
        assert data == b"partial"
        assert r.complete is False, "the last chunk must not be sent after a failure"
        assert r.raw_body == b"7\r\npartial\r\n"
        assert c.at_eof(5), "the connection must be closed"
    wait_until(marker.exists, 5, what="the app's marker")
    assert marker.read_text() == "reraised-same\n"
    wait_until(lambda: "late-error" in srv.output(), 5, what="the error in the log")
    assert b"500 Late" not in r.raw_head
    assert jget(srv, "/environ")["PATH_INFO"] == "/environ"


def test_start_response_twice_without_exc_info_is_an_error(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/double-start"))
    assert r.status == 500
    assert r.get("x-first") is None and r.get("x-second") is None
    assert b"double" not in r.body


# ------------------------------------------------------------------- write()

@pytest.mark.parametrize("mode, body, framing", [
    ("mixed", b"abcd", "chunked"),
    ("only", b"only-writes", "chunked"),
    ("cl", b"helloworld", "length"),
])
def test_write_callable(srv, mode, body, framing):
    with HTTPConn.connect(srv) as c:
        r = c.request(get(f"/write?mode={mode}"))
        assert r.status == 200 and r.complete
        assert r.body == body
        if framing == "chunked":
            assert r.get("transfer-encoding") == "chunked" and r.get("content-length") is None
        else:
            assert r.get("content-length") == str(len(body)) and r.get("transfer-encoding") is None
        assert c.request(get("/text")).body == b"GET /text"   # framing left the connection usable


def test_write_callable_big(srv):
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get("/write?mode=big&mib=8"))
    assert r.status == 200 and r.complete
    assert len(r.body) == 8 * MiB
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(8 * 16)


def test_write_to_a_client_that_disconnects(srv):
    """write() blocks while the client lags; a client that goes away must
    fail the app's write(), not hang or kill the worker."""
    pids = srv.worker_pids()
    c = HTTPConn.connect(srv, rcvbuf=65536)
    c.send(get("/write?mode=big&mib=16"))
    r = c.read_head()
    assert r.status == 200
    c.read_exact(100_000)
    c.close()
    with HTTPConn.connect(srv, timeout=10) as c2:
        assert c2.request(get("/text")).body == b"GET /text"
    assert srv.worker_pids() == pids


def test_write_with_http10_is_close_delimited(srv):
    with HTTPConn.connect(srv) as c:
        r = c.request(get("/write?mode=mixed", version="1.0"))
    assert r.body == b"abcd"
    assert r.get("transfer-encoding") is None and r.get("content-length") is None


# ----------------------------------------------------------------- streaming

def test_generator_is_streamed_as_it_yields(srv, tmp_path):
    go = tmp_path / "go"
    with HTTPConn.connect(srv, timeout=5) as c:
        c.send(get(f"/stream?go={q(go)}"))
        r = c.read_head()
        assert r.status == 200 and r.get("transfer-encoding") == "chunked"
        chunks = c.iter_chunked(r)
        # The generator is now blocked until `go` exists (up to 10 s); the
        # first chunk must already be here (5 s socket timeout).
        assert next(chunks) == b"first"
        go.write_text("go")
        assert list(chunks) == [b"second"]
        assert r.complete


def test_generator_is_streamed_with_http_client(srv, tmp_path):
    go = tmp_path / "go"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", f"/stream?go={q(go)}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(100) == b"first"
    go.write_text("go")
    assert resp.read() == b"second"
    conn.close()


def _rss_anon_kib(pid):
    """The worker's private anonymous memory: where a drained generator would
    sit.  Not VmRSS: that also counts file pages (libpython, libcrypto) the
    first run of a code path maps in, as many as the page cache allows."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


def test_big_generator_to_slow_reader_is_bounded(server_factory, tmp_path):
    """20 MiB from a generator to a client that stalls: the server must not
    drain the generator into memory, must keep serving others, and the bytes
    must arrive intact."""
    s = server_factory("apps_wsgi:app").start()
    (pid,) = s.worker_pids()
    with HTTPConn.connect(s, timeout=20) as c:   # the same path once, read at once: the baseline
        r = c.request(get("/big?mib=2"))
        assert r.status == 200 and len(r.body) == 2 * MiB
    rss0 = _rss_anon_kib(pid)
    progress = tmp_path / "progress"
    with HTTPConn.connect(s, timeout=20, rcvbuf=65536) as c:
        c.send(get(f"/big?mib=20&progress={q(progress)}"))
        r = c.read_head()
        assert r.status == 200 and r.get("transfer-encoding") == "chunked"
        chunks = c.iter_chunked(r)
        h = hashlib.sha256()
        got = 0
        for data in chunks:
            h.update(data)
            got += len(data)
            if got >= MiB:
                break
        # Stalled.  A second client is served: the worker is not stuck on us.
        with s.connect() as s2:
            status, _, body = raw_request(s2, get("/text?body=second-client"), timeout=10)
        assert (status, body) == (200, b"second-client")
        yielded = (int(progress.read_text()) + 1) * CHUNK
        assert yielded - got < 8 * MiB, f"generator ran {yielded - got} bytes ahead of a stalled client"
        grown = _rss_anon_kib(pid) - rss0
        assert grown < 12 * 1024, f"worker's anonymous memory grew by {grown} KiB while a client stalled"
        # Now read the rest, in small pieces (64 KiB receive window).
        for data in chunks:
            h.update(data)
            got += len(data)
        assert r.complete
    assert got == 20 * MiB
    assert h.hexdigest() == pattern_sha256(20 * 16)
    assert_no_validator_complaints(s.output())


# ------------------------------------------------------------------- close()

def _closed_once(marker):
    wait_until(lambda: marker.exists() and marker.read_text() != "", 10, what="close() to be called")
    return marker.read_text()


def test_close_called_on_normal_end(srv, tmp_path):
    marker = tmp_path / "m"
    with HTTPConn.connect(srv) as c:
        r = c.request(get(f"/closing?mode=normal&marker={q(marker)}"))
        assert r.body == b"chunk1chunk2" and r.complete
        assert _closed_once(marker) == "closed\n"
        assert c.request(get("/text")).status == 200   # later requests don't close it again
    assert marker.read_text() == "closed\n"


def test_close_called_on_head(srv, tmp_path):
    marker = tmp_path / "m"
    with HTTPConn.connect(srv) as c:
        r = c.request(b"HEAD /closing?mode=normal&marker=" + q(marker).encode() + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert r.status == 200
        assert _closed_once(marker) == "closed\n"
        assert c.request(get("/text")).body == b"GET /text"


def test_close_called_on_error_mid_iteration(srv, tmp_path):
    marker = tmp_path / "m"
    with HTTPConn.connect(srv) as c:
        c.send(get(f"/closing?mode=error&marker={q(marker)}"))
        r = c.read_head()
        assert r.status == 200
        assert b"".join(c.iter_chunked(r)) == b"chunk1"
        assert r.complete is False
    assert _closed_once(marker) == "closed\n"
    wait_until(lambda: "closing-iterable-error" in srv.output(), 5, what="the error in the log")


def test_close_called_when_client_disconnects(srv, tmp_path):
    marker = tmp_path / "m"
    pids = srv.worker_pids()
    c = HTTPConn.connect(srv, rcvbuf=65536)
    c.send(get(f"/closing?mode=infinite&marker={q(marker)}"))
    r = c.read_head()
    assert r.status == 200
    chunks = c.iter_chunked(r)
    for _ in range(3):
        assert len(next(chunks)) == CHUNK
    c.close()        # unread data in flight: the server's next writes fail
    assert _closed_once(marker) == "closed\n"
    assert jget(srv, "/environ")["PATH_INFO"] == "/environ"
    assert srv.worker_pids() == pids
    assert marker.read_text() == "closed\n"


def test_close_called_when_the_response_is_invalid(srv, tmp_path):
    marker = tmp_path / "m"
    with HTTPConn.connect(srv) as c:
        r = c.request(get(f"/raw/invalid?case=value-crlf&kind=closing&marker={q(marker)}"))
    assert r.status == 500
    assert _closed_once(marker) == "closed\n"


# ------------------------------------------------------------ app exceptions

def _traceback_for(server, needle):
    """The log record whose traceback ends with needle: from its "[date] [pid]
    [ERROR]" line to the needle, with no other record in between."""
    wait_until(lambda: needle in server.output(), 5, what=f"{needle!r} in the server log")
    out = server.output()
    i = out.index(needle)
    start = out.rfind("\n[", 0, i)
    assert start >= 0, out[:i][-3000:]
    return out[start + 1:i + len(needle)]


@pytest.mark.parametrize("route, exc", [("/raise-before", "boom-before-"),
                                        ("/raise-gen-first", "boom-gen-first-"),
                                        ("/raise-after-empty", "boom-after-empty-")])
def test_exception_before_response_is_500(srv, route, exc):
    pids = srv.worker_pids()
    token = uuid.uuid4().hex
    with HTTPConn.connect(srv) as c:
        r = c.request(get(f"{route}?token={token}"))
        assert r.status == 500
        assert r.get("x-not-sent") is None
        assert token.encode() not in r.raw_head + r.body
    tb = _traceback_for(srv, f"RuntimeError: {exc}{token}")
    assert "[ERROR]" in tb.splitlines()[0], tb
    assert "Traceback (most recent call last)" in tb, tb
    assert jget(srv, "/environ")["PATH_INFO"] == "/environ"
    assert srv.worker_pids() == pids


@pytest.mark.parametrize("cl", [None, "100"])
def test_exception_after_headers_closes_connection(srv, cl):
    pids = srv.worker_pids()
    token = uuid.uuid4().hex
    path = f"/raise-after?token={token}" + (f"&cl={cl}" if cl else "")
    with HTTPConn.connect(srv) as c:
        r = c.request(get(path))
        assert r.status == 200
        assert r.body == b"partial"
        assert r.complete is False, "the body must end short"
        if cl is None:
            assert r.raw_body == b"7\r\npartial\r\n"    # no last-chunk
        assert c.at_eof(5)
    tb = _traceback_for(srv, f"RuntimeError: boom-after-{token}")
    assert "[ERROR]" in tb.splitlines()[0], tb
    assert "Traceback (most recent call last)" in tb, tb
    assert jget(srv, "/environ")["PATH_INFO"] == "/environ"
    assert srv.worker_pids() == pids


# --------------------------------------------------------- invalid responses

@pytest.mark.parametrize("kind", ["list", "gen", "write"])
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_response_is_500_and_never_sent(srv, case, kind):
    needle = INVALID[case][2]
    with HTTPConn.connect(srv) as c:
        c.send(get(f"/raw/invalid?case={case}&kind={kind}"))
        raw = c.read_to_eof()
    assert raw.startswith(b"HTTP/1.1 500 "), raw[:200]
    assert needle not in raw, raw
    assert b"body-" not in raw, raw


@pytest.mark.parametrize("kind", ["list", "gen", "write"])
def test_the_log_says_why_a_response_was_refused(srv, kind):
    """C's reason (blaze_resp_error, read in the thread C refused in) reaches the error log."""
    off = os.path.getsize(srv.log_path)
    with HTTPConn.connect(srv) as c:
        c.send(get(f"/raw/invalid?case=value-crlf&kind={kind}"))
        assert c.read_to_eof().startswith(b"HTTP/1.1 500 ")
    want = "invalid response from the application: invalid character in the value of header X-Ok"
    wait_until(lambda: want in log_from(srv, off), timeout=5, what=want)


def test_invalid_responses_leave_the_worker_serving(srv):
    pids = srv.worker_pids()
    for case in ("status-crlf", "value-int", "value-nonlatin1"):
        with HTTPConn.connect(srv) as c:
            assert c.request(get(f"/raw/invalid?case={case}&kind=gen")).status == 500
    with HTTPConn.connect(srv) as c:
        assert c.request(get("/text")).body == b"GET /text"
    assert srv.worker_pids() == pids


def test_status_without_reason_phrase(srv):
    """PEP 3333 wants "999 Message"; on the wire RFC 9112 needs the SP after the
    code (status-line = HTTP-version SP status-code SP [reason-phrase]).
    Either the server rejects "200" (500) or it sends a valid status line."""
    with HTTPConn.connect(srv) as c:
        c.send(get("/raw/status-only"))
        raw = c.read_until(b"\r\n")
    assert raw == b"HTTP/1.1 200 \r\n" or raw.startswith(b"HTTP/1.1 500 "), raw


# -------------------------------------------------------------- file_wrapper

@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "data.bin"
    data = os.urandom(5 * MiB + 12345)
    path.write_bytes(data)
    return path, data


def test_file_wrapper_uses_sendfile(srv, big_file, tmp_path):
    path, data = big_file
    log = tmp_path / "log"
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get(f"/raw/sendfile?path={q(path)}&log={q(log)}"))
        assert r.status == 200 and r.complete
        assert r.get("content-length") == str(len(data))
        assert r.get("transfer-encoding") is None
        assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(data).hexdigest()
        # keep-alive survives a sendfile response
        assert c.request(get("/text")).body == b"GET /text"
    wait_until(lambda: log.exists() and "close" in log.read_text(), 5, what="the file to be closed")
    assert log.read_text() == "close\n", "read() was called: the file was not sent with sendfile"


def test_file_wrapper_offset_and_app_content_length(srv, big_file, tmp_path):
    path, data = big_file
    log = tmp_path / "log"
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get(f"/raw/sendfile?path={q(path)}&log={q(log)}&offset=1000"))
        assert r.body == data[1000:]
        assert r.get("content-length") == str(len(data) - 1000)
        r = c.request(get(f"/raw/sendfile?path={q(path)}&log={q(log)}&cl=4096"))
        assert r.get("content-length") == "4096"
        assert r.body == data[:4096]
        # the rest of the file was not sent: the next response parses
        assert c.request(get("/text")).body == b"GET /text"
    wait_until(lambda: log.exists() and log.read_text().count("close") == 2, 5, what="both files closed")
    assert "read" not in log.read_text()


def test_file_wrapper_buffered_file_that_read_ahead(srv, big_file):
    """A buffered file whose OS position is ahead of tell(): the body starts at tell()."""
    path, data = big_file
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get(f"/raw/sendfile?path={q(path)}&log=-&readfirst=10"))
        assert r.get("content-length") == str(len(data) - 10)
        assert r.body == data[10:]


def test_file_wrapper_pipelined(srv, big_file, tmp_path):
    path, data = big_file
    log = tmp_path / "log"
    one = get(f"/raw/sendfile?path={q(path)}&log={q(log)}")
    with HTTPConn.connect(srv, timeout=20) as c:
        c.send(one + get("/text?body=between") + one)
        assert c.response().body == data
        assert c.response().body == b"between"
        assert c.response().body == data


def test_file_wrapper_with_curl(srv, big_file, tmp_path):
    path, data = big_file
    out = tmp_path / "out"
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    subprocess.run([curl, "-sS", "--fail", "-o", str(out),
                    srv.url(f"/raw/sendfile?path={q(path)}&log={q(tmp_path / 'log')}")],
                   check=True, timeout=30)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_file_wrapper_through_validator_real_file(srv, big_file):
    path, data = big_file
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get(f"/file?path={q(path)}"))
        assert r.status == 200 and r.complete
        assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(data).hexdigest()
        r = c.request(get(f"/file?path={q(path)}&offset=77"))
        assert r.body == data[77:]


def test_file_wrapper_around_bytesio(srv):
    expected = b"".join(pattern_chunk(i, 1024) for i in range(1500))
    with HTTPConn.connect(srv, timeout=20) as c:
        r = c.request(get("/file?bio=1500"))
        assert r.status == 200 and r.complete
        assert r.body == expected
        assert c.request(get("/text")).body == b"GET /text"


# ------------------------------------------------------------- request bodies

_DATA = {}


def body_data(size):
    if size not in _DATA:
        _DATA[size] = os.urandom(size)
    return _DATA[size]


_CHUNK_SIZES = (1, 1000, 65536, MiB, 12345, 3 * MiB + 1)


def encode_chunked(data):
    """Chunked framing with varying chunk sizes, mixed-case hex, an extension."""
    out = []
    pos = 0
    k = 0
    while pos < len(data):
        n = min(_CHUNK_SIZES[k % len(_CHUNK_SIZES)], len(data) - pos)
        size = b"%x" % n if k % 2 else b"%X" % n
        ext = b";ext=1" if k % 3 == 0 else b""
        out.append(size + ext + b"\r\n")
        out.append(data[pos:pos + n])
        out.append(b"\r\n")
        pos += n
        k += 1
    out.append(b"0\r\n\r\n")
    return out


def send_body(c, path, data, framing):
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
    if framing == "chunked":
        c.send(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in encode_chunked(data):
            c.send(piece)
    else:
        c.send(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode())
        c.send(data)
    return c.response()


def check_body_response(r, data):
    assert r.status == 200, r
    got = json.loads(r.body)
    assert got["length"] == len(data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    if data:
        assert got["content_length"] == str(len(data))
    else:
        assert got["content_length"] in (None, "", "0")


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", [0, MiB, MiB + 1, 50 * MiB])
def test_request_body(srv, size, framing):
    data = body_data(size)
    with HTTPConn.connect(srv, timeout=60) as c:
        check_body_response(send_body(c, "/body", data, framing), data)
        # same connection, next request: the body was consumed exactly
        assert c.request(get("/text")).body == b"GET /text"


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", [0, 100, 4096, 4097, MiB + 3])
def test_request_body_spilled_to_file(spill_srv, size, framing):
    data = body_data(size)
    with HTTPConn.connect(spill_srv, timeout=60) as c:
        check_body_response(send_body(c, "/body", data, framing), data)
        check_body_response(send_body(c, "/body", data[:50], framing), data[:50])


@pytest.mark.parametrize("size", [50_000, 200_000, MiB + 3])
def test_request_body_that_starts_with_its_head(srv, size):
    """The head and the body's first bytes in one segment, the rest later in
    pieces: C keeps that start in its head buffer until the rest waits in
    the socket (body_held), then makes the body's buffer (under 64 KiB: the
    connection's own; over: handed to wsgi.input; over body_buffer_size: a
    file).  The pauses pace the client; nothing waits on them."""
    data = body_data(size)
    head = f"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode()
    with HTTPConn.connect(srv, timeout=30) as c:
        c.send(head + data[:300])
        time.sleep(0.05)
        c.send(data[300:40_000])
        time.sleep(0.05)
        c.send(data[40_000:])
        check_body_response(c.response(), data)
        # the same connection: the next body (sent whole) and a GET after it
        check_body_response(send_body(c, "/body", data[::-1], "length"), data[::-1])
        assert c.request(get("/text")).body == b"GET /text"


def test_request_body_chunked_with_curl(srv, tmp_path):
    data = body_data(MiB + 1)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    out = subprocess.run([curl, "-sS", "--fail", "-H", "Transfer-Encoding: chunked",
                          "-H", "Content-Type: application/octet-stream",
                          "--data-binary", f"@{f}", srv.url("/body")],
                         check=True, timeout=30, capture_output=True).stdout
    got = json.loads(out)
    assert got["sha256"] == hashlib.sha256(data).hexdigest() and got["length"] == len(data)


LINES_BODY = (b"first line\nsecond\n" + b"x" * 10000 + b"\n\nshort\r\n" +
              bytes(range(256)) + b"\nlast-without-newline")

OPS = [
    "readline,readline,readline:3,readline,read:5,readline,iter",
    "read",
    "read:0,read:4,read,read:10,readline,read",
    "readlines,read:1",
    "viter,readline",
    "readline:100,readline:100000,read:-1",
    "iter,read:5",
    "read:20000,read:20000,read:1",
    "readline:1,readline:1,read:100,readlines",
]
# a body's input (BytesIO, the spill file, _BodyRaw) seeks; the shared empty one does not
SEEK_OPS = ["read:70000,seek:0,readline,seek:65000,read:10,read"]


def reference(body, ops):
    f = __import__("io").BytesIO(body)
    out = []
    for op in ops.split(","):
        name, _, arg = op.partition(":")
        if name == "read":
            v = f.read(int(arg)) if arg else f.read()
        elif name == "readline":
            v = f.readline(int(arg)) if arg else f.readline()
        elif name == "readlines":
            v = f.readlines()
        elif name == "seek":
            v = str(f.seek(int(arg))).encode()
        else:
            v = list(f)
        out.append([x.decode("latin-1") for x in v] if isinstance(v, list) else v.decode("latin-1"))
    return out


# over BLAZE_BODY_KEEP (64 KiB): C hands its buffer to wsgi.input (_BodyRaw)
BIG_LINES_BODY = LINES_BODY * 9 + b"\n".join(b"line %d" % i for i in range(20000))


@pytest.mark.parametrize("server_name", ["srv", "spill_srv"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("body", [LINES_BODY, BIG_LINES_BODY, b"", b"one line\n"],
                         ids=["lines", "biglines", "empty", "oneline"])
def test_input_methods(request, server_name, framing, body):
    server = request.getfixturevalue(server_name)
    with HTTPConn.connect(server) as c:
        for ops in OPS + (SEEK_OPS if body else []):
            r = send_body(c, f"/input?ops={ops}", body, framing)
            assert r.status == 200, (ops, r)
            assert json.loads(r.body) == reference(body, ops), ops


def test_input_of_get_without_body(srv):
    with HTTPConn.connect(srv) as c:
        for ops in OPS:
            r = c.request(get(f"/input?ops={ops}"))
            assert r.status == 200, (ops, r)
            assert json.loads(r.body) == reference(b"", ops), ops
