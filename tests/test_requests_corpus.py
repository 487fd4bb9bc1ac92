"""The raw request corpus (tests/requests/, format in its README.md) against the real server.

Each file runs twice: the whole request in one send, and trickled in small
pieces so that read boundaries fall inside every token.  Invalid requests
must get the stated status and then a closed connection; valid ones a 200
whose environ matches the file's `# environ:` line, and a connection that
is either still usable (keep-alive) or closed, as the request asked.
"""
import glob
import json
import os
import re
import socket
import time

import pytest

from conftest import Server, read_response, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "requests")

_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}


def decode_request(text, where="<text>"):
    """The request bytes of a corpus file body: file newlines dropped, escapes decoded."""
    out = bytearray()
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip(" \t\r")
        i = 0
        while i < len(line):
            ch = line[i]
            if ord(ch) > 0x7E or (ord(ch) < 0x20 and ch != "\t"):
                raise ValueError(f"{where}:{lineno}: literal {ch!r}; write it as \\xNN")
            if ch != "\\":
                out += ch.encode("ascii")
                i += 1
                continue
            nxt = line[i + 1:i + 2]
            if nxt in _ESCAPES:
                out += _ESCAPES[nxt]
                i += 2
            elif nxt == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", line[i + 2:i + 4]):
                out.append(int(line[i + 2:i + 4], 16))
                i += 4
            else:
                raise ValueError(f"{where}:{lineno}: unknown escape {line[i:i + 4]!r}")
    return bytes(out)


class Case:
    def __init__(self, path):
        self.path = path
        self.name = os.path.relpath(path, CORPUS)
        self.valid = self.name.startswith("valid" + os.sep)
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        self.expect = None
        self.why = ""
        self.environ = {}
        i = 0
        while i < len(lines) and lines[i].startswith("#"):
            m = re.match(r"#\s*expect:\s*(\d{3}(?:\|\d{3})*)\s*(.*)$", lines[i])
            if m:
                self.expect = tuple(int(x) for x in m.group(1).split("|"))
                self.why = m.group(2).lstrip("—-– ").strip()
            m = re.match(r"#\s*environ:\s*(\{.*\})\s*$", lines[i])
            if m:
                self.environ = json.loads(m.group(1))
            i += 1
        if self.expect is None:
            raise ValueError(f"{path}: no '# expect: NNN' line")
        if self.valid and self.expect != (200,):
            raise ValueError(f"{path}: a valid case must expect 200")
        if self.environ and not self.valid:
            raise ValueError(f"{path}: '# environ:' only applies to valid cases")
        self.data = decode_request("\n".join(lines[i:]), path)
        if not self.data:
            raise ValueError(f"{path}: no request")

    def keeps_alive(self):
        """True if the server must keep the connection open after answering."""
        head = self.data.split(b"\r\n\r\n", 1)[0].lstrip(b"\r\n")
        request_line, _, fields = head.partition(b"\r\n")
        version = request_line.rsplit(b" ", 1)[-1]
        conn = [v.strip().lower() for k, _, v in (f.partition(b":") for f in fields.split(b"\r\n"))
                if k.strip().lower() == b"connection"]
        if version == b"HTTP/1.0":
            return b"keep-alive" in conn
        return b"close" not in conn


def _all_cases():
    files = sorted(glob.glob(os.path.join(CORPUS, "valid", "*.http")) +
                   glob.glob(os.path.join(CORPUS, "invalid", "*.http")))
    return [Case(p) for p in files]


CASES = _all_cases()


def test_corpus_is_complete():
    """The corpus was found and parses (guards against a glob silently matching nothing)."""
    assert sum(c.valid for c in CASES) >= 30
    assert sum(not c.valid for c in CASES) >= 60


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    srv = Server(str(tmp_path_factory.mktemp("corpus")), "apps_limits:environ_app", workers=1,
                 extra={"keepalive_timeout": 30, "header_timeout": 30, "io_timeout": 30,
                        "max_body_size": "1M"})
    srv.start()
    srv.initial_workers = wait_until(lambda: srv.worker_pids(), 10, what="the worker to show up")
    yield srv
    srv.close()


