"""Apps served by test_wsgi.py and test_http11.py, and the raw HTTP client they share.

Server side: ``apps_wsgi:app`` dispatches on PATH_INFO.  Everything under
``/raw/`` goes to apps that are NOT wrapped in wsgiref.validate.validator,
each for a stated reason (they send something invalid on purpose, or the
validator's wrapper would hide what the server must see, e.g. a plain
one-item list or the wsgi.file_wrapper object itself).  Every other path
goes through ``validator(router)``.

Side channels with the test process are files whose paths arrive in the
query string (markers written by close(), "go" files a generator waits
for, progress counters); every wait on them is bounded.

Client side: HTTPConn, a small buffered reader for raw-socket tests that
keeps the bytes after one response (pipelining) and reports premature EOF
instead of looping.
"""
import hashlib
import io
import json
import os
import socket
import sys
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

CHUNK = 65536
CT = ("Content-Type", "text/plain")


# ---------------------------------------------------------------- shared data

def pattern_chunk(i, size=CHUNK):
    """Deterministic, cheap, non-repeating-per-index data for big responses."""
    block = hashlib.sha256(b"blaze-%d" % i).digest()
    return (block * (size // 32 + 1))[:size]


def pattern_sha256(n_chunks, size=CHUNK):
    h = hashlib.sha256()
    for i in range(n_chunks):
        h.update(pattern_chunk(i, size))
    return h.hexdigest()


# ------------------------------------------------------------------ helpers

def _qs(environ):
    """Query string as {name: [values]} (blank values kept)."""
    return parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)


def _q1(environ, name, default=None):
    return _qs(environ).get(name, [default])[0]


def _mark(path, text):
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def _wait_for_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


def _json_response(start_response, obj, status="200 OK"):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _describe(value):
    """JSON-able view of an environ value."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, tuple):
        return {"tuple": list(value)}
    return {"type": type(value).__name__,
            "attrs": sorted(a for a in ("read", "readline", "readlines", "__iter__", "write",
                                        "writelines", "flush") if hasattr(value, a)),
            "callable": callable(value)}


# ------------------------------------------------------ validated routes

def r_environ(environ, start_response):
    """The whole environ as JSON; ?errors=TEXT also writes TEXT to wsgi.errors."""
    msg = _q1(environ, "errors")
    if msg:
        environ["wsgi.errors"].write(msg + "\n")
        environ["wsgi.errors"].flush()
    return _json_response(start_response, {k: _describe(v) for k, v in environ.items()})


def r_text(environ, start_response):
    """"METHOD PATH" (or ?body=...) with a Content-Length; ?kb=N: N KiB of pattern data."""
    kb = _q1(environ, "kb")
    if kb is not None:
        body = b"".join(pattern_chunk(i, 1024) for i in range(int(kb)))
    else:
        body = _q1(environ, "body", f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}").encode("latin-1")
    start_response("200 OK", [CT, ("Content-Length", str(len(body)))])
    return [body]


def r_gen(environ, start_response):
    """A generator yielding each ?c= value (empty ones too); ?cl=N sets Content-Length;
    ?big=N appends an N-byte chunk; ?list=1: the list of them instead (sized, so its last
    block is known as such)."""
    q = _qs(environ)
    headers = [CT]
    if "cl" in q:
        headers.append(("Content-Length", q["cl"][0]))
    start_response("200 OK", headers)
    items = [c.encode("latin-1") for c in q.get("c", [])]
    if "big" in q:
        items.append(b"x" * int(q["big"][0]))

    if "list" in q:
        return items

    def gen():
        yield from items
    return gen()


def r_status(environ, start_response):
    """?code=204|304 and an empty body; ?body=TEXT returns TEXT anyway (a buggy app)."""
    code = _q1(environ, "code")
    reason = {"204": "No Content", "304": "Not Modified"}[code]
    headers = [("ETag", '"v1"')] if code == "304" else []
    start_response(f"{code} {reason}", headers)
    body = _q1(environ, "body")
    return [body.encode()] if body else []


def r_server_header(environ, start_response):
    """The app sends its own Server (and, with ?date=1, Date) header, in lower case."""
    headers = [CT, ("Content-Length", "2"), ("server", "MyApp/1.0")]
    if _q1(environ, "date"):
        headers.append(("date", "Tue, 01 Jan 2030 00:00:00 GMT"))
    start_response("200 OK", headers)
    return [b"ok"]


def r_conn_close(environ, start_response):
    """The app asks for the connection to be closed after this response."""
    start_response("200 OK", [CT, ("Content-Length", "3"), ("Connection", "close")])
    return [b"bye"]


def r_latin1(environ, start_response):
    start_response("200 OK", [CT, ("Content-Length", "2"), ("X-Latin", "caf\xe9")])
    return [b"ok"]


def r_many_headers(environ, start_response):
    """?n=N headers X-H-i of ?size=S bytes each."""
    n, size = int(_q1(environ, "n")), int(_q1(environ, "size"))
    headers = [CT, ("Content-Length", "4")]
    headers += [(f"X-H-{i}", (f"{i}-" * size)[:size]) for i in range(n)]
    start_response("200 OK", headers)
    return [b"many"]


def r_vary(environ, start_response):
    """A head of its own for each ?i: X-N: i, and 201 Created for every third."""
    i = int(_q1(environ, "i"))
    status = "201 Created" if i % 3 == 0 else "200 OK"
    start_response(status, [CT, ("Content-Length", "4"), ("X-N", str(i))])
    return [b"vary"]


SHARED_HEADERS = [CT, ("X-V", "0"), ("Content-Length", "2")]


def r_shared_headers(environ, start_response):
    """One header list object for every response, its X-V set in place to ?v."""
    SHARED_HEADERS[1] = ("X-V", _q1(environ, "v"))
    start_response("200 OK", SHARED_HEADERS)
    return [b"ok"]


def r_long_head(environ, start_response):
    """X-Long of ?n bytes: past what C remembers of a head (BLAZE_HEAD_KEY_MAX)."""
    start_response("200 OK", [CT, ("Content-Length", "4"), ("X-Long", "L" * int(_q1(environ, "n")))])
    return [b"long"]


def r_double_start(environ, start_response):
    """start_response twice without exc_info: PEP 3333 says that is an error."""
    start_response("200 OK", [CT, ("X-First", "1")])
    start_response("201 Created", [CT, ("X-Second", "1")])
    return [b"double"]


def r_stream(environ, start_response):
    """Yield b"first", wait (bounded) for the file ?go=PATH, then yield b"second"."""
    go = _q1(environ, "go")
    start_response("200 OK", [CT])

    def gen():
        yield b"first"
        yield b"second" if _wait_for_file(go, 10.0) else b"timed-out-waiting-for-go"
    return gen()


def r_hold(environ, start_response):
    """Sleep ?ms=N milliseconds, or wait (bounded) for the file ?go=PATH; answer "held"."""
    go = _q1(environ, "go")
    if go:
        body = b"held" if _wait_for_file(go, 10.0) else b"timed-out-waiting-for-go"
    else:
        time.sleep(int(_q1(environ, "ms", "0")) / 1000)
        body = b"held"
    start_response("200 OK", [CT, ("Content-Length", str(len(body)))])
    return [body]


def r_big(environ, start_response):
    """?mib=N MiB of pattern chunks from a generator; ?progress=PATH gets the count yielded."""
    n = int(_q1(environ, "mib")) * 16
    progress = _q1(environ, "progress")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def gen():
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644) if progress else -1
        try:
            for i in range(n):
                if fd >= 0:
                    os.pwrite(fd, b"%012d" % i, 0)
                yield pattern_chunk(i)
            if fd >= 0:
                os.pwrite(fd, b"%012d" % n, 0)
        finally:
            if fd >= 0:
                os.close(fd)
    return gen()


class Closing:
    """An iterable whose close() appends "closed" to a marker file.

    mode: normal (two chunks), error (raises after one chunk),
    infinite (64 KiB chunks, up to 1 GiB: ends only by a disconnect)."""

    def __init__(self, mode, marker):
        self.mode = mode
        self.marker = marker
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        if self.mode == "normal":
            if self.i > 2:
                raise StopIteration
            return b"chunk%d" % self.i
        if self.mode == "error":
            if self.i > 1:
                raise RuntimeError("closing-iterable-error")
            return b"chunk1"
        if self.i > 16384:
            raise StopIteration
        return pattern_chunk(self.i)

    def close(self):
        _mark(self.marker, "closed")


def r_closing(environ, start_response):
    start_response("200 OK", [CT])
    return Closing(_q1(environ, "mode"), _q1(environ, "marker"))


def r_raise_before(environ, start_response):
    raise RuntimeError("boom-before-" + _q1(environ, "token", ""))


def r_raise_in_gen_first(environ, start_response):
    """A generator app failing before its first yield: nothing was sent yet."""
    token = _q1(environ, "token", "")

    def gen():
        start_response("200 OK", [CT])
        raise RuntimeError("boom-gen-first-" + token)
        yield b"never"
    return gen()


def r_raise_after_empty(environ, start_response):
    """Yield only empty strings, then fail: PEP 3333 holds the headers back until
    the first non-empty chunk, so nothing was sent and a 500 is still possible."""
    token = _q1(environ, "token", "")
    start_response("200 OK", [CT, ("X-Not-Sent", "1")])

    def gen():
        yield b""
        yield b""
        raise RuntimeError("boom-after-empty-" + token)
    return gen()


def r_raise_after(environ, start_response):
    """Yield b"partial", then fail; ?cl=N declares a Content-Length."""
    token = _q1(environ, "token", "")
    headers = [CT]
    cl = _q1(environ, "cl")
    if cl:
        headers.append(("Content-Length", cl))
    start_response("200 OK", headers)

    def gen():
        yield b"partial"
        raise RuntimeError("boom-after-" + token)
    return gen()


def r_excinfo_replace(environ, start_response):
    """Catch our own error before anything was sent and replace the status."""
    start_response("200 OK", [CT, ("X-Before", "1")])
    try:
        raise RuntimeError("handled-error")
    except RuntimeError:
        start_response("500 Handled Error", [CT, ("X-After", "1")], sys.exc_info())
    return [b"error page"]


def r_excinfo_replace_gen(environ, start_response):
    """Same, inside a generator, before its first yield."""
    def gen():
        start_response("200 OK", [CT, ("X-Before", "1")])
        try:
            raise RuntimeError("handled-error")
        except RuntimeError:
            start_response("503 Replaced", [CT, ("X-After", "1")], sys.exc_info())
        yield b"replaced "
        yield b"body"
    return gen()


def r_excinfo_late(environ, start_response):
    """After the body started, start_response(exc_info) must re-raise that very error."""
    marker = _q1(environ, "marker")
    start_response("200 OK", [CT])

    def gen():
        yield b"partial"
        try:
            raise ValueError("late-error")
        except ValueError as original:
            try:
                start_response("500 Late", [CT], sys.exc_info())
            except ValueError as again:
                _mark(marker, "reraised-same" if again is original else "reraised-other")
                raise
            except BaseException as other:
                _mark(marker, "raised-" + type(other).__name__)
                raise
            _mark(marker, "not-reraised")
        yield b"after-excinfo"
    return gen()


def r_write(environ, start_response):
    """The write() callable.  mode=mixed: write a, b, return [c, d];
    only: writes and an empty list; cl: write with a Content-Length;
    big: one write() of ?mib=N MiB of pattern data, then return []."""
    mode = _q1(environ, "mode")
    if mode == "cl":
        write = start_response("200 OK", [CT, ("Content-Length", "10")])
        write(b"hello")
        write(b"world")
        return []
    write = start_response("200 OK", [CT])
    if mode == "mixed":
        write(b"a")
        write(b"b")
        return [b"c", b"d"]
    if mode == "only":
        write(b"only-")
        write(b"writes")
        return []
    if mode == "big":
        n = int(_q1(environ, "mib")) * 16
        write(b"".join(pattern_chunk(i) for i in range(n)))
        return []
    raise ValueError(mode)


def r_file(environ, start_response):
    """wsgi.file_wrapper through the validator (so the server sees an iterator):
    ?path=P (a real file, ?offset=N seeks first) or ?bio=N (a BytesIO of N pattern KiB)."""
    q = _qs(environ)
    if "bio" in q:
        f = io.BytesIO(b"".join(pattern_chunk(i, 1024) for i in range(int(q["bio"][0]))))
    else:
        f = open(q["path"][0], "rb")   # noqa: SIM115 - closed by the server via file_wrapper
        f.seek(int(q.get("offset", ["0"])[0]))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](f, 32768)


_PIECES = (1, 10, 4095, 65536, 100003, 7)


def r_body(environ, start_response):
    """sha256 and length of wsgi.input, read in pieces of varying size."""
    inp = environ["wsgi.input"]
    h = hashlib.sha256()
    n = 0
    k = 0
    while True:
        chunk = inp.read(_PIECES[k % len(_PIECES)])
        k += 1
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return _json_response(start_response, {"sha256": h.hexdigest(), "length": n,
                                           "content_length": environ.get("CONTENT_LENGTH")})


def r_input(environ, start_response):
    """Apply ?ops=op,op,... to wsgi.input and return the results as JSON (latin-1).

    Ops: read (no argument), read:N, readline, readline:N, readlines, iter
    (iterate the server's object), viter (iterate the validator's wrapper),
    seek:N (the object underneath; answers the new position).
    wsgiref.validate's InputWrapper only allows read(size), so read() and
    the server's own __iter__ are exercised on the object underneath it."""
    wrapped = environ["wsgi.input"]
    raw = wrapped.input
    out = []
    for op in _q1(environ, "ops").split(","):
        name, _, arg = op.partition(":")
        if name == "read":
            v = wrapped.read(int(arg)) if arg else raw.read()
        elif name == "readline":
            v = wrapped.readline(int(arg)) if arg else wrapped.readline()
        elif name == "readlines":
            v = wrapped.readlines()
        elif name == "iter":
            v = list(raw)
        elif name == "viter":
            v = list(wrapped)
        elif name == "seek":             # not in PEP 3333; a body's input has always had it
            v = str(raw.seek(int(arg))).encode()
        else:
            raise ValueError(op)
        if isinstance(v, list):
            for x in v:
                assert type(x) is bytes, type(x)
            out.append([x.decode("latin-1") for x in v])
        else:
            assert type(v) is bytes, type(v)
            out.append(v.decode("latin-1"))
    return _json_response(start_response, out)


ROUTES = {
    "/environ": r_environ,
    "/text": r_text,
    "/gen": r_gen,
    "/status": r_status,
    "/server-header": r_server_header,
    "/latin1": r_latin1,
    "/conn-close": r_conn_close,
    "/stream": r_stream,
    "/many-headers": r_many_headers,
    "/vary": r_vary,
    "/shared-headers": r_shared_headers,
    "/long-head": r_long_head,
    "/double-start": r_double_start,
    "/big": r_big,
    "/closing": r_closing,
    "/raise-before": r_raise_before,
    "/raise-gen-first": r_raise_in_gen_first,
    "/raise-after": r_raise_after,
    "/hold": r_hold,
    "/raise-after-empty": r_raise_after_empty,
    "/excinfo-replace": r_excinfo_replace,
    "/excinfo-replace-gen": r_excinfo_replace_gen,
    "/excinfo-late": r_excinfo_late,
    "/write": r_write,
    "/file": r_file,
    "/body": r_body,
    "/input": r_input,
}


@validator
def router(environ, start_response):
    if environ.get("HTTP_X_ENVIRON"):   # the environ of any target, whatever its path
        return r_environ(environ, start_response)
    handler = ROUTES.get(environ["PATH_INFO"])
    if handler is None:   # anything else: "METHOD PATH" (pipelining uses distinct paths)
        handler = r_text
    return handler(environ, start_response)


# ----------------------------------------------- unvalidated routes (/raw/)

def raw_list(environ, start_response):
    """A plain one-item list.  Not validated: the validator would wrap the list
    in an iterator, and the point is what the server does with a real list.
    ?cl=N declares a Content-Length (too big or too small on purpose)."""
    body = _q1(environ, "body", "one item").encode()
    headers = [CT]
    if _q1(environ, "cl"):
        headers.append(("Content-Length", _q1(environ, "cl")))
    start_response("200 OK", headers)
    return [body]


def raw_items(environ, start_response):
    """A plain list of the ?c= values, not validated (so its iterator is sized and
    its last block known as such); ?cl=N declares a Content-Length."""
    headers = [CT]
    if _q1(environ, "cl"):
        headers.append(("Content-Length", _q1(environ, "cl")))
    start_response("200 OK", headers)
    return [c.encode("latin-1") for c in _qs(environ).get("c", [])]


class TrackedFile(io.FileIO):
    """A real file that logs read() and close() calls to a marker file."""

    def __init__(self, path, log):
        super().__init__(path, "r")
        self._log = log

    def read(self, size=-1):
        _mark(self._log, f"read {size}")
        return super().read(size)

    def readinto(self, b):
        _mark(self._log, "readinto")
        return super().readinto(b)

    def close(self):
        if not self.closed:
            _mark(self._log, "close")
        super().close()


def raw_sendfile(environ, start_response):
    """wsgi.file_wrapper returned as is.  Not validated: PEP 3333 lets the
    server optimise only when it gets the wrapper object itself, and the
    validator would hand it an IteratorWrapper instead.
    ?path=P ?log=L ?offset=N ?cl=N; ?readfirst=N: a buffered file after read(N)."""
    q = _qs(environ)
    if "readfirst" in q:     # a buffered file that has read ahead of its position
        f = open(q["path"][0], "rb")   # noqa: SIM115 - closed by the server via file_wrapper
        f.read(int(q["readfirst"][0]))
    else:
        f = TrackedFile(q["path"][0], q["log"][0])
    if "offset" in q:
        f.seek(int(q["offset"][0]))
    headers = [("Content-Type", "application/octet-stream")]
    if "cl" in q:
        headers.append(("Content-Length", q["cl"][0]))
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](f, 65536)


