"""Compile csrc/ into the CFFI extension ``blazewsgi._blaze`` (out-of-line API mode).

Run by setuptools through ``cffi_modules`` in setup.py, or by hand:
``python build_ffi.py`` builds the module in place.

The C core links the system libevent, http-parser and OpenSSL (Debian:
``apt-get install libevent-dev libhttp-parser-dev libssl-dev``).  Before
compiling, each dependency is probed so that a missing one stops the build
with the name of the package to install instead of a compiler error.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
SOURCES = ["blaze_loop.c", "blaze_conn.c", "blaze_http.c", "blaze_write.c", "blaze_stats.c", "blaze_log.c",
           "blaze_client.c", "blaze_tls.c", "blaze_pool.c"]
LIBRARIES = ["event_core", "http_parser", "ssl", "crypto", "pthread"]
# Our files are held to -Werror; see also the diagnostics note below.
CFLAGS = ["-std=gnu11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]

# (header, library, Debian package) for each system dependency.
DEPENDENCIES = [
    ("event2/event.h", "event_core", "libevent-dev"),
    ("http_parser.h", "http_parser", "libhttp-parser-dev"),
    ("openssl/ssl.h", "ssl", "libssl-dev"),
]

# Calls from C into Python: one per request (blaze_py_request), plus the
# resumption of a suspended streaming response and its abort.  With
# threads > 1 the loop calls none of them: app threads call blaze_pool_next.
# blaze_py_request: delta, conn_slot and conn_id are req's fields, passed
# again as arguments because reading a cdata field costs more per request.
EXTERN_PYTHON = """
extern "Python+C" {
    int blaze_py_request(blaze_conn *c, int keyset, size_t values_len, int listener,
                         const blaze_request *req, int delta, int conn_slot,
                         unsigned long long conn_id);
    int blaze_py_resume(blaze_conn *c, unsigned long long conn_id);
    void blaze_py_abort(unsigned long long conn_id);
}
"""


def check_dependencies():
    """Stop with the apt package to install when a header or library is missing."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        sys.exit(f"blazewsgi build: no C compiler ({cc[0]}): apt-get install build-essential python3-dev")
    with tempfile.TemporaryDirectory() as tmp:
        for header, lib, package in DEPENDENCIES:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(f"#include <{header}>\nint main(void) {{ return 0; }}\n")
            cmd = cc + [src, "-o", os.path.join(tmp, "probe"), f"-l{lib}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                what = "header" if header in proc.stderr else "library"
                sys.exit(
                    f"blazewsgi build: missing {header} / lib{lib} ({what} not found).\n"
                    f"  Install it with: apt-get install {package}\n"
                    f"  (compiler said: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})"
                )


def make_ffi():
    ffi = FFI()
    with open(os.path.join(CSRC, "blaze_cdef.h")) as f:
        ffi.cdef(f.read() + EXTERN_PYTHON)
    ffi.set_source(
        "blazewsgi._blaze",
        # The generated glue is CFFI's code, not ours: its unused helpers
        # must not fail the -Werror build of our files.
        '#pragma GCC diagnostic ignored "-Wunused-parameter"\n'
        '#pragma GCC diagnostic ignored "-Wunused-function"\n'
        '#include "blaze.h"\n',
        sources=[os.path.join("csrc", s) for s in SOURCES],
        include_dirs=[CSRC],
        libraries=LIBRARIES,
        extra_compile_args=CFLAGS + os.environ.get("BLAZE_CFLAGS", "").split(),
        extra_link_args=os.environ.get("BLAZE_LDFLAGS", "").split(),
        depends=[os.path.join("csrc", h) for h in ("blaze.h", "blaze_cdef.h")],
    )
    return ffi


if "egg_info" not in sys.argv and "sdist" not in sys.argv:
    check_dependencies()
ffibuilder = make_ffi()

if __name__ == "__main__":
    os.chdir(HERE)
    ffibuilder.compile(verbose=True)
