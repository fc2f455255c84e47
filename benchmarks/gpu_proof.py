"""The GPU proof in one command: every GPU test and benchmark, then the training step and the loader stall, each
under its own time cap, into one folder with a summary table.

    python benchmarks/gpu_proof.py --out proof/            # on the GPU machine (`make gpu-proof`): <= 8 minutes
    python benchmarks/gpu_proof.py --out /tmp/p --smoke    # CPU, tiny shapes: every part's plumbing (in `make test`)

Parts, in order (a part whose dependency is missing, DALI or xformers, is skipped or gives rows saying why; a part
that crashes or overruns its cap is marked so and the next one runs):
  tests        pytest -m gpu -x (compiled kernels, CUDA graphs, DALI on the GPU)
  bandwidth    the device's copy bandwidth (a 1 GiB device-to-device copy), the floor the kernels are held to
  losses, koleo, attention, fused_head
               the kernel benchmarks at their target shapes with their side-by-side baselines
  step         bench_step.py: the whole training step, rows (a)-(d) for ViT-S/14 B=128 and ViT-L/14 B=32
  loader_stall bench_loader_stall.py: the step fed by DALI on the GPU, share of time waiting for data
Writes into --out at most 8 files: proof.json (every part's status, time, output tail, the bandwidth), one JSON per
benchmark (format: benchmarks/README.md), summary.md; prints the summary table last. Caps are sized so that the
whole run, Triton autotuning and torch.compile included, stays within TOTAL_S on an H100/H200.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import device_name, versions

HERE = Path(__file__).resolve().parent
TOTAL_S = 480  # the whole run's budget on the GPU (issue 16: 8 minutes)
# part: (command after `python`, its cap in seconds on the GPU, the --smoke arguments that replace the GPU ones)
PARTS = {
    "tests": (["-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider"], 90, None),
    "losses": (["bench_losses.py", "--B", "128"], 50,
               ["bench_losses.py", "--B", "4", "--K", "64", "--n-local", "2", "--no-compile", "--warmup", "1",
                "--rep", "2"]),
    "koleo": (["bench_koleo.py", "--B", "128", "4096"], 35,
              ["bench_koleo.py", "--B", "8", "--D", "16", "--no-compile", "--warmup", "1", "--rep", "2"]),
    "attention": (["bench_attention.py"], 60,
                  ["bench_attention.py", "--cases", "vit-s-local", "--no-compile", "--warmup", "1", "--rep", "2"]),
    "fused_head": (["bench_fused_head.py"], 40, ["bench_fused_head.py", "--smoke"]),
    "step": (["bench_step.py", "--steps", "8", "--warmup", "3"], 160,
             ["bench_step.py", "--smoke", "--steps", "1", "--warmup", "1", "--impls", "eager_sdpa", "dinotron"]),
    "loader_stall": (["bench_loader_stall.py", "--steps", "8", "--warmup", "3"], 45,
                     ["bench_loader_stall.py", "--smoke", "--steps", "1", "--warmup", "1", "--threads", "2"]),
}
SMOKE_CAP_S = 60  # per part on CPU
# Attention autotunes over up to 32 configs per launch and head dim, one compile each: an even spread of 6 keeps the
# run within TOTAL_S (the environment's DINOTRON_AUTOTUNE_MAX wins; kernels/flash_attention.py).
AUTOTUNE_MAX = 6


def copy_bandwidth(device: torch.device) -> dict:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted), median of 10; CPU: 64 MiB."""
    n = (2**30 if device.type == "cuda" else 2**26) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    seconds = sorted(times[2:])[len(times[2:]) // 2]
    return {"bytes": 2 * src.nbytes, "gbps": round(2 * src.nbytes / seconds / 1e9, 1)}


def run_part(name: str, command: list[str], cap: float, out: Path) -> dict:
    """Runs one part as a child process (its own CUDA context, so a crash or a hang stays in it), results into out."""
    env = {"DINOTRON_AUTOTUNE_MAX": str(AUTOTUNE_MAX), **os.environ, "DINOTRON_RESULTS_DIR": str(out),
           "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    cwd = HERE.parent if name == "tests" else HERE
    try:
        proc = subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=cap)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        if name == "tests" and proc.returncode == 5:  # pytest: no test selected (no GPU test collected)
            status = "ok (no GPU test ran)"
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status = f"over its cap of {cap:.0f} s"
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
    return {"part": name, "status": status, "seconds": round(time.monotonic() - start, 1),
            "command": " ".join(["python", *command]), "tail": tail}


def summary_rows(out: Path) -> list[dict]:
    """The rows worth a line in the summary: every row of ours (those with speedup_vs) and every row with a note."""
    rows = []
    for path in sorted(out.glob("*.json")):
        if path.name == "proof.json":
            continue
        record = json.loads(path.read_text())
        for r in record.get("rows", []):
            if r.get("speedup_vs") or r.get("note") or record["bench"] == "loader_stall":
                rows.append({"bench": record["bench"], "device": record["device"], **r})
    return rows


def write_summary(out: Path, parts: list[dict], device: str, smoke: bool) -> str:
    lines = [f"# dinotron GPU proof: {device}{' (smoke, CPU)' if smoke else ''}", "",
             "| part | status | s |", "| --- | --- | --- |"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} |" for p in parts]
    columns = ["bench", "device", "case", "impl", "ms", "images/s", "peak MiB", "speedup vs", "roofline / stall share",
               "note"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in summary_rows(out):
        speedups = ", ".join(f"{k} {v:.2f}x" for k, v in (r.get("speedup_vs") or {}).items())
        share = r.get("roofline_share", r.get("stall_share"))
        cells = [r["bench"], r["device"], r["case"], r["impl"], r.get("ms"), r.get("images_per_s"),
                 r.get("peak_mib"), speedups, share, r.get("note", "")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON files and summary.md")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: every part's plumbing")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        p.error("no CUDA GPU here: run with --smoke on CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (SMOKE_CAP_S * len(PARTS) if args.smoke else TOTAL_S)
    record = {"bench": "gpu_proof", "device": device_name(device), **versions(), "smoke": args.smoke,
              "bandwidth": copy_bandwidth(device), "parts": []}
    print(f"device copy: {record['bandwidth']['gbps']} GB/s", flush=True)
    for name in args.parts:
        command, cap, smoke_command = PARTS[name]
        if args.smoke:
            command, cap = smoke_command or command, SMOKE_CAP_S
        cap = min(cap, deadline - time.monotonic())
        if cap < 5:
            part = {"part": name, "status": "skipped: the run's time budget is spent", "seconds": 0.0}
        elif name == "tests" and importlib.util.find_spec("pytest") is None:
            part = {"part": name, "status": "skipped: pytest is not installed (README: make gpu-wheels)",
                    "seconds": 0.0}
        else:
            part = run_part(name, command, cap, args.out)
        record["parts"].append(part)
        print(f"{name}: {part['status']} in {part['seconds']} s", flush=True)
        (args.out / "proof.json").write_text(json.dumps(record, indent=2) + "\n")
    print(write_summary(args.out, record["parts"], record["device"], args.smoke))
    failed = [q["part"] for q in record["parts"] if not q["status"].startswith(("ok", "skipped"))]
    if failed:
        print(f"failed: {', '.join(failed)} (their output tails are in {args.out / 'proof.json'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
