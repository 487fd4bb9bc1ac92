#!/usr/bin/env bash
# Install the load generator and the peer servers BlazeWSGI is compared against.
#
# Idempotent: safe to re-run. Peers go into a venv of their own
# (benchmarks/.peers-venv) so that they never leak into the project's venv.
# A peer that fails to install is reported at the end, and pip's last error
# line is kept in $VENV/install-failed/<name>.txt: the benchmarks show it as
# "not installed: <reason>" in the tables. The script exits non-zero only if
# wrk or the venv itself cannot be set up.
#
# usage: benchmarks/setup_peers.sh [name ...]   # default: every peer below
#        benchmarks/setup_peers.sh bjoern django # e.g. the CI smoke pass
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BLAZE_PEERS_VENV:-$HERE/.peers-venv}"
PYTHON="${PYTHON:-python3}"
# name|check|pip requirement. check is "import:<module>" or "bin:<venv script>"
# (uWSGI's module only imports inside uwsgi). Extend this table when adding a
# launcher in harness.py (Launcher.dist names the same package).
PEERS=(
  "bjoern|import:bjoern|bjoern"
  "gunicorn|import:gunicorn|gunicorn"
  "gevent|import:gevent|gevent"
  "uwsgi|bin:uwsgi|uwsgi"
  # fastwsgi 0.0.9 imports pkg_resources, which setuptools 81 removed
  "fastwsgi|import:fastwsgi|fastwsgi setuptools<81"
  # meinheld 1.0.2 pins greenlet<0.5, which does not build on Python >= 3.11
  "meinheld|import:meinheld|meinheld"
  "granian|bin:granian|granian"
  "waitress|import:waitress|waitress"
  "django|import:django|django"
  # Django's PostgreSQL driver for the django-orm-pg case (psycopg 3: green under
  # gevent's monkey-patching by itself since 3.1.14, no psycogreen); the server
  # comes from apt below
  "psycopg|import:psycopg|psycopg[binary]"
  # not a server: report.py draws benchmarks/results.png with this venv's python
  "matplotlib|import:matplotlib|matplotlib"
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- system packages: wrk (load generator), libev-dev (bjoern's and meinheld's
# C build), python3-dev + gcc (uWSGI and other source builds), nginx (ceiling
# and front proxy), and postgresql (the server django-orm-pg starts in a
# scratch dir of its own) only when psycopg is wanted, so that the CI smoke
# pass (`setup_peers.sh bjoern`) does not pull it in. Neither must start a
# system service: RUNLEVEL=1.
apt_pkgs=(libev-dev libevent-dev libffi-dev python3-dev gcc nginx)
if [ $# -eq 0 ] || [[ " $* " == *" psycopg "* ]]; then apt_pkgs+=(postgresql); fi
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
for pkg in "${apt_pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
else
  echo "== wrk, ${apt_pkgs[*]} already installed"
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
mkdir -p "$VENV/install-failed"

installed() {  # check
  case "$1" in
    import:*) "$VENV/bin/python" -c "import ${1#import:}" >/dev/null 2>&1 ;;
    bin:*) [ -x "$VENV/bin/${1#bin:}" ] ;;
  esac
}

wanted=("$@")
failed=()
for entry in "${PEERS[@]}"; do
  IFS='|' read -r name check req <<<"$entry"
  if [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then
    continue
  fi
  # one pip call per peer, so one failing build does not block the others
  log="$VENV/install-failed/$name.log"
  if installed "$check"; then
    echo "== $name: already installed"
    rm -f "$VENV/install-failed/$name.txt" "$log"
  # shellcheck disable=SC2086  # $req may hold several requirements
  elif "$VENV/bin/pip" install -q $req >"$log" 2>&1 && installed "$check"; then
    echo "== $name: installed"
    rm -f "$VENV/install-failed/$name.txt" "$log"
  else
    # the most telling lines of pip's output: which build failed, its first
    # compiler error; else pip's own error; else (installed but not
    # importable) the import's last line
    reason="$( { grep -m1 -o -E 'Building wheel for [^ ]+' "$log"; grep -m1 -E ': error:' "$log"; } \
               | sed -E 's/^[[:space:]]+//' | paste -sd '|' - | sed 's/|/ failed: /' | cut -c1-220)"
    [ -n "$reason" ] || reason="$(grep -m1 -E '^ERROR:' "$log" | cut -c1-220)"
    if [ -z "$reason" ] && [ "${check%%:*}" = import ]; then
      reason="installed, but import ${check#import:} fails: $("$VENV/bin/python" -c "import ${check#import:}" 2>&1 | tail -n1 | cut -c1-160)"
    fi
    [ -n "$reason" ] || reason="$(grep -v '^WARNING: Location' "$log" | tail -n1 | cut -c1-220)"
    echo "pip install $req failed: $reason" >"$VENV/install-failed/$name.txt"
    echo "!! $name: FAILED ($reason; full log: $log)"
    failed+=("$name")
  fi
done

# --- the 10 ms sleep workload's ceiling: a C program, no Python (peers/sleep_ceiling.c) ---
if [ ${#wanted[@]} -eq 0 ] || [[ " ${wanted[*]} " == *" sleep-ceiling "* ]]; then
  log="$VENV/install-failed/sleep-ceiling.log"
  if gcc -O2 -Wall -Wextra -o "$VENV/bin/sleep-ceiling" "$HERE/peers/sleep_ceiling.c" -levent >"$log" 2>&1; then
    echo "== sleep-ceiling: built"
    rm -f "$VENV/install-failed/sleep-ceiling.txt" "$log"
  else
    echo "gcc failed: $(grep -m1 -E 'error' "$log" | cut -c1-200)" >"$VENV/install-failed/sleep-ceiling.txt"
    echo "!! sleep-ceiling: FAILED (see $log)"
    failed+=("sleep-ceiling")
  fi
fi

# --- BlazeWSGI itself, installed as users get it (not editable) ---
# The project's .venv has an editable install, whose import hook pulls
# pathlib, urllib and friends into every worker (~1.5 MiB of RSS that a
# wheel install does not have). Reinstalled on every run: it tracks the tree.
BLAZE_VENV_DIR="${BLAZE_VENV:-$HERE/.blaze-venv}"
if [ ! -x "$BLAZE_VENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$BLAZE_VENV_DIR" && "$BLAZE_VENV_DIR/bin/pip" install -q --upgrade pip 'setuptools>=77' wheel
fi
# cffi built from source, as the README's setup does (.ci/cffi_from_source.sh says why)
if bash "$HERE/../.ci/cffi_from_source.sh" "$BLAZE_VENV_DIR/bin/python" >"$BLAZE_VENV_DIR/install.log" 2>&1 \
   && "$BLAZE_VENV_DIR/bin/pip" install -q --force-reinstall --no-deps "$HERE/.." >>"$BLAZE_VENV_DIR/install.log" 2>&1 \
   && "$BLAZE_VENV_DIR/bin/pip" install -q "$HERE/.." >>"$BLAZE_VENV_DIR/install.log" 2>&1; then
  echo "== blazewsgi: installed (non-editable) into $BLAZE_VENV_DIR"
else
  echo "!! blazewsgi: install into $BLAZE_VENV_DIR FAILED (see $BLAZE_VENV_DIR/install.log)"
  failed+=("blazewsgi")
fi

echo
echo "== peers venv: $VENV"
"$VENV/bin/pip" list 2>/dev/null \
  | grep -i -E "^(bjoern|gunicorn|gevent|uwsgi|fastwsgi|meinheld|granian|waitress|django|psycopg|matplotlib) " || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "!! FAILED TO INSTALL: ${failed[*]}  (benchmarks will report them as 'not installed')"
else
  echo "== all requested peers installed"
fi
