"""HTTPS (ssl = true): the TLS side of the C core, tested with real clients.

Certificates are made here with `openssl req` (a self-signed server
certificate for localhost/127.0.0.1, a second one for renewal, a client CA
and client certificates for mutual TLS).  Clients: Python's ssl module,
`curl --cacert`, `openssl s_client`.  A TLS server is ready when a TLS
request gets an answer (polled; the conftest probe speaks plain HTTP).

The whole request corpus (tests/requests/) runs over TLS too, through the
loader and the checks of test_requests_corpus.py.
"""
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from apps_wsgi import pattern_sha256
from conftest import Server, free_port, read_response, wait_until
from test_config import assert_one_line_error, run, workdir, write_config  # noqa: F401 (fixture)
from test_metrics import metrics_server, scrape, wait_scrape
from test_requests_corpus import CASES, assert_closed, check_pipelined, read_final_response, send_all

HANDSHAKE_ERRORS = "blazewsgi_tls_handshake_errors_total"
CLIENT_DN = "CN=client one,O=Blaze Test,C=DE"


# ------------------------------------------------------------------ certificates

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _server_cert(d, name, cn="localhost"):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", cwd=d)


def _client_cert(d, ca, name, subject):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", "7", "-days", "2", "-out", f"{name}.pem", cwd=d)


class PKI:
    def __init__(self, d):
        self.dir = d
        _server_cert(d, "server")
        _server_cert(d, "renewed")                       # the same names, another key
        _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:s3cret", "-out", "server-enc.key", cwd=d)
        for ca in ("ca", "rogue-ca"):
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=Test {ca}", cwd=d)
        _client_cert(d, "ca", "client", "/C=DE/O=Blaze Test/CN=client one")
        _client_cert(d, "rogue-ca", "rogue", "/CN=rogue")
        with open(os.path.join(d, "not-pem.pem"), "w") as f:
            f.write("this is not a certificate\n")

    def path(self, name):
        return os.path.join(self.dir, name)

    def settings(self, **extra):
        s = {"ssl": "true", "ssl_certfile": self.path("server.pem"), "ssl_keyfile": self.path("server.key"),
             "log_level": "debug"}
        s.update(extra)
        return s

    def client_context(self, cert=None, cafile="server.pem", alpn=("http/1.1",), **versions):
        ctx = ssl.create_default_context(cafile=self.path(cafile))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if cert:
            ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        for k, v in versions.items():
            setattr(ctx, k, v)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


# ------------------------------------------------------------------ servers and clients

def tls_connect(port, ctx, timeout=10.0, session=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise


def tls_probe(port, ctx):
    """True once a GET over TLS gets an HTTP status line."""
    try:
        with tls_connect(port, ctx, timeout=2.0) as s:
            s.sendall(b"GET /__probe__ HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 ")
    except (OSError, ssl.SSLError):
        return False


def start_tls(srv, ctx):
    srv.start(wait=False)
    wait_until(lambda: srv.proc.poll() is not None or tls_probe(srv.port, ctx), 15,
               what="the TLS server to answer")
    assert srv.proc.poll() is None, f"server exited early:\n{srv.output()}"
    return srv


def tls_server(server_factory, pki, app="apps:echo_app", ctx=None, workers=1, extra=None, **kw):
    srv = server_factory(app=app, workers=workers, extra=pki.settings(**(extra or {})), **kw)
    return start_tls(srv, ctx or pki.client_context())


def get(sock, path, close=False, host="localhost"):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{'Connection: close' if close else ''}\r\n\r\n"
                 .replace("\r\n\r\n\r\n", "\r\n\r\n").encode())
    return read_response(sock)


def environ_over(sock):
    status, _, body = get(sock, "/json")
    assert status == 200
    return json.loads(body)


