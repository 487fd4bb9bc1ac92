"""HTTPS: BlazeWSGI terminating TLS itself vs the usual ways of serving a
WSGI app over HTTPS, hello-world with keep-alive, 1 worker each:

* nginx terminating TLS in front of gunicorn sync (nginx keeps its upstream
  connections, gunicorn sync closes each one),
* nginx terminating TLS in front of bjoern,
* uWSGI's own --https-socket (which closes every connection after one
  response: no keep-alive there), and uWSGI's --https router (TLS and
  keep-alive in a router process that forwards to the worker).

Target: ours ahead of every one of them (req/s ratio >= 1.0).  Same
interleaving, measurement and reporting as test_core_ratios.py; the
servers and the certificate are in harness.py (LAUNCHERS, tls_files).

    BLAZE_BENCH_SECONDS=5 .venv/bin/python -m pytest benchmarks/test_tls_ratios.py -rs
"""

import pytest

import harness
from harness import Comparison

OURS = "blazewsgi-tls"
COMPARISONS = [
    Comparison("hello", ours=OURS, peer="nginx-tls+gunicorn-sync", workers=1, min_rps_ratio=1.0),
    Comparison("hello", ours=OURS, peer="nginx-tls+bjoern", workers=1, min_rps_ratio=1.0),
    Comparison("hello", ours=OURS, peer="uwsgi-https-socket", workers=1, min_rps_ratio=1.0),
    Comparison("hello", ours=OURS, peer="uwsgi-https-router", workers=1, min_rps_ratio=1.0),
]
ROUNDS = harness.env_int("BLAZE_BENCH_ROUNDS", 2)
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

CASES = [
    pytest.param(c, round_, server, id=f"https-{c.workload}-{c.workers}w-r{round_}-{server}")
    for c in COMPARISONS
    for round_ in range(1, ROUNDS + 1)
    for server in (c.ours, c.peer)
]


@pytest.mark.parametrize("comparison,round_,server", CASES)
def test_https(benchmark, app_specs, bench_results, tmp_path, comparison, round_, server):
    result = harness.base_result(comparison, server, round_)
    result["comparison"] = "https-" + result["comparison"]
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

    benchmark.group = result["comparison"]
    result["server_version"] = launcher.version()
    try:
        with harness.TLSServer(launcher, spec, comparison.workers, tmp_path / "server.log") as server_proc:
            server_proc.warmup(harness.warmup_seconds())
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
    assert result["non_2xx_3xx"] == 0, f"{server} answered {result['non_2xx_3xx']} errors"
    if server == OURS:
        assert sum(result["socket_errors"].values()) == 0, result["socket_errors"]
