#!/usr/bin/env bash
# usage: .ci/cffi_from_source.sh VENV_PYTHON
#
# Build cffi's own C part (_cffi_backend) in the given venv from source, with
# the interpreter's flags (-O3), in place of the manylinux wheel.  It runs on
# every request (the extern "Python" call, argument conversion, every call
# from Python into C), and the cp311 x86_64 wheels of cffi 2.0.0 and 2.1.1 in
# our package registry are compiled without optimisation: Py_TYPE and
# PyType_HasFeature are out-of-line functions that spill to the stack (1.17.1's
# wheel is optimised).  Hello-world, 1 worker: 3.4 -> 2.9 us of user CPU per
# request (benchmarks/RESULTS.md).  Needs gcc and libffi-dev.  Idempotent: an
# existing build from source is kept.
set -euo pipefail
PY="$1"
if "$PY" - <<'PYEOF'
import sys
from importlib.metadata import distribution
try:
    wheel = distribution("cffi").read_text("WHEEL") or ""
except Exception:
    sys.exit(1)                       # not installed: build it
# a wheel built here is tagged linux_<arch>; the registry's are manylinux
sys.exit(0 if "manylinux" not in wheel and "musllinux" not in wheel else 1)
PYEOF
then
    echo "==> cffi: already built from source"
else
    echo "==> cffi: building from source (pip --no-binary cffi)"
    "$PY" -m pip install -q --force-reinstall --no-deps --no-binary cffi cffi
    "$PY" -m pip install -q cffi       # its dependency (pycparser)
fi
