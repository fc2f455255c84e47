"""Plumbing shared by the benchmark scripts: timing, peak memory, the results JSON and its plot.

Results follow the format in benchmarks/README.md: benchmarks/results/<device-slug>/<bench>.json with one row
per (case, impl) and a PNG of the same rows beside it. Timings are medians measured side by side in
one process: triton.testing.do_bench on CUDA, time.perf_counter on CPU.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from roofline import Cost

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cuda") -> str:
    """torch.cuda.get_device_name() on CUDA, else the CPU model."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"\b(nvidia|intel-r|amd|r|tm|cpu)-", "", slug)
    return re.sub(r"-+", "-", slug).strip("-")


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "triton": _package_version("triton", "pytorch-triton"),
        "dali": _package_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    }


def time_ms(fn: Callable[[], object], device: str | torch.device, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of one call of `fn` (CUDA: do_bench, which flushes L2 between calls)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device: str | torch.device) -> float | None:
    """Peak memory allocated by one call of `fn` beyond what was allocated before it (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(case: str, impl: str, step: Callable[[], object], device: str | torch.device, warmup: int,
            rep: int, cost: Cost | None = None) -> dict:
    """One results row: the median ms of step() and its peak memory (CUDA), after one untimed call
    that compiles (Triton, inductor); a row with a note instead if step() raises. cost: the op's
    analytic bytes and flops (benchmarks/roofline.py), for add_roofline."""
    row = {"case": case, "impl": impl}
    try:
        step()
        ms = time_ms(step, device, warmup=warmup, rep=rep)
    except (RuntimeError, ValueError) as e:
        row["note"] = f"does not run: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return row
    row["ms"] = round(ms, 4)
    mib = peak_mib(step, device)
    if mib is not None:
        row["peak_mib"] = round(mib, 2)
    add_roofline(row, cost, device)
    return row


def add_roofline(row: dict, cost: Cost | None, device: str | torch.device) -> None:
    """On CUDA, give a timed row its op's roofline time (roofline_ms) and the share of it the row reached
    (roofline_share = roofline_ms / ms, 1 at the roofline). Not on CPU: the roofline is an H100's."""
    if cost is None or row.get("ms") is None or torch.device(device).type != "cuda":
        return
    row["roofline_ms"] = round(cost.roofline_ms, 5)
    row["roofline_share"] = round(cost.share(row["ms"]), 4)


def add_speedups(rows: list[dict], ours: str, metric: str = "ms") -> None:
    """Give each row of impl `ours` a speedup_vs {impl: their metric / ours} over its case's rows."""
    for row in rows:
        if row["impl"] != ours or row.get(metric) is None:
            continue
        others = [r for r in rows if r["case"] == row["case"] and r["impl"] != ours and r.get(metric) is not None]
        row["speedup_vs"] = {r["impl"]: round(r[metric] / row[metric], 3) for r in others}


def print_table(rows: list[dict]) -> None:
    keys = ["case", "impl"] + sorted({k for r in rows for k in r} - {"case", "impl", "speedup_vs", "note"})
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    for r in rows:
        if r.get("note"):
            print(f"note [{r['case']} / {r['impl']}]: {r['note']}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def save(bench: str, rows: list[dict], device: str | torch.device, metric: str = "ms",
         extra: dict | None = None) -> Path:
    """Print the table, write results/<device-slug>/<bench>.json and a PNG plot of `metric` beside it; where the
    environment sets DINOTRON_RESULTS_DIR (gpu_proof.py), <bench>.json into that folder and no plot."""
    name = device_name(device)
    out_dir = Path(os.environ.get("DINOTRON_RESULTS_DIR") or RESULTS / device_slug(name))
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": bench,
        "device": name,
        **versions(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *[_relative(a) for a in sys.argv]]),
        **(extra or {}),
        "rows": rows,
    }
    path = out_dir / f"{bench}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print_table(rows)
    if "DINOTRON_RESULTS_DIR" not in os.environ:  # gpu_proof's folder holds the JSON files only
        _plot(record, metric, path.with_suffix(".png"))
    print(f"wrote {_relative(str(path))}")
    return path


def _relative(arg: str) -> str:
    p = Path(arg)
    if p.is_absolute() and p.exists():
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return arg
    return arg


def _plot(record: dict, metric: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    rows = [r for r in record["rows"] if r.get(metric) is not None]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(impls) / 3)), 4))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, case in enumerate(cases):
            match = [r[metric] for r in rows if r["case"] == case and r["impl"] == impl]
            if match:
                xs.append(j + i * width)
                ys.append(match[0])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{record['bench']} on {record['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
