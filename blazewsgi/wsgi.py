"""The WSGI side of a request: environ, start_response, the response.

C calls blaze_py_request once per complete request.  C makes the CGI
names and values (HTTP_* already upper-cased, PATH_INFO already
percent-decoded).  The names of a key set are learned once (_learn_keys);
per request only the values come, one "VALUE\\0VALUE\\0..." block read
in place from the loop's buffer (use_loop).  Building the environ is a
copy of the listener's base, one decode, one split and one store per
name, with no Python work per header.  The environ of a kept-alive
connection's last request is remembered (_memo): when the next one has the
same names, C sends only the values that changed, and the environ is a copy
of the remembered one with those stored.  The response goes back the same
way: the status and the headers joined into one "status\\0name\\0value\\0..."
string, which C validates and frames; it is remembered encoded (_head).

Responses:
  * a one-item list or tuple (the common case) goes out in one write
    with its Content-Length: blaze_resp_simple;
  * wsgi.file_wrapper around a real file goes out with sendfile;
  * anything else is iterated; when the socket is slower than the app
    (more than HIGH_WATER bytes queued) we return BLAZE_PY_STREAM and the
    loop calls blaze_py_resume when the output drains, so one slow client
    never holds the worker and memory stays bounded.
The app's iterable is closed in every case, including client disconnects
(blaze_py_abort).

With threads > 1 the same functions run in the app threads (threads.py):
C hands each thread a request, the thread calls _serve or _resume, and
what they frame goes into the connection's buffer for the loop to write.
"""
import io
import itertools
import logging
import os
import stat
import sys

from . import SERVER_SOFTWARE
from ._blaze import ffi, lib

log = logging.getLogger("blazewsgi.error")

DONE = lib.BLAZE_PY_DONE
STREAM = lib.BLAZE_PY_STREAM
ERROR = lib.BLAZE_PY_ERROR
HIGH_WATER = 256 * 1024
BODY_KEEP = lib.BLAZE_BODY_KEEP

_app = None
_bases = []          # per listener index: (base environ, in a grown table, room): see _sized
_streams = {}        # conn_id -> _Response suspended mid-body


class ClientGone(Exception):
    """The client disconnected while we were sending."""


