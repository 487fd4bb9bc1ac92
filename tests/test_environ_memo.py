"""The remembered environ: a kept-alive connection's next
request with the same CGI names gets a copy of the last environ with only the
changed values stored (C env_delta, wsgi._memo).  Nothing of an earlier
request may show through: every request's CGI values are checked against
what it sent, over long random runs that repeat, change, add and drop values,
on connections used side by side, after errors and after reconnecting.
test_threads.py runs this file again with threads = 8."""
import json
import random
import socket

import pytest
from apps_wsgi import HTTPConn
from conftest import Server

KEEPALIVE = {"keepalive_timeout": 60}
OPTIONAL = {                      # header -> the values a request picks from
    "X-A": ["1", "2", "22"],
    "X-B": ["", "b", "bb"],
    "Accept": ["*/*", "text/html"],
    "User-Agent": ["ua-one", "ua-two/1.0 (x)"],
    "Cookie": ["a=1", "a=1; b=2"],
    "Content-Type": ["text/plain", "application/json"],
}
QUERIES = ["q=1", "q=2", "q=1&r=%20"]
# what `GET /environ HTTP/1.1` with `Host: t` makes, REMOTE_* aside
GET_ENVIRON = {"REQUEST_METHOD": "GET", "PATH_INFO": "/environ", "QUERY_STRING": "",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "t"}
HOSTS = ["t", "example.org", "t:8080"]


def get_environ(header, value, path="/environ"):
    """`GET path` with `Host: t` and one more header."""
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{header}: {value}\r\n\r\n".encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("memo")), "apps_wsgi:app", extra=KEEPALIVE).start()
    yield s
    s.close()


def cgi(env):
    """The CGI part of an environ: what C sends (wsgi.* and the base's fixed keys aside)."""
    fixed = {"SCRIPT_NAME", "SERVER_NAME", "SERVER_PORT", "SERVER_SOFTWARE"}
    return {k: v for k, v in env.items() if k.isupper() and k not in fixed}


def random_request(rng, names=None):
    """(raw request, the CGI values it must produce but REMOTE_*).  names:
    (method, with a query, the optional headers in order) to keep the CGI
    names of the last request and change only values."""
    if names is None:
        names = (rng.choice(["GET", "GET", "GET", "POST"]), rng.random() < 0.7,
                 rng.sample(sorted(OPTIONAL), rng.randint(0, len(OPTIONAL))))
    method, with_query, optional = names
    query = rng.choice(QUERIES) if with_query else ""
    host = rng.choice(HOSTS)
    headers = [(name, rng.choice(OPTIONAL[name])) for name in optional]
    body = b"x" * rng.choice([1, 5]) if method == "POST" else b""
    lines = [f"{method} /environ{'?' + query if query else ''} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    want = {"REQUEST_METHOD": method, "PATH_INFO": "/environ", "QUERY_STRING": query,
            "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": host}
    for k, v in headers:
        key = "CONTENT_TYPE" if k == "Content-Type" else "HTTP_" + k.upper().replace("-", "_")
        want[key] = v
    if body:                      # Content-Length: 0 is no body: no CONTENT_LENGTH
        want["CONTENT_LENGTH"] = str(len(body))
    return raw, want


def check(conn, raw, want, what):
    r = conn.request(raw)
    assert r.status == 200, (what, r.status, r.body[:200])
    got = cgi(json.loads(r.body))
    local = conn.sock.getsockname()
    want = dict(want, REMOTE_ADDR=local[0], REMOTE_PORT=str(local[1]))
    assert got == want, what


def check_get(conn, header, value, what, path="/environ"):
    """get_environ's request: the app sees GET_ENVIRON plus that header's value."""
    key = "HTTP_" + header.upper().replace("-", "_")
    check(conn, get_environ(header, value, path), dict(GET_ENVIRON, **{key: value}), what)


