"""Dynamic worker scaling from the request rate the master reads in the workers' shared memory.

rate = requests completed in the last scale_window seconds / scale_window.
Up one worker when rate > scale_threshold_high, below max_workers, and
scale_window seconds after the last step; down one (the newest retires
gracefully) when rate < scale_threshold_low, above min_workers, and
scale_down_delay seconds after the last step.
"""
import re
import subprocess
import sys
import time

from apps_reload import Load
from conftest import ROOT, wait_until

APP = "apps_reload:app"
FAST = {"scale_window": 1, "scale_down_delay": 1, "scale_threshold_high": 30, "scale_threshold_low": 5,
        "max_workers": 3}
UP = re.compile(r"Scaling up to (\d+) workers?: ([\d.]+) req/s")
DOWN = re.compile(r"Scaling down to (\d+) workers?: ([\d.]+) req/s")


class Watch:
    """Samples the worker count while a phase runs (for the min/max bounds)."""

    def __init__(self, srv):
        self.srv = srv
        self.counts = []

    def __call__(self):
        n = len(self.srv.worker_pids())
        self.counts.append(n)
        return n

    def hold(self, seconds):
        """Keep sampling for `seconds` (an observation window: nothing is waited for)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self()
            time.sleep(0.05)


def test_scales_up_under_load_and_back_down_when_idle(server_factory):
    srv = server_factory(app=APP, workers=1, extra=FAST).start()
    first = srv.worker_pids()
    assert len(first) == 1
    watch = Watch(srv)
    # ~200 req/s: four keep-alive connections at 40 req/s, one new connection per request at 40 req/s
    load = [Load(srv.connect, conns=4, keepalive=True, rate=40, name="keep-alive load"),
            Load(srv.connect, conns=1, keepalive=False, rate=40, name="new-connection load")]
    try:
        t0 = time.monotonic()
        wait_until(lambda: watch() >= 2, 10, what=f"a second worker under load:\n{srv.output()}")
        wait_until(lambda: watch() == 3, 10, what=f"a third worker under load:\n{srv.output()}")
        grown = time.monotonic() - t0
        watch.hold(3.0)            # still loaded: stays at max_workers, never above, never down
    finally:
        for ld in load:
            ld.stop()
    out = srv.output()
    for ld in load:
        assert ld.failures == [], ld.report()
    sent = sum(ld.ok for ld in load)
    assert sent > 150 * 4, f"the load was too light to test anything: {[ld.report() for ld in load]}"
    assert max(watch.counts) == 3 and watch.counts[-1] == 3, watch.counts
    ups = [(int(n), float(r)) for n, r in UP.findall(out)]
    assert [n for n, _ in ups] == [2, 3], out
    assert all(r > 30 for _, r in ups), ups
    assert grown >= 1.0, f"two steps up need scale_window (1 s) between them; took {grown:.2f} s"
    assert not DOWN.search(out), f"scaled down under load:\n{out}"

    # the load stops; a trickle (~2 req/s, below scale_threshold_low) keeps running during the shrink
    # (1 req/s on new connections, 1 req/s on a keep-alive connection that may have to follow
    # a Connection: close from a retiring worker)
    trickle = [Load(srv.connect, conns=1, keepalive=False, rate=1, name="trickle"),
               Load(srv.connect, conns=1, keepalive=True, rate=1, name="keep-alive trickle")]
    try:
        t0 = time.monotonic()
        wait_until(lambda: watch() == 1, 12, what=f"back to one worker:\n{srv.output()}")
        shrunk = time.monotonic() - t0
        watch.hold(2.5)            # at min_workers: stays there
    finally:
        for ld in trickle:
            ld.stop()
    out = srv.output()
    for ld in trickle:
        assert ld.failures == [], ld.report()
        assert ld.ok >= 3, ld.report()
    assert watch.counts[-1] == 1 and min(watch.counts) >= 1, watch.counts
    downs = [(int(n), float(r)) for n, r in DOWN.findall(out)]
    assert [n for n, _ in downs] == [2, 1], out
    assert all(r <= 5.0 for _, r in downs), downs   # < 5, logged to 0.1: 4.96 shows as 5.0
    assert shrunk < 10, f"took {shrunk:.1f} s to shrink"
    # the newest worker retires first; the first one is never touched; all retire cleanly
    assert srv.worker_pids() == first, (first, srv.worker_pids())
    assert not re.search(r"Worker \d+ (was killed|exited with code)", out), out
    assert "Traceback" not in out, out
    assert srv.stop() == 0


def test_scale_up_steps_wait_scale_window(server_factory):
    """Two steps up are at least scale_window apart, and the rate is measured over it."""
    srv = server_factory(app=APP, workers=1, extra=dict(FAST, scale_window=2)).start()
    ld = Load(srv.connect, conns=4, keepalive=True, rate=40, name="load")
    try:
        wait_until(lambda: len(UP.findall(srv.output())) >= 2, 15, what=f"two steps up:\n{srv.output()}")
    finally:
        ld.stop()
    assert ld.failures == [], ld.report()
    stamps = [time.mktime(time.strptime(m, "%Y-%m-%d %H:%M:%S"))
              for m in re.findall(r"^\[([\d-]+ [\d:]+)\] \[\d+\] \[INFO\] Scaling up", srv.output(), re.M)]
    assert len(stamps) == 2
    assert stamps[1] - stamps[0] >= 2, "steps up closer than scale_window = 2 s"
    assert len(srv.worker_pids()) == 3


def test_no_scaling_when_min_equals_max(server_factory):
    srv = server_factory(app=APP, workers=2, extra=dict(FAST, max_workers=2)).start()
    pids = wait_until(lambda: len(srv.worker_pids()) == 2 and srv.worker_pids(), 10, what="2 workers")
    ld = Load(srv.connect, conns=4, keepalive=True, rate=40, name="load")
    watch = Watch(srv)
    try:
        watch.hold(2.5)
    finally:
        ld.stop()
    assert ld.failures == [] and ld.ok > 200, ld.report()
    watch.hold(2.0)                # and idle: no step down below min_workers
    assert set(watch.counts) == {2} and srv.worker_pids() == pids, watch.counts
    assert not UP.search(srv.output()) and not DOWN.search(srv.output()), srv.output()


def test_scale_settings_and_defaults(tmp_path):
    from blazewsgi.config import BY_NAME
    assert BY_NAME["scale_window"].default == 3
    assert BY_NAME["scale_down_delay"].default == 5
    ini = tmp_path / "c.ini"
    ini.write_text("[server]\nwsgi_path = apps_reload:app\nmin_workers = 1\nmax_workers = 3\n"
                   "scale_window = 1\nscale_down_delay = 1\n"
                   "scale_threshold_high = 30\nscale_threshold_low = 5\n")
    r = subprocess.run([sys.executable, "-m", "blazewsgi", "--check-config", str(ini)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nwsgi_path = apps_reload:app\nscale_window = soon\n")
    r = subprocess.run([sys.executable, "-m", "blazewsgi", "--check-config", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "scale_window" in r.stderr, (r.returncode, r.stderr)
