"""Turn a pytest-benchmark JSON file (--benchmark-json) into a markdown report.

    python benchmarks/report.py /tmp/bench.json                  # print
    python benchmarks/report.py /tmp/bench.json -o benchmarks/RESULTS.md

With -o, the report replaces the block between the two markers below in that
file (or is appended, with the markers, if they are not there yet), so the
rest of the file can hold hand-written notes.
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


def header(data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    settings = data.get("blaze", {}).get("settings", {})
    cpu = machine.get("cpu", {})
    lines = [
        f"Run {data.get('datetime', '?')} on {cpu.get('brand_raw', '?')} ({cpu.get('count', '?')} CPUs), "
        f"Python {machine.get('python_version', '?')}, commit {str(commit.get('id', '?'))[:10]}"
        + (" (dirty)" if commit.get("dirty") else "") + ".",
        f"wrk -t1 -c64 keep-alive on 127.0.0.1, {settings.get('seconds', '?')} s per run after a "
        f"{settings.get('warmup_seconds', '?')} s warm-up; runs interleaved ours/peer; ratios are ours/peer "
        "of the per-server mean. CPU = utime+stime of the server's whole process tree (/proc) / requests.",
    ]
    versions = sorted({f"{r['server']} {r['server_version']}" for r in load_results(data) if r.get("server_version")})
    if versions:
        lines.append("Versions: " + ", ".join(versions) + ".")
    return "\n".join(lines)


def render(data: dict) -> str:
    return f"{header(data)}\n\n{harness.render_markdown(load_results(data))}"


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
    parser.add_argument("json_file", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="markdown file to create or update")
    args = parser.parse_args()
    report = render(json.loads(args.json_file.read_text()))
    if args.output:
        update_file(args.output, report)
        print(f"updated {args.output}")
    else:
        print(report)


if __name__ == "__main__":
    main()
