"""Benchmark harness: start a WSGI server, load it with wrk, measure it from /proc.

Three tables drive everything and are meant to grow:

* WORKLOADS: name -> function preparing an app (an AppSpec) in a scratch dir;
* LAUNCHERS: name -> how to start a server for an AppSpec with N workers;
* comparisons (test files): "ours vs peer on workload W with N workers, target".

A measurement is a flat, JSON-friendly dict (see Server.measure); results of a
session are collected in RESULTS and summarized into ratios by summarize().
Linux only (/proc), loopback only.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_VENV = Path(os.environ.get("BLAZE_PEERS_VENV", BENCH_DIR / ".peers-venv"))
BLAZE_VENV = Path(os.environ.get("BLAZE_VENV", REPO_ROOT / ".venv"))
HOST = "127.0.0.1"  # loopback only, by design
CLK_TCK = os.sysconf("SC_CLK_TCK")

RESULTS: list[dict] = []  # every case of the session, including "not installed" ones


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def bench_seconds() -> int:
    return env_int("BLAZE_BENCH_SECONDS", 10)


def warmup_seconds() -> int:
    return env_int("BLAZE_BENCH_WARMUP", 1)


class Unavailable(Exception):
    """A server or workload that cannot run here (e.g. a peer not installed)."""


class ServerError(Exception):
    """The server did not start, crashed, or answered wrongly."""


# --------------------------------------------------------------------------
# Workloads


@dataclass
class AppSpec:
    app: str  # "module:callable", importable from cwd / pythonpath
    cwd: Path
    pythonpath: list[Path]
    path: str = "/"
    expect_body: bytes = b""  # readiness check: the body must contain this


def peers_site_packages() -> Path:
    return Path(_run_python(PEERS_VENV / "bin" / "python", "import sysconfig; print(sysconfig.get_paths()['purelib'])"))


def hello_workload(scratch: Path) -> AppSpec:
    return AppSpec("benchmarks.apps.hello:application", REPO_ROOT, [REPO_ROOT], expect_body=b"Hello, World!")


def django_workload(scratch: Path) -> AppSpec:
    """`django-admin startproject`, DEBUG off, one view returning "Hello" at /.

    Django comes from the peers venv and is put on every server's PYTHONPATH,
    so that all servers run the very same Django.
    """
    python = PEERS_VENV / "bin" / "python"
    if not _importable(python, "django"):
        raise Unavailable(f"django not installed in {PEERS_VENV} (run benchmarks/setup_peers.sh)")
    root = scratch / "djangoproj"
    if not (root / "manage.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-m", "django", "startproject", "myproject", str(root)], check=True)
        settings = root / "myproject" / "settings.py"
        text = settings.read_text()
        for old, new in (("DEBUG = True", "DEBUG = False"), ("ALLOWED_HOSTS = []", "ALLOWED_HOSTS = ['*']")):
            if old not in text:
                raise RuntimeError(f"unexpected startproject settings: {old!r} not found")
            text = text.replace(old, new)
        settings.write_text(text)
        (root / "myproject" / "views.py").write_text(
            "from django.http import HttpResponse\n\n\n"
            "def hello(request):\n"
            '    return HttpResponse("Hello")\n'
        )
        (root / "myproject" / "urls.py").write_text(
            "from django.urls import path\n\n"
            "from myproject.views import hello\n\n"
            'urlpatterns = [path("", hello)]\n'
        )
    return AppSpec("myproject.wsgi:application", root, [root, peers_site_packages()], expect_body=b"Hello")


WORKLOADS: dict[str, Callable[[Path], AppSpec]] = {
    "hello": hello_workload,
    "django": django_workload,
}


# --------------------------------------------------------------------------
# Launchers


@dataclass
class Launcher:
    name: str
    python: Path  # the interpreter the server runs on
    argv: Callable[[AppSpec, int, int], list[str]]  # (spec, port, workers) -> argv
    requires: tuple[str, ...]  # modules that must import with `python`
    dist: str  # distribution name, for the version
    executable: Path | None = None  # must exist, if given

    def unavailable(self) -> str | None:
        """Why this server cannot run here, or None."""
        if self.executable is not None and not self.executable.exists():
            return f"{self.executable} not found"
        if not self.python.exists():
            return f"{self.python} not found"
        missing = [m for m in self.requires if not _importable(self.python, m)]
        if missing:
            return f"cannot import {', '.join(missing)} with {self.python}"
        return None

    def version(self) -> str:
        try:
            return _run_python(self.python, f"import importlib.metadata as m; print(m.version({self.dist!r}))")
        except Exception:
            return "unknown"


def _blaze_argv(spec: AppSpec, port: int, workers: int) -> list[str]:
    # BLAZE_SERVER_ARGS: extra flags to try options without editing this file
    extra = shlex.split(os.environ.get("BLAZE_SERVER_ARGS", ""))
    return [str(BLAZE_VENV / "bin" / "blazewsgi"), "--app", spec.app, "--bind", f"{HOST}:{port}",
            "--workers", str(workers), *extra]


def _bjoern_argv(spec: AppSpec, port: int, workers: int) -> list[str]:
    return [str(PEERS_VENV / "bin" / "python"), str(BENCH_DIR / "peers" / "bjoern_serve.py"),
            "--app", spec.app, "--bind", f"{HOST}:{port}", "--workers", str(workers)]


def _gunicorn_argv(worker_class: str) -> Callable[[AppSpec, int, int], list[str]]:
    def argv(spec: AppSpec, port: int, workers: int) -> list[str]:
        return [str(PEERS_VENV / "bin" / "gunicorn"), "-w", str(workers), "-k", worker_class,
                "-b", f"{HOST}:{port}", spec.app]
    return argv


LAUNCHERS: dict[str, Launcher] = {
    "blazewsgi": Launcher("blazewsgi", BLAZE_VENV / "bin" / "python", _blaze_argv, (), "blazewsgi",
                          executable=BLAZE_VENV / "bin" / "blazewsgi"),
    "bjoern": Launcher("bjoern", PEERS_VENV / "bin" / "python", _bjoern_argv, ("bjoern",), "bjoern"),
    "gunicorn-sync": Launcher("gunicorn-sync", PEERS_VENV / "bin" / "python", _gunicorn_argv("sync"),
                              ("gunicorn",), "gunicorn"),
}


@functools.cache
def _importable(python: Path, module: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


@functools.cache
def _run_python(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# --------------------------------------------------------------------------
# /proc: process tree, CPU time, memory


@dataclass
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    state: str
    ticks: int  # utime + stime + cutime + cstime


def _read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17
    return ProcStat(pid, int(fields[1]), int(fields[2]), fields[0], sum(int(f) for f in fields[11:15]))


def _all_stats() -> list[ProcStat]:
    stats = (_read_stat(int(d)) for d in os.listdir("/proc") if d.isdigit())
    return [s for s in stats if s is not None]


def process_tree(root: int) -> list[ProcStat]:
    """root, its descendants, and anything else in its process group.

    Zombies are kept: their CPU time is still readable and not yet in a parent's cutime.
    cutime/cstime of the live processes hold the time of reaped children, so summing
    all four fields over the tree is the total CPU spent by the server since start.
    """
    stats = _all_stats()
    children: dict[int, list[ProcStat]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    found = {s.pid: s for s in stats if s.pid == root or s.pgrp == root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child.pid] = child
            todo.append(child.pid)
    return list(found.values())


def tree_cpu_ticks(root: int) -> dict[int, int]:
    return {s.pid: s.ticks for s in process_tree(root)}


def _status_kb(pid: int, key: str, filename: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{filename}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kb(root: int) -> dict:
    """Peak RSS (VmHWM) per process, and current PSS (shares counted once) total."""
    pids = [s.pid for s in process_tree(root) if s.state != "Z"]
    hwm = {pid: _status_kb(pid, "VmHWM") for pid in pids}
    return {
        "rss_hwm_kb": hwm,
        "rss_hwm_kb_total": sum(hwm.values()),
        "rss_hwm_kb_max": max(hwm.values(), default=0),
        "pss_kb_total": sum(_status_kb(pid, "Pss", "smaps_rollup") for pid in pids),
        "nprocs": len(pids),
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def group_alive(pgid: int) -> bool:
    return any(s.pgrp == pgid and s.state != "Z" for s in _all_stats())


# --------------------------------------------------------------------------
# wrk

_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_MS[unit]


def parse_wrk(text: str) -> dict:
    """Parse `wrk --latency` output into a dict (missing counters are 0)."""
    out: dict = {"socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx_3xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    out["requests"] = int(m.group(1))
    out["duration_s"] = _to_ms(m.group(2), m.group(3)) / 1e3
    out["rps"] = float(re.search(r"Requests/sec:\s*([\d.]+)", text).group(1))
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        out[f"latency_p{pct}_ms"] = round(_to_ms(value, unit), 4)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx_3xx"] = int(m.group(1))
    return out


def run_wrk(url: str, seconds: int, threads: int = 1, connections: int = 64) -> dict:
    """Run wrk; also report its own CPU use, to spot a saturated load generator."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    result = parse_wrk(proc.stdout)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["wrk_cpu_util"] = round(wrk_cpu / wall, 3)  # 1.0 = one core busy
    result["wrk_argv"] = " ".join(argv)
    return result