def send_all(sock, data, trickle):
    """Send the request; a server that has already answered and shut us out may reset."""
    try:
        if not trickle:
            sock.sendall(data)
            return
        for i in range(0, len(data), 3):
            sock.sendall(data[i:i + 3])
            time.sleep(0.001)   # pacing, so the pieces arrive in separate reads
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_final_response(sock):
    """Skip interim 1xx responses (a 100 Continue is allowed before the final answer)."""
    while True:
        status, headers, body = read_response(sock)
        if not 100 <= status < 200:
            return status, headers, body


def assert_closed(sock, timeout=5.0):
    """The server closes the connection: recv returns b"" within timeout; anything else fails."""
    deadline = time.monotonic() + timeout
    extra = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"connection still open {timeout}s after the response; unread: {extra!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            assert extra == b"", f"bytes after the response: {extra!r}"
            return
        extra += chunk


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickled"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(os.sep, "/")[:-5] for c in CASES])
def test_request(corpus_server, case, trickle):
    with corpus_server.connect() as sock:
        sock.settimeout(10)
        send_all(sock, case.data, trickle)
        try:
            status, headers, body = read_final_response(sock)
        except (ConnectionError, socket.timeout) as e:
            pytest.fail(f"{case.name}: no response ({e!r}); expected {case.expect} ({case.why})\n"
                        f"server log:\n{corpus_server.output()[-3000:]}")
        assert status in case.expect, (
            f"{case.name}: expected {'|'.join(map(str, case.expect))} ({case.why}), got {status}: {body[:300]!r}")

        if not case.valid:
            assert headers.get("connection", "").lower() == "close", headers
            assert_closed(sock)
        else:
            env = json.loads(body)
            for key, want in case.environ.items():
                if want is None:
                    assert key not in env, f"{key} should be absent, is {env[key]!r}"
                else:
                    assert key in env, f"{key} missing from the environ: {sorted(env)}"
                    assert env[key] == want, f"{key}: expected {want!r}, got {env[key]!r}"
            if case.keeps_alive():
                assert headers.get("connection", "").lower() != "close", headers
                sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status2, _, body2 = read_response(sock)
                assert status2 == 200
                assert json.loads(body2)["PATH_INFO"] == "/next"
            assert_closed(sock)

    assert corpus_server.proc.poll() is None, "the server exited"
    assert corpus_server.worker_pids() == corpus_server.initial_workers, (
        f"worker restarted (crash?) while handling {case.name}:\n{corpus_server.output()[-3000:]}")


def test_valid_cases_pipelined(corpus_server):
    """Every keep-alive valid case, back to back in one send: answered in order, each environ right."""
    cases = [c for c in CASES if c.valid and c.keeps_alive()]
    assert len(cases) >= 25
    with corpus_server.connect() as sock:
        sock.settimeout(10)
        check_pipelined(sock, cases)


def check_pipelined(sock, cases):
    """Send cases back to back, then a closing request: each answered 200 in order, environ right."""
    sock.sendall(b"".join(c.data for c in cases) +
                 b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for case in cases:
        status, _, body = read_final_response(sock)
        assert status == 200, f"{case.name} (pipelined): got {status}: {body[:300]!r}"
        env = json.loads(body)
        for key, want in case.environ.items():
            assert env.get(key) == want, f"{case.name} (pipelined): {key}: expected {want!r}, got {env.get(key)!r}"
    status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["PATH_INFO"] == "/last"
    assert_closed(sock)


def test_decode_request():
    """The corpus format's own rules (README.md)."""
    assert decode_request("GET / HTTP/1.1\\r\\n\nHost: x\\r\\n   \n\\r\\n") == \
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert decode_request("a\\x20\\t\\0\\\\\\xE9") == b"a \t\0\\\xe9"
    with pytest.raises(ValueError):
        decode_request("bad \\q escape")
    with pytest.raises(ValueError):
        decode_request("caf\u00e9")