def s_client(port, *args, request=b"GET /s-client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"):
    """openssl s_client with a request on stdin; it stays until the server closes (-ign_eof)."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           "-ign_eof", *args], input=request, capture_output=True, timeout=20)


def worker_alive_and_same(srv, pids):
    assert srv.proc.poll() is None, "the master exited"
    assert srv.worker_pids() == pids, f"a worker was replaced:\n{srv.output()[-3000:]}"


# ------------------------------------------------------------------ the basics

def test_https_with_python_ssl(server_factory, pki):
    """TLS 1.3 by default, ALPN http/1.1 (even when h2 is offered first), and the environ says https."""
    srv = tls_server(server_factory, pki)
    with tls_connect(srv.port, pki.client_context(alpn=("h2", "http/1.1"))) as s:
        assert s.version() == "TLSv1.3"
        assert s.selected_alpn_protocol() == "http/1.1"
        env = environ_over(s)
    assert env["wsgi.url_scheme"] == "https"
    assert env["HTTPS"] == "on"
    assert "SSL_CLIENT_S_DN" not in env
    assert env["SERVER_PORT"] == str(srv.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1"


def test_alpn_without_http11_goes_on_without_alpn(server_factory, pki):
    """A client offering only h2 is not refused: no protocol is selected and it gets HTTP/1.1."""
    srv = tls_server(server_factory, pki)
    with tls_connect(srv.port, pki.client_context(alpn=("h2",))) as s:
        assert s.selected_alpn_protocol() is None
        assert get(s, "/x")[0] == 200


def test_curl_cacert_keepalive(server_factory, pki):
    srv = tls_server(server_factory, pki)
    url = f"https://localhost:{srv.port}"
    proc = subprocess.run(["curl", "-sS", "-v", "--cacert", pki.path("server.pem"),
                           "--resolve", f"localhost:{srv.port}:127.0.0.1",
                           f"{url}/one", f"{url}/two"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "GET /oneGET /two"
    assert "ALPN: server accepted http/1.1" in proc.stderr or "ALPN, server accepted to use http/1.1" in proc.stderr
    assert "Re-using existing connection" in proc.stderr, "the second request did not reuse the connection"
    # curl checks the certificate: without our CA it refuses
    proc = subprocess.run(["curl", "-sS", "--resolve", f"localhost:{srv.port}:127.0.0.1", f"{url}/x"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 60, proc.stderr


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3", "-tls1_2 -no_ticket"],
                         ids=["tls1_2-ticket", "tls1_3-ticket", "tls1_2-session-cache"])
def test_s_client_alpn_version_and_resumption(server_factory, pki, tmp_path, version):
    """Resumption by ticket, and (TLS 1.2 without tickets) from the worker's session cache."""
    srv = tls_server(server_factory, pki)
    sess = str(tmp_path / "session.pem")
    version, *more = version.split()
    first = s_client(srv.port, version, *more, "-alpn", "http/1.1", "-CAfile", pki.path("server.pem"),
                     "-sess_out", sess)
    out = first.stdout.decode("latin-1")
    assert "HTTP/1.1 200 OK" in out and "GET /s-client" in out, out[-2000:]
    assert "ALPN protocol: http/1.1" in out
    assert f"Protocol  : TLSv1.{version[-1]}" in out
    assert "New, TLSv1." in out
    assert "Verify return code: 0 (ok)" in out
    second = s_client(srv.port, version, *more, "-sess_in", sess)
    out = second.stdout.decode("latin-1")
    assert "Reused, TLSv1." in out, out[-2000:]
    assert "HTTP/1.1 200 OK" in out


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumption_on_every_worker(server_factory, pki, maximum):
    """Ticket keys come from the master: a session resumes whichever worker takes the connection."""
    srv = tls_server(server_factory, pki, workers=3)
    wait_until(lambda: len(srv.worker_pids()) == 3, 10, what="3 workers")
    ctx = pki.client_context(maximum_version=maximum)
    with tls_connect(srv.port, ctx) as s:
        assert get(s, "/first", close=True)[0] == 200
        session = s.session
    assert session is not None
    for i in range(12):
        with tls_connect(srv.port, ctx, session=session) as s:
            assert get(s, f"/again/{i}", close=True)[0] == 200
            assert s.session_reused, f"connection {i} was not resumed"