# --------------------------------------------------------------------------
# Server lifecycle


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own session / process group (pgid == pid)."""

    def __init__(self, launcher: Launcher, spec: AppSpec, workers: int, log_path: Path):
        self.launcher, self.spec, self.workers, self.log_path = launcher, spec, workers, log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.stop_info: dict = {}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.spec.path}"

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        env = dict(os.environ)
        # a fresh PYTHONPATH: nothing from the test runner's environment leaks in
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in self.spec.pythonpath)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("VIRTUAL_ENV", None)
        self.argv = self.launcher.argv(self.spec, self.port, self.workers)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.spec.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = float(os.environ.get("BLAZE_BENCH_START_TIMEOUT", 30))) -> None:
        """Poll until a GET succeeds with the expected body (no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last_line = (self.log_tail(1) or "no output").strip()
                raise ServerError(f"{self.launcher.name} exited with {self.proc.returncode} before ready: "
                                  f"{last_line}\n$ {' '.join(self.argv)}\n{self.log_tail()}")
            try:
                status, body = http_get(self.port, self.spec.path)
            except OSError as e:  # refused / reset while starting up
                last_error = e
                time.sleep(0.02)
                continue
            if status != 200 or self.spec.expect_body not in body:
                raise ServerError(f"{self.launcher.name}: GET {self.spec.path} -> {status} {body[:200]!r}\n"
                                  f"{self.log_tail()}")
            return
        raise ServerError(f"{self.launcher.name}: no HTTP answer within {timeout}s "
                          f"(last: {type(last_error).__name__}: {last_error})\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM the group, wait for it to empty, SIGKILL what is left."""
        if self.proc is None or self.stop_info:
            return self.stop_info
        pgid = self.proc.pid
        t0 = time.monotonic()
        _killpg(pgid, signal.SIGTERM)
        graceful = True
        try:
            self.proc.wait(timeout)
            # workers may outlive the master for a moment: wait for the group to empty
            while group_alive(pgid) and time.monotonic() - t0 < timeout:
                time.sleep(0.02)
        except subprocess.TimeoutExpired:
            pass
        if group_alive(pgid):
            graceful = False
            _killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        self.stop_info = {"stopped_by_sigterm": graceful, "stop_seconds": round(time.monotonic() - t0, 3),
                          "exit_code": self.proc.returncode}
        return self.stop_info

    def warmup(self, seconds: int) -> None:
        if seconds > 0:
            run_wrk(self.url, seconds)

    def measure(self, seconds: int, threads: int = 1, connections: int = 64) -> dict:
        """One wrk run; server CPU is the /proc delta of the process tree around it."""
        root = self.proc.pid
        ticks0, busy0 = tree_cpu_ticks(root), machine_busy_seconds()
        result = run_wrk(self.url, seconds, threads, connections)
        ticks1, busy = tree_cpu_ticks(root), machine_busy_seconds() - busy0
        cpu = (sum(ticks1.values()) - sum(ticks0.values())) / CLK_TCK
        # per process, to see how the load spread over workers (keep-alive
        # connections stay with the worker that accepted them)
        result["cpu_util_by_proc"] = sorted(
            (round((t - ticks0.get(pid, 0)) / CLK_TCK / result["duration_s"], 2) for pid, t in ticks1.items()),
            reverse=True)
        if self.proc.poll() is not None:
            raise ServerError(f"{self.launcher.name} died during the run:\n{self.log_tail()}")
        result.update(memory_kb(root))
        result["cpu_s"] = round(cpu, 3)
        result["server_cpu_util"] = round(cpu / result["duration_s"], 3)  # 1.0 = one core busy
        # cores busy with neither server nor wrk (other jobs, unattributed kernel time):
        # a high value flags a run disturbed by the shared machine
        result["other_cpu_util"] = round(busy / result["duration_s"] - result["server_cpu_util"]
                                         - result["wrk_cpu_util"], 3)
        result["cpu_us_per_req"] = round(cpu * 1e6 / result["requests"], 3) if result["requests"] else None
        return result


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Comparisons and summaries


@dataclass(frozen=True)
class Comparison:
    """Ours vs one peer on one workload; targets are ratios ours/peer."""

    workload: str
    ours: str
    peer: str
    workers: int
    min_rps_ratio: float | None = None
    max_cpu_ratio: float | None = None  # on CPU seconds per request

    @property
    def id(self) -> str:
        return f"{self.workload}-{self.workers}w-{self.ours}-vs-{self.peer}"


def base_result(comparison: Comparison, server: str, round_: int) -> dict:
    """Fields every result carries, so that a JSON file is self-describing."""
    return {
        "comparison": comparison.id, "workload": comparison.workload, "server": server,
        "role": "ours" if server == comparison.ours else "peer", "ours": comparison.ours,
        "peer": comparison.peer, "workers": comparison.workers, "round": round_,
        "min_rps_ratio": comparison.min_rps_ratio, "max_cpu_ratio": comparison.max_cpu_ratio,
    }


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarize(results: list[dict]) -> list[dict]:
    """Per comparison: mean req/s and CPU/request of each side, ratios, verdict."""
    by_comparison: dict[str, list[dict]] = {}
    for r in results:
        by_comparison.setdefault(r["comparison"], []).append(r)
    rows = []
    for cid, rs in by_comparison.items():
        first = rs[0]
        ours = [r for r in rs if r["role"] == "ours" and r.get("status") == "ok"]
        peer = [r for r in rs if r["role"] == "peer" and r.get("status") == "ok"]
        row = {"comparison": cid, "workload": first["workload"], "workers": first["workers"],
               "ours": first["ours"], "peer": first["peer"],
               "ours_rps": _mean(ours, "rps"), "peer_rps": _mean(peer, "rps"),
               "ours_cpu_us_per_req": _mean(ours, "cpu_us_per_req"),
               "peer_cpu_us_per_req": _mean(peer, "cpu_us_per_req"),
               "min_rps_ratio": first["min_rps_ratio"], "max_cpu_ratio": first["max_cpu_ratio"],
               "rps_ratio": None, "cpu_ratio": None}
        if row["ours_rps"] and row["peer_rps"]:
            row["rps_ratio"] = row["ours_rps"] / row["peer_rps"]
        if row["ours_cpu_us_per_req"] and row["peer_cpu_us_per_req"]:
            row["cpu_ratio"] = row["ours_cpu_us_per_req"] / row["peer_cpu_us_per_req"]
        row["verdict"] = _verdict(row, rs)
        rows.append(row)
    return rows


def _verdict(row: dict, rs: list[dict]) -> str:
    missing = sorted({f"{r['server']}: {r['status']}" for r in rs if r.get("status") != "ok"})
    if row["rps_ratio"] is None:
        return "n/a (" + "; ".join(missing or ["no data"]) + ")"
    failures = []
    if row["min_rps_ratio"] is not None and row["rps_ratio"] < row["min_rps_ratio"]:
        failures.append(f"req/s {row['rps_ratio']:.2f}x < {row['min_rps_ratio']}x")
    if row["max_cpu_ratio"] is not None and row["cpu_ratio"] is not None and row["cpu_ratio"] > row["max_cpu_ratio"]:
        failures.append(f"cpu/req {row['cpu_ratio']:.2f}x > {row['max_cpu_ratio']}x")
    return "FAIL: " + ", ".join(failures) if failures else "PASS"


def _fmt(value, spec: str = ".0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


RATIO_HEADER = ["comparison", "ours req/s", "peer req/s", "req/s ratio", "target", "ours µs CPU/req",
                "peer µs CPU/req", "CPU/req ratio", "target", "verdict"]
RUN_HEADER = ["workload", "server", "w", "round", "status", "req/s", "p50 ms", "p99 ms", "sock err", "non-2xx",
              "µs CPU/req", "server CPU", "wrk CPU", "other CPU", "CPU by proc", "peak RSS MiB (sum/max)",
              "PSS MiB", "procs"]


def _ratio_row(s: dict) -> list[str]:
    return [
        f"{s['workload']}, {s['workers']}w: {s['ours']} vs {s['peer']}",
        _fmt(s["ours_rps"]), _fmt(s["peer_rps"]), _fmt(s["rps_ratio"], ".2f", "x"),
        f"≥{s['min_rps_ratio']}x" if s["min_rps_ratio"] else "—",
        _fmt(s["ours_cpu_us_per_req"], ".1f"), _fmt(s["peer_cpu_us_per_req"], ".1f"),
        _fmt(s["cpu_ratio"], ".2f", "x"),
        f"≤{s['max_cpu_ratio']}x" if s["max_cpu_ratio"] else "—",
        s["verdict"],
    ]


def _run_row(r: dict) -> list[str]:
    row = [r["workload"], r["server"], str(r["workers"]), str(r["round"]), r.get("status", "?")]
    if r.get("status") != "ok":  # the reason spans the measurement columns
        return row + [r.get("reason", "")[:80]] + [""] * (len(RUN_HEADER) - len(row) - 1)
    return row + [
        _fmt(r["rps"]), _fmt(r.get("latency_p50_ms"), ".2f"), _fmt(r.get("latency_p99_ms"), ".2f"),
        str(sum(r["socket_errors"].values())), str(r["non_2xx_3xx"]), _fmt(r["cpu_us_per_req"], ".1f"),
        _fmt(r["server_cpu_util"], ".2f"), _fmt(r["wrk_cpu_util"], ".2f"), _fmt(r.get("other_cpu_util"), ".2f"),
        " / ".join(f"{c:.2f}" for c in r.get("cpu_util_by_proc", [])),
        f"{r['rss_hwm_kb_total'] / 1024:.1f} / {r['rss_hwm_kb_max'] / 1024:.1f}",
        f"{r['pss_kb_total'] / 1024:.1f}", str(r["nprocs"]),
    ]


def render_markdown(results: list[dict]) -> str:
    """Ratio table, then one line per run (in the order they ran)."""
    ratios = _table(RATIO_HEADER, [_ratio_row(s) for s in summarize(results)])
    runs = _table(RUN_HEADER, [_run_row(r) for r in results])
    return ratios + "\n\n" + runs + "\n"


# --------------------------------------------------------------------------
# HTTPS (test_tls_ratios.py): servers that speak TLS themselves, and TLS
# terminated by nginx in front of a plain peer.  One self-signed ECDSA P-256
# certificate (made with `openssl req`) for all of them, and OpenSSL's
# defaults otherwise (TLS 1.3, AES-256-GCM on this machine).


@functools.cache
def tls_files() -> tuple[Path, Path]:
    """(certificate, key) in a scratch dir of this session."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="blaze-bench-tls-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def _blaze_tls_argv(spec: AppSpec, port: int, workers: int) -> list[str]:
    """Our server with ssl = true: the TLS settings only exist in a config file."""
    cert, key = tls_files()
    cfg = cert.parent / f"blazewsgi-{port}.ini"
    cfg.write_text(f"[server]\nwsgi_path = {spec.app}\nsockets = {HOST}:{port}\nmin_workers = {workers}\n"
                   f"ssl = true\nssl_certfile = {cert}\nssl_keyfile = {key}\n")
    extra = shlex.split(os.environ.get("BLAZE_SERVER_ARGS", ""))
    return [str(BLAZE_VENV / "bin" / "blazewsgi"), str(cfg), *extra]


def _uwsgi_argv(option: str) -> Callable[[AppSpec, int, int], list[str]]:
    """uWSGI's own TLS.  --https-socket: the workers speak HTTPS themselves, but close the
    connection after every response (no keep-alive there, --http-keepalive or not: wrk
    reconnects and counts a read error each time).  --https: uWSGI's router process
    terminates TLS with keep-alive and forwards each request to the workers."""
    def argv(spec: AppSpec, port: int, workers: int) -> list[str]:
        cert, key = tls_files()
        module, _, attr = spec.app.partition(":")
        return [str(PEERS_VENV / "bin" / "uwsgi"), option, f"{HOST}:{port},{cert},{key}", "--http-keepalive",
                "--module", f"{module}:{attr or 'application'}", "--processes", str(workers), "--master",
                "--disable-logging", "--die-on-term", "--need-app", "--chdir", str(spec.cwd)]
    return argv


_NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{
        server {host}:{backend};
        keepalive 32;
    }}
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def _nginx_in_front(backend: Callable[[AppSpec, int, int], list[str]]) -> Callable[[AppSpec, int, int], list[str]]:
    """nginx (from apt, as the current user, its own pid and error log) terminating TLS on port,
    proxying to `backend` started on another loopback port.  nginx gets as many worker processes
    as the backend gets workers.  One shell runs both in the server's process group, so the
    harness measures and stops them together."""
    def argv(spec: AppSpec, port: int, workers: int) -> list[str]:
        cert, key = tls_files()
        backend_port = free_port()
        d = cert.parent / f"nginx-{port}"
        d.mkdir()
        (d / "nginx.conf").write_text(_NGINX_CONF.format(workers=workers, dir=d, host=HOST, port=port,
                                                         backend=backend_port, cert=cert, key=key))
        behind = " ".join(shlex.quote(a) for a in backend(spec, backend_port, workers))
        nginx = f"nginx -p {shlex.quote(str(d))} -c {shlex.quote(str(d / 'nginx.conf'))}"
        # nginx starts once the backend answers, so the first request through it cannot fail
        wait = (f"until {shlex.quote(str(PEERS_VENV / 'bin' / 'python'))} -c 'import socket; "
                f"socket.create_connection((\"{HOST}\", {backend_port}), 1).close()' 2>/dev/null; do sleep 0.05; done")
        return ["sh", "-c", f"{behind} & {wait}; exec {nginx}"]
    return argv


LAUNCHERS.update({
    "blazewsgi-tls": Launcher("blazewsgi-tls", BLAZE_VENV / "bin" / "python", _blaze_tls_argv, (), "blazewsgi",
                              executable=BLAZE_VENV / "bin" / "blazewsgi"),
    "nginx-tls+gunicorn-sync": Launcher("nginx-tls+gunicorn-sync", PEERS_VENV / "bin" / "python",
                                        _nginx_in_front(_gunicorn_argv("sync")), ("gunicorn",), "gunicorn",
                                        executable=Path("/usr/sbin/nginx")),
    "nginx-tls+bjoern": Launcher("nginx-tls+bjoern", PEERS_VENV / "bin" / "python", _nginx_in_front(_bjoern_argv),
                                 ("bjoern",), "bjoern", executable=Path("/usr/sbin/nginx")),
    "uwsgi-https-socket": Launcher("uwsgi-https-socket", PEERS_VENV / "bin" / "python", _uwsgi_argv("--https-socket"),
                                   (), "uwsgi", executable=PEERS_VENV / "bin" / "uwsgi"),
    "uwsgi-https-router": Launcher("uwsgi-https-router", PEERS_VENV / "bin" / "python", _uwsgi_argv("--https"),
                                   (), "uwsgi", executable=PEERS_VENV / "bin" / "uwsgi"),
})


def https_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    import ssl
    ctx = ssl.create_default_context(cafile=str(tls_files()[0]))
    conn = http.client.HTTPSConnection("localhost", port, timeout=timeout, context=ctx)
    conn.sock = ctx.wrap_socket(socket.create_connection((HOST, port), timeout), server_hostname="localhost")
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class TLSServer(Server):
    """A server answering HTTPS: wrk and the readiness probe use https:// URLs."""

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}{self.spec.path}"

    def wait_ready(self, timeout: float = float(os.environ.get("BLAZE_BENCH_START_TIMEOUT", 30))) -> None:
        """Server.wait_ready over TLS: poll until a GET succeeds with the expected body."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.launcher.name} exited with {self.proc.returncode} before ready\n"
                                  f"$ {' '.join(self.argv)}\n{self.log_tail()}")
            try:
                status, body = https_get(self.port, self.spec.path)
            except OSError as e:  # refused / reset / TLS not up yet
                last_error = e
                time.sleep(0.02)
                continue
            if status != 200 or self.spec.expect_body not in body:
                raise ServerError(f"{self.launcher.name}: GET {self.spec.path} -> {status} {body[:200]!r}\n"
                                  f"{self.log_tail()}")
            return
        raise ServerError(f"{self.launcher.name}: no HTTPS answer within {timeout}s "
                          f"(last: {type(last_error).__name__}: {last_error})\n{self.log_tail()}")
