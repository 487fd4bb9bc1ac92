#!/usr/bin/env bash
# Benchmark smoke pass (CI): the whole path of the suite (peer install, server
# start, wrk, /proc measurement, ratio table, report.py, the microbenchmarks)
# on one case, hello-world with 1 worker, ours vs bjoern, 1 s per run, so the
# suite cannot rot. Targets are reported, not enforced: a 1 s run on a CI
# machine says nothing about speed. The full suite is run by hand
# (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/blazewsgi ] || bash .ci/setup
bash benchmarks/setup_peers.sh bjoern

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
BLAZE_BENCH_SMOKE=1 BLAZE_BENCH_SECONDS=1 BLAZE_BENCH_WARMUP=0 BLAZE_BENCH_ROUNDS=1 \
  .venv/bin/python -m pytest -q -rs -p no:cacheprovider benchmarks/ \
  --benchmark-max-time=0.2 --benchmark-json="$out/smoke.json"
.venv/bin/python benchmarks/report.py "$out/smoke.json" >"$out/report.md"
grep -q "| hello-world (smoke), 1w, c64 | \*\*blazewsgi\*\* | ok |" "$out/report.md" || {
  echo "smoke: no measurement of blazewsgi in the report" >&2; cat "$out/report.md" >&2; exit 1; }
echo "== benchmark smoke pass ok"