def test_min_version_tls13_refuses_tls12(server_factory, pki):
    srv = tls_server(server_factory, pki, extra={"ssl_min_version": "tlsv1.3"})
    with pytest.raises(ssl.SSLError):
        tls_connect(srv.port, pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)).close()
    out = s_client(srv.port, "-tls1_2").stdout.decode("latin-1")
    assert "HTTP/1.1 200" not in out
    with tls_connect(srv.port, pki.client_context()) as s:
        assert s.version() == "TLSv1.3"
        assert get(s, "/ok")[0] == 200


def test_default_min_version_accepts_tls12(server_factory, pki):
    srv = tls_server(server_factory, pki)
    with tls_connect(srv.port, pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)) as s:
        assert s.version() == "TLSv1.2"
        assert get(s, "/ok")[0] == 200


def test_ciphers_restrict_tls12(server_factory, pki):
    srv = tls_server(server_factory, pki, extra={"ssl_ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"})
    out = s_client(srv.port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384").stdout.decode("latin-1")
    assert "HTTP/1.1 200" not in out
    out = s_client(srv.port, "-tls1_2").stdout.decode("latin-1")
    assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in out and "HTTP/1.1 200 OK" in out, out[-2000:]


def test_encrypted_key_with_password(server_factory, pki):
    srv = tls_server(server_factory, pki, extra={"ssl_keyfile": pki.path("server-enc.key"),
                                                 "ssl_password": "s3cret"})
    with tls_connect(srv.port, pki.client_context()) as s:
        assert get(s, "/ok")[0] == 200


# ------------------------------------------------------------------ keep-alive, pipelining, big bodies

def test_keepalive_and_pipelining(server_factory, pki):
    srv = tls_server(server_factory, pki)
    with tls_connect(srv.port, pki.client_context()) as s:
        for i in range(50):
            status, headers, body = get(s, f"/ka/{i}")
            assert (status, body) == (200, f"GET /ka/{i}".encode())
            assert headers.get("connection") != "close"
        # 200 requests in one send: many share a TLS record, answered in order
        s.sendall(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200)))
        for i in range(200):
            status, _, body = read_response(s)
            assert (status, body) == (200, b"GET /p/%d" % i)
        status, headers, body = get(s, "/last", close=True)
        assert status == 200 and headers["connection"] == "close"
        assert_closed(s)


def test_pipelined_requests_larger_than_the_head_buffer(server_factory, pki):
    """More pipelined bytes than the read buffer holds: OpenSSL keeps the rest, and the loop asks for it."""
    srv = tls_server(server_factory, pki, extra={"head_buffer_size": "1024", "limit_request_line": "256",
                                                 "limit_request_field_size": "256"})
    n = 300
    reqs = [b"GET /q/%d HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (i, b"p" * 100) for i in range(n)]
    with tls_connect(srv.port, pki.client_context()) as s:
        s.sendall(b"".join(reqs))
        for i in range(n):
            status, _, body = read_response(s)
            assert (status, body) == (200, b"GET /q/%d" % i)


MIB50 = 50 * 1024 * 1024


def test_50mib_upload_by_hash(server_factory, pki):
    srv = tls_server(server_factory, pki)
    data = os.urandom(1024 * 1024) * 50
    with tls_connect(srv.port, pki.client_context(), timeout=60) as s:
        s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data))
        s.sendall(data)
        status, _, body = read_response(s)
        assert status == 200
        got = json.loads(body)
        assert got["length"] == MIB50
        assert got["sha256"] == hashlib.sha256(data).hexdigest()
        assert get(s, "/after")[0] == 200       # still in step


def _sha256_of_response(conn, path):
    """GET path on an http.client connection (kept alive); status, headers and the body's sha256."""
    conn.request("GET", path)
    r = conn.getresponse()
    h, n = hashlib.sha256(), 0
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return r.status, {k.lower(): v for k, v in r.getheaders()}, n, h.hexdigest()


