"""Regenerate the benchmark tables in benchmarks/README.md from benchmarks/results/*/*.json.

    python benchmarks/report.py          # rewrites the block between the markers in benchmarks/README.md
    python benchmarks/report.py --check  # exits 1 if benchmarks/README.md is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
METRICS = ("ms", "peak_mib", "peak_rss_mib", "tflops", "gbps", "images_per_s")


def table(record: dict) -> str:
    rows = record["rows"]
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    head = ["case", "impl", *metrics, "speedup"]
    lines = [
        f"**{record['bench']}** on {record['device']} (torch {record['torch']}, triton {record.get('triton')}, "
        f"{record['date']}): `{record['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        speedup = ", ".join(f"{v:.2f}x vs {k}" for k, v in (r.get("speedup_vs") or {}).items())
        values = [f"{r[m]:.4g}" if r.get(m) is not None else "-" for m in metrics]
        lines.append("| " + " | ".join([r["case"], r["impl"], *values, speedup or ""]) + " |")
    return "\n".join(lines)


def render(results: Path) -> str:
    files = sorted(results.glob("*/*.json"))
    if not files:
        return "No benchmark results yet."
    return "\n\n".join(table(json.loads(f.read_text())) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    name = README.relative_to(ROOT)
    text = README.read_text()
    if START not in text or END not in text:
        print(f"{name} lacks the markers {START} / {END}", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render(ROOT / 'benchmarks' / 'results')}\n{END}{tail}"
    if args.check:
        if new != text:
            print(f"{name}: the benchmark tables are out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
