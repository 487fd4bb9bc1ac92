"""Which servers call the response's close() (PEP 3333)?

Django's request cycle ends in close(): HttpResponse.close() sends
request_finished, which closes old database connections, among others.  A
server that never calls it runs less of Django per request, so its Django
rows are not the same work; test_core_ratios.py's "django-noclose" case
gives every server that lighter work.  This measures, per server, what a
comparison can only assume: one worker, the `closing` app (apps/closing.py),
five requests, then the app's own count of close() calls.
"""

import time

import pytest

import harness
from test_core_ratios import PEERS_1W

REQUESTS = 5
# measured with this test (fastwsgi 0.0.9); any other server is expected to close
SKIPS_CLOSE = {"fastwsgi"}


def closed_count(port: int) -> int:
    status, body = harness.http_get(port, "/closed")
    assert status == 200, f"/closed answered {status}"
    return int(body)


@pytest.mark.parametrize("server", ["blazewsgi", *PEERS_1W])
def test_calls_close(app_specs, tmp_path, server):
    launcher = harness.LAUNCHERS[server]
    reason = launcher.unavailable() or launcher.unsupported("closing", 1)
    if reason:
        pytest.skip(f"{server}: {reason}")
    with harness.Server(launcher, app_specs.get("closing"), 1, tmp_path / "server.log") as srv:
        # the readiness check's requests, closed or not; a threaded server may
        # close the last of them only after this count (then one more below)
        before = closed_count(srv.port)
        for _ in range(REQUESTS):
            assert harness.http_get(srv.port, "/") == (200, b"ok")
        # a threaded server may close the last one just after it answered: poll briefly
        deadline = time.monotonic() + 2.0
        while (closed := closed_count(srv.port) - before) < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.05)
    calls_close = closed >= REQUESTS
    expected = server not in SKIPS_CLOSE
    assert calls_close == expected, (
        f"{server} called close() for {closed} of {REQUESTS} responses; "
        f"expected {'all' if expected else 'none'} (update SKIPS_CLOSE and RESULTS.md)")