class FileWrapper:
    """wsgi.file_wrapper: sent with sendfile when it wraps a regular file."""

    def __init__(self, filelike, blksize=65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


_values = None      # the loop's values block, an ffi.buffer (use_loop)
_flushes = None     # the loop's count of flushes of held output (blaze_loop_flushes)
_lent = []          # big bodies C sends from where they lie when the pass ends ...
_lent_at = 0        # ... lent while the count was this: kept until it moves


def use_loop(loop):
    """The worker's loop, before it runs: _values is its values block (see
    blaze_loop_values), read in place; slicing an ffi.buffer costs less than
    ffi.unpack of a pointer C passes."""
    global _values, _flushes
    _values = ffi.buffer(lib.blaze_loop_values(loop), lib.blaze_loop_values_cap(loop))
    _flushes = lib.blaze_loop_flushes(loop)


def _lend(body):
    """blaze_resp_simple returned 1: C refers to body until its held output
    is flushed (conn_lend_last), so body stays alive until then.  What was
    lent before the last flush can go."""
    global _lent_at
    n = _flushes[0]
    if n != _lent_at:
        _lent.clear()
        _lent_at = n
    _lent.append(body)


def setup(app, listeners, multiprocess, threads=1, tls=None):
    """Called once per worker before the loop runs; tls[i]: listener i speaks TLS."""
    global _app
    _app = app
    _bases.clear()
    _spare[:] = [_Response() for _ in range(4)]
    for i, lst in enumerate(listeners):
        secure = bool(tls and tls[i])
        _bases.append({
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if secure else "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": threads > 1,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
            "wsgi.input": _EMPTY_INPUT,       # replaced when the request has a body
            "SCRIPT_NAME": "",
            # Defaults C leaves out when they hold (see http_build_environ).
            "REQUEST_METHOD": "GET",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "QUERY_STRING": "",
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "SERVER_NAME": lst.server_name,
            "SERVER_PORT": lst.server_port,
        })
        if lst.kind == "unix":
            _bases[-1]["REMOTE_ADDR"] = ""   # a Unix peer has no address (as gunicorn says it)
        if secure:
            _bases[-1]["HTTPS"] = "on"       # the CGI key; SSL_CLIENT_S_DN comes from C with mTLS
        _bases[-1] = _sized(_bases[-1])


def _sized(base):
    """(base, the same items in a grown hash table, room): a request's
    environ is a copy of base when its keys number at most room (the keys a
    copy takes before its table grows), else of the grown one, whose copy
    takes them without growing (CPython copies a table as it is).  A small
    request (an API client, wrk) keeps a table small enough for Python's
    own allocator; a browser's dozen headers do not grow one per request.
    A table may hold up to half again its items in deleted slots and still
    be copied as it is, hence the 8."""
    grown = dict(base)
    pad = [f"\0pad{i}" for i in range(8)]
    for k in pad:
        grown[k] = None
    for k in pad:
        del grown[k]
    probe = base.copy()
    size = sys.getsizeof(probe)
    room = 0
    while True:
        probe[f"\0room{room}"] = None
        if sys.getsizeof(probe) != size:
            return base, grown, room
        room += 1


_join0 = "\0".join
_chain = itertools.chain.from_iterable
_heads = {}          # (status, *headers) -> (head, its length, header count): see _new_head
HEADS_MAX = 256
_last = (None, None, None, 0, 0)   # see _remember_last


def _header_block(headers):
    # TypeError for non-str items, UnicodeEncodeError for non-latin-1: both 500.
    s = _join0(_chain(headers))
    b = s.encode()                # ASCII (nearly always): the fast encoder, same bytes
    if len(b) != len(s):
        b = s.encode("latin-1")
    return b


def _head(status, headers):
    """(head, len(head), len(headers)) for C, the head being the status and
    the header block in one string: the last head sent (_last, which
    blaze_py_request also checks inline), else a remembered one (_heads),
    else a new one (_new_head).  The lengths are remembered with it: no
    len() per response."""
    ls, lh, head, hl, nh = _last
    if status == ls and headers == lh:
        return head, hl, nh
    try:
        key = (status, *headers)
        head = _heads.get(key)
    except TypeError:            # an unhashable header item: not remembered
        return _new_head(status, headers, None)
    head = head or _new_head(status, headers, key)
    _remember_last(status, headers, head)
    return head


def _remember_last(status, headers, head):
    """_last: a hashable head's status, a copy of its header list (the app's own
    list may change after the response; its tuples cannot), and its head
    (bytes, length, header count).  One assignment, so an app thread never
    reads half of another's."""
    global _last
    _last = (status, list(headers), *head)


def _new_head(status, headers, key):
    """Encode a head not in _heads and remember it under key (None: an
    unhashable one, not remembered): an app answers with a few heads over
    and over.  Heads that vary (cookies, ETags) fill the table, which then
    starts again empty."""
    if "\0" in status:            # C would end the status line there
        raise ValueError("invalid status line: a NUL character")
    head = b"%s\0%s" % (status.encode("latin-1"), _header_block(headers))
    head = head, len(head), len(headers)
    if key is not None:
        if len(_heads) >= HEADS_MAX:
            _heads.clear()
        _heads[key] = head
    return head


def _refused():
    """C refused a response: the client left, or the app's status or headers
    are invalid.  Called at once, in the thread C refused."""
    why = ffi.string(lib.blaze_resp_error()).decode("latin-1", "replace")
    if why == "client disconnected":
        raise ClientGone(why)
    raise ValueError(f"invalid response from the application: {why}")


class _EmptyInput:
    """wsgi.input of a request without a body: stateless, so one is shared."""
    __slots__ = ()

    def read(self, size=-1):
        return b""

    def readline(self, size=-1):
        return b""

    def readlines(self, hint=-1):
        return []

    def __iter__(self):
        return iter(())


_EMPTY_INPUT = _EmptyInput()


class _BodyRaw(io.RawIOBase):
    """The raw stream under wsgi.input for a body bigger than C keeps per
    connection (BLAZE_BODY_KEEP): C hands over its buffer (blaze_body_take)
    and reads copy out of it, so a 1 MiB body is not first copied whole
    into a bytes object.  Closed (and the buffer freed) when the response
    is done, like a spilled body's file, or when the reader is collected."""

    def __init__(self, ptr, size):
        super().__init__()
        self._p = ffi.gc(ptr, lib.blaze_body_free)
        self._size = size
        self._pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        if self._p is None:
            raise ValueError("I/O operation on closed file")
        n = min(b.nbytes if type(b) is memoryview else len(b), self._size - self._pos)
        if n <= 0:
            return 0
        ffi.memmove(b, self._p + self._pos, n)
        self._pos += n
        return n

    def readall(self):
        if self._p is None:
            raise ValueError("I/O operation on closed file")
        n = self._size - self._pos
        if n <= 0:
            return b""
        data = _unpack(self._p + self._pos, n)
        self._pos = self._size
        return data

    def seek(self, offset, whence=io.SEEK_SET):
        if self._p is None:
            raise ValueError("I/O operation on closed file")
        base = (0, self._pos, self._size)[whence] if whence in (0, 1, 2) else None
        if base is None:
            raise ValueError(f"invalid whence ({whence!r}, should be 0, 1 or 2)")
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self):
        if self._p is None:
            raise ValueError("I/O operation on closed file")
        return self._pos

    def close(self):
        p, self._p = self._p, None
        if p is not None:
            ffi.release(p)     # frees it now, not when the last reference goes
        super().close()


