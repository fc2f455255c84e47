"""How long the training step waits for data: the trainer fed by MultiCropLoader(device="gpu") from JPEG shards vs
the same trainer on synthetic crops already on the GPU, side by side in one run.

    python benchmarks/bench_loader_stall.py              # GPU: ViT-S/14 B=128 (dinotron's defaults), DALI on the GPU
    python benchmarks/bench_loader_stall.py --smoke      # CPU: the tests' tiny ViT, DALI's CPU graph, a few steps

The shards are made on the spot: --images 500x375 JPEGs (quality 90) of smooth random colour fields with noise,
written by dinotron.pipeline.write_shards into a temporary folder. Rows: `synthetic` (bench_step's SyntheticCrops)
and `dali_<device>` (the loader, prefetching as in training), each timed over --steps steps after --warmup; the
loader row's `stall_share` is (its ms - synthetic's ms) / its ms: the share of the step the device spends waiting
for data, floored at 0 (target on the GPU: <= 0.02). A missing DALI gives a row saying so, not a crash.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench_step import MODELS, step_device, time_steps, trainer_for
from common import save


def write_jpeg_shards(folder: Path, n: int, seed: int = 0) -> str:
    """n 500x375 JPEGs (one class per 100 images) in folder/images, sharded into folder/shards; returns the
    pattern."""
    from PIL import Image

    from dinotron.pipeline import write_shards

    rng = np.random.default_rng(seed)
    images = folder / "images"
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # a smooth field, as photos compress
        img = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        (images / f"c{i // 100}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(images / f"c{i // 100}" / f"{i:06d}.jpg", quality=90)
    write_shards(images, folder / "shards", shard_size=128, prefix="stall", progress=False)
    return str(folder / "shards" / f"stall-{{000000..{(n - 1) // 128:06d}}}.tar")


def endless(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="vits14")
    p.add_argument("--images", type=int, default=None, help="dataset size (default: 2048 GPU, 48 smoke)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=8, help="DALI CPU threads")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny ViT and DALI's CPU graph")
    args = p.parse_args(argv)
    device = step_device(p, args.smoke)
    dali_device = "gpu" if device.type == "cuda" else "cpu"
    case = "tiny ViT B=4" if args.smoke else f"{args.model} B={MODELS[args.model][1]}"
    rows = []
    with trainer_for(args.model, "dinotron", args.smoke, device) as (trainer, synthetic):
        ms, _ = time_steps(trainer, iter(synthetic), args.steps, args.warmup, device)
        rows.append({"case": case, "impl": "synthetic", "ms": round(ms, 3)})
    row = {"case": case, "impl": f"dali_{dali_device}"}
    rows.append(row)
    from dinotron.pipeline.dali_loader import dali_available

    if not dali_available():
        row["note"] = "skipped: NVIDIA DALI is not installed (pip install 'dinotron[train]'; on the GPU machine see " \
                      "README 'Benchmarks on a GPU')"
        return save("loader_stall", rows, device)
    from dinotron.pipeline import MultiCropLoader

    with tempfile.TemporaryDirectory() as tmp:
        n = args.images or (48 if args.smoke else 2048)
        pattern = write_jpeg_shards(Path(tmp), n)
        with trainer_for(args.model, "dinotron", args.smoke, device) as (trainer, _):
            cfg = trainer.cfg
            loader = MultiCropLoader(pattern, cfg.data.batch_size_per_gpu, device=dali_device,
                                     augment=cfg.data.augment, num_threads=args.threads, seed=cfg.train.seed)
            ms, _ = time_steps(trainer, endless(loader), args.steps, args.warmup, device)
    row["ms"] = round(ms, 3)
    row["stall_share"] = round(max(0.0, (ms - rows[0]["ms"]) / ms), 4)
    return save("loader_stall", rows, device)


if __name__ == "__main__":
    main()
