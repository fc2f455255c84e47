"""Multi-crop loader throughput: images/s with all crops, DALI (GPU and CPU) vs torchvision.

    python benchmarks/bench_pipeline.py                               # GPU machine: B=256, 16 workers
    python benchmarks/bench_pipeline.py --workers 2 --images 512 --batch-size 32 --batches 8 --rounds 3  # 2 CPU cores

Data: ImageNet-like 500x375 (25% portrait 375x500) JPEGs, quality 90, cut from the real photos that
ship with scikit-image (random crops, scales and flips), written once with `write_shards` (the
`dinotron make-shards` code) into --data-dir. Every row reads the same shards and produces DINOv2's
2x224 + 8x96 crops (flip, colour jitter, grayscale, blur, solarize, normalisation), B images per
batch; `images_per_s` counts source images (each with its 10 crops), `ms` is per batch.

Impls, each at every --workers count (DALI threads / DataLoader worker processes):
- dali_gpu: MultiCropLoader(device="gpu"): nvJPEG/hardware decode, augmentation on the GPU, batches on the GPU.
- dali_cpu: MultiCropLoader(device="cpu"): the same graph on CPU threads.
- torchvision: TorchvisionMultiCropLoader, the project's baseline/fallback (transforms.v2 functional ops,
  DataLoader workers), same order and random parameters as DALI.
- torchvision_wds: the stock baseline: webdataset.WebDataset + shuffle buffer + PIL decode +
  transforms.v2.Compose of DINOv2's DataAugmentationDINO, batched, DataLoader workers.
Timed after --warmup batches (workers started, graphs built), over --batches batches, side by side in one run;
every impl is measured --rounds R times (default 3) round-robin, and each metric's median over the rounds is kept
(for shared machines; every round's numbers are kept in the JSON's round_samples). `cpu_ms_per_image` is the CPU
time (user + system) of the process, its threads and its DataLoader workers over the timed batches, per source
image; `cpu_speedup_vs` is the baseline's cpu_ms_per_image / ours.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import save
from dinotron.pipeline import MultiCropConfig, MultiCropLoader, TorchvisionMultiCropLoader, write_shards
from dinotron.pipeline.dali_loader import dali_available

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina",
          "stereo_motorcycle", "camera", "moon", "brick", "grass", "gravel")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]


def _write_image(job: tuple[int, Path]) -> None:
    from PIL import Image

    i, folder = job
    rng = np.random.default_rng(i)
    name = PHOTOS[i % len(PHOTOS)]
    photo = Image.fromarray(_photo(name))
    w, h = photo.size
    s = rng.uniform(0.5, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    size = (375, 500) if i % 4 == 0 else (500, 375)
    img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    (folder / name).mkdir(exist_ok=True)
    img.save(folder / name / f"{i:07d}.jpg", quality=90)


def make_dataset(data_dir: Path, n: int, shard_size: int) -> str:
    """ImageNet-like shards of n images (one class per source photo) in data_dir (reused when there);
    returns the pattern."""
    shards = data_dir / f"shards-{n}"
    pattern = shards / f"bench-{{000000..{(n - 1) // shard_size:06d}}}.tar"
    if (shards / "manifest.json").exists():
        return str(pattern)
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        sys.exit("bench_pipeline needs scikit-image for its photos: pip install -e '.[bench]'")
    folder = data_dir / f"images-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_image, [(i, folder) for i in range(n)], chunksize=32))
    write_shards(folder, shards, shard_size=shard_size, prefix="bench")
    return str(pattern)


def stock_torchvision_wds(pattern: str, batch_size: int, workers: int, cfg: MultiCropConfig):
    """The straightforward baseline: webdataset stream -> PIL -> transforms.v2 per crop -> batches, view-major."""
    import webdataset as wds
    from torchvision.transforms import v2

    def crop(size, scale, blur_p, solarize_p):
        steps = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_p),
            v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel_size, sigma=cfg.blur_sigma)], p=blur_p),
        ]
        if solarize_p:
            steps.append(v2.RandomSolarize(cfg.solarize_threshold, p=solarize_p))
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
        return v2.Compose(steps)

    views = [crop(cfg.view_size(v), cfg.global_scale if v < cfg.n_global else cfg.local_scale, cfg.blur_p(v),
                  cfg.solarize_p(v)) for v in range(cfg.n_views)]

    def augment(sample):
        image, label = sample
        return [t(image) for t in views], label

    def collate(samples):
        crops = [torch.stack([s[0][v] for s in samples]) for v in range(cfg.n_views)]
        return {"global_crops": torch.cat(crops[:cfg.n_global]), "local_crops": torch.cat(crops[cfg.n_global:]),
                "labels": torch.tensor([s[1] for s in samples])}

    dataset = (wds.WebDataset(pattern, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
               .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map(augment)
               .batched(batch_size, collation_fn=collate))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=2 if workers else None)


def endless(loader):
    """Batches forever (epochs chained)."""
    while True:
        yield from loader


def cpu_seconds() -> float:
    """CPU time (user + system, s) of this process, all its threads (DALI's), its reaped children (os.times: the
    DataLoader workers of finished epochs) and its live descendants (from /proc): the cost of an image whichever
    process spends it."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK")
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(entry)] = int(fields[1])  # ppid
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    family, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - family
        family |= frontier
    return total + sum(stats[pid] for pid in family)


