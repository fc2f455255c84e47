"""Training step time and peak memory per rank for each train.parallel mode and rank count.

    python benchmarks/bench_scaling.py                       # CPU: gloo ranks 1/2/4, the demo model
    python benchmarks/bench_scaling.py --config configs/vits14_imagenet.yaml --worlds 1 --modes none fsdp2 ddp \
        --global-batch 128                                   # one GPU (NCCL): ViT-S/14 at its real sizes

Every configuration runs the real trainer (`Trainer.train_step`: forward, backward, gradient reduction,
clipping, AdamW, EMA) in `world` processes on one machine, on random crops held in memory (no data
loading), with the same global batch split over the ranks. Rows: the median step time of rank 0
(`ms`) after warm-up, images/s of the whole job, and the largest peak memory over the ranks: on CUDA
`torch.cuda.max_memory_allocated` (`peak_mib`), on CPU the process's peak resident set
(`peak_rss_mib`, which includes the Python interpreter and torch, ~0.5 GiB). On a CPU the ranks share
its cores, so more ranks do not run faster: these figures show what each mode costs on top of one
process, not GPU scaling. `none` needs one rank; `ddp` and `fsdp2` run on 1 rank too (torch.distributed
with a world of 1), which isolates their bookkeeping.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from common import save
from dinotron.train import loop
from dinotron.train.config import load_config


class RandomCrops:
    """`batches` fixed batches of random crops at the config's sizes, cycled; the loader state protocol."""

    def __init__(self, cfg, batch_size: int, batches: int = 2):
        aug, g = cfg.data.augment, torch.Generator().manual_seed(0)
        self.data = [{
            "global_crops": torch.randn(aug.n_global * batch_size, 3, aug.global_size, aug.global_size, generator=g),
            "local_crops": torch.randn(aug.n_local * batch_size, 3, aug.local_size, aug.local_size, generator=g),
            "labels": None,
        } for _ in range(batches)]
        self.epoch, self.position = 0, 0

    def __len__(self):
        return len(self.data)

    def set_epoch(self, epoch):
        self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def __iter__(self):
        while self.position < len(self.data):
            self.position += 1
            yield self.data[self.position - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, args, mode, results):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if mode == "none":
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            del os.environ[key]
    torch.set_num_threads(max(1, args.threads // world))
    batch = args.global_batch // world
    cfg = load_config(args.config, [f"train.parallel={mode}", f"data.batch_size_per_gpu={batch}",
                                    "data.train_shards=[memory]", f"train.output_dir={args.out}/{mode}-{world}",
                                    "train.progress=false", *args.overrides])
    loop.build_train_loader = lambda cfg, r, w: RandomCrops(cfg, batch)
    trainer = loop.Trainer(cfg, overwrite=True)
    batches = iter(trainer.micro_batch_groups())
    times = []
    for i in range(args.warmup + args.steps):
        group = next(batches)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        trainer.train_step(*group)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(1e3 * (time.perf_counter() - tic))
    peak = (torch.cuda.max_memory_allocated() if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    results[rank] = {"ms": statistics.median(times), "peak": peak, "cuda": trainer.device.type == "cuda"}
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank closes its connections while another still uses them
        torch.distributed.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--modes", nargs="+", default=["none", "ddp", "fsdp2"], choices=["none", "ddp", "fsdp2"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--out", default="/tmp/dinotron-bench-scaling", help="the runs' output folders")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()

    rows = []
    for world in args.worlds:
        for mode in args.modes:
            if mode == "none" and world > 1:
                continue
            results = mp.Manager().dict()
            mp.spawn(_rank, args=(world, _free_port(), args, mode, results), nprocs=world, join=True)
            ranks = [results[r] for r in range(world)]
            key = "peak_mib" if ranks[0]["cuda"] else "peak_rss_mib"
            rows.append({"case": f"{os.path.basename(args.config)} global batch {args.global_batch}",
                         "impl": f"{mode} x{world}", "ms": round(ranks[0]["ms"], 2),
                         "images_per_s": round(args.global_batch * 1e3 / ranks[0]["ms"], 1),
                         key: round(max(r["peak"] for r in ranks), 1)})
    save("scaling", rows, "cuda" if torch.cuda.is_available() else "cpu",
         extra={"steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                "note": "CPU rows: gloo ranks sharing the machine's cores; not evidence of GPU scaling"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