def test_50mib_downloads_by_hash(server_factory, pki, tmp_path):
    """A generator (streamed under backpressure) and wsgi.file_wrapper (no sendfile on TLS), one connection."""
    srv = tls_server(server_factory, pki, app="apps_wsgi:app", extra={"keepalive_timeout": 30})
    path = tmp_path / "big.bin"
    data = os.urandom(1024 * 1024) * 50
    path.write_bytes(data)
    conn = http.client.HTTPSConnection("localhost", srv.port, timeout=60, context=pki.client_context())
    conn.sock = tls_connect(srv.port, pki.client_context(), timeout=60)
    try:
        status, headers, n, digest = _sha256_of_response(conn, "/big?mib=50")
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert (n, digest) == (MIB50, pattern_sha256(50 * 16))
        status, headers, n, digest = _sha256_of_response(conn, f"/raw/sendfile?path={path}&log={tmp_path / 'l'}")
        assert status == 200 and int(headers["content-length"]) == MIB50
        assert (n, digest) == (MIB50, hashlib.sha256(data).hexdigest())
        status, headers, n, digest = _sha256_of_response(
            conn, f"/raw/sendfile?path={path}&log={tmp_path / 'l'}&offset=1000")
        assert (n, digest) == (MIB50 - 1000, hashlib.sha256(data[1000:]).hexdigest())
        # the legacy write() callable: one 16 MiB write, flushed while the client reads
        status, headers, n, digest = _sha256_of_response(conn, "/write?mode=big&mib=16")
        assert status == 200 and (n, digest) == (16 * 1024 * 1024, pattern_sha256(16 * 16))
        sock = conn.sock
        status, headers, n, digest = _sha256_of_response(conn, "/text")
        assert status == 200 and conn.sock is sock, "one connection for all of them (keep-alive)"
    finally:
        conn.close()