# Invalid responses: (status, headers, needle).  The needle is what an
# injection would put on the wire; it must never reach the client.
INVALID = {
    "status-word-first": ("OK 200", [CT], b"OK 200"),
    "status-4-digits": ("2000 Injected", [CT], b"2000"),
    "status-2-digits": ("20 Injected", [CT], b"Injected"),
    "status-letters": ("2x0 Injected", [CT], b"Injected"),
    "status-crlf": ("200 OK\r\nX-Injected: evil", [CT], b"X-Injected"),
    "status-lf": ("200 OK\nX-Injected: evil", [CT], b"X-Injected"),
    "status-cr": ("200 OK\rX-Injected: evil", [CT], b"X-Injected"),
    "status-nul": ("200 OK\0X-Injected", [CT], b"X-Injected"),
    # the head goes to C as "status\0name\0value...": a NUL in the status must not make a header
    "status-nul-pair": ("200 OK\0X-Injected\0evil", [CT], b"X-Injected"),
    "status-bytes": (b"200 Injected", [CT], b"Injected"),
    "status-nonlatin1": ("200 Injected \u20ac", [CT], b"Injected"),
    "name-crlf": ("200 OK", [CT, ("X-Bad\r\nX-Injected", "evil")], b"X-Injected"),
    "name-lf": ("200 OK", [CT, ("X-Bad\nX-Injected", "evil")], b"X-Injected"),
    "name-colon": ("200 OK", [CT, ("X-Injected: evil", "v")], b"X-Injected"),
    "name-space": ("200 OK", [CT, ("X Injected", "v")], b"X Injected"),
    "name-empty": ("200 OK", [CT, ("", "X-Injected")], b"X-Injected"),
    "name-bytes": ("200 OK", [CT, (b"X-Injected", "v")], b"X-Injected"),
    "name-nonlatin1": ("200 OK", [CT, ("X-Injected-\u20ac", "v")], b"X-Injected"),
    "value-crlf": ("200 OK", [CT, ("X-Ok", "v\r\nX-Injected: evil")], b"X-Injected"),
    "value-lf": ("200 OK", [CT, ("X-Ok", "v\nX-Injected: evil")], b"X-Injected"),
    "value-cr": ("200 OK", [CT, ("X-Ok", "v\rX-Injected: evil")], b"X-Injected"),
    "value-nul": ("200 OK", [CT, ("X-Ok", "v\0X-Injected")], b"X-Injected"),
    "value-int": ("200 OK", [CT, ("X-Injected", 31337)], b"31337"),
    "value-bytes": ("200 OK", [CT, ("X-Ok", b"X-Injected")], b"X-Injected"),
    "value-nonlatin1": ("200 OK", [CT, ("X-Injected", "caf\u20ac")], b"X-Injected"),
    "value-none": ("200 OK", [CT, ("X-Injected", None)], b"X-Injected"),
    "header-3-tuple": ("200 OK", [CT, ("X-Ok", "v", "X-Injected")], b"X-Injected"),
    "header-1-tuple": ("200 OK", [CT, ("X-Injected",)], b"X-Injected"),
    "headers-tuple": ("200 OK", (CT, ("X-Injected", "v")), b"X-Injected"),
    "headers-dict": ("200 OK", {"X-Injected": "v"}, b"X-Injected"),
    "cl-not-a-number": ("200 OK", [CT, ("Content-Length", "abc")], b"body-"),
    "cl-negative": ("200 OK", [CT, ("Content-Length", "-13")], b"body-"),
    "cl-twice-different": ("200 OK", [CT, ("Content-Length", "13"), ("Content-Length", "5")], b"body-"),
}


