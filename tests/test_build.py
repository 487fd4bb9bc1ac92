"""The build names the apt package to install when a system dependency is missing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys
sys.argv = ["egg_info"]          # skip the import-time check; call it ourselves
import build_ffi
build_ffi.DEPENDENCIES = [(%r, %r, %r)]
build_ffi.check_dependencies()
print("no error")
"""


def run_probe(header, lib, package):
    return subprocess.run([sys.executable, "-c", PROBE % (header, lib, package)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_missing_header_names_the_package():
    p = run_probe("blaze_no_such_header.h", "c", "libblaze-test-dev")
    assert p.returncode != 0
    assert "missing blaze_no_such_header.h" in p.stderr
    assert "apt-get install libblaze-test-dev" in p.stderr


def test_missing_library_names_the_package():
    p = run_probe("stdio.h", "blaze_no_such_lib", "libblaze-lib-dev")
    assert p.returncode != 0
    assert "libblaze_no_such_lib" in p.stderr
    assert "apt-get install libblaze-lib-dev" in p.stderr


def test_real_dependencies_are_found():
    for header, lib, package in [("event2/event.h", "event_core", "libevent-dev"),
                                 ("http_parser.h", "http_parser", "libhttp-parser-dev"),
                                 ("openssl/ssl.h", "ssl", "libssl-dev")]:
        p = run_probe(header, lib, package)
        assert p.returncode == 0 and "no error" in p.stdout, p.stderr
