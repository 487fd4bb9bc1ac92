"""Turn pytest-benchmark JSON files (--benchmark-json) into a markdown report and a chart.

    python benchmarks/report.py /tmp/bench.json                  # print
    python benchmarks/report.py /tmp/bench.json /tmp/micro.json \\
        -o benchmarks/RESULTS.md --png benchmarks/results.png

With -o, the report replaces the block between the two markers below in that
file (or is appended, with the markers, if they are not there yet), so the
rest of the file can hold hand-written notes. --png draws one panel per case:
each server's req/s, labelled with ours/peer; it needs matplotlib, which
setup_peers.sh installs into benchmarks/.peers-venv (run this script with
that venv's python for the chart; the markdown needs only the stdlib).
Microbenchmark files (test_micro.py) become a table of their own.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

BEGIN = "<!-- blaze-bench:begin -->"
END = "<!-- blaze-bench:end -->"


def load_results(data: dict) -> list[dict]:
    # conftest stores every case (not-installed ones too) under "blaze";
    # fall back to the per-benchmark extra_info for files written without it
    if "blaze" in data:
        return data["blaze"]["results"]
    return [b["extra_info"] for b in data.get("benchmarks", []) if "comparison" in b.get("extra_info", {})]


def micro_rows(data: dict) -> list[list[str]]:
    rows = []
    for b in data.get("benchmarks", []):
        if b.get("group") != "micro" and not b.get("name", "").startswith("test_micro"):
            continue
        st = b["stats"]
        rows.append([b["name"], f"{st['median'] * 1e6:.2f}", f"{st['mean'] * 1e6:.2f}",
                     f"{st['stddev'] * 1e6:.2f}", str(st["rounds"]), b.get("extra_info", {}).get("what", "")])
    return rows


def header(data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    settings = data.get("blaze", {}).get("settings", {})
    cpu = machine.get("cpu", {})
    lines = [
        f"Run {data.get('datetime', '?')} on {cpu.get('brand_raw', '?')} ({cpu.get('count', '?')} CPUs), "
        f"Python {machine.get('python_version', '?')}, commit {str(commit.get('id', '?'))[:10]}"
        + (" (dirty)" if commit.get("dirty") else "") + ".",
        f"wrk -t1 on 127.0.0.1 (keep-alive unless the case says otherwise), {settings.get('seconds', '?')} s per "
        f"run after a {settings.get('warmup_seconds', '?')} s warm-up, servers interleaved, "
        f"{settings.get('rounds', '?')} rounds; ratios are ours/peer of the per-server means (req/s: > 1 is ours "
        "faster; CPU, p99, RSS: < 1 is ours smaller). CPU = utime+stime of the server's whole process tree "
        "(/proc) / requests; RSS/worker = mean peak RSS of the worker processes. \"by round\": the bar's ratio in "
        "each round; \"rounds split\": the rounds gave different verdicts.",
    ]
    if settings.get("command"):
        lines.append(f"Command: `{settings['command']}`")
    return "\n".join(lines)


def render(files: list[dict]) -> str:
    parts = []
    for data in files:
        results = load_results(data)
        if results:
            parts.append(header(data) + "\n\n" + harness.render_markdown(results))
        micro = micro_rows(data)
        if micro:
            parts.append("Microbenchmarks (in-process, pytest-benchmark, µs per call):\n\n"
                         + harness._table(["benchmark", "median µs", "mean µs", "stddev µs", "rounds", "what"],
                                          micro) + "\n")
    return "\n".join(parts)


def draw_png(results: list[dict], path: Path) -> None:
    """One horizontal bar panel per case: req/s per server, ours highlighted, ours/peer on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: dict[str, list[dict]] = {}
    for row in harness.summarize(results):
        cases.setdefault(row["comparison"], []).append(row)
    cols = 2
    nrows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(14, 3.2 * nrows), squeeze=False)
    for ax, rows in zip(axes.flat, cases.values()):
        rows = sorted(rows, key=lambda r: (r["rps"] is None, -(r["rps"] or 0)))
        names = [r["server"] for r in rows]
        values = [r["rps"] or 0 for r in rows]
        colors = ["#d9480f" if r["role"] == "ours" else "#868e96" if r["server"] in harness.CEILINGS
                  else "#1c7ed6" for r in rows]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        top = max(values) or 1
        for i, r in enumerate(rows):
            if r["rps"] is None:
                label = harness._short_status(r["status"])
            elif r["role"] == "ours":
                label = f"{r['rps']:.0f} req/s (ours)"
            else:
                label = f"{r['rps']:.0f}  ours/peer {r['rps_ratio']:.2f}x" if r["rps_ratio"] else f"{r['rps']:.0f}"
            ax.text((r["rps"] or 0) + top * 0.01, i, label, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.45)
        ax.set_title(harness.case_title(rows[0]), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("req/s", fontsize=8)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle("BlazeWSGI (orange) vs peers (blue) and nginx return 200 (grey): req/s, same machine, same run",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_file(path: Path, block: str) -> None:
    block = f"{BEGIN}\n{block.rstrip()}\n{END}\n"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        text = before + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, help="markdown file to create or update")
    parser.add_argument("--png", type=Path, help="bar chart to write (needs matplotlib)")
    args = parser.parse_args()
    files = [json.loads(f.read_text()) for f in args.json_files]
    report = render(files)
    if args.output:
        update_file(args.output, report)
        print(f"updated {args.output}")
    else:
        print(report)
    if args.png:
        results = [r for data in files for r in load_results(data)]
        try:
            draw_png(results, args.png)
            print(f"wrote {args.png}")
        except ImportError as e:
            print(f"no chart: {e} (run with benchmarks/.peers-venv/bin/python, which has matplotlib)",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