def raw_invalid(environ, start_response):
    """Send INVALID[?case] through the list, generator or write() path (?kind).
    Not validated: sending something invalid is the point."""
    status, headers, _ = INVALID[_q1(environ, "case")]
    kind = _q1(environ, "kind")
    marker = _q1(environ, "marker")
    if kind == "list":
        start_response(status, headers)
        return [b"body-Injected"]
    if kind == "write":
        write = start_response(status, headers)
        write(b"body-Injected")
        return []
    if kind == "closing":
        start_response(status, headers)
        return Closing("normal", marker)

    def gen():
        start_response(status, headers)
        yield b"body-"
        yield b"Injected"
    return gen()


def raw_status_only(environ, start_response):
    """Status "200" with no reason phrase.  Not validated: the validator only
    warns about it, and the warning would look like a test failure."""
    start_response("200", [CT, ("Content-Length", "2")])
    return [b"ok"]


def raw_list_header(environ, start_response):
    """A header given as a list, not a tuple.  Not validated: the validator
    wants tuples; gunicorn and we take any pair."""
    start_response("200 OK", [CT, ["X-List", "yes"], ("Content-Length", "2")])
    return [b"ok"]


RAW_ROUTES = {
    "/raw/list-header": raw_list_header,
    "/raw/list": raw_list,
    "/raw/items": raw_items,
    "/raw/sendfile": raw_sendfile,
    "/raw/invalid": raw_invalid,
    "/raw/status-only": raw_status_only,
}