def measure(make, batches: int, warmup: int, batch_size: int, on_gpu: bool) -> dict:
    it = endless(make())
    for _ in range(warmup):
        next(it)
    if on_gpu:
        torch.cuda.synchronize()
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    if on_gpu:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert batch["global_crops"].shape[0] == 2 * batch_size
    del it  # stop this impl's workers before the next one is timed
    return {"images_per_s": batches * batch_size / seconds, "ms": 1e3 * seconds / batches,
            "cpu_ms_per_image": 1e3 * cpu / (batches * batch_size)}


def skipped(impl: str, gpu: bool) -> str | None:
    """Why `impl` cannot run here (None when it can): a DALI loader never stands in for another."""
    if impl.startswith("dali") and not dali_available():
        return "DALI not installed"
    if impl == "dali_gpu" and not gpu:
        return "no CUDA GPU on this machine"
    return None


def main() -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["dali_gpu", "dali_cpu", "torchvision", "torchvision_wds"])
    parser.add_argument("--workers", type=int, nargs="+", default=[16] if gpu else [os.cpu_count() or 1])
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    parser.add_argument("--images", type=int, default=8192 if gpu else 512, help="dataset size")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches (default: one pass over the data, >= 4)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="measure every impl this many times, round-robin; median")
    parser.add_argument("--gpu-batches-factor", type=int, default=4, help="dali_gpu times this many more batches")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent / ".data"))
    args = parser.parse_args()

    pattern = make_dataset(Path(args.data_dir), args.images, args.shard_size)
    cfg = MultiCropConfig()
    batches = args.batches or max(4, args.images // args.batch_size)
    case_of = lambda w: (f"{cfg.n_global}x{cfg.global_size}+{cfg.n_local}x{cfg.local_size} 500x375 JPEG"  # noqa: E731
                         f" B={args.batch_size} workers={w}")
    rows, round_samples = [], {}
    for workers in args.workers:
        makers = {
            "dali_gpu": lambda w=workers: MultiCropLoader(pattern, args.batch_size, device="gpu", augment=cfg,
                                                          num_threads=w),
            "dali_cpu": lambda w=workers: MultiCropLoader(pattern, args.batch_size, device="cpu", augment=cfg,
                                                          num_threads=w),
            "torchvision": lambda w=workers: TorchvisionMultiCropLoader(pattern, args.batch_size, augment=cfg,
                                                                        num_threads=w),
            "torchvision_wds": lambda w=workers: stock_torchvision_wds(pattern, args.batch_size, w, cfg),
        }
        samples = {impl: [] for impl in args.impls}
        for _ in range(args.rounds):  # round-robin, so that load from elsewhere hits every impl alike
            for impl in args.impls:
                if skipped(impl, gpu):
                    continue
                n = batches * (args.gpu_batches_factor if impl == "dali_gpu" else 1)
                samples[impl].append(measure(makers[impl], n, args.warmup, args.batch_size, on_gpu=impl == "dali_gpu"))
                last = samples[impl][-1]
                print(f"{case_of(workers)} {impl}: {last['images_per_s']:.1f} images/s, "
                      f"{last['cpu_ms_per_image']:.1f} CPU-ms/image", flush=True)
        for impl, runs in samples.items():
            row = {"case": case_of(workers), "impl": impl}
            if not runs:
                row["note"] = f"skipped: {skipped(impl, gpu)}"
            else:  # the median of each metric over the rounds
                row.update({k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]})
                row["rounds"] = len(runs)
                round_samples[f"{row['case']} / {impl}"] = runs
            rows.append(row)
    for ours in ("dali_gpu", "dali_cpu"):
        for row in rows:
            if row["impl"] == ours and row.get("images_per_s"):
                base = [r for r in rows if r["case"] == row["case"] and r["impl"].startswith("torchvision")
                        and r.get("images_per_s")]
                if ours == "dali_gpu":
                    base += [r for r in rows if r["case"] == row["case"] and r["impl"] == "dali_cpu"
                             and r.get("images_per_s")]
                row["speedup_vs"] = {r["impl"]: round(row["images_per_s"] / r["images_per_s"], 3) for r in base}
                row["cpu_speedup_vs"] = {r["impl"]: round(r["cpu_ms_per_image"] / row["cpu_ms_per_image"], 3)
                                         for r in base}
    save("pipeline", [r for r in rows if r.get("images_per_s")], "cuda" if gpu else "cpu", metric="images_per_s",
         extra={"images": args.images, "batches": batches, "cpu_count": os.cpu_count(),
                "skipped": [f"{r['impl']}: {r['note']}" for r in rows if r.get("note")],
                "round_samples": round_samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
