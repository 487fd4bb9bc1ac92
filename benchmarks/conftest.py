"""pytest glue for the benchmark suite: fixtures, opt-in collection, summary.

The benchmarks only run when benchmarks/ (or a file in it) is named on the
command line, or BLAZE_BENCH=1 is set, so that a bare `pytest` at the repo
root never starts a multi-second load test by accident.
"""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `import harness`, whatever pytest's import mode

import harness  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark creates its storage dir (default ./.benchmarks) at startup:
    # keep it inside benchmarks/ (git-ignored) rather than in the caller's cwd
    if config.getoption("benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = f"file://{HERE / '.benchmarks'}"


def _explicitly_selected(config) -> bool:
    if os.environ.get("BLAZE_BENCH") == "1":
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _explicitly_selected(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run only when benchmarks/ is named explicitly or BLAZE_BENCH=1")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


class AppSpecs:
    """Prepares each workload once per session; remembers why one is unavailable."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.cache: dict[str, object] = {}

    def get(self, name: str) -> harness.AppSpec:
        if name not in self.cache:
            try:
                self.cache[name] = harness.WORKLOADS[name](self.scratch)
            except harness.Unavailable as e:
                self.cache[name] = e
        spec = self.cache[name]
        if isinstance(spec, harness.Unavailable):
            raise spec
        return spec


@pytest.fixture(scope="session")
def app_specs(tmp_path_factory):
    return AppSpecs(tmp_path_factory.mktemp("workloads"))


@pytest.fixture(scope="session")
def bench_results():
    return harness.RESULTS


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    # every case, "not installed" ones included, for report.py
    output_json["blaze"] = {
        "results": harness.RESULTS,
        "settings": {"seconds": harness.bench_seconds(), "warmup_seconds": harness.warmup_seconds(),
                     "rounds": harness.env_int("BLAZE_BENCH_ROUNDS", 2),
                     # how to reproduce: the BLAZE_* variables and pytest's own arguments
                     "command": " ".join([*(f"{k}={v}" for k, v in sorted(os.environ.items())
                                            if k.startswith("BLAZE_")),
                                          "pytest", *config.invocation_params.args])},
    }


def pytest_terminal_summary(terminalreporter):
    if harness.RESULTS:
        terminalreporter.section("BlazeWSGI comparison")
        terminalreporter.write(harness.render_markdown(harness.RESULTS))