def app(environ, start_response):
    """Entry point: /raw/* unvalidated (see each function), the rest validated."""
    raw = RAW_ROUTES.get(environ.get("PATH_INFO", ""))
    if raw is not None:
        return raw(environ, start_response)
    return router(environ, start_response)


# ============================================================ client side

class Response:
    def __init__(self, version, status, reason, headers, raw_head):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers          # [(name, value)] as sent (latin-1 str)
        self.raw_head = raw_head        # bytes up to and including CRLFCRLF
        self.body = b""
        self.complete = True            # False: EOF before the framing said the body ended
        self.raw_body = b""             # the body bytes as framed on the wire

    def get(self, name, default=None):
        vals = self.all(name)
        return vals[0] if vals else default

    def all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def __repr__(self):
        return f"<Response {self.status} {self.headers} body={self.body[:80]!r}>"


class HTTPConn:
    """Raw socket client that keeps unread bytes between responses."""

    def __init__(self, sock, timeout=10.0):
        self.sock = sock
        sock.settimeout(timeout)
        self.buf = bytearray()

    @classmethod
    def connect(cls, server, timeout=10.0, rcvbuf=None):
        if rcvbuf is None:
            return cls(server.connect(timeout), timeout)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", server.port))
        return cls(s, timeout)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n=262144):
        chunk = self.sock.recv(n)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def read_until(self, sep):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            self._fill()

    def read_exact(self, n):
        parts = []
        if self.buf:
            take = bytes(self.buf[:n])
            del self.buf[:n]
            parts.append(take)
            n -= len(take)
        while n > 0:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError("connection closed by the server")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def read_to_eof(self):
        parts = [bytes(self.buf)]
        self.buf.clear()
        while True:
            chunk = self.sock.recv(262144)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def at_eof(self, timeout=5.0):
        """True if the server closes with no further bytes within timeout."""
        if self.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(old)

    def read_head(self):
        raw = self.read_until(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        headers = []
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            assert sep, f"header line without a colon: {line!r}"
            headers.append((k.decode("latin-1"), v.strip(b" \t").decode("latin-1")))
        return Response(version.decode("latin-1"), int(code), reason.decode("latin-1"), headers, raw)

    def iter_chunked(self, resp=None):
        """Yield the data of each chunk as it arrives; sets resp.complete."""
        raw = []
        try:
            while True:
                line = self.read_until(b"\r\n")
                raw.append(line)
                size = int(line[:-2].split(b";")[0], 16)
                if size == 0:
                    while True:          # trailers, then the empty line
                        t = self.read_until(b"\r\n")
                        raw.append(t)
                        if t == b"\r\n":
                            return
                data = self.read_exact(size)
                crlf = self.read_exact(2)
                raw.append(data)
                raw.append(crlf)
                assert crlf == b"\r\n", f"chunk data not followed by CRLF: {crlf!r}"
                yield data
        except EOFError:
            if resp is not None:
                resp.complete = False
        finally:
            if resp is not None:
                resp.raw_body = b"".join(raw)

    def read_body(self, resp, method="GET"):
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            return resp
        te = resp.get("transfer-encoding")
        if te is not None:
            assert te.lower() == "chunked", te
            resp.body = b"".join(self.iter_chunked(resp))
            return resp
        cl = resp.get("content-length")
        if cl is not None:
            n = int(cl)
            got = bytes(self.buf[:n])
            del self.buf[:n]
            parts = [got]
            n -= len(got)
            while n > 0:
                try:
                    chunk = self.sock.recv(min(n, 1 << 20))
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    resp.complete = False
                    break
                parts.append(chunk)
                n -= len(chunk)
            resp.body = resp.raw_body = b"".join(parts)
            return resp
        resp.body = resp.raw_body = self.read_to_eof()
        return resp

    def response(self, method="GET"):
        return self.read_body(self.read_head(), method)

    def request(self, raw, method=None):
        self.send(raw)
        if method is None:
            method = raw.split(b" ", 1)[0].decode()
        return self.response(method)


def get(path, host="t", version="1.1", headers=()):
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")
