#!/usr/bin/env bash
# Instructions per request inside the worker's loop, counted by callgrind:
# steadier than time on this shared machine (runs of the same code agree to
# ~0.5%), so it tells small changes of the hot path apart.
#
# usage: benchmarks/callgrind.sh [MODULE:APP] [SECONDS]    (default hello:application, 4)
#        WRK_ARGS="-s benchmarks/wrk/vary_query.lua" benchmarks/callgrind.sh   (more wrk options)
#
# Runs .venv's blazewsgi (1 worker, threads = 1, access log off) under
# valgrind --tool=callgrind, counting only inside blaze_loop_run, drives it
# with wrk -c8, and prints requests, instructions per request in the loop and
# in blaze_py_request (the Python side: cffi's crossing, environ, app,
# response).  The profile stays in $OUT (default /tmp/blaze-callgrind) for
# callgrind_annotate (inclusive.txt and tree.txt are its two views).
# Needs valgrind (apt) and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
APP="${1:-hello:application}"
SECS="${2:-4}"
OUT="${OUT:-/tmp/blaze-callgrind}"
PORT="${PORT:-18097}"
mkdir -p "$OUT" && rm -f "$OUT"/cg.*
printf '[server]\nsockets = 127.0.0.1:%s\nmin_workers = 1\nmax_workers = 1\nthreads = 1\naccess_log = false\n' \
    "$PORT" >"$OUT/config.ini"
PYTHONPATH="$PWD/benchmarks/apps${PYTHONPATH:+:$PYTHONPATH}" \
  valgrind --tool=callgrind --trace-children=yes --toggle-collect=_cffi_f_blaze_loop_run \
    --callgrind-out-file="$OUT/cg.%p" .venv/bin/python -m blazewsgi "$OUT/config.ini" --app "$APP" \
    >"$OUT/server.log" 2>&1 &
master=$!
for _ in $(seq 300); do curl -s -m 1 -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.2; done
wrk -t1 -c8 -d"${SECS}s" ${WRK_ARGS:-} "http://127.0.0.1:$PORT/" >"$OUT/wrk.txt"
kill -TERM "$master"; wait "$master" || true
worker=$(ls -S "$OUT"/cg.* | head -1)      # the master's file counts nothing inside the loop
callgrind_annotate --inclusive=yes "$worker" >"$OUT/inclusive.txt"
callgrind_annotate --tree=calling --inclusive=yes "$worker" >"$OUT/tree.txt"
total=$(awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1; exit}' "$OUT/inclusive.txt")
requests=$(grep -m1 "cffi_call_python (" "$OUT/tree.txt" | sed 's/.*(\([0-9,]*\)x).*/\1/' | tr -d ,)
python=$(grep -m1 "blaze_py_request \[" "$OUT/inclusive.txt" | awk '{gsub(",","",$1); print $1}')
echo "$APP: $requests requests; $((total / requests)) instructions per request in the loop," \
     "$((python / requests)) of them in blaze_py_request ($worker)"