def test_random_runs_on_one_connection_see_only_their_own_values(srv):
    rng = random.Random(1234)
    with HTTPConn.connect(srv) as c:
        prev = None
        for i in range(400):
            if prev is not None and rng.random() < 0.3:
                raw, want = prev                    # the same request again: nothing changed
            else:
                raw, want = random_request(rng)
            check(c, raw, want, (i, raw))
            prev = raw, want


def test_the_same_names_with_values_changing_one_at_a_time_or_all(srv):
    """Same CGI names request after request: the deltas (C env_delta) are
    what carries each value.  Every other request repeats the one before, so
    C does not give up on the connection (MEMO_GIVE_UP changes in a row)."""
    rng = random.Random(4321)
    with HTTPConn.connect(srv) as c:
        for i in range(300):
            if i % 60 == 0:
                names = ("GET" if i % 120 else "POST", True, sorted(OPTIONAL))
            if i % 2 == 0:
                raw, want = random_request(rng, names)
            check(c, raw, want, (i, raw))


def test_a_connection_whose_values_keep_changing_is_sent_whole(srv):
    """After MEMO_GIVE_UP requests in a row with changed values C stops
    comparing; the values stay right before, at and after that point, also
    when the requests then repeat."""
    rng = random.Random(55)
    names = ("GET", True, sorted(OPTIONAL))
    with HTTPConn.connect(srv) as c:
        for i in range(40):
            raw, want = random_request(rng, names)
            check(c, raw, want, (i, raw))
        for i in range(5):
            check(c, raw, want, ("repeat", i))


def test_connections_side_by_side_keep_their_own(srv):
    rng = random.Random(99)
    conns = [HTTPConn.connect(srv) for _ in range(3)]
    try:
        for i in range(150):
            c = rng.choice(conns)
            raw, want = random_request(rng)
            check(c, raw, want, (i, conns.index(c), raw))
    finally:
        for c in conns:
            c.close()


def test_pipelined_requests_each_see_their_own(srv):
    rng = random.Random(7)
    reqs = [random_request(rng) for _ in range(12)]
    reqs[3] = reqs[2]
    with HTTPConn.connect(srv) as c:
        c.send(b"".join(raw for raw, _ in reqs))
        local = c.sock.getsockname()
        for i, (raw, want) in enumerate(reqs):
            r = c.response(raw.split(b" ", 1)[0].decode())
            assert r.status == 200, (i, r.status)
            assert cgi(json.loads(r.body)) == dict(want, REMOTE_ADDR=local[0], REMOTE_PORT=str(local[1])), i


def test_after_an_error_and_a_reconnect_the_values_are_the_new_ones(srv):
    for round_ in range(5):
        with HTTPConn.connect(srv) as c:
            check_get(c, "User-Agent", f"before-{round_}", round_)
            r = c.request(get_environ("User-Agent", "err", "/raise-before"))
            assert r.status == 500
            if r.get("Connection", "").lower() == "close":
                c.close()
                c = HTTPConn.connect(srv)
            # the same names as the failed request, another value
            check_get(c, "User-Agent", f"after-{round_}", round_)
            check_get(c, "User-Agent", f"after-{round_}", round_)


def test_values_too_big_to_remember_are_sent_whole(srv):
    big1, big2, small = "a" * 5000, "b" * 5000, "c"
    with HTTPConn.connect(srv) as c:
        for v in (small, big1, big1, small, big2, small, small, big2):
            check_get(c, "X-Big", v, len(v))


def test_a_new_connection_on_a_reused_descriptor_starts_afresh(srv):
    """Closed and reopened at once, the new connection usually gets the old one's
    descriptor (the memo's slot); its first request is taken whole."""
    for i in range(20):
        with HTTPConn.connect(srv) as c:
            check_get(c, "User-Agent", f"ua-{i}", i)
            check_get(c, "User-Agent", f"ua-{i}", i)
            c.sock.shutdown(socket.SHUT_WR)
