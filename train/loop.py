"""The training loop: schedules, mixed precision, EMA teacher, logging, collapse watch, checkpoints,
exact resume, graceful SIGTERM/SIGINT, periodic k-NN evaluation."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from dinotron.train import checkpoint as ckpt
from dinotron.train.config import Config, from_dict, to_dict
from dinotron.train.knn import extract_features, knn_classify
from dinotron.train.masking import BlockMaskGenerator, sample_masks
from dinotron.train.model import DinoV2
from dinotron.train.optim import apply_schedules, build_optimizer, clip_gradients
from dinotron.train.schedules import build_schedules

log = logging.getLogger(__name__)

LOSS_PARTS = ("dino_loss", "koleo_loss", "ibot_loss", "loss")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class TrainingDiverged(RuntimeError):
    pass


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # before NCCL starts, so that its communicators use this GPU
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_loader(loader_cls, *args, **kwargs):
    """loader_cls(*args, **kwargs), where a missing DALI's error names the config key that avoids it."""
    from dinotron.pipeline import DaliNotInstalledError

    try:
        return loader_cls(*args, **kwargs)
    except DaliNotInstalledError as e:
        raise DaliNotInstalledError("data.loader=dali needs NVIDIA DALI, which is not installed: "
                                    "pip install nvidia-dali-cuda130, or set data.loader=torchvision") from e


def build_train_loader(cfg: Config, rank: int, world: int):
    """The multi-crop loader data.loader names, never another: MultiCropLoader ("dali", on data.device; raises
    DaliNotInstalledError where DALI is missing) or TorchvisionMultiCropLoader ("torchvision"). Logs its backend."""
    from dinotron.pipeline import MultiCropLoader, TorchvisionMultiCropLoader

    if not cfg.data.train_shards:
        raise ValueError("data.train_shards is empty: give shard paths or brace patterns")
    loader_cls = MultiCropLoader if cfg.data.loader == "dali" else TorchvisionMultiCropLoader
    loader = _build_loader(
        loader_cls,
        cfg.data.train_shards,
        cfg.data.batch_size_per_gpu,
        device=cfg.data.device,
        augment=cfg.data.augment,
        seed=cfg.train.seed,
        shard_id=rank,
        num_shards=world,
        num_threads=cfg.data.num_threads,
    )
    log.info(f"train loader: {loader.backend} ({type(loader).__name__}, {len(loader)} batches per epoch per rank)")
    return loader


def build_eval_loader(cfg: Config, shards: list[str], rank: int, world: int):
    """EvalLoader (DALI) or TorchvisionEvalLoader, the same backend as the train loader's (data.loader)."""
    from dinotron.pipeline import EvalLoader, TorchvisionEvalLoader

    ev = cfg.evaluation
    return _build_loader(
        EvalLoader if cfg.data.loader == "dali" else TorchvisionEvalLoader,
        shards,
        ev.batch_size,
        image_size=ev.image_size,
        resize_size=ev.resize_size,
        device=cfg.data.device,
        shard_id=rank,
        num_shards=world,
        num_threads=cfg.data.num_threads,
    )


