#!/usr/bin/env python3
"""Request fuzzing for BlazeWSGI: the generator, the oracle, and a long campaign.

tests/test_fuzz.py imports the generator and the oracle from here and runs a
short, fixed-seed pass in the normal suite.  Run as a script, this file is a
campaign: fresh seeds for --seconds against a real server, meant for a build
of the C core with ASan+UBSan (see --help).  Not collected by pytest (no
test_ prefix).

The server's promise, which the oracle checks for every connection:
  * every response starts with "HTTP/1.1 ", has an allowed status
    (100 interim; 200; 400 413 414 417 431 501 505), a Content-Length, at
    most a "Connection: close" or "keep-alive" (errors: close), and the byte
    stream is a clean sequence of such
    responses (nothing truncated, nothing in between, nothing after a
    "Connection: close" response; an error always closes);
  * a 200 carries the environ_app JSON whose _body matches CONTENT_LENGTH;
  * the server answers or closes within its timeouts (never a hang);
  * the worker survives (same pid), the log has no traceback, and the
    sanitizer log files (campaign) stay empty.
Families built valid by construction (random chunk framing, Content-Length
bodies, header values, targets, limits at +-3 of their boundary, pipelines of
them) also have an exact expected status and environ.

Campaign usage: build a copy of the tree with the sanitizers (never the main build):
  rm -rf /tmp/fuzzasan && mkdir /tmp/fuzzasan && tar -c --exclude=.venv --exclude=.git \\
      --exclude='*.so' --exclude=benchmarks/.peers-venv . | tar -x -C /tmp/fuzzasan
  cd /tmp/fuzzasan && mv pyproject.toml pyproject.toml.aside   # see below
  BLAZE_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1" \\
      BLAZE_LDFLAGS="-fsanitize=address,undefined" /work/main/.venv/bin/python build_ffi.py
  mv pyproject.toml.aside pyproject.toml
  BLAZE_SERVER_LD_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so) \\
  ASAN_OPTIONS=detect_leaks=0,log_path=/tmp/fuzzasan/asanlog \\
  UBSAN_OPTIONS=print_stacktrace=1,log_path=/tmp/fuzzasan/ubsanlog PYTHONPATH=/tmp/fuzzasan \\
  /work/main/.venv/bin/python tests/fuzz_campaign.py --seconds 300
(cffi compiles through setuptools, which reads ./pyproject.toml; the venv's
setuptools 65 rejects its PEP 639 `license = "MIT"`, hence the move.)  The
campaign prints which _blaze module the worker mapped and whether libasan is
in it, so a run that silently tests the plain build shows.  Each round is a
fresh seed (--seed + round), alternating the configs below; a crash or a
sanitizer report is bisected to the case that causes it on fresh servers and
minimized.  Findings (raw request bytes, de-duplicated by signature, a few
examples each) go to --out: findings.json, finding-*.bin, summary.json.
Exit status 1 when there was any finding.
"""
import argparse
import concurrent.futures
import glob
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import Server, read_to_close, wait_until   # noqa: E402
from test_requests_corpus import CORPUS, Case      # noqa: E402

# Small limits, so that every limit is reachable by a mutation.
LIMITS = {
    "head_buffer_size": 4096,
    "limit_request_line": 1024,
    "limit_request_fields": 20,
    "limit_request_field_size": 1024,
    "max_body_size": 65536,
    "body_buffer_size": 8192,      # bodies above it spill to a temporary file
    "header_timeout": 2,
    "io_timeout": 2,
    "keepalive_timeout": 1,
}
LINGER_S = 2.0                      # blaze_loop.c: tv_linger
# A connection must be closed by then after our last byte: the timers one after
# the other at worst (head or body, keep-alive, linger), plus slack for a loaded machine.
CLOSE_DEADLINE_S = (max(LIMITS["header_timeout"], LIMITS["io_timeout"]) + LIMITS["keepalive_timeout"]
                    + LINGER_S + 4.0)
APP = "apps_limits:environ_app"

ERRORS = frozenset({400, 413, 414, 417, 431, 501, 505})
FINAL_OK = frozenset({200}) | ERRORS

MAX_BODY = LIMITS["max_body_size"]
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEXDIGITS = b"0123456789abcdefABCDEF"


class FuzzCase:
    """One connection's worth of bytes and what the server must do with it."""
    __slots__ = ("name", "data", "expect", "environ", "pieces", "half_close", "first_path",
                 "last_path", "sequence", "abort")

    def __init__(self, name, data, expect=None, environ=None, pieces=(), half_close=True,
                 first_path=None, last_path=None, sequence=None, abort=None):
        self.name = name
        self.data = data
        self.expect = expect          # None: any allowed status; else the set for the first final response
        self.environ = environ        # for a 200: key -> value (None: absent)
        self.pieces = tuple(pieces)   # split offsets: sent in several writes with pauses
        self.half_close = half_close  # shutdown(SHUT_WR) after the last byte
        self.first_path = first_path  # pipelines: PATH_INFO of the first response (must be 200)
        self.last_path = last_path    # pipelines: PATH_INFO only the last response may carry
        self.sequence = sequence      # pipelines of valid requests: [(status set, environ)] in order
        self.abort = abort            # None, or seconds after the last byte to reset the connection (RST)

    def __repr__(self):
        d = self.data if len(self.data) <= 400 else self.data[:300] + b"..." + self.data[-60:]
        return (f"<{self.name} len={len(self.data)} pieces={list(self.pieces)} "
                f"half_close={self.half_close}{f' abort={self.abort}' if self.abort is not None else ''} data={d!r}>")


# ---------------------------------------------------------------- seeds