def test_slow_reader_of_a_big_response(server_factory, pki):
    """A client that reads slowly: the response is suspended and resumed, nothing lost, others served."""
    srv = tls_server(server_factory, pki, app="apps_wsgi:app")
    ctx = pki.client_context()
    with tls_connect(srv.port, ctx, timeout=30) as slow:
        slow.sendall(b"GET /big?mib=8 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while len(got) < 64 * 1024:
            got += slow.recv(8192)
        with tls_connect(srv.port, ctx) as other:          # the worker is not held by the slow one
            assert get(other, "/text")[0] == 200
        status, _, body = read_response_after(slow, got)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(8 * 16)


def read_response_after(sock, already):
    """read_response, with the first bytes of it already read."""
    from conftest import _leftover
    _leftover[sock] = already
    return read_response(sock)


# ------------------------------------------------------------------ mutual TLS

def test_mutual_tls_required(server_factory, pki):
    srv = tls_server(server_factory, pki, ctx=pki.client_context(cert="client"),
                     extra={"ssl_ca_certs": pki.path("ca.pem"), "ssl_verify_client": "true"})
    with tls_connect(srv.port, pki.client_context(cert="client")) as s:
        env = environ_over(s)
    assert env["SSL_CLIENT_S_DN"] == CLIENT_DN
    assert env["HTTPS"] == "on" and env["wsgi.url_scheme"] == "https"
    for cert in (None, "rogue"):      # no certificate, or one from another CA: no request gets through
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_connect(srv.port, pki.client_context(cert=cert)) as s:
                get(s, "/json")       # TLS 1.3: the server's verdict arrives after the client's handshake
    out = s_client(srv.port, "-cert", pki.path("client.pem"), "-key", pki.path("client.key")).stdout
    assert b"HTTP/1.1 200 OK" in out


def test_mutual_tls_optional(server_factory, pki):
    """ssl_ca_certs without ssl_verify_client: a certificate is asked for, checked if sent, not required."""
    srv = tls_server(server_factory, pki, extra={"ssl_ca_certs": pki.path("ca.pem")})
    with tls_connect(srv.port, pki.client_context()) as s:
        assert "SSL_CLIENT_S_DN" not in environ_over(s)
    with tls_connect(srv.port, pki.client_context(cert="client")) as s:
        assert environ_over(s)["SSL_CLIENT_S_DN"] == CLIENT_DN
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(srv.port, pki.client_context(cert="rogue")) as s:
            get(s, "/json")


# ------------------------------------------------------------------ misbehaving clients

def _closed_by_server(sock, timeout=5.0):
    """Read until the server closes (EOF or reset); what it sent meanwhile."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


def test_plain_http_garbage_and_stalls_are_closed_counted_logged(server_factory, pki):
    srv = metrics_server(server_factory, extra=pki.settings(header_timeout="1"), start=False)
    start_tls(srv, pki.client_context())
    pids = srv.worker_pids()
    first = scrape(srv)
    assert first.has(HANDSHAKE_ERRORS) and first.value(HANDSHAKE_ERRORS) == 0, first.show()
    # plain HTTP to the TLS port
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1" not in _closed_by_server(s)
    # garbage
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(bytes(range(256)) * 8)
        _closed_by_server(s)
    # a stalled handshake: half a ClientHello, then nothing; closed by header_timeout
    hello = _client_hello(pki)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(hello[: len(hello) // 2])
        _closed_by_server(s)
    assert 0.8 < time.monotonic() - t0 < 3.0
    # a connection that sends nothing at all, also closed by header_timeout
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        _closed_by_server(s)
    # a port probe (connect, close) is not a handshake error
    socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
    wait_scrape(srv, lambda m: m.value(HANDSHAKE_ERRORS) == 4, what="4 handshake errors")
    with tls_connect(srv.port, pki.client_context()) as s:     # the worker serves on
        assert get(s, "/fine")[0] == 200
    scraped = scrape(srv)
    assert scraped.value(HANDSHAKE_ERRORS) == 4, scraped.show()
    assert scraped.value("blazewsgi_parse_errors_total") == 0
    worker_alive_and_same(srv, pids)
    log = srv.output()
    assert log.count("[DEBUG] TLS handshake with 127.0.0.1 failed") == 4, log
    assert "failed: http request" in log
    assert log.count("failed: not finished within header_timeout") == 2, log


def test_handshake_failures_logged_to_log_dir_without_access_log(server_factory, pki, tmp_path):
    """The debug line goes to log_dir's day file like the server's own lines, access log on or off."""
    logs = tmp_path / "logs"
    logs.mkdir()
    srv = tls_server(server_factory, pki, extra={"log_dir": logs, "access_log": "false"})
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _closed_by_server(s)

    def logged():
        text = "".join(p.read_text() for p in logs.iterdir())
        return text if "TLS handshake with 127.0.0.1 failed: http request" in text else None
    text = wait_until(logged, 10, what="the debug line in log_dir")
    line = next(x for x in text.splitlines() if "TLS handshake" in x)
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[\d+\] \[DEBUG\] TLS handshake with "
                        r"127\.0\.0\.1 failed: http request", line), line
    assert "Request:" not in text          # access_log = false


def _client_hello(pki):
    """The first flight of a real client: a ClientHello, taken from a memory BIO."""
    ctx = pki.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_handshake_time_counts_against_header_timeout(server_factory, pki):
    """The header deadline runs from the accept: a slow handshake leaves less
    time for the head.  (The listener defers the accept to the first bytes,
    TCP_DEFER_ACCEPT: so the client sends the start of its ClientHello, then
    stalls 0.9 s before the rest.)"""
    srv = tls_server(server_factory, pki, extra={"header_timeout": "1.5"})
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")

    def pump():
        """One handshake step: what the client has to send goes out, the reply comes in."""
        try:
            tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            raw.sendall(outgoing.read())
        data = raw.recv(65536)
        if not data:
            raise ConnectionError("closed during the handshake")
        incoming.write(data)
        return False

    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    t0 = time.monotonic()
    raw.sendall(hello[:20])                             # the server accepts now
    time.sleep(0.9)                                     # a slow client: the handshake drags
    raw.sendall(hello[20:])
    while not pump():
        pass
    tls.write(b"GET / HTTP/1.1\r\n")                    # and the head never completes
    raw.sendall(outgoing.read())
    _closed_by_server(raw, timeout=10)
    took = time.monotonic() - t0
    raw.close()
    assert 1.3 < took < 2.2, f"closed after {took:.2f}s: the handshake did not count against header_timeout"


def test_garbage_after_the_handshake_closes_the_connection(server_factory, pki):
    """Bytes that are not TLS records once TLS is up: the connection goes, the worker stays."""
    srv = tls_server(server_factory, pki)
    pids = srv.worker_pids()
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s = pki.client_context().wrap_socket(raw, server_hostname="localhost")
    assert get(s, "/one")[0] == 200
    raw_fd = socket.socket(fileno=os.dup(s.fileno()))
    raw_fd.sendall(b"\x17\x03\x03\x00\x20" + b"\0" * 32)     # an application record that fails to decrypt
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s.settimeout(5)
        if not s.recv(100):
            raise ConnectionError("closed")
    raw_fd.close()
    s.close()
    with tls_connect(srv.port, pki.client_context()) as s:
        assert get(s, "/two")[0] == 200
    worker_alive_and_same(srv, pids)


# ------------------------------------------------------------------ reload, listeners

def _der(sock):
    return sock.getpeercert(binary_form=True)


def _der_file(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_hup_picks_up_a_renewed_certificate_without_dropping_connections(server_factory, pki, tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.path(name), d / name)
    srv = tls_server(server_factory, pki, extra={"ssl_certfile": d / "server.pem", "ssl_keyfile": d / "server.key",
                                                 "keepalive_timeout": 30})
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(pki.path("server.pem"))
    ctx.load_verify_locations(pki.path("renewed.pem"))
    old = tls_connect(srv.port, ctx)
    assert get(old, "/before")[0] == 200
    served_by = _der(old)
    assert served_by == _der_file(pki.path("server.pem"))
    # renew: the files change in place, then HUP
    shutil.copy(pki.path("renewed.pem"), d / "server.pem")
    shutil.copy(pki.path("renewed.key"), d / "server.key")
    old_pids = srv.worker_pids()
    srv.send(signal.SIGHUP)

    def renewed():
        try:
            with tls_connect(srv.port, ctx, timeout=2) as s:
                return _der(s) == _der_file(pki.path("renewed.pem")) and get(s, "/new", close=True)[0] == 200
        except (OSError, ssl.SSLError):
            return False
    wait_until(renewed, 15, what=f"the renewed certificate:\n{srv.output()[-2000:]}")
    # the connection made before the reload still works (and is told to close by its retiring worker)
    status, headers, body = get(old, "/still-there")
    assert (status, body) == (200, b"GET /still-there")
    old.close()
    wait_until(lambda: not set(old_pids) & set(srv.worker_pids()), 15, what="the old workers to stop")


def test_hup_with_a_broken_certificate_keeps_the_old_workers(server_factory, pki, tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.path(name), d / name)
    srv = tls_server(server_factory, pki, extra={"ssl_certfile": d / "server.pem", "ssl_keyfile": d / "server.key"})
    pids = srv.worker_pids()
    shutil.copy(pki.path("renewed.pem"), d / "server.pem")          # the key was not renewed with it
    srv.send(signal.SIGHUP)
    wait_until(lambda: "Reload aborted" in srv.output(), 10, what="the reload to be refused")
    assert "does not match the certificate" in srv.output()
    with tls_connect(srv.port, pki.client_context()) as s:
        assert get(s, "/ok")[0] == 200
    assert srv.worker_pids() == pids


class BioClient:
    """A TLS client on memory BIOs: it decides what goes into each TCP send, so
    several records can leave in one segment (and land in one read-ahead)."""

    def __init__(self, port, ctx):
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump()
        self.raw.sendall(self.out.read())          # the client Finished

    def _pump(self):
        pending = self.out.read()
        if pending:
            self.raw.sendall(pending)
        chunk = self.raw.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.inc.write(chunk)

    def send_records(self, *pieces):
        """One TLS record per piece, all in one sendall."""
        for piece in pieces:
            self.tls.write(piece)
        self.raw.sendall(self.out.read())

    def recv(self, n):
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                try:
                    self._pump()
                except ConnectionError:
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def close(self):
        self.raw.close()


def test_retiring_worker_answers_requests_waiting_inside_openssl(server_factory, pki, tmp_path):
    """Three requests in three records of one TCP segment: read-ahead leaves two of them in
    OpenSSL's buffer, not in ours.  A reload retires the worker while the first one runs;
    the two waiting ones are still answered, and only the last response says close."""
    srv = tls_server(server_factory, pki, app="apps_metrics:app")
    mark = tmp_path / "inflight"
    c = BioClient(srv.port, pki.client_context())
    try:
        c.send_records(f"GET /sleep?s=3&mark={mark} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                       b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: mark.exists() and mark.read_text(), 10, what="the slow request to reach the app")
        old = int(mark.read_text())
        srv.send(signal.SIGHUP)
        wait_until(lambda: "Reload complete" in srv.output(), 15, what=f"the reload:\n{srv.output()[-2000:]}")
        responses = [read_response(c) for _ in range(3)]
    finally:
        c.close()
    assert [r[0] for r in responses] == [200, 200, 200]
    assert responses[0][2] == f"slept {old}".encode()
    assert [r[2] for r in responses[1:]] == [str(old).encode()] * 2, "answered by the retiring worker"
    assert [r[1].get("connection", "") for r in responses] == ["", "", "close"]


def test_unix_sockets_stay_plain_unless_ssl_unix(server_factory, pki, tmp_path):
    port = free_port()
    sock_path = str(tmp_path / "app.sock")
    srv = server_factory(bind=[f"127.0.0.1:{port}", sock_path], extra=pki.settings())
    srv.port = port
    start_tls(srv, pki.client_context())
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(5)
        u.connect(sock_path)
        env = environ_over(u)
    assert env["wsgi.url_scheme"] == "http" and "HTTPS" not in env
    with tls_connect(port, pki.client_context()) as s:
        assert environ_over(s)["wsgi.url_scheme"] == "https"
    srv.close()

    sock_path2 = str(tmp_path / "tls.sock")
    srv2 = server_factory(bind=[f"127.0.0.1:{port}", sock_path2], extra=pki.settings(ssl_unix="true"),
                          own_dir="unix-tls")
    srv2.port = port
    start_tls(srv2, pki.client_context())
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(5)
        u.connect(sock_path2)
        with pki.client_context().wrap_socket(u, server_hostname="localhost") as s:
            env = environ_over(s)
    assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"


def test_graceful_stop_with_tls_connections(server_factory, pki):
    """SIGTERM: idle keep-alive TLS connections are closed (close_notify), the server exits 0."""
    srv = tls_server(server_factory, pki)
    s = tls_connect(srv.port, pki.client_context())
    assert get(s, "/x")[0] == 200
    handshaking = socket.create_connection(("127.0.0.1", srv.port), timeout=5)   # not even a hello
    assert srv.stop() == 0
    s.settimeout(5)
    assert s.recv(100) == b""         # a clean TLS close (close_notify), not an error
    s.close()
    handshaking.close()


# ------------------------------------------------------------------ configuration errors

def _tls_config_error(workdir, pki, settings, *fragments):
    cfg = write_config(workdir, dict({"ssl": "true", "ssl_certfile": pki.path("server.pem"),
                                      "ssl_keyfile": pki.path("server.key")}, **settings))
    proc = run([sys.executable, "-m", "blazewsgi", cfg], cwd=workdir)
    return assert_one_line_error(proc, workdir, *fragments)


@pytest.mark.parametrize("settings,fragments", [
    ({"ssl_certfile": "missing.pem"}, ["ssl_certfile", "missing.pem", "no such file"]),
    ({"ssl_keyfile": None}, ["ssl_keyfile", "missing"]),
    ({"ssl_keyfile": "/"}, ["ssl_keyfile", "/", "not a regular file"]),
    ({"ssl_certfile": "@not-pem.pem"}, ["ssl_certfile", "not-pem.pem", "certificate"]),
    ({"ssl_keyfile": "@renewed.key"}, ["ssl_keyfile", "renewed.key", "does not match the certificate",
                                       "server.pem"]),
    ({"ssl_keyfile": "@server-enc.key"}, ["ssl_keyfile", "server-enc.key", "ssl_password"]),
    ({"ssl_keyfile": "@server-enc.key", "ssl_password": "wrong"}, ["ssl_keyfile", "server-enc.key",
                                                                     "ssl_password"]),
    ({"ssl_ciphers": "NO-SUCH-CIPHER"}, ["ssl_ciphers", "NO-SUCH-CIPHER", "selects no cipher"]),
    ({"ssl_ca_certs": "@not-pem.pem"}, ["ssl_ca_certs", "not-pem.pem"]),
    ({"ssl_verify_client": "true"}, ["ssl_verify_client", "ssl_ca_certs"]),
    ({"ssl_min_version": "tlsv1.1"}, ["ssl_min_version", "tlsv1.1"]),
], ids=["missing-file", "no-keyfile", "key-is-a-directory", "cert-not-pem", "key-mismatch",
        "encrypted-key-no-password", "wrong-password", "bad-ciphers", "ca-not-pem", "verify-without-ca",
        "min-version"])
def test_tls_config_errors_are_one_line_exit_2(workdir, pki, settings, fragments):  # noqa: F811
    settings = {k: (pki.path(v[1:]) if isinstance(v, str) and v.startswith("@") else v)
                for k, v in settings.items()}
    _tls_config_error(workdir, pki, settings, *fragments)


def test_check_config_validates_tls(workdir, pki):  # noqa: F811
    cfg = write_config(workdir, {"ssl": "true", "ssl_certfile": pki.path("server.pem"),
                                 "ssl_keyfile": pki.path("renewed.key")})
    proc = run([sys.executable, "-m", "blazewsgi", "--check-config", cfg], cwd=workdir)
    assert proc.returncode == 2 and "does not match the certificate" in proc.stderr
    cfg = write_config(workdir, {"ssl": "true", "ssl_certfile": pki.path("server.pem"),
                                 "ssl_keyfile": pki.path("server.key")})
    proc = run([sys.executable, "-m", "blazewsgi", "--check-config", cfg], cwd=workdir)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ the request corpus over TLS

@pytest.fixture(scope="module")
def tls_corpus_server(tmp_path_factory, pki):
    srv = Server(str(tmp_path_factory.mktemp("tls-corpus")), "apps_limits:environ_app", workers=1,
                 extra=pki.settings(keepalive_timeout=30, header_timeout=30, io_timeout=30, max_body_size="1M",
                                    log_level="info"))
    start_tls(srv, pki.client_context())
    srv.initial_workers = wait_until(lambda: srv.worker_pids(), 10, what="the worker to show up")
    yield srv
    srv.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickled"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(os.sep, "/")[:-5] for c in CASES])
def test_corpus_over_tls(tls_corpus_server, pki, case, trickle):
    """Every corpus request over TLS; trickled, each 3-byte piece is a TLS record of its own."""
    srv = tls_corpus_server
    with tls_connect(srv.port, pki.client_context()) as sock:
        send_all(sock, case.data, trickle)
        try:
            status, headers, body = read_final_response(sock)
        except (ConnectionError, socket.timeout, ssl.SSLError) as e:
            pytest.fail(f"{case.name}: no response ({e!r}); expected {case.expect} ({case.why})\n"
                        f"server log:\n{srv.output()[-3000:]}")
        assert status in case.expect, (
            f"{case.name}: expected {'|'.join(map(str, case.expect))} ({case.why}), got {status}: {body[:300]!r}")
        if not case.valid:
            assert headers.get("connection", "").lower() == "close", headers
            assert_closed(sock)
        else:
            env = json.loads(body)
            assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"
            for key, want in case.environ.items():
                if want is None:
                    assert key not in env, f"{key} should be absent, is {env[key]!r}"
                else:
                    assert env.get(key) == want, f"{key}: expected {want!r}, got {env.get(key)!r}"
            if case.keeps_alive():
                assert headers.get("connection", "").lower() != "close", headers
                sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status2, _, body2 = read_response(sock)
                assert status2 == 200 and json.loads(body2)["PATH_INFO"] == "/next"
            assert_closed(sock)
    worker_alive_and_same(srv, srv.initial_workers)


def test_corpus_pipelined_over_tls(tls_corpus_server, pki):
    cases = [c for c in CASES if c.valid and c.keeps_alive()]
    with tls_connect(tls_corpus_server.port, pki.client_context()) as sock:
        check_pipelined(sock, cases)