class _Response:
    """One request's response state; reused across requests (see _spare)."""
    __slots__ = ("conn", "status", "headers", "sent", "result", "it", "input", "start", "_write")

    def __init__(self):
        self.start = self.start_response     # bound once, not per request
        self._write = self.write
        self.conn = self.status = self.headers = None
        self.sent = False
        self.result = self.it = self.input = None

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if type(status) is not str:
            raise TypeError(f"status must be str, not {type(status).__name__}")
        if type(headers) is not list:
            raise TypeError(f"headers must be a list, not {type(headers).__name__}")
        self.status = status
        self.headers = headers
        return self._write

    def _start(self, body_len):
        if self.status is None:
            raise AssertionError("the application sent a body before calling start_response()")
        head, hl, nh = _head(self.status, self.headers)
        if lib.blaze_resp_start(self.conn, head, hl, nh, body_len) != 0:
            _refused()
        self.sent = True

    def write(self, data):
        """The legacy write() callable: sent now, blocking while the client lags."""
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if not self.sent:
            self._start(-1)
        pending = lib.blaze_resp_write(self.conn, data, len(data))
        if pending > HIGH_WATER:
            pending = lib.blaze_resp_flush(self.conn, HIGH_WATER // 4)
        if pending < 0:
            raise ClientGone("client disconnected")

    def pump(self):
        """Send from the iterator until it ends (DONE) or the socket lags (STREAM)."""
        conn = self.conn
        it = self.it
        sized = type(it) in _SIZED
        for chunk in it:
            if type(chunk) is not bytes:
                _not_bytes(chunk)
            if not chunk:
                continue
            if not self.sent:
                self._start(-1)
            if sized and not it.__length_hint__():
                # the last block, known as such: it and the end in one call
                if lib.blaze_resp_last(conn, chunk, len(chunk)) != 0:
                    raise ClientGone("client disconnected")
                return DONE
            pending = lib.blaze_resp_write(conn, chunk, len(chunk))
            if pending < 0:
                raise ClientGone("client disconnected")
            if pending > HIGH_WATER:
                return STREAM
        if not self.sent:
            self._start(0)
        if lib.blaze_resp_finish(conn) != 0:
            raise ClientGone("client disconnected")
        return DONE

    def close(self):
        """Close the app's iterable and our copy of the body; errors are logged."""
        result, self.result, self.it = self.result, None, None
        inp, self.input = self.input, None
        if inp is not None and not isinstance(inp, io.BytesIO):
            inp.close()
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("Error closing the application's response")


def _send_file(r, wrapper):
    """sendfile path for wsgi.file_wrapper; None when the file is not a regular file."""
    f = wrapper.filelike
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        offset = f.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    size = max(st.st_size - offset, 0)
    if not r.sent:
        r._start(-1 if any(k.lower() == "content-length" for k, _ in r.headers) else size)
    if lib.blaze_resp_file(r.conn, os.dup(fd), offset, size) < 0 or lib.blaze_resp_finish(r.conn) != 0:
        raise ClientGone("client disconnected")
    return DONE


def _run_general(r, result):
    """Anything but one block of bytes: sendfile, or iterate."""
    if type(result) is FileWrapper:
        rc = _send_file(r, result)
        if rc is not None:
            return rc
    if r.it is None:
        r.it = iter(result)
    return r.pump()


def _not_bytes(chunk):
    raise TypeError(f"the application yielded {type(chunk).__name__}, not bytes")


def _finish(r):
    """The response is out: close what needs closing, keep r for the next request."""
    if type(r.result) is not list or r.input is not None:
        r.close()
    r.result = r.it = None
    _spare.append(r)


def _fail_refused(r):
    """C refused a deferred one-item response (threads.py): ERROR, logged."""
    try:
        _refused()
    except Exception as exc:
        return _fail(r, exc)


def _fail(r, exc):
    if isinstance(exc, ClientGone):
        log.debug("client disconnected during the response")
    else:
        log.error("Error handling request", exc_info=exc)
    r.close()
    return ERROR


# finished _Response objects, reused to spare an allocation.  setup() puts
# four in: popping a list's only item shrinks it and append() grows it
# again, two reallocs per request.
_spare = []
_SIZED = (type(iter([])), type(iter(())))   # iterators that know how many items are left
_unpack = ffi.unpack
_resp_simple = lib.blaze_resp_simple


def _body_input(r, req, conn):
    if req.body_len == 0:            # e.g. an empty chunked body
        return io.BytesIO()
    if req.body_fd >= 0:
        r.input = open(os.dup(req.body_fd), "rb")
        return r.input
    if req.body_len > BODY_KEEP:
        ptr = lib.blaze_body_take(conn)
        if ptr != ffi.NULL:
            r.input = io.BufferedReader(_BodyRaw(ptr, req.body_len))
            return r.input
    return io.BytesIO(_unpack(req.body, req.body_len))


# slot -> (C's generation of the slot, the environ builder for its CGI names,
# the names) (see C keyset_slot), stored in one assignment so that an app
# thread never pairs one learner's generation with another's builder
_keysets = [(0, None, ())] * lib.BLAZE_KEYSETS_PY
# connection slot (its descriptor) -> (the connection's id, the environ of its
# last request, as built): see C env_delta, which says when an entry is made,
# used or left alone.  An entry left by a closed connection is only ever
# replaced (the id is checked).  With threads, a connection is in one thread
# at a time and its requests come in order.
_memo = {}
COMPILE_AFTER = 16   # requests with a key set before it gets a compiled builder


def _learn_keys(slot, req):
    keys = tuple(sys.intern(k) for k in _unpack(req.keys, req.keys_len).decode("latin-1").split("\0"))
    build = _generic_builder(slot, keys)
    _keysets[slot] = (req.keygen, build, keys)
    return build


def _generic_builder(slot, keys):
    """A key set's first builder: a base's copy (see _sized) and
    update(zip()).  Once it has built COMPILE_AFTER environs it puts a
    compiled builder in its place, so a client that makes up new header
    names on every request costs no compiling."""
    left = COMPILE_AFTER

    def build(bases, block):
        nonlocal left
        left -= 1
        if left == 0:
            gen, current, _ = _keysets[slot]
            if current is build:
                _keysets[slot] = (gen, _compiled_builder(keys), keys)
        environ = bases[len(keys) > bases[2]].copy()
        environ.update(zip(keys, block.decode("latin-1").split("\0")))
        return environ
    return build


def _compiled_builder(keys):
    """A base's copy and one store per name, written out for this key set: half
    the cost of update(zip()), whose zip object alone costs as much as the
    stores.  Made with exec, as namedtuple makes its methods; the names are
    C's CGI names, written as repr() literals."""
    values = ", ".join(f"v{i}" for i in range(len(keys)))
    src = ["def build(bases, block):",
           f"    environ = bases[{len(keys)} > bases[2]].copy()",
           f"    {values}, = block.decode('latin-1').split('\\0')"]
    src += [f"    environ[{k!r}] = v{i}" for i, k in enumerate(keys)]
    src.append("    return environ")
    namespace = {}
    exec("\n".join(src), namespace)
    return namespace["build"]


_REMEMBER = lib.BLAZE_ENV_REMEMBER


def _memo_update(environ, keys, n, block):
    """delta n > 0: block holds the indices of the n values that changed since
    the connection's last request, then those values; they replace the
    remembered ones."""
    for i, v in zip(block[:n], block[n:].decode("latin-1").split("\0")):
        environ[keys[i]] = v


def _memo_lost(conn_id):
    """C sent a delta, but what is remembered in the connection's slot is not
    this connection's: never used.  ERROR (a 500), and C sends the next
    request whole."""
    raise LookupError(f"no remembered environ for connection {conn_id}")


def _serve(conn, req):
    """threads > 1: blaze_py_request in an app thread.  A key set C calls known
    may have been learned by another thread that has not stored it yet."""
    slot = req.keyset
    if slot < 0:
        build = _learn_keys(-slot - 1, req)
    else:
        gen, build, _ = _keysets[slot]
        if gen != req.keygen:
            build = _learn_keys(slot, req)
    delta = req.delta
    if delta == 0:                  # nothing to read: the connection's remembered environ
        listener, block = 0, b""
    else:
        listener, block = req.listener, _unpack(req.values, req.values_len)
    # values_len 0: unused, the block is given
    return blaze_py_request(conn, slot, 0, listener, req, delta, req.conn_slot, req.conn_id, build, block)


@ffi.def_extern(onerror=lambda *exc: log.critical("blaze_py_request failed", exc_info=exc) or ERROR)
def blaze_py_request(conn, keyset, values_len, listener, req, delta, conn_slot, conn_id,
                     build=None, block=None):
    """Build the environ, call the app and send its response; DONE, STREAM or
    ERROR.  From C (threads = 1): the values are the first values_len bytes
    of the loop's values block (_values); delta >= 0: only the values that
    changed since the connection's last request (see _memo).  From _serve
    (an app thread), with the builder it chose and the block: a one-item
    response comes back as (r, head, len(head), len(headers), body) for the
    thread to hand to C with the connection (threads.py).  Everything on the
    common path is inline: each Python call costs."""
    defer = block is not None
    if delta >= 0:                  # a kept-alive connection's next request: see C env_delta
        cid, environ = _memo[conn_slot]
        if cid != conn_id:
            _memo_lost(conn_id)
        if delta:
            _memo_update(environ, _keysets[keyset][2], delta, block if defer else _values[:values_len])
        environ = environ.copy()
    else:
        if not defer:
            build = _keysets[keyset][1] if keyset >= 0 else _learn_keys(-keyset - 1, req)
            block = _values[:values_len]
        environ = build(_bases[listener], block)
        if delta == _REMEMBER:
            _memo[conn_slot] = conn_id, environ.copy()
    if not defer and _lent and _flushes[0] != _lent_at:
        _lent.clear()               # written: C no longer refers to them
    r = _spare.pop() if _spare else _Response()
    r.conn = conn
    r.status = r.headers = None
    r.sent = False
    try:
        if "CONTENT_LENGTH" in environ:
            environ["wsgi.input"] = _body_input(r, req, conn)
        r.result = result = _app(environ, r.start)
        # One block of bytes (the common case) goes out with the status and
        # headers in one write: a one-item list, or an iterable whose iterator
        # runs over one (Django's HttpResponse iterates its list of one).
        body = None
        taken = False
        if type(result) is list:
            if len(result) == 1:
                body = result[0]
        elif type(result) is not FileWrapper:
            r.it = it = iter(result)
            if type(it) in _SIZED and it.__length_hint__() == 1:
                body = next(it)
                taken = True
        if type(body) is bytes and r.status is not None and not r.sent:
            ls, lh, head, hl, nh = _last      # _head's first test, inline
            if r.status != ls or r.headers != lh:
                head, hl, nh = _head(r.status, r.headers)
            if defer:
                return r, head, hl, nh, body
            rc = _resp_simple(conn, head, hl, nh, body, len(body))
            if rc != 0:
                if rc < 0:
                    _refused()
                _lend(body)
            if type(result) is list and r.input is None:   # _finish, with nothing to close
                r.result = None
                _spare.append(r)
                return DONE
            rc = DONE
        else:
            if taken:
                r.it = itertools.chain((body,), r.it)   # put back in front
            rc = _run_general(r, result)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            r.close()
            raise
        return _fail(r, exc)
    if rc == STREAM:
        _streams[req.conn_id] = r
        return STREAM
    _finish(r)
    return DONE


@ffi.def_extern(onerror=lambda *exc: log.critical("blaze_py_resume failed", exc_info=exc) or ERROR)
def blaze_py_resume(conn, conn_id):
    r = _streams.pop(conn_id, None)
    if r is None:
        return ERROR
    r.conn = conn
    try:
        rc = r.pump()
    except Exception as exc:
        return _fail(r, exc)
    if rc == STREAM:
        _streams[conn_id] = r
        return STREAM
    _finish(r)
    return DONE


@ffi.def_extern(onerror=lambda *exc: log.critical("blaze_py_abort failed", exc_info=exc))
def blaze_py_abort(conn_id):
    r = _streams.pop(conn_id, None)
    if r is not None:
        log.debug("client disconnected during a streamed response")
        r.close()
