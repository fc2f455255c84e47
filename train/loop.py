"""The training loop: schedules, mixed precision, EMA teacher, logging, collapse watch, checkpoints,
exact resume, graceful SIGTERM/SIGINT, periodic k-NN evaluation."""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import signal
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.profiler import record_function
from tqdm import tqdm

from dinotron.pipeline.multires import MultiResolutionLoader, check_patch_multiples
from dinotron.train import checkpoint as ckpt
from dinotron.train.config import Config, ConfigError, from_dict, to_dict
from dinotron.train.errors import USER_ERRORS, ConfigChanged, DataError, OutputDirInUse
from dinotron.train.knn import extract_features, knn_classify
from dinotron.train.masking import BlockMaskGenerator, masked_patch_indices, sample_masks_for_rank
from dinotron.train.model import DinoV2, fp16_in_graph, host_to_device
from dinotron.train.optim import apply_schedules, build_optimizer, clip_gradients
from dinotron.train.parallel import parallelize, setup_distributed
from dinotron.train.schedules import build_schedules

log = logging.getLogger(__name__)

LOSS_PARTS = ("dino_loss", "koleo_loss", "ibot_loss", "loss")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_grad_scaler(autocast_dtype: torch.dtype | None, parallel: str, device_type: str = "cuda"):
    """The trainer's loss scaler: enabled whenever the step computes in fp16 (model.fp16_in_graph: precision fp16,
    and bf16 for the heads' fp16 prototype layer), else a no-op; ShardedGradScaler under FSDP2, which agrees on
    inf / NaN gradients across ranks. Enabled, it starts at 2^16, and its step reads the inf flag on the host (one
    sync per step) unless the optimiser is fused (AdamW on CUDA without FSDP2)."""
    scaler = ShardedGradScaler if parallel == "fsdp2" else torch.amp.GradScaler
    return scaler(device_type, enabled=fp16_in_graph(autocast_dtype))


def gram_load_due(g, step: int) -> bool:
    """Whether the Gram teacher is (re)loaded from the EMA teacher before `step` (gram = cfg.gram): at
    it_load_ema_teacher, then with rep_update before every step s >= it_first_update with s % update_frequency == 0
    (dinov3's train loop updates after iteration it where (it + 1) does), the first max_updates of those. A function
    of the step alone, so a resumed run reloads where the uninterrupted one would (the snapshot is checkpointed)."""
    if step == g.it_load_ema_teacher:
        return True
    if not g.rep_update or step < max(g.it_first_update, 1) or step % g.update_frequency:
        return False
    first = -(-max(g.it_first_update, 1) // g.update_frequency) * g.update_frequency  # first multiple >= it_first
    return g.max_updates is None or (step - first) // g.update_frequency < g.max_updates


class TrainingDiverged(RuntimeError):
    pass


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
    DaliNotInstalledError where DALI is missing) or TorchvisionMultiCropLoader ("torchvision"); with
    data.resolution_schedule, a MultiResolutionLoader of one such loader per (global, local) crop-size pair, the
    micro-batches of a step (train.grad_accum_steps) of one pair. Logs its backend."""
    from dinotron.pipeline import MultiCropLoader, TorchvisionMultiCropLoader

    if not cfg.data.train_shards:
        raise ValueError("data.train_shards is empty: give shard paths or brace patterns")
    loader_cls = MultiCropLoader if cfg.data.loader == "dali" else TorchvisionMultiCropLoader
    make_loader = partial(  # of keyword arguments augment and seed
        _build_loader,
        loader_cls,
        cfg.data.train_shards,
        cfg.data.batch_size_per_gpu,
        device=cfg.data.device,
        shard_id=rank,
        num_shards=world,
        num_threads=cfg.data.num_threads,
        on_error=cfg.data.on_error,
        max_bad_fraction=cfg.data.max_bad_fraction,
        max_image_pixels=cfg.data.max_image_pixels,
        read_order=cfg.data.read_order,
        shuffle_buffer=cfg.data.shuffle_buffer,
        read_ahead=cfg.data.read_ahead,
        read_threads=cfg.data.read_threads,
    )
    if cfg.data.resolution_schedule:
        loader = MultiResolutionLoader(cfg.data.resolution_schedule, make_loader, cfg.data.augment, seed=cfg.train.seed,
                                       micro_batches=cfg.train.grad_accum_steps)
    else:
        loader = make_loader(augment=cfg.data.augment, seed=cfg.train.seed)
    log.info(f"train loader: {loader.backend} ({type(loader).__name__}, {len(loader)} batches per epoch per rank)")
    return loader


def check_knn_shards(key: str, shards: list[str]) -> None:
    """DataError, naming `key`, unless `shards` exist, can be read and carry labels (k-NN needs them): reads one
    sample count per shard and the first shard's sample list (`SampleTable.from_shards`), no image."""
    from dinotron.pipeline.shards import SampleTable

    try:
        table = SampleTable.from_shards(shards)
    except (OSError, ValueError) as e:  # missing, not a tar, empty (ShardError is a ValueError)
        raise DataError(f"{key}: {e}") from e
    if not table.labelled:
        raise DataError(f"{key}: the shards hold no labels (.cls), which k-NN needs: shard a folder of class "
                        "sub-folders (dinotron make-shards)")