def corpus_seeds():
    cases = [Case(p) for p in sorted(glob.glob(os.path.join(CORPUS, "*", "*.http")))]
    seeds = [(c.name[:-5], c.data) for c in cases]
    body = bytes(range(32, 127)) * 3
    seeds += [
        ("syn/post_cl", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body),
        ("syn/chunked", b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\r\nhello\r\n1A;x=y\r\n" + b"z" * 26 + b"\r\n0\r\nT: v\r\n\r\n"),
        ("syn/expect", b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"),
        ("syn/http10", b"POST /o HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"),
        ("syn/many", b"GET /m?q=1 HTTP/1.1\r\nHost: x\r\n" +
                     b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(17)) + b"\r\n"),
        ("syn/absolute", b"GET http://h:80/a%20b?c=d HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"),
    ]
    return seeds


# ---------------------------------------------------------------- helpers

def split_lines(data):
    """Lines with their CRLF (the last one may lack it)."""
    out, i = [], 0
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            out.append(data[i:])
            break
        out.append(data[i:j + 2])
        i = j + 2
    return out


def head_and_body(data):
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return data, b""
    return data[:i + 2], data[i + 4:]     # head keeps the CRLF of its last line


def chunk_frame(rng, body, ext=True, trailers=True):
    """Random but valid chunked framing of body."""
    out = bytearray()
    i = 0
    while i < len(body):
        n = min(len(body) - i, rng.choice([1, 2, 3, 7, 16, 100, 255, 1000, 4096, rng.randint(1, 9000)]))
        size = b"%x" % n
        if rng.random() < 0.3:
            size = size.upper()
        if rng.random() < 0.15:
            size = b"0" * rng.randint(1, 6) + size
        out += size
        if ext and rng.random() < 0.2:
            out += rng.choice([b";a=b", b" ;q=\"x y\"", b";flag", b"\t;e=1;f", b";" + b"x" * rng.randint(1, 50)])
        out += b"\r\n" + body[i:i + n] + b"\r\n"
        i += n
    out += b"0" * rng.randint(1, 3) if rng.random() < 0.2 else b"0"
    if ext and rng.random() < 0.2:
        out += b";last"
    out += b"\r\n"
    if trailers and rng.random() < 0.3:
        for k in range(rng.randint(1, 3)):
            out += b"X-Trailer-%d: %s\r\n" % (k, rng.choice([b"v", b"", b" a b ", b"\xe9t\xe9"]))
    out += b"\r\n"
    return bytes(out)


def rand_pieces(rng, data, most=6):
    if len(data) < 2:
        return ()
    if len(data) < 300 and rng.random() < 0.15:
        most = 40                      # close to byte by byte
    k = rng.randint(1, min(most, len(data) - 1))
    return tuple(sorted(rng.sample(range(1, len(data)), k)))


def env_key(name):
    return "HTTP_" + name.upper().replace("-", "_")


def latin1(b):
    return b.decode("latin-1")


def percent_decode(path):
    """PATH_INFO as csrc/blaze_http.c put_path decodes it; None if it decodes a NUL."""
    out = bytearray()
    i = 0
    hexd = b"0123456789abcdefABCDEF"
    while i < len(path):
        ch = path[i]
        if ch == 0x25 and i + 2 < len(path) and path[i + 1] in hexd and path[i + 2] in hexd:
            ch = int(path[i + 1:i + 3], 16)
            if ch == 0:
                return None
            i += 2
        out.append(ch)
        i += 1
    return bytes(out)


# ---------------------------------------------------------------- mutations

SPECIAL = [b"\r", b"\n", b"\0", b" ", b"\t", b":", b"%", b"\r\n", b"\x7f", b"\xff", b";", b",",
           b"\r\n\r\n", b"\n\n", b"=", b"?", b"#", b"/", b"0", b"-", b"\x80", b"\x0b", b"\"", b"\\"]
HUGE_DEC = [b"18446744073709551615", b"18446744073709551616", b"9223372036854775807",
            b"9223372036854775808", b"999999999999999999", b"1000000000000000000",
            b"99999999999999999999999999999", b"65536", b"65537", b"65535", b"0", b"-1", b"+1",
            b"0x10", b"1e3", b"00000000000000000000001", b"4294967296", b"4294967295", b"2147483648",
            b"8193", b"8192", b"1 1", b"1,1", b"", b"1.0"]
HUGE_HEX = [b"ffffffffffffffff", b"10000000000000000", b"fffffffffffffff", b"7fffffffffffffff",
            b"8000000000000000", b"0800000000000000", b"10000", b"10001", b"ffff", b"FFFFFFFF",
            b"0" * 30 + b"1", b"0" * 40, b"1" * 20, b"-1", b"0x5", b"5 ", b" 5", b"g", b"",
            b"2000", b"2001", b"fffffffffffffff0", b"1000000000000001"]
EXTRA_HEADERS = [
    b"Content-Length: %s\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: %s\r\n",
    b"Host: x\r\n", b"Host: %s\r\n", b"Expect: 100-continue\r\n", b"Expect: %s\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b"Content-Type: %s\r\n", b"Cookie: %s\r\n", b"X_Under: %s\r\n", b"X-Empty:\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Length: 0\r\n", b"Trailer: X\r\n",
]


class Mutator:
    def __init__(self, rng, seeds):
        self.rng = rng
        self.seeds = seeds

    def any_seed(self):
        return self.rng.choice(self.seeds)

    def run(self, data):
        rng = self.rng
        ops = []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
            op = rng.choice(self.OPS)
            new = op(self, bytearray(data))
            if not new:              # does not apply, or would leave nothing to send
                continue
            data = bytes(new)
            ops.append(op.__name__[3:])
        return data, ops

    # each op returns the new bytes, or None when it does not apply

    def op_flip(self, d):
        if not d:
            return None
        i = self.rng.randrange(len(d))
        d[i] ^= 1 << self.rng.randrange(8)
        return d

    def op_byte(self, d):
        if not d:
            return None
        d[self.rng.randrange(len(d))] = self.rng.randrange(256)
        return d

    def op_insert(self, d):
        i = self.rng.randint(0, len(d))
        d[i:i] = self.rng.choice(SPECIAL) * self.rng.choice([1, 1, 1, 2, 5])
        return d

    def op_delete(self, d):
        if len(d) < 2:
            return None
        i = self.rng.randrange(len(d))
        del d[i:i + self.rng.randint(1, 8)]
        return d

    def op_truncate(self, d):
        if len(d) < 2:
            return None
        return d[:self.rng.randrange(1, len(d))]

    def op_dup_line(self, d):
        lines = split_lines(bytes(d))
        if not lines:
            return None
        i = self.rng.randrange(len(lines))
        lines[i:i] = [lines[i]] * self.rng.choice([1, 1, 2, 5, 20])
        return bytearray(b"".join(lines))

    def op_del_line(self, d):
        lines = split_lines(bytes(d))
        if len(lines) < 2:
            return None
        del lines[self.rng.randrange(len(lines))]
        return bytearray(b"".join(lines))

    def op_swap_lines(self, d):
        lines = split_lines(bytes(d))
        if len(lines) < 3:
            return None
        i, j = self.rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        return bytearray(b"".join(lines))

    def op_splice(self, d):
        other = self.any_seed()[1]
        i = self.rng.randint(0, len(d))
        j = self.rng.randint(0, len(other))
        return d[:i] + other[j:]

    def op_append_request(self, d):
        other = self.any_seed()[1]
        if self.rng.random() < 0.3:
            other = other[:self.rng.randint(1, len(other))]
        return d + other

    def op_number(self, d):
        runs = [m.span() for m in re.finditer(rb"\d+", bytes(d))]
        if not runs:
            return None
        a, b = self.rng.choice(runs)
        d[a:b] = self.rng.choice(HUGE_DEC)
        return d

    def op_chunk_size(self, d):
        """Replace a chunk-size token (a hex run at the start of a body line) by a huge/odd one."""
        head, body = head_and_body(bytes(d))
        if not body:
            return None
        runs = [m.span(1) for m in re.finditer(rb"(?:^|\r\n)([0-9a-fA-F]+)(?=[\r;\n \t])", body)]
        if not runs:
            return None
        a, b = self.rng.choice(runs)
        body = body[:a] + self.rng.choice(HUGE_HEX) + body[b:]
        return bytearray(head + b"\r\n" + body)

    def op_add_header(self, d):
        lines = split_lines(bytes(d))
        h = self.rng.choice(EXTRA_HEADERS)
        if b"%s" in h:
            h = h.replace(b"%s", self.rng.choice(HUGE_DEC + [b"chunked, chunked", b"identity", b"x y",
                                                            b"a=b; c=d", b"100-Continue", b"\xe9",
                                                            b"[::1]:80", b"h:99999999"]))
        i = self.rng.randint(1, max(1, len(lines) - 1))
        lines[i:i] = [h]
        return bytearray(b"".join(lines))

    def op_many_headers(self, d):
        """Header counts near limit_request_fields."""
        lines = split_lines(bytes(d))
        if not lines:
            return None
        n = LIMITS["limit_request_fields"] + self.rng.randint(-4, 3)
        extra = [b"X-N%d: %d\r\n" % (k, k) for k in range(max(0, n - max(0, len(lines) - 2)))]
        lines[1:1] = extra
        return bytearray(b"".join(lines))

    def op_long_line(self, d):
        """A line grown to the edge of limit_request_line / limit_request_field_size."""
        lines = split_lines(bytes(d))
        if not lines:
            return None
        i = self.rng.randrange(len(lines))
        line = lines[i]
        body = line[:-2] if line.endswith(b"\r\n") else line
        target = self.rng.choice([LIMITS["limit_request_line"], LIMITS["limit_request_field_size"],
                                  LIMITS["head_buffer_size"]]) + self.rng.randint(-3, 3)
        grow = target - len(body)
        if grow <= 0:
            return None
        pos = self.rng.randint(min(len(body), 5), len(body)) if body else 0
        fill = self.rng.choice([b"a", b"/", b"%41", b" "])
        ins = (fill * (grow // len(fill) + 1))[:grow]
        lines[i] = body[:pos] + ins + body[pos:] + line[len(body):]
        return bytearray(b"".join(lines))

    def op_case(self, d):
        if not d:
            return None
        i = self.rng.randrange(len(d))
        j = min(len(d), i + self.rng.randint(1, 20))
        d[i:j] = bytes(d[i:j]).swapcase()
        return d

    def op_version(self, d):
        m = re.search(rb"HTTP/\d\.\d", bytes(d))
        if not m:
            return None
        d[m.start():m.end()] = self.rng.choice([b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.9",
                                                b"HTTP/0.9", b"HTTP/11", b"HTTP/1.", b"http/1.1",
                                                b"HTTP/1.1 ", b"HTTP/3.0", b"HTTP/1.10"])
        return d

    def op_percent(self, d):
        sp = bytes(d).find(b" ")
        if sp < 0:
            return None
        end = bytes(d).find(b" ", sp + 1)
        end = end if end > sp else len(d)
        i = self.rng.randint(sp + 1, end)
        d[i:i] = self.rng.choice([b"%", b"%0", b"%00", b"%zz", b"%2F", b"%25", b"%ff", b"%%",
                                  b"%2", b"%C3%A9", b"?", b"#", b"*", b"//", b"/../"])
        return d

    def op_chunkify(self, d):
        """Turn a Content-Length body into a random chunked one (sometimes keeping the length)."""
        head, body = head_and_body(bytes(d))
        if not body and self.rng.random() < 0.5:
            body = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 300)))
        lines = split_lines(head)
        if self.rng.random() < 0.8:
            lines = [ln for ln in lines if not ln.lower().startswith(b"content-length")]
        lines.append(b"Transfer-Encoding: chunked\r\n")
        return bytearray(b"".join(lines) + b"\r\n" + chunk_frame(self.rng, body))

    def op_body_junk(self, d):
        """Random bytes after the head: stray body, binary garbage, a second head."""
        junk = self.rng.choice([
            lambda: bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 64))),
            lambda: b"\r\n" * self.rng.randint(1, 40),
            lambda: b"0\r\n\r\n",
            lambda: b"x" * self.rng.choice([100, 4096, 9000, 70000]),
        ])()
        return d + junk

    OPS = [op_flip, op_byte, op_insert, op_insert, op_delete, op_truncate, op_dup_line, op_del_line,
           op_swap_lines, op_splice, op_append_request, op_number, op_number, op_chunk_size,
           op_chunk_size, op_add_header, op_add_header, op_many_headers, op_long_line, op_case,
           op_version, op_percent, op_chunkify, op_body_junk]


