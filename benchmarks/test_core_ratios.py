"""The two headline ratios: BlazeWSGI vs bjoern (hello, 1 worker) and vs
gunicorn sync (Django, 2 workers).

Runs are interleaved (ours, peer, ours, peer, ...) so that slow drifts of the
shared machine hit both sides alike, and ratios are computed within one session
(see harness.summarize, printed at the end of the pytest run).

    BLAZE_BENCH_SECONDS=2 pytest benchmarks/ --benchmark-json=/tmp/bench.json
    python benchmarks/report.py /tmp/bench.json

A server that is not installed is skipped and reported as "not installed".
BLAZE_BENCH_ENFORCE=1 makes test_targets fail when a target is missed.
"""

import os

import pytest

import harness
from harness import Comparison

COMPARISONS = [
    Comparison("hello", ours="blazewsgi", peer="bjoern", workers=1, min_rps_ratio=0.8, max_cpu_ratio=1.25),
    Comparison("django", ours="blazewsgi", peer="gunicorn-sync", workers=2, min_rps_ratio=1.8),
]
ROUNDS = harness.env_int("BLAZE_BENCH_ROUNDS", 2)
# a case that fails before its measurement never uses `benchmark`: no extra warning for that
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

# pytest runs parametrized cases in list order: this list *is* the interleaving
CASES = [
    pytest.param(c, round_, server, id=f"{c.workload}-{c.workers}w-r{round_}-{server}")
    for c in COMPARISONS
    for round_ in range(1, ROUNDS + 1)
    for server in (c.ours, c.peer)
]


@pytest.mark.parametrize("comparison,round_,server", CASES)
def test_core(benchmark, app_specs, bench_results, tmp_path, comparison, round_, server):
    result = harness.base_result(comparison, server, round_)
    launcher = harness.LAUNCHERS[server]
    reason = launcher.unavailable()
    if reason is None:
        try:
            spec = app_specs.get(comparison.workload)
        except harness.Unavailable as e:
            reason = str(e)
    if reason:
        result.update(status="not installed", reason=reason)
        bench_results.append(result)
        pytest.skip(f"{server} on {comparison.workload}: not installed: {reason}")

    benchmark.group = comparison.id
    result["server_version"] = launcher.version()
    try:
        with harness.Server(launcher, spec, comparison.workers, tmp_path / "server.log") as server_proc:
            server_proc.warmup(harness.warmup_seconds())
            # one timed wrk run: pytest-benchmark's own timing is just its wall time
            measured = benchmark.pedantic(server_proc.measure, args=(harness.bench_seconds(),),
                                          rounds=1, iterations=1)
        result.update(measured, **server_proc.stop_info, status="ok")
    except Exception as e:
        result.update(status="error", reason=str(e).splitlines()[0] if str(e) else repr(e))
        bench_results.append(result)
        raise
    bench_results.append(result)
    benchmark.extra_info.update(result)
    assert result["requests"] > 0, f"{server} completed no request"


def test_targets(bench_results):
    """Checks the ratio targets; only asserts with BLAZE_BENCH_ENFORCE=1."""
    summary = [s for s in harness.summarize(bench_results) if s["rps_ratio"] is not None]
    if os.environ.get("BLAZE_BENCH_ENFORCE") != "1":
        pytest.skip("targets reported in the summary; BLAZE_BENCH_ENFORCE=1 to assert them")
    if not summary:
        pytest.skip("no comparison has data on both sides")
    failed = [f"{s['comparison']}: {s['verdict']}" for s in summary if s["verdict"] != "PASS"]
    assert not failed, "\n".join(failed)