def check_data_device(cfg: Config) -> None:
    """DataError where data.device=gpu asks DALI for a GPU that torch does not see."""
    if cfg.data.device == "gpu" and not torch.cuda.is_available():
        raise DataError("data.device=gpu needs a CUDA GPU and torch sees none: set data.device=cpu (or auto)")


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
    """Weighted k-NN top-1/top-5 of model.evaluated's cls features (the teacher; the student when distilling): train
    shards as memory, val as queries."""
    ev = cfg.evaluation
    autocast = _DTYPES[cfg.train.precision] if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    try:
        backbone = model.evaluated.backbone
        train_f, train_l = extract_features(backbone, build_eval_loader(cfg, ev.knn_train_shards, rank, world), device,
                                            autocast, image_size=ev.image_size)
        val_f, val_l = extract_features(backbone, build_eval_loader(cfg, ev.knn_val_shards, rank, world), device,
                                        autocast, image_size=ev.image_size)
    finally:
        model.train(was_training)
    return knn_classify(train_f, train_l, val_f, val_l, k=ev.k, temperature=ev.temperature)


def _stamp(device: torch.device) -> torch.cuda.Event | float:
    """Now, in the device's stream order: a timing CUDA event recorded on the current stream; on CPU, where every
    op has finished when it returns, the host's clock."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    """Seconds between two _stamp()s, the later one complete."""
    return start.elapsed_time(end) / 1e3 if isinstance(start, torch.cuda.Event) else end - start


class StepMetrics:
    """One step's metrics on their way to the host, read a step later, so that the host never waits for the step
    it has just queued.

    values (fp32, on the device): this rank's `parts`, their means over ranks, then the gradient norms of
    `norm_names`. They are copied non_blocking into pinned host memory and an event is recorded after the copy:
    `read()` waits for that event only, never for the work queued after it. On CPU every op has finished when it
    returns, so the copy is synchronous and the same code runs. The step is timed from `timed_from` (a _stamp) to
    the copy's end.
    """

    def __init__(self, step: int, parts: list[str], norm_names: list[str], sched: dict[str, float],
                 values: torch.Tensor, timed_from: torch.cuda.Event | float):
        self.step, self.parts, self.norm_names, self.sched, self.timed_from = step, parts, norm_names, sched, timed_from
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        self._host.copy_(values, non_blocking=True)
        self.done = _stamp(values.device)

    def read(self) -> tuple[dict[str, float], dict[str, float], dict[str, float], float]:
        """(this rank's parts, their means over ranks, the gradient norms, the step's seconds), once copied."""
        if isinstance(self.done, torch.cuda.Event):
            self.done.synchronize()
        values, n = self._host.tolist(), len(self.parts)
        mine, mean = (dict(zip(self.parts, values[i * n : (i + 1) * n], strict=True)) for i in range(2))
        norms = dict(zip(self.norm_names, values[2 * n :], strict=True))
        return mine, mean, norms, _seconds(self.timed_from, self.done)


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
    """DINOv2 training of `cfg` as this process's rank (torchrun, srun or one process); `fit()` runs it.

    resume: continue from the latest checkpoint in cfg.train.output_dir (from scratch where there is none).
    overwrite: start from scratch, rank 0 first deleting that folder's checkpoints, metrics.jsonl and tensorboard/.
    Neither, where the folder holds checkpoints: OutputDirInUse on every rank, before anything is built.
    allow_config_change: resume even where cfg changes training keys of the checkpoint's config (logged); without
    it ConfigChanged lists them (`checkpoint.config_changes` sorts the keys).
    loader: the batches to train on instead of cfg.data.train_shards' (a dinotron.pipeline loader or anything with
    its protocol: iteration, set_epoch, state_dict, load_state_dict), e.g. synthetic batches in bench_step.

    Profiler scopes (torch.profiler.record_function) name the parts of a step: dinotron/teacher,
    dinotron/backbone, dinotron/heads, dinotron/losses, dinotron/backward, dinotron/optimizer, dinotron/ema.

    Before the model is built, in this order: temporary folders of an interrupted save are removed; a resume's
    config is compared with the checkpoint's; the train loader opens its shards and the k-NN shards are checked
    (DataError, on every rank together).
    """

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False,
                 *, loader=None):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        self.out_dir = Path(cfg.train.output_dir)
        self._claim_output_dir(resume, overwrite)
        resume_from = self._check_resume(allow_config_change) if resume else None
        self.loader = self._open_data() if loader is None else loader
        seed_everything(cfg.train.seed)  # the same initial weights on every rank (and broadcast, to be sure)
        self.model = DinoV2(cfg).to(self.device)
        if dist.is_initialized():
            for t in self.model.state_dict().values():
                dist.broadcast(t, src=0)
        seed_everything(cfg.train.seed + self.rank)
        self.model.train()
        # After the broadcast (whole tensors), before the optimiser (it must see the sharded parameters).
        self.parallel = parallelize(self.model, cfg, self.world, self.device)
        log.info(f"parallel: {self.parallel} over {self.world} rank(s)")
        self.optimizer = build_optimizer(self.model.student, cfg.optim)
        self.schedules = build_schedules(cfg, cfg.data.batch_size_per_gpu * self.world * cfg.train.grad_accum_steps)
        self.total_steps = cfg.optim.epochs * cfg.train.epoch_length
        self.end_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.autocast_dtype = _DTYPES[cfg.train.precision] if self.device.type == "cuda" else None
        self.scaler = build_grad_scaler(self.autocast_dtype, self.parallel)  # loss scaling wherever fp16 runs
        try:  # the schedule's crop sides against the patch size, known from the model
            check_patch_multiples(cfg.data.resolution_schedule, self.model.patch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._mask_generators: dict[tuple[int, int], BlockMaskGenerator] = {}  # by patch grid (_mask_generator)
        self.step = 0
        self._timed_from: torch.cuda.Event | float | None = None  # the next step's time counts from here
        self.collapse = CollapseWatch(cfg.train.collapse_patience)
        self.stop_signal: int | None = None
        if resume_from is not None:
            self._resume(*resume_from)
        self.is_main = self.rank == 0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics_file = self.out_dir / "metrics.jsonl"
        self.tb = self._tensorboard() if cfg.train.tensorboard and self.is_main else None

    def _claim_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuse an output folder holding checkpoints unless resuming; remove the temporary folders of an interrupted
        save; with overwrite, empty it of the last run. Rank 0 looks and deletes; the others learn its verdict
        (all-reduce) and wait for the deletions (barrier), so nothing is written before them."""
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in "
                             f"{self.out_dir}, overwrite deletes it")
        if not (resume or overwrite) and self._any_rank(self.rank == 0 and bool(ckpt.list_checkpoints(self.out_dir))):
            raise OutputDirInUse(f"train.output_dir {self.out_dir} holds checkpoints of an earlier run: pass --resume "
                                 "to continue it, or --overwrite to delete it and start from scratch")
        if self.rank == 0:
            stale = ckpt.remove_stale_temporaries(self.out_dir)
            if stale:
                log.warning(f"removed {len(stale)} temporary folder(s) of an interrupted checkpoint save or deletion "
                            f"from {self.out_dir}: {', '.join(stale)}")
            if overwrite:
                old = ckpt.list_checkpoints(self.out_dir)
                for path in old:
                    ckpt.remove_checkpoint(path)
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
                if old:
                    log.info(f"--overwrite: deleted {len(old)} checkpoints and the metrics of {self.out_dir}")
        if dist.is_initialized():
            dist.barrier()  # no rank reads or writes the folder before rank 0 has cleaned it

    def _open_data(self):
        """The train loader, opened (shards listed and counted) before the model is built, and the k-NN shards
        checked, so that unusable data stops in seconds. DataError (or another of USER_ERRORS) on every rank where
        it arose on any: the others would wait for it in the model's broadcast."""
        cfg, error, loader = self.cfg, None, None
        try:
            check_data_device(cfg)
            if not cfg.data.train_shards:
                raise DataError("data.train_shards is empty: give shard paths or brace patterns, e.g. "
                                "data.train_shards='shards/train-{000000..001281}.tar'")
            ev = cfg.evaluation
            if bool(ev.knn_train_shards) != bool(ev.knn_val_shards):
                raise DataError("k-NN needs both evaluation.knn_train_shards and evaluation.knn_val_shards "
                                "(or neither)")
            for key in ("knn_train_shards", "knn_val_shards"):
                if getattr(ev, key):
                    check_knn_shards(f"evaluation.{key}", getattr(ev, key))
            try:
                loader = build_train_loader(cfg, self.rank, self.world)
            except (OSError, ValueError) as e:  # the loader's checks of its shards and arguments (ShardError too)
                raise DataError(f"data.train_shards: {e}") from e
        except USER_ERRORS as e:
            error = e
        if self._any_rank(error is not None):
            raise error or DataError("the training data could not be opened on another rank (its error says why)")
        return loader

    # ---- state ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint at `step` through DCP: a collective, every rank writes its own shards of the model and
        optimiser state and its RNG states; rank 0 the step, loader position, loss scaler and config."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        meta = {"step": self.step, "world_size": self.world, "scaler": self.scaler.state_dict(),
                "loader": self.loader.state_dict(), "config": to_dict(self.cfg)}
        return ckpt.save_checkpoint(self.out_dir, self.step, sharded={"model": model_state, "optimizer": optim_state},
                                    meta=meta, rank_state={"rng": ckpt.rng_state()}, keep_last=self.cfg.train.keep_last)

    def _check_resume(self, allow_config_change: bool) -> tuple[Path, dict] | None:
        """(the checkpoint --resume continues, its meta), or None where there is none. Rank 0 picks it and every rank
        gets the same. ConfigChanged where cfg changes a key that shapes the saved state, or, unless
        allow_config_change, a training key (both listed in the message); free keys' changes are logged."""
        path = [ckpt.latest_checkpoint(self.out_dir)]
        if dist.is_initialized():  # rank 0 decides: a shared file system may list the folder late elsewhere
            dist.broadcast_object_list(path, src=0)
        path = path[0]
        if path is None:
            log.info(f"--resume: no checkpoint in {self.out_dir}, starting from scratch")
            return None
        meta = ckpt.load_meta(path)
        changes = ckpt.config_changes(to_dict(from_dict(meta["config"])), meta["world_size"], to_dict(self.cfg),
                                      self.world)
        if changes["state"]:
            raise ConfigChanged(f"cannot resume {path}: its weights have other shapes ({'; '.join(changes['state'])});"
                                " set these keys back to the checkpoint's values")
        if changes["training"] and not allow_config_change:
            raise ConfigChanged(f"--resume from {path} would change the run's training: "
                                f"{'; '.join(changes['training'])}. Set these keys back to the checkpoint's values, "
                                "or pass --allow-config-change to continue with the new ones")
        if changes["training"]:
            log.warning(f"--allow-config-change: resuming {path} with {'; '.join(changes['training'])}")
        if changes["free"]:
            log.info(f"resuming {path} with {'; '.join(changes['free'])}")
        return path, meta

    def _resume(self, path: Path, meta: dict) -> None:
        """Restore checkpoint `path` (with its `meta`), written by any number of ranks: model, teacher, optimiser,
        centres, step and loss scaler exactly; the data position re-derived for this world size; the RNG streams
        exactly when the world size is the same, else restarted from (seed, step, rank)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        ckpt.load_sharded(path, {"model": model_state, "optimizer": optim_state})
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        if meta["scaler"]:  # empty when saved without loss scaling
            self.scaler.load_state_dict(meta["scaler"])
        try:
            self.loader.load_state_dict(meta["loader"])
        except ValueError as e:  # the shards hold another number of samples
            raise DataError(f"data.train_shards cannot continue {path}: {e}") from e
        self.step = meta["step"]
        mine = ckpt.load_rank_state(path, self.rank)
        if meta["world_size"] == self.world and mine is not None:
            ckpt.set_rng_state(mine["rng"])
        else:
            seed_everything(self.cfg.train.seed + self.step * 100_003 + self.rank)
            log.warning(f"{path} was saved by {meta['world_size']} ranks, resuming on {self.world}: the data "
                        "position is re-derived and random streams other than the masks restart from (seed, step, "
                        "rank)")
        log.info(f"resumed from {path} at step {self.step}")

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, *micro_batches: dict) -> StepMetrics:
        """One optimiser step over train.grad_accum_steps micro-batches of data.batch_size_per_gpu images each.

        Gradients are reduced across ranks only in the last micro-batch's backward (FSDP2 / DDP); every
        micro-batch's teacher targets use the centres of the step's start, which then take the micro-batches'
        updates weighted by their rows, so the step equals one over the whole batch (softmax centring;
        Sinkhorn-Knopp normalises each micro-batch). Returns the step's StepMetrics: the losses and indicators
        averaged over micro-batches and ranks (one all_reduce, which also carries this rank's stop flag), gradient
        norms and schedule values, still on their way to the host. No host sync: the masks and their indices are
        made on the host and sent non_blocking, and nothing is read back (but for loss scaling, under fp16 and bf16
        precision, whose GradScaler reads its inf flag unless the optimiser is fused).
        """
        cfg = self.cfg
        if len(micro_batches) != cfg.train.grad_accum_steps:
            raise ValueError(f"train_step takes train.grad_accum_steps={cfg.train.grad_accum_steps} micro-batches, "
                             f"got {len(micro_batches)}")
        timed_from = _stamp(self.device) if self._timed_from is None else self._timed_from
        sched = self.schedules.at(self.step)
        apply_schedules(self.optimizer, sched["lr"], sched["last_layer_lr"], sched["wd"])
        if cfg.gram.enabled:
            if gram_load_due(cfg.gram, self.step):
                self.model.refresh_gram_teacher()
            self.model.gram_active = self.step >= cfg.gram.it_load_ema_teacher
        n_global, n_micro = cfg.data.augment.n_global, len(micro_batches)
        B = micro_batches[0]["global_crops"].shape[0] // n_global
        masks = sample_masks_for_rank(  # keyed by (seed, step, global image), so the same for any world size
            self.step,
            cfg.train.seed,
            self._mask_generator(micro_batches),
            n_global,
            B * n_micro,  # micro-batch k holds rows [k * B, (k + 1) * B) of every view
            self.rank,
            self.world,
            cfg.ibot.mask_sample_probability,
            cfg.ibot.mask_ratio_min_max,
        ).unflatten(0, (n_global, n_micro, B)).transpose(0, 1).flatten(1, 2)  # micro-batch k: masks[k], view-major
        mask_indices = [host_to_device(masked_patch_indices(m), self.device) for m in masks]
        masks = host_to_device(masks, self.device)
        centers = [self.model.dino_center, self.model.ibot_center]
        start = [c.clone() for c in centers]
        updated = [torch.zeros_like(c) for c in centers]
        # Each micro-batch's centre update counts by its share of the step's rows: equal for the cls tokens,
        # its masked patches over all ranks for iBOT (a collective only when accumulating).
        cls_share = torch.full((n_micro,), 1.0 / n_micro, device=self.device)
        patches = masks.sum(dim=(1, 2)).float()
        if n_micro > 1 and self.world > 1:
            dist.all_reduce(patches)
        patch_share = torch.where(patches.sum() > 0, patches / patches.sum().clamp_min(1.0), cls_share)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        totals = None
        for k, batch in enumerate(micro_batches):
            global_crops = batch["global_crops"].to(self.device, non_blocking=True)
            local = batch.get("local_crops")
            local_crops = local.to(self.device, non_blocking=True) if local is not None else None
            for c, s in zip(centers, start, strict=True):
                c.copy_(s)
            with self._gradient_sync(k == n_micro - 1), autocast:
                out = self.model(global_crops, local_crops, masks[k], sched["teacher_temp"], mask_indices[k])
                # FSDP2 / DDP average the gradients over ranks in the last micro-batch's backward
                with record_function("dinotron/backward"):
                    self.scaler.scale(out["loss"] / n_micro).backward()
            torch._foreach_add_(updated, [centers[0] * cls_share[k], centers[1] * patch_share[k]])
            parts = torch.stack([v.detach().float() for v in out.values()])
            totals = parts if totals is None else totals + parts
        for c, u in zip(centers, updated, strict=True):
            c.copy_(u)
        local = torch.cat([totals / n_micro, totals.new_full((1,), float(self.stop_signal is not None))])
        mean = local.clone()
        if self.world > 1:  # every rank, every step, whatever the values: Trainer._record reads them
            dist.all_reduce(mean)
            mean /= self.world
        with record_function("dinotron/optimizer"):
            self.scaler.unscale_(self.optimizer)
            norms = clip_gradients(self.model.student, cfg.optim.clip_grad)
            metrics = StepMetrics(self.step, [*out, "stop"], list(norms), sched,
                                  torch.cat([local, mean, torch.stack(list(norms.values()))]), timed_from)
            self._timed_from = metrics.done  # the next step is timed from here, unless fit() pauses first
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with record_function("dinotron/ema"):
            self.model.update_teacher(sched["momentum"])
        self.step += 1
        return metrics

    def _mask_generator(self, micro_batches: tuple[dict, ...]) -> BlockMaskGenerator:
        """dinov2's iBOT mask generator (rectangles of up to half the patches) for the patch grid of the step's global
        crops, made once per grid: data.resolution_schedule changes the crop size between steps, never within one."""
        sizes = {tuple(batch["global_crops"].shape[-2:]) for batch in micro_batches}
        if len(sizes) > 1:
            raise ValueError(f"the micro-batches of a step must have one global crop size, got {sorted(sizes)}")
        h, w = (side // self.model.patch_size for side in sizes.pop())
        if (h, w) not in self._mask_generators:
            self._mask_generators[h, w] = BlockMaskGenerator((h, w), max_num_patches=0.5 * h * w)
        return self._mask_generators[h, w]

    def _gradient_sync(self, enabled: bool):
        """A context in which backward reduces gradients across ranks only if `enabled` (accumulation)."""
        if self.parallel == "fsdp2":
            self.model.student.set_requires_gradient_sync(enabled)
        elif self.parallel == "ddp" and not enabled:
            return self.model.student_forward.no_sync()
        return nullcontext()

    def _record(self, metrics: StepMetrics, bar: tqdm) -> tuple[dict, bool]:
        """Read a step's metrics (waiting for that step only) and log them; returns (the metrics record, whether a
        stop signal reached any rank by that step). Raises TrainingDiverged, naming the step, where a loss was
        non-finite on any rank: every rank reads the same means, so every rank raises at the same point."""
        mine, mean, norms, seconds = metrics.read()
        if not all(math.isfinite(mean[part]) for part in LOSS_PARTS):
            bad = [f"{part} = {mine[part]}" for part in LOSS_PARTS if not math.isfinite(mine[part])]
            raise TrainingDiverged(
                f"non-finite {', '.join(bad) or 'loss on another rank'} at step {metrics.step + 1}; stopping. The last "
                f"good checkpoint in {self.out_dir} is intact (try a lower optim.base_lr or train.precision=fp32)"
            )
        stop = mean.pop("stop") > 0  # (steps are numbered from 1, as in metrics.jsonl and checkpoint names)
        images = self.cfg.data.batch_size_per_gpu * self.world * self.cfg.train.grad_accum_steps
        record = {"step": metrics.step + 1, **mean, **{f"grad_norm_{k}": v for k, v in norms.items()},
                  **metrics.sched, "images_per_s": images / seconds}
        if self.device.type == "cuda":
            record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(record, bar)
        return record, stop

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is True on any rank (a collective: every rank must call it)."""
        if self.world == 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until end_step or a stop signal; returns the last logged metrics (and k-NN).

        The host runs a step ahead of the device: step s's metrics are read (checked, logged) once step s + 1 is
        queued, and at once where the weights leave the loop (checkpoint, k-NN, end). A non-finite loss thus stops
        training at most one step later, naming its step, and never reaches a checkpoint. A stop signal travels in
        the next step's all_reduce: every rank stops after the same step, at most two after the signal, and saves.
        """
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.end_step, initial=self.step, disable=not (self.is_main and cfg.train.progress),
                   dynamic_ncols=True)
        last: dict = {}
        stopping = False
        pending: StepMetrics | None = None
        steps = self.micro_batch_groups()
        self._timed_from = None
        try:
            while self.step < self.end_step and not stopping:
                metrics = self.train_step(*next(steps))
                if pending is not None:
                    last, stopping = self._record(pending, bar)
                pending = metrics
                due = self.step % cfg.train.checkpoint_every == 0 or self.step == self.end_step
                if due or stopping or self._knn_due():  # the weights leave the loop: check their step first
                    last, stop = self._record(pending, bar)
                    stopping, pending, self._timed_from = stopping or stop, None, None
                if due or stopping:
                    self.save()
                if self._knn_due():
                    last.update(self._knn())
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

    def micro_batch_groups(self):
        """Lists of train.grad_accum_steps consecutive batches, on across epoch ends."""
        group = []
        while True:
            for batch in self.loader:
                group.append(batch)
                if len(group) == self.cfg.train.grad_accum_steps:
                    yield group
                    group = []
            self.loader.set_epoch(self.loader.state_dict()["epoch"] + 1)

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
        step = m["step"]
        warning = self.collapse.update(step, m)
        if warning:
            log.warning(warning)
        if not self.is_main or step % self.cfg.train.log_every:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
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
