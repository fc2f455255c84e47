"""One full DINOv2 training step, as the trainer runs it, against eager PyTorch and torch.compile.

    python benchmarks/bench_step.py                  # GPU: ViT-S/14 B=128 and ViT-L/14 B=32, rows (a)-(d)
    python benchmarks/bench_step.py --models vits14 --steps 5
    python benchmarks/bench_step.py --smoke          # CPU: the tests' tiny ViT, every row, a few steps

A step is dinotron.train.loop.Trainer.train_step on one batch: 2 x 224 global + 8 x 98 local crops per image,
K=65,536 prototypes (DINO head shared with iBOT, as dinov2's ViT-S/L configs), iBOT masks, DINO + iBOT + KoLeo,
AdamW with dinov2's parameter groups, gradient clipping, EMA teacher update, bf16 autocast with its loss scaler.
The images are synthetic uint8 crops made once on the device and normalised in each step, as the loader's output
would be, so no data loading is timed (benchmarks/bench_loader_stall.py times that). Rows:

- `eager_sdpa` (a): timm's ViT with its torch SDPA attention, the heads' logits and the eager reference losses
  (DINOTRON_BACKEND=eager, model.fused_head=false: kernels/reference.py, dinov2's formulas written plainly),
  separate global and local forwards, no compile: dinov2's recipe as plain PyTorch;
- `eager_compile` (b): (a) with the backbones under torch.compile (model.compile=true);
- `dinotron` (c): the trainer's defaults on CUDA (Triton loss kernels, fused head + loss);
- `dinotron_all` (d): every option on: Triton attention, global and local crops packed into one varlen pass,
  torch.compile, fused head + loss.

Each row: ms per step (CUDA events over --steps steps after --warmup untimed ones, which compile), images/s,
peak_mib (torch.cuda.max_memory_allocated over the timed steps: the whole process, weights and optimiser state
included), and split_ms: one more step under torch.profiler, its device time (CPU: its CPU time) per part of the
step, from the trainer's profiler scopes (teacher, backbone, heads, losses, optimizer, ema; a backward op counts to
the scope of the forward op it differentiates, as `<scope>_bwd`; "other" the rest).
Anchors measured on an H100 (torch 2.11), issue 16: (a) 199 ms = 645 images/s at 37.7 GiB for ViT-S/14 B=128,
(b) 135 ms = 949 images/s; ViT-L/14 B=32 (a) 120 images/s at 37.2 GiB. Targets: (c) or (d) >= 2.0x (a) and
>= 1.37x (b) in images/s for ViT-S/14 with peak memory <= half of (a); ViT-L/14 >= 2.0x (a).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from common import add_speedups, save

# the tests' tiny ViT, for --smoke
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MODELS = {  # name: (timm architecture, images per step)
    "vits14": ("vit_small_patch14_dinov2", 128),
    "vitl14": ("vit_large_patch14_dinov2", 32),
}
IMPLS = {  # name: (DINOTRON_BACKEND, config overrides)
    "eager_sdpa": ("eager", ["model.attention=timm", "model.pack_crops=false", "model.compile=false",
                             "model.fused_head=false"]),
    "eager_compile": ("eager", ["model.attention=timm", "model.pack_crops=false", "model.compile=true",
                                "model.fused_head=false"]),
    "dinotron": ("auto", []),
    "dinotron_all": ("auto", ["model.attention=dinotron", "model.pack_crops=true", "model.compile=true",
                              "model.fused_head=true"]),
}
SCOPES = ("teacher", "backbone", "heads", "losses", "backward", "optimizer", "ema")
LOCAL_SIZE = 98  # dinov2's local crop side for patch 14 (7 x 7 patches)


class SyntheticCrops:
    """Random uint8 crops made once on `device`; each batch() normalises them as the loader's output would be.
    Iterating gives batches forever (the loader protocol, for Trainer(loader=...))."""

    def __init__(self, B: int, n_global: int, global_size: int, n_local: int, local_size: int, mean, std,
                 device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.global_u8 = torch.randint(0, 256, (n_global * B, 3, global_size, global_size), dtype=torch.uint8,
                                       generator=g).to(device)
        self.local_u8 = torch.randint(0, 256, (n_local * B, 3, local_size, local_size), dtype=torch.uint8,
                                      generator=g).to(device)
        self.shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.scale = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def batch(self) -> dict:
        return {"global_crops": (self.global_u8.float() - self.shift) * self.scale,
                "local_crops": (self.local_u8.float() - self.shift) * self.scale}

    def __iter__(self):
        while True:
            yield self.batch()

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"epoch": 0, "position": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def step_config(model: str, smoke: bool, overrides: list[str], out_dir: str):
    from dinotron.train.config import load_config

    if smoke:
        from helpers import TINY

        base = TINY + ["data.batch_size_per_gpu=4"]
    else:
        arch, B = MODELS[model]
        base = [f"model.arch={arch}", f"data.batch_size_per_gpu={B}", "model.img_size=224",
                "data.augment.global_size=224", f"data.augment.local_size={LOCAL_SIZE}", "data.augment.n_local=8"]
    return load_config(None, base + [
        f"train.output_dir={out_dir}", "train.parallel=none", "train.progress=false", "train.precision=bf16",
        "optim.epochs=10", "optim.warmup_epochs=1", "train.epoch_length=100", *overrides,
    ])


def step_split(prof, cuda: bool) -> dict[str, float]:
    """Milliseconds of one profiled step per trainer scope: each op's self device time (CPU: self CPU time) goes to
    the outermost dinotron/<scope> around it; a backward op's (under autograd's evaluate_function) to the scope of
    the forward op with its sequence number, as <scope>_bwd; the rest to "other"."""
    events = prof.events()

    def ancestors(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    def scope(e) -> str | None:
        names = [a.name[len("dinotron/"):] for a in ancestors(e) if a.name.startswith("dinotron/")]
        return names[-1] if names else None

    forward_scope = {}
    for e in events:
        if e.sequence_nr >= 0 and not any(a.name.startswith("autograd::engine") for a in ancestors(e)):
            s = scope(e)
            if s is not None:
                forward_scope.setdefault(e.sequence_nr, s)
    split: dict[str, float] = {}
    for e in events:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        part = scope(e)
        engine = next((a for a in ancestors(e) if a.name.startswith("autograd::engine::evaluate_function")), None)
        if engine is not None and engine.sequence_nr in forward_scope:
            part = forward_scope[engine.sequence_nr] + "_bwd"
        part = part if part is not None else "other"
        split[part] = split.get(part, 0.0) + us / 1e3
    return {k: round(v, 3) for k, v in sorted(split.items())}


@contextmanager
def trainer_for(model: str, impl: str, smoke: bool, device: torch.device, loader=None):
    """A Trainer of `impl` (its backend and overrides) for `model` in a temporary output folder, fed by `loader` or
    by SyntheticCrops; yields (trainer, loader). Freed on exit, so that rows do not share memory or compiled code."""
    from dinotron.train.loop import Trainer

    backend, overrides = IMPLS[impl]
    os.environ["DINOTRON_BACKEND"] = backend
    torch._dynamo.reset()
    trainer = None
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = step_config(model, smoke, overrides, out_dir)
            aug = cfg.data.augment
            loader = loader or SyntheticCrops(cfg.data.batch_size_per_gpu, aug.n_global, aug.global_size,
                                              aug.n_local, aug.local_size, aug.mean, aug.std, device)
            trainer = Trainer(cfg, loader=loader)
            yield trainer, loader
    finally:
        os.environ.pop("DINOTRON_BACKEND", None)
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_steps(trainer, batches, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """(ms per step, peak MiB on CUDA) of `steps` train steps on batches from the iterator `batches`, after `warmup`
    untimed ones. On CUDA, events span the device timeline: time the device waits for a late batch counts."""
    for _ in range(warmup):
        trainer.train_step(next(batches))
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(batches))
        return (time.perf_counter() - t0) * 1e3 / steps, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        trainer.train_step(next(batches))
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, torch.cuda.max_memory_allocated() / 2**20


def measure_step(case: str, impl: str, model: str, smoke: bool, steps: int, warmup: int,
                 device: torch.device) -> dict:
    """One row: `impl` trains `steps` timed steps after `warmup` untimed ones, then one profiled step."""
    row = {"case": case, "impl": impl}
    cuda = device.type == "cuda"
    try:
        with trainer_for(model, impl, smoke, device) as (trainer, data):
            batches = iter(data)
            ms, peak = time_steps(trainer, batches, steps, warmup, device)
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda
                                                                  else [])
            with torch.profiler.profile(activities=activities) as prof:
                trainer.train_step(next(batches))
                if cuda:
                    torch.cuda.synchronize()
            row.update(ms=round(ms, 3), images_per_s=round(trainer.cfg.data.batch_size_per_gpu * 1e3 / ms, 1))
            if peak is not None:
                row["peak_mib"] = round(peak, 1)
            row["split_ms"] = step_split(prof, cuda)
    except (RuntimeError, ValueError) as e:  # out of memory, a compile failure: the row says so, the rest runs
        row["note"] = f"does not run: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return row


def step_device(parser: argparse.ArgumentParser, smoke: bool) -> torch.device:
    """CUDA where there is a GPU; CPU only for --smoke (a full-size step on CPU would take hours)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        parser.error("the full-size step needs a CUDA GPU; on CPU run --smoke")
    return device


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile, Triton autotuning)")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny ViT at 4 images (CPU: a plumbing check)")
    args = p.parse_args(argv)
    device = step_device(p, args.smoke)
    rows = []
    for model in ([args.models[0]] if args.smoke else args.models):
        arch, B = MODELS[model]
        case = "tiny ViT B=4 2x32+2x16 K=64" if args.smoke else f"{model} B={B} 2x224+8x{LOCAL_SIZE} K=65536"
        for impl in args.impls:
            rows.append(measure_step(case, impl, model, args.smoke, args.steps, args.warmup, device))
            print({k: v for k, v in rows[-1].items() if k != "split_ms"}, flush=True)
    for ours in ("dinotron", "dinotron_all"):
        add_speedups(rows, ours)
    return save("step", rows, device)


if __name__ == "__main__":
    main()