def evaluate_knn(model: DinoV2, cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 of the teacher's cls features: train shards as memory, val as queries."""
    ev = cfg.evaluation
    autocast = _DTYPES[cfg.train.precision] if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    try:
        backbone = model.teacher.backbone
        train_f, train_l = extract_features(backbone, build_eval_loader(cfg, ev.knn_train_shards, rank, world), device,
                                            autocast)
        val_f, val_l = extract_features(backbone, build_eval_loader(cfg, ev.knn_val_shards, rank, world), device,
                                        autocast)
    finally:
        model.train(was_training)
    return knn_classify(train_f, train_l, val_f, val_l, k=ev.k, temperature=ev.temperature)


class CollapseWatch:
    """Warns when the collapse indicators stay bad for `patience` consecutive steps."""

    def __init__(self, patience: int = 50):
        self.patience = patience
        self.bad_steps = 0
        self.warned = False

    def problems(self, m: dict) -> list[str]:
        found = []
        if m["teacher_entropy"] > 0.98:
            found.append(f"teacher targets are near-uniform (entropy {m['teacher_entropy']:.3f} of log K)")
        if m["prototypes_in_use"] < 0.05:
            found.append(f"one prototype dominates ({100 * m['prototypes_in_use']:.1f}% of the possible prototypes "
                         "in use)")
        if m["feature_std"] < 0.05:
            found.append(f"student features have collapsed (normalised std {m['feature_std']:.3f})")
        return found

    def update(self, step: int, m: dict) -> str | None:
        found = self.problems(m)
        self.bad_steps = self.bad_steps + 1 if found else 0
        if not found:
            self.warned = False
        if self.bad_steps >= self.patience and not self.warned:
            self.warned = True
            return (
                f"possible collapse at step {step}: {'; '.join(found)}. Small-batch and single-GPU DINOv2 runs "
                "collapse easily: raise data.batch_size_per_gpu, lower optim.base_lr, check teacher.teacher_temp "
                "(0.04-0.07), or try teacher.centering=sinkhorn_knopp"
            )
        return None


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        self.out_dir = Path(cfg.train.output_dir)
        seed_everything(cfg.train.seed)  # the same initial weights on every rank (and broadcast, to be sure)
        self.model = DinoV2(cfg).to(self.device)
        if dist.is_initialized():
            for t in self.model.state_dict().values():
                dist.broadcast(t, src=0)
        seed_everything(cfg.train.seed + self.rank)
        self.model.train()
        self.optimizer = build_optimizer(self.model.student, cfg.optim)
        self.schedules = build_schedules(cfg, cfg.data.batch_size_per_gpu * self.world)
        self.total_steps = cfg.optim.epochs * cfg.train.epoch_length
        self.end_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.autocast_dtype = _DTYPES[cfg.train.precision] if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        aug = cfg.data.augment
        grid = aug.global_size // self.model.patch_size
        self.mask_generator = BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
        self.mask_rng = random.Random(cfg.train.seed * 1000 + self.rank)
        self.loader = build_train_loader(cfg, self.rank, self.world)
        self.step = 0
        self.collapse = CollapseWatch(cfg.train.collapse_patience)
        self.stop_signal: int | None = None
        if resume:
            self._resume()
        self.is_main = self.rank == 0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics_file = self.out_dir / "metrics.jsonl"
        self.tb = self._tensorboard() if cfg.train.tensorboard and self.is_main else None

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = ckpt.rng_state()
        rngs = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(rngs, {"rng": rng, "mask_rng": self.mask_rng.getstate()})
        else:
            rngs = [{"rng": rng, "mask_rng": self.mask_rng.getstate()}]
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng_per_rank": rngs,
            "config": to_dict(self.cfg),
        }

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out_dir)
        if path is None:
            log.info(f"--resume: no checkpoint in {self.out_dir}, starting from scratch")
            return
        state = ckpt.load_checkpoint(path)
        saved = from_dict(state["config"])
        if to_dict(saved)["model"] != to_dict(self.cfg)["model"]:
            raise ValueError(f"{path} was trained with a different model config: {to_dict(saved)['model']}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        if len(state["rng_per_rank"]) != self.world:
            raise ValueError(f"{path} was saved by {len(state['rng_per_rank'])} ranks, resuming on {self.world}")
        mine = state["rng_per_rank"][self.rank]
        ckpt.set_rng_state(mine["rng"])
        self.mask_rng.setstate(mine["mask_rng"])
        self.step = state["step"]
        log.info(f"resumed from {path} at step {self.step}")

    def save(self) -> Path | None:
        state = self.state_dict()  # every rank takes part in gathering RNG states
        if not self.is_main:
            return None
        return ckpt.save_checkpoint(self.out_dir, self.step, state, keep_last=self.cfg.train.keep_last)

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        sched = self.schedules.at(self.step)
        apply_schedules(self.optimizer, sched["lr"], sched["last_layer_lr"], sched["wd"])
        global_crops = batch["global_crops"].to(self.device, non_blocking=True)
        local = batch.get("local_crops")
        local_crops = local.to(self.device, non_blocking=True) if local is not None else None
        masks = sample_masks(
            global_crops.shape[0],
            self.mask_generator,
            self.mask_rng,
            cfg.ibot.mask_sample_probability,
            cfg.ibot.mask_ratio_min_max,
        ).to(self.device, non_blocking=True)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            out = self.model(global_crops, local_crops, masks, sched["teacher_temp"])
        values = {k: float(v.detach()) for k, v in out.items()}
        bad = [f"{part} = {values[part]}" for part in LOSS_PARTS if not math.isfinite(values[part])]
        if self._any_rank(bool(bad)):  # every rank stops at the same step, none is left in a collective
            raise TrainingDiverged(
                f"non-finite {', '.join(bad) or 'loss on another rank'} at step {self.step}; stopping. The last good "
                f"checkpoint in {self.out_dir} is intact (try a lower optim.base_lr or train.precision=fp32)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        if self.world > 1:
            self._all_reduce_gradients()
        self.scaler.unscale_(self.optimizer)
        norms = clip_gradients(self.model.student, cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.update_teacher(sched["momentum"])
        self.step += 1
        values.update({f"grad_norm_{k}": float(v) for k, v in norms.items()})
        values.update(sched)
        return values

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is True on any rank (a collective: every rank must call it)."""
        if self.world == 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def _all_reduce_gradients(self) -> None:
        grads = [p.grad for p in self.model.student.parameters() if p.grad is not None]
        handles = [dist.all_reduce(g, async_op=True) for g in grads]
        for h in handles:
            h.wait()
        torch._foreach_div_(grads, self.world)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until end_step or a stop signal; returns the last logged metrics (and k-NN)."""
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.end_step, initial=self.step, disable=not (self.is_main and cfg.train.progress),
                   dynamic_ncols=True)
        images = cfg.data.batch_size_per_gpu * self.world
        last: dict = {}
        stopping = False
        try:
            while self.step < self.end_step and not stopping:
                tic = time.perf_counter()
                for batch in self.loader:
                    last = {"step": self.step + 1, **self.train_step(batch)}
                    last["images_per_s"] = images / (time.perf_counter() - tic)
                    if self.device.type == "cuda":
                        last["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self._log(last, bar)
                    # A signal may reach the ranks at different steps: they stop together after this one.
                    stopping = self._any_rank(self.stop_signal is not None)
                    if self.step % cfg.train.checkpoint_every == 0 or self.step == self.end_step or stopping:
                        self.save()
                    if self._knn_due():
                        last.update(self._knn())
                    if self.step >= self.end_step or stopping:
                        break
                    tic = time.perf_counter()
                else:
                    self.loader.set_epoch(self.loader.state_dict()["epoch"] + 1)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.tb is not None:
                self.tb.close()
        if stopping:  # by a signal, here or on another rank
            log.info(f"stopped by signal {self.stop_signal or 'on another rank'} after step {self.step}; "
                     "checkpoint saved")
        elif cfg.evaluation.knn_val_shards and not self._knn_due():
            last.update(self._knn())
        return last

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _knn_due(self) -> bool:
        period = self.cfg.evaluation.period_steps
        return bool(self.cfg.evaluation.knn_val_shards) and period > 0 and self.step % period == 0

    def _knn(self) -> dict:
        result = evaluate_knn(self.model, self.cfg, self.device, self.rank, self.world)
        record = {"step": self.step, **{f"knn_{k}": v for k, v in result.items()}}
        if self.is_main:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info(f"step {self.step}: k-NN " + ", ".join(f"{k} {v:.2f}%" for k, v in result.items()))
        return {f"knn_{k}": v for k, v in result.items()}

    def _log(self, m: dict, bar: tqdm) -> None:
        bar.update(1)
        warning = self.collapse.update(self.step, m)
        if warning:
            log.warning(warning)
        if not self.is_main or self.step % self.cfg.train.log_every:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step":
                    self.tb.add_scalar(k, v, self.step)
        bar.set_postfix(
            loss=f"{m['loss']:.3f}",
            dino=f"{m['dino_loss']:.3f}",
            ibot=f"{m['ibot_loss']:.3f}",
            koleo=f"{m['koleo_loss']:.3f}",
            lr=f"{m['lr']:.2e}",
            wd=f"{m['wd']:.3f}",
            mom=f"{m['momentum']:.4f}",
            t_temp=f"{m['teacher_temp']:.3f}",
            img_s=f"{m['images_per_s']:.0f}",
            refresh=False,
        )

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(str(self.out_dir / "tensorboard"))