# ---------------------------------------------------------------- families

class Generator:
    """Deterministic for a given seed: the same cases in the same order."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.seeds = corpus_seeds()
        self.mut = Mutator(self.rng, self.seeds)
        self.n = 0

    def _transport(self, case, trickle=0.25, keep_open=0.12, abort=0.04):
        rng = self.rng
        if rng.random() < trickle:
            case.pieces = rand_pieces(rng, case.data)
        case.half_close = rng.random() >= keep_open
        if rng.random() < abort:        # the client resets: only the server's health is checked
            case.abort = rng.choice([0.0, 0.0, 0.001, 0.005, 0.02])
        return case

    def mutated(self):
        name, data = self.mut.any_seed()
        data, ops = self.mut.run(data)
        return self._transport(FuzzCase(f"mut:{name}:{'+'.join(ops) or 'none'}", data))

    def _valid_request(self, path, close=False):
        return b"GET %s HTTP/1.1\r\nHost: fuzz\r\n%s\r\n" % (path, b"Connection: close\r\n" if close else b"")

    def pipeline_mix(self):
        k = self.n
        first, last = b"/pipe-a-%d" % k, b"/pipe-z-%d" % k
        name, data = self.mut.any_seed()
        data, ops = self.mut.run(data)
        whole = self._valid_request(first) + data + self._valid_request(last, close=True)
        case = FuzzCase(f"pipe:{name}:{'+'.join(ops) or 'none'}", whole,
                        first_path=latin1(first), last_path=latin1(last))
        return self._transport(case)

    def chunked_valid(self):
        rng = self.rng
        n = rng.choice([0, 1, rng.randint(2, 100), rng.randint(100, 3000), rng.randint(3000, 12000),
                        MAX_BODY, MAX_BODY + 1, MAX_BODY - 1])
        body = rng.randbytes(n) if rng.random() < 0.5 else bytes(rng.choice(b"abc\r\n0;") for _ in range(n))
        expect_hdr = b"Expect: 100-continue\r\n" if rng.random() < 0.15 else b""
        method = rng.choice([b"POST", b"PUT", b"PATCH"])
        data = (b"%s /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n%s\r\n"
                % (method, rng.choice([b"chunked", b"Chunked", b"CHUNKED", b" chunked "]), expect_hdr)
                + chunk_frame(rng, body))
        if n > MAX_BODY:
            return self._transport(FuzzCase(f"chunked_valid:{n}", data, expect={413}))
        env = {"_body": latin1(body), "CONTENT_LENGTH": str(n), "REQUEST_METHOD": latin1(method),
               "HTTP_TRANSFER_ENCODING": None, "PATH_INFO": "/chunked"}
        return self._transport(FuzzCase(f"chunked_valid:{n}", data, expect={200}, environ=env))

    def chunked_edge(self):
        """Chunk sizes and chunk lines around the limits."""
        rng = self.rng
        kind = rng.choice(["huge", "sum", "line", "trailers"])
        head = b"POST /ce HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        if kind == "huge":
            size = rng.choice([b"ffffffffffffffff", b"1" + b"0" * 16, b"fffffffffffffff", b"10001",
                               b"0" * 50 + b"10001", b"7" + b"f" * 15, b"F" * 30])
            return self._transport(FuzzCase(f"chunked_edge:huge:{size[:20]!r}", head + size + b"\r\nabc\r\n0\r\n\r\n",
                                            expect={413}))
        if kind == "sum":
            a = rng.randint(1, MAX_BODY)
            b = MAX_BODY - a + rng.choice([0, 1])
            body = b"q" * (a + b)
            data = head + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (a, body[:a], b, body[a:]) if b else \
                head + b"%x\r\n%s\r\n0\r\n\r\n" % (a, body)
            if a + b > MAX_BODY:
                return self._transport(FuzzCase(f"chunked_edge:sum:{a}+{b}", data, expect={413}))
            return self._transport(FuzzCase(f"chunked_edge:sum:{a}+{b}", data, expect={200},
                                            environ={"CONTENT_LENGTH": str(a + b)}))
        if kind == "line":
            # the size line (with its CRLF) may be at most limit_request_field_size bytes
            total = LIMITS["limit_request_field_size"] + rng.randint(-3, 3)
            ext = b";" + b"e" * (total - len(b"3;\r\n"))
            data = head + b"3" + ext + b"\r\nabc\r\n0\r\n\r\n"
            expect = {200} if total <= LIMITS["limit_request_field_size"] else {400}
            return self._transport(FuzzCase(f"chunked_edge:line:{total}", data, expect=expect,
                                            environ={"_body": "abc"}))
        # trailer section around head_buffer_size
        target = LIMITS["head_buffer_size"] + rng.randint(-3, 3)
        lines, left = [], target
        while left > 0:
            n = min(left, 1000)
            if 0 < left - n < 10:
                n -= 10
            lines.append(b"T%d:" % len(lines) + b"v" * (n - len(b"T%d:" % len(lines)) - 2) + b"\r\n")
            left -= n
        trailer = b"".join(lines)
        assert len(trailer) == target
        data = head + b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n"
        expect = {200} if target <= LIMITS["head_buffer_size"] else {431}
        return self._transport(FuzzCase(f"chunked_edge:trailers:{target}", data, expect=expect))

    def length_valid(self):
        rng = self.rng
        n = rng.choice([1, rng.randint(2, 200), rng.randint(200, 9000), rng.randint(9000, MAX_BODY),
                        MAX_BODY, MAX_BODY + 1])
        digits = b"%d" % n
        if rng.random() < 0.2:
            digits = b"0" * rng.randint(1, 18 - len(digits)) + digits
        ows = rng.choice([(b"", b""), (b" ", b""), (b"\t", b"\t"), (b"  ", b" \t ")])
        body = rng.randbytes(n)
        method = rng.choice([b"POST", b"PUT", b"DELETE", b"OPTIONS"])
        expect_100 = rng.random() < 0.25
        head = (b"%s /len HTTP/1.%d\r\nHost: x\r\n%sContent-Length:%s%s%s\r\n\r\n"
                % (method, 1 if expect_100 else rng.choice([0, 1]),
                   b"Expect: 100-continue\r\n" if expect_100 else b"", ows[0], digits, ows[1]))
        name = f"length_valid:{n}{':expect' if expect_100 else ''}"
        if n > MAX_BODY:
            case = self._transport(FuzzCase(name, head + body[:100], expect={413}))
        else:
            case = self._transport(FuzzCase(name, head + body, expect={200},
                                            environ={"_body": latin1(body), "CONTENT_LENGTH": str(n)}))
        if expect_100:      # the body follows the head in a later write: the server says 100 first
            case.pieces = tuple(sorted({len(head), *case.pieces}))
        return case

    def length_huge(self):
        value = self.rng.choice(HUGE_DEC[:10] + [b"%d" % (MAX_BODY + 1), b"%d" % (2 ** 64 + 5)])
        v = int(value)
        data = b"POST /huge HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\nabc" % value
        if v > MAX_BODY:
            expect = {413} if len(value) <= 18 else {400, 413}
        else:
            # a short body: the server waits for the rest (then the client's EOF closes)
            expect = None
        return self._transport(FuzzCase(f"length_huge:{value.decode()}", data, expect=expect))

    def limits_edge(self):
        rng = self.rng
        kind = rng.choice(["line", "field", "count", "head"])
        d = rng.randint(-3, 3)
        if kind == "line":
            L = LIMITS["limit_request_line"] + d
            path = b"/" + b"a" * (L - len(b"GET / HTTP/1.1"))
            data = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            ok = L <= LIMITS["limit_request_line"]
            return self._transport(FuzzCase(f"limits:line:{L}", data, expect={200} if ok else {414},
                                            environ={"PATH_INFO": latin1(path)}))
        if kind == "field":
            L = LIMITS["limit_request_field_size"] + d
            value = b"b" * (L - len(b"X-Long: "))
            data = b"GET /f HTTP/1.1\r\nHost: x\r\nX-Long: " + value + b"\r\n\r\n"
            ok = L <= LIMITS["limit_request_field_size"]
            return self._transport(FuzzCase(f"limits:field:{L}", data, expect={200} if ok else {431},
                                            environ={"HTTP_X_LONG": latin1(value)}))
        if kind == "count":
            N = LIMITS["limit_request_fields"] + d
            fields = b"".join(b"X-C%d: %d\r\n" % (i, i) for i in range(N - 1))
            data = b"GET /n HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"
            ok = N <= LIMITS["limit_request_fields"]
            env = {"HTTP_X_C%d" % (N - 2): str(N - 2)} if N > 1 else {}
            return self._transport(FuzzCase(f"limits:count:{N}", data, expect={200} if ok else {431},
                                            environ=env))
        H = LIMITS["head_buffer_size"] + d
        base = b"GET /h HTTP/1.1\r\nHost: x\r\n"
        fill = H - len(base) - 2
        lines = []
        while fill > 0:
            k = min(fill, 1000)
            if 0 < fill - k < 10:
                k -= 10
            name = b"X-F%d: " % len(lines)
            lines.append(name + b"c" * (k - len(name) - 2) + b"\r\n")
            fill -= k
        data = base + b"".join(lines) + b"\r\n"
        assert len(data) == H
        ok = H <= LIMITS["head_buffer_size"]
        return self._transport(FuzzCase(f"limits:head:{H}", data, expect={200} if ok else {431}))

    def header_values(self):
        rng = self.rng
        chars = bytes([9] + list(range(0x20, 0x7f)) + list(range(0x80, 0x100)))
        fields = []                                  # (name as sent, canonical name, value)
        for i in range(rng.randint(1, 8)):
            name = b"X-F%d-" % i + bytes(rng.choice(TCHAR.replace(b"_", b"")) for _ in range(rng.randint(0, 10)))
            if rng.random() < 0.1:
                name += b"_u"
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                v = bytes(rng.choice(chars) for _ in range(rng.randint(0, 40)))
                fields.append((name if rng.random() < 0.7 else name.swapcase(), name, v))
        if rng.random() < 0.3:
            fields += [(b"Cookie", b"Cookie", b" a=1"), (b"cookie", b"Cookie", b"b=%d" % rng.randint(0, 99))]
        rng.shuffle(fields)
        del fields[LIMITS["limit_request_fields"] - 1:]     # Host is one more
        env = {}
        for _, name, v in fields:                    # repeats are joined in wire order
            key = env_key(latin1(name))
            if b"_" in name:
                env[key] = None
                continue
            sep = "; " if name == b"Cookie" else ", "
            v = latin1(v.strip(b" \t"))
            env[key] = v if key not in env else env[key] + sep + v
        method = rng.choice([b"GET", b"DELETE", b"OPTIONS", b"PROPFIND", b"HEAD"])   # HEAD: no body comes back
        data = (b"%s /hv HTTP/1.1\r\nHost: x\r\n" % method
                + b"".join(sent + b":" + v + b"\r\n" for sent, _, v in fields) + b"\r\n")
        return self._transport(FuzzCase("header_values", data, expect={200}, environ=env))

    def target(self):
        rng = self.rng
        if rng.random() < 0.12:
            # asterisk-form is exactly "*" (RFC 9112 3.2.4), and only for OPTIONS; anything
            # else starting with "*" is no request-target form at all: 400
            target = b"*" + rng.choice([b"", b"", b"?", b"?a=b", b"*", b"x", b"#f", b"/", b"/x", b"%2A"])
            method = rng.choice([b"OPTIONS", b"OPTIONS", b"GET", b"POST"])
            data = b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, target)
            if target == b"*" and method == b"OPTIONS":
                return self._transport(FuzzCase("target:asterisk", data, expect={200},
                                                environ={"PATH_INFO": "", "REQUEST_METHOD": "OPTIONS"}))
            return self._transport(FuzzCase(f"target:asterisk:{latin1(method)} {latin1(target)}", data,
                                            expect={400}))
        safe = b"abcXYZ019-._~!$&'()*+,;=:@/"
        path = bytearray(b"/")
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.15:
                path += b"%" + bytes(rng.choice(HEXDIGITS) for _ in range(2))
            elif r < 0.18:
                path += rng.choice([b"%", b"%4", b"%G1", b"%00", b"%2f", b"%25", b"%%41"])
            else:
                path.append(rng.choice(safe))
        path = bytes(path)
        query = b""
        if rng.random() < 0.5:
            query = bytes(rng.choice(safe + b"?%/") for _ in range(rng.randint(0, 30)))
        target = path + (b"?" + query if query or rng.random() < 0.3 else b"")
        if rng.random() < 0.2:
            target = b"http://example.com" + rng.choice([b"", b":8080"]) + target
        decoded = percent_decode(path)
        data = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target
        if decoded is None:
            return self._transport(FuzzCase("target:nul", data, expect={400}))
        env = {"PATH_INFO": latin1(decoded), "QUERY_STRING": latin1(query)}
        return self._transport(FuzzCase("target", data, expect={200}, environ=env))

    def pipeline_valid(self):
        """Several valid requests on one connection: answered in order, exactly."""
        parts, seq = [], []
        for _ in range(self.rng.randint(2, 5)):
            fam = self.rng.choice([self.chunked_valid, self.length_valid, self.header_values,
                                   self.target, self.limits_edge])
            c = fam()
            if c.expect != {200} or c.name.startswith("limits:head"):   # re-targeting changes its size
                continue
            tag = b"/pv%d-%d" % (self.n, len(parts))
            data = c.data
            # re-target the request so its answer is recognisable (keep its shape)
            sp1 = data.index(b" ")
            sp2 = data.index(b" ", sp1 + 1)
            data = data[:sp1 + 1] + tag + data[sp2:]
            env = {k: v for k, v in (c.environ or {}).items() if k not in ("PATH_INFO", "QUERY_STRING")}
            env["PATH_INFO"] = latin1(tag)
            if b" HTTP/1.0\r\n" in data[:data.index(b"\r\n") + 2]:
                data = data.replace(b" HTTP/1.0\r\n", b" HTTP/1.1\r\n", 1)
            if len(data.split(b"\r\n", 1)[0]) > LIMITS["limit_request_line"]:
                continue
            parts.append(data)
            seq.append(({200}, env))
        if not parts:
            return self.mutated()
        case = FuzzCase(f"pipeline_valid:{len(parts)}", b"".join(parts), sequence=seq)
        return self._transport(case, keep_open=0.0)

    FAMILIES = [
        (mutated, 52), (pipeline_mix, 10), (chunked_valid, 7), (chunked_edge, 4), (length_valid, 5),
        (length_huge, 2), (limits_edge, 7), (header_values, 5), (target, 5), (pipeline_valid, 3),
    ]

    def next(self):
        self.n += 1
        fams, weights = zip(*self.FAMILIES)
        return self.rng.choices(fams, weights)[0](self)

    def batch(self, n):
        return [self.next() for _ in range(n)]


# ---------------------------------------------------------------- running one case

class Outcome:
    __slots__ = ("data", "closed", "reset", "elapsed", "send_error")

    def __init__(self):
        self.data = b""
        self.closed = False      # EOF or reset seen
        self.reset = False
        self.elapsed = 0.0
        self.send_error = None


def run_case(connect, case, close_deadline=CLOSE_DEADLINE_S, pause=0.003):
    """Send the case on a fresh connection, read until the server closes or the deadline."""
    out = Outcome()
    t0 = time.monotonic()
    with connect() as s:
        s.settimeout(10)
        bounds = [0, *case.pieces, len(case.data)]
        try:
            for a, b in zip(bounds, bounds[1:]):
                s.sendall(case.data[a:b])
                if b != len(case.data):
                    time.sleep(pause)
            if case.half_close:
                s.shutdown(socket.SHUT_WR)
        except socket.timeout:
            out.send_error = "send timed out"
        except OSError as e:     # EPIPE, ECONNRESET, ENOTCONN: the server may answer and close early
            out.send_error = f"{type(e).__name__}: {e}"
        if case.abort is not None:
            time.sleep(case.abort)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")   # l_onoff=1, l_linger=0
            out.closed = True
            out.elapsed = time.monotonic() - t0
            return out
        deadline = time.monotonic() + close_deadline
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                out.closed = out.reset = True
                break
            if not chunk:
                out.closed = True
                break
            chunks.append(chunk)
        out.data = b"".join(chunks)
    out.elapsed = time.monotonic() - t0
    return out


# ---------------------------------------------------------------- the oracle

_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\Z")


def parse_responses(buf, head_possible):
    """[(status, headers{name: [values]}, body)], problem or None."""
    out, i = [], 0
    while i < len(buf):
        if not buf.startswith(b"HTTP/1.1 ", i):
            return out, f"garbage where a response should start (offset {i}): {buf[i:i + 80]!r}"
        end = buf.find(b"\r\n\r\n", i)
        if end < 0:
            return out, f"truncated response head: {buf[i:i + 200]!r}"
        lines = buf[i:end].split(b"\r\n")
        m = _STATUS_LINE.match(lines[0])
        if not m:
            return out, f"malformed status line {lines[0][:100]!r}"
        status = int(m.group(1))
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name.strip() != name or re.search(rb"[^!#$%&'*+.^_`|~0-9A-Za-z-]", name):
                return out, f"malformed response header line {line[:100]!r}"
            headers.setdefault(latin1(name).lower(), []).append(latin1(value).strip())
        i = end + 4
        body = b""
        if not 100 <= status < 200:
            cl = headers.get("content-length")
            if not cl or len(cl) != 1 or not cl[0].isdigit():
                return out, f"response {status} without one valid Content-Length: {headers}"
            n = int(cl[0])
            bodiless = head_possible and n > 0 and (i == len(buf) or buf.startswith(b"HTTP/1.1 ", i))
            if not bodiless:
                if len(buf) - i < n:
                    return out, f"response {status} body truncated: {len(buf) - i} of {n} bytes"
                body = buf[i:i + n]
                i += n
        out.append((status, headers, body))
    return out, None


def check(case, out):
    """Problems with the server's behaviour for this case (empty list: fine)."""
    problems = []
    if case.abort is not None:
        return problems          # we reset the connection: nothing to expect from it
    responses, problem = parse_responses(out.data, head_possible=b"HEAD " in case.data)
    if problem:
        problems.append(problem)
    finals = [r for r in responses if not 100 <= r[0] < 200]
    for idx, (status, headers, body) in enumerate(responses):
        last = idx == len(responses) - 1
        if 100 <= status < 200:
            if status != 100:
                problems.append(f"interim status {status}")
            continue
        if status not in FINAL_OK:
            problems.append(f"status {status} not allowed: {body[:200]!r}")
        conn = [v.lower() for v in headers.get("connection", [])]
        # HTTP/1.1: no header means keep-alive; HTTP/1.0: "keep-alive", or none (then it closes)
        if conn not in ([], ["close"], ["keep-alive"]):
            problems.append(f"response {status} with Connection {conn}")
        if status >= 400 and conn != ["close"]:
            problems.append(f"error {status} without Connection: close")
        if conn == ["close"] and not last:
            problems.append(f"bytes after a Connection: close response ({status})")
        if status == 200 and body:
            try:
                env = json.loads(body)
                got = env["_body"]
                want = int(env.get("CONTENT_LENGTH") or 0)
                if len(got) != want:
                    problems.append(f"_body has {len(got)} bytes, CONTENT_LENGTH says {want}")
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"200 without the app's JSON ({e!r}): {body[:200]!r}")
    if not out.closed:
        problems.append(f"hang: connection still open {out.elapsed:.1f}s after connecting "
                        f"({len(out.data)} bytes received)")

    def env_of(resp):
        try:
            return json.loads(resp[2]) if resp[2] else None
        except ValueError:
            return None

    def env_problems(label, env, want):
        if env is None or not want:
            return
        for k, v in want.items():
            if v is None and k in env:
                problems.append(f"{label}: {k} should be absent, is {env[k]!r}")
            elif v is not None and env.get(k) != v:
                problems.append(f"{label}: {k} = {env.get(k)!r:.200}, expected {v!r:.200}")

    if case.expect is not None:
        if not finals:
            problems.append(f"no response; expected {sorted(case.expect)}")
        elif finals[0][0] not in case.expect:
            problems.append(f"status {finals[0][0]}, expected {sorted(case.expect)}: {finals[0][2][:200]!r}")
        elif finals[0][0] == 200:
            env_problems("environ", env_of(finals[0]), case.environ)
    if case.first_path is not None:
        if not finals or finals[0][0] != 200 or (env_of(finals[0]) or {}).get("PATH_INFO") != case.first_path:
            problems.append(f"the valid request before the mutated one was not answered first with 200 "
                            f"(got {[r[0] for r in finals]})")
        for idx, r in enumerate(finals):
            if r[0] == 200 and (env_of(r) or {}).get("PATH_INFO") == case.last_path and idx != len(finals) - 1:
                problems.append("responses out of order: the last request was answered before others")
    if case.sequence is not None:
        got = [r[0] for r in finals]
        if got != [200] * len(case.sequence):
            problems.append(f"pipeline of {len(case.sequence)} valid requests got {got}")
        else:
            for k, (r, (_, want)) in enumerate(zip(finals, case.sequence)):
                env_problems(f"pipelined request {k}", env_of(r), want)
    return problems


