#!/usr/bin/env bash
# Install the load generator and the peer servers BlazeWSGI is compared against.
#
# Idempotent: safe to re-run. Peers go into a venv of their own
# (benchmarks/.peers-venv) so that they never leak into the project's venv.
# A peer that fails to install is reported at the end (and the benchmarks
# report it as "not installed"); the script exits non-zero only if wrk or the
# venv itself cannot be set up.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BLAZE_PEERS_VENV:-$HERE/.peers-venv}"
PYTHON="${PYTHON:-python3}"
# name -> pip requirement. Extend this table when adding a peer launcher.
PEERS=(
  "bjoern=bjoern"
  "gunicorn=gunicorn"
  "django=django"
  "uwsgi=uwsgi"        # built from source: needs libssl-dev for --https-socket
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- system packages: wrk (load generator), libev-dev (bjoern's C build) ---
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
dpkg -s libev-dev >/dev/null 2>&1 || need_apt+=(libev-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
else
  echo "== wrk and libev-dev already installed"
fi
if ! command -v wrk >/dev/null 2>&1; then
  echo "ERROR: wrk is not installed; no benchmark can run" >&2
  exit 1
fi

# --- peers venv ---
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV" || { echo "ERROR: cannot create $VENV" >&2; exit 1; }
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi

failed=()
for entry in "${PEERS[@]}"; do
  name="${entry%%=*}"; req="${entry#*=}"
  # one pip call per peer, so one failing build does not block the others
  # uwsgi is a program (its module only exists inside it): found by its executable
  if "$VENV/bin/python" -c "import $name" >/dev/null 2>&1 || [ -x "$VENV/bin/$name" ]; then
    echo "== $name: already installed"
  elif "$VENV/bin/pip" install -q "$req"; then
    echo "== $name: installed"
  else
    failed+=("$name")
  fi
done

echo
echo "== peers venv: $VENV"
"$VENV/bin/pip" list 2>/dev/null | grep -i -E "^(bjoern|gunicorn|django|uwsgi) " || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "!! FAILED TO INSTALL: ${failed[*]}  (benchmarks will report them as 'not installed')"
else
  echo "== all peers installed"
fi