def run_batch(connect, cases, concurrency=48, close_deadline=CLOSE_DEADLINE_S):
    """[(case, outcome, problems)] in case order."""
    def one(case):
        try:
            out = run_case(connect, case, close_deadline)
        except OSError as e:        # cannot even connect: that is a problem too
            out = Outcome()
            out.closed = True
            return case, out, [f"connection failed: {e!r}"]
        return case, out, check(case, out)
    # keep-open cases wait for a timeout: start them first so they overlap the rest
    order = sorted(range(len(cases)), key=lambda k: cases[k].half_close)
    results = [None] * len(cases)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for k, res in zip(order, pool.map(one, [cases[k] for k in order])):
            results[k] = res
    return results


BAD_LOG = re.compile(r"Traceback|ERROR: AddressSanitizer|runtime error:|Segmentation fault|"
                     r"blaze_py_\w+ failed|Error handling request|Worker \d+ (?:was killed|exited)|keep dying",
                     re.IGNORECASE)


def log_problems(text):
    return [line for line in text.splitlines() if BAD_LOG.search(line)]


def valid_request_works(server):
    """A plain valid request on a new connection gets 200 with the right PATH_INFO."""
    with server.connect(timeout=10) as s:
        s.sendall(b"GET /still-alive?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        buf = read_to_close(s)
    responses, problem = parse_responses(buf, False)
    return (problem is None and len(responses) == 1 and responses[0][0] == 200
            and json.loads(responses[0][2]).get("PATH_INFO") == "/still-alive")


# ---------------------------------------------------------------- the campaign

def sanitizer_globs():
    """log_path=... of ASAN_OPTIONS / UBSAN_OPTIONS: the report files are PATH.<pid>."""
    pats = []
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        for opt in re.split(r"[:,]", os.environ.get(var, "")):
            if opt.startswith("log_path="):
                pats.append(opt[len("log_path="):] + ".*")
    return pats


def sanitizer_files(pats):
    files = {}
    for p in pats:
        for f in glob.glob(p):
            try:
                files[f] = os.path.getsize(f)
            except OSError:
                pass
    return files


def new_sanitizer_output(pats, before):
    now = sanitizer_files(pats)
    return {f: n for f, n in now.items() if n and before.get(f) != n}


CONFIGS = {
    # the small limits of tests/test_fuzz.py
    "small": dict(LIMITS),
    # every body spills to a file; few connections, so accepting pauses and resumes
    "spill": dict(LIMITS, body_buffer_size=0, max_connections=16),
}


_ASTERISK_TARGET = re.compile(rb"(?:\A|\n)[!-~]+ \*[!-~]")


def _signature(kind, problems, case=None):
    """Findings that differ only in numbers and quoted bytes are the same finding."""
    first = problems[0] if problems else ""
    if kind == "log":       # app tracebacks: the exception line says what went wrong
        first = next((p for p in problems if re.match(r"\w+(Error|Exception): ", p)), first)
        first = re.sub(r"'[^']*'$", "'...'", first)
    first = re.sub(r"b'.*|b\".*|\[\d{4}-.*", "", first)
    sig = kind + ":" + re.sub(r"\d+", "N", first)[:120]
    if case is not None:
        sig += f" [{case.name.split(':')[0]}]"
        if _ASTERISK_TARGET.search(case.data):
            sig += " [target starts with '*']"
    return sig


class Campaign:
    EXAMPLES = 3          # reproducers kept per distinct finding

    def __init__(self, args):
        self.args = args
        self.out_dir = args.out
        os.makedirs(self.out_dir, exist_ok=True)
        self.pats = sanitizer_globs()
        self.findings = []
        self.signatures = {}
        self.count = 0
        self.tmp = tempfile.mkdtemp(prefix="blaze-fuzz-")
        self.server = None
        self.config = None

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self, config):
        self.stop()
        d = tempfile.mkdtemp(dir=self.tmp)
        self.config = config
        self.server = Server(d, APP, workers=1, extra=CONFIGS[config]).start()
        self.workers = wait_until(self.server.worker_pids, 15, what="the worker")
        self.log_seen = 0
        return self.server

    def stop(self):
        if self.server is not None:
            try:
                self.server.stop(timeout=30)
            except AssertionError as e:
                self.record("shutdown", None, [f"server did not stop: {str(e)[:500]}"])
            self.server = None

    def describe_worker(self):
        """Which _blaze the worker runs, and whether a sanitizer runtime is mapped into it."""
        try:
            with open(f"/proc/{self.workers[0]}/maps") as f:
                maps = f.read()
        except OSError as e:
            return f"cannot read the worker's maps: {e}"
        blaze = sorted({line.split()[-1] for line in maps.splitlines() if "/_blaze" in line})
        return {"blaze_module": blaze, "asan": "libasan" in maps, "ubsan": "libubsan" in maps}

    def record(self, kind, case, problems, extra=None):
        sig = _signature(kind, problems, case)
        n = self.signatures.get(sig, 0)
        self.signatures[sig] = n + 1
        if n >= self.EXAMPLES:
            return
        k = len(self.findings)
        entry = {"kind": kind, "signature": sig, "config": self.config, "problems": problems[:20]}
        if case is not None:
            path = os.path.join(self.out_dir, f"finding-{k:03d}-{kind}.bin")
            with open(path, "wb") as f:
                f.write(case.data)
            entry.update(name=case.name, file=path, pieces=list(case.pieces), half_close=case.half_close,
                         data=repr(case.data[:2000]))
        if extra:
            entry.update(extra)
        self.findings.append(entry)
        self.log(f"FINDING {kind}: {case!r:.600} {problems[:3]}")
        self.save()

    def save(self):
        with open(os.path.join(self.out_dir, "findings.json"), "w") as f:
            json.dump({"signatures": self.signatures, "findings": self.findings}, f, indent=1)

    def crash_health(self):
        """The worker was replaced or the master is gone."""
        if self.server.proc.poll() is not None:
            return [f"master exited with {self.server.proc.returncode}"]
        pids = self.server.worker_pids()
        if pids != self.workers:
            return [f"worker changed {self.workers} -> {pids}"]
        return []

    def new_log_lines(self):
        text = self.server.output()
        new = text[self.log_seen:]
        self.log_seen = len(text)
        bad = log_problems(new)
        if bad:     # with the exception lines, which tell one traceback from another
            bad += sorted({ln for ln in new.splitlines() if re.match(r"\w+(Error|Exception): ", ln)})
        return bad

    def probe(self, case):
        """Run one case alone; (behaviour problems, crash problems, new sanitizer files)."""
        before = sanitizer_files(self.pats)
        out = run_case(self.server.connect, case)
        time.sleep(0.05)
        crash = self.crash_health()
        if not crash:
            time.sleep(0.15)          # a dying worker may still be in the process table
            crash = self.crash_health()
        return check(case, out), crash, new_sanitizer_output(self.pats, before)

    def batch_breaks(self, cases):
        """Does this group, run concurrently on a fresh server, crash it or make a sanitizer speak?"""
        self.start(self.config)
        before = sanitizer_files(self.pats)
        run_batch(self.server.connect, cases, self.args.concurrency)
        time.sleep(0.3)
        return bool(self.crash_health() or new_sanitizer_output(self.pats, before))

    def replay_for_culprit(self, cases):
        """Bisect the batch (fresh server per half: UBSan reports a location once per process),
        then replay the remaining group one case at a time."""
        group = list(cases)
        while len(group) > 12:
            half = len(group) // 2
            if self.batch_breaks(group[:half]):
                group = group[:half]
            elif self.batch_breaks(group[half:]):
                group = group[half:]
            else:
                break                # it takes cases from both halves (or timing): go one by one
        self.log(f"replaying {len(group)} of {len(cases)} cases one by one to find the culprit")
        self.start(self.config)
        for case in group:
            problems, crash, san = self.probe(case)
            if crash or san:
                return case, problems + crash, san
        return None, [], {}

    def still_fails(self, data, case, how):
        """Does this (smaller) input still break a fresh server in the same way?"""
        c = FuzzCase(case.name, data, pieces=(), half_close=case.half_close)
        self.start(self.config)
        _, crash, san = self.probe(c)
        return bool(san) if how == "sanitizer" else bool(crash)

    def minimize(self, case, how, budget=80):
        """ddmin-style: drop chunks of bytes while the failure reproduces."""
        data = case.data
        if len(data) > 20000:
            return data
        tries, n = 0, 2
        while len(data) >= 2 and tries < budget:
            size = max(1, len(data) // n)
            shrunk = False
            for start in range(0, len(data), size):
                if tries >= budget:
                    break
                cand = data[:start] + data[start + size:]
                tries += 1
                if cand and self.still_fails(cand, case, how):
                    data, n, shrunk = cand, max(n - 1, 2), True
                    break
            if not shrunk:
                if size == 1:
                    break
                n = min(len(data), n * 2)
        self.log(f"minimized {len(case.data)} -> {len(data)} bytes in {tries} runs")
        return data

    def read_reports(self, files):
        out = {}
        for f in files:
            try:
                with open(f, errors="replace") as fh:
                    out[f] = fh.read()[:8000]
            except OSError:
                pass
        return out

    def run(self):
        try:
            return self._run()
        finally:
            self.stop()              # never leave a server behind, whatever happened

    def _run(self):
        args = self.args
        t0 = time.monotonic()
        t_end = t0 + args.seconds
        rnd = 0
        configs = list(CONFIGS) if args.rotate else ["small"]
        self.start(configs[0])
        worker = self.describe_worker()
        self.log(f"worker: {worker}")
        if self.pats and not (isinstance(worker, dict) and worker["asan"]):
            self.log("WARNING: sanitizer log paths are set but the worker has no libasan mapped")
        last_report = time.monotonic()
        crashes = 0
        while time.monotonic() < t_end:
            seed = args.seed + rnd
            config = configs[rnd % len(configs)]
            if config != self.config:
                self.start(config)
            cases = Generator(seed).batch(args.batch)
            before = sanitizer_files(self.pats)
            results = run_batch(self.server.connect, cases, args.concurrency)
            self.count += len(cases)
            for case, out, problems in results:
                if problems:
                    self.record("behaviour", case, problems, {"seed": seed, "response": repr(out.data[:1500])})
            time.sleep(0.3)       # let a crash show up in the process table and the logs
            crash = self.crash_health()
            san = new_sanitizer_output(self.pats, before)
            logs = self.new_log_lines()
            if logs and not crash:
                # app tracebacks: the cases are the behaviour findings (status 500) above;
                # one finding per distinct exception
                for exc in sorted({ln for ln in logs if re.match(r"\w+(Error|Exception): ", ln)}) or [""]:
                    self.record("log", None, [exc] + logs[:6], {"seed": seed})
            if crash or san:
                crashes += 1
                how = "sanitizer" if san else "crash"
                reports = self.read_reports(san)
                culprit, cp, csan = self.replay_for_culprit(cases)
                if culprit is not None:
                    reports.update(self.read_reports(csan))
                    small = culprit.data
                    if args.minimize and _signature(how, crash + cp) not in self.signatures:
                        small = self.minimize(culprit, how)
                    self.record(how, FuzzCase(culprit.name, small, pieces=(), half_close=culprit.half_close),
                                crash + cp + [f"sanitizer report {f}" for f in csan],
                                {"seed": seed, "original": repr(culprit.data[:3000]),
                                 "original_pieces": list(culprit.pieces), "reports": reports, "log": logs[:20]})
                else:
                    self.record(how, None, crash + [f"sanitizer report {f}" for f in san],
                                {"seed": seed, "reports": reports, "log": logs[:20],
                                 "note": "did not reproduce case by case (timing or interaction)"})
                self.start(config)
            rnd += 1
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                self.log(f"{self.count} cases, {rnd} rounds, {time.monotonic() - t0:.0f}s, "
                         f"{len(self.signatures)} distinct findings")
        if not valid_request_works(self.server):
            self.record("final", None, ["a valid request did not get 200 at the end"])
        self.stop()
        summary = {"cases": self.count, "rounds": rnd, "elapsed_s": round(time.monotonic() - t0, 1),
                   "seed": args.seed, "batch": args.batch, "worker": worker, "crash_rounds": crashes,
                   "distinct_findings": self.signatures, "sanitizer_logs": self.pats,
                   "sanitizer_files_nonempty": sorted(f for f, n in sanitizer_files(self.pats).items() if n),
                   "configs": {k: CONFIGS[k] for k in configs}}
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        self.save()
        self.log(f"done: {json.dumps(summary)}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return 1 if self.signatures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--seed", type=int, default=int(time.time()) % 1000000)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "blaze-fuzz-findings"))
    p.add_argument("--no-rotate", dest="rotate", action="store_false",
                   help="only the 'small' config (default: alternate small/spill per round)")
    p.add_argument("--no-minimize", dest="minimize", action="store_false")
    args = p.parse_args(argv)
    print(f"seed {args.seed}, {args.seconds}s, sanitizer logs: {sanitizer_globs() or 'none (not a sanitizer run?)'}",
          flush=True)
    return Campaign(args).run()


if __name__ == "__main__":
    sys.exit(main())
