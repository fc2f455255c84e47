"""Checkpoints through torch.distributed.checkpoint (DCP): a folder per step, every rank writes its own shards.

`checkpoint-<step:08d>/` holds DCP's files for the sharded state (model and optimiser: under FSDP2 each
rank writes its shards, and DCP reshards them on load for any world size), `meta.pt` (rank 0: step,
config, loader position, loss scaler) and `rank-<r>.pt` (each rank's RNG states).

Atomic: everything is written into `.checkpoint-<step>.tmp/` (files fsynced), then, once every rank has
finished (a barrier), rank 0 renames the folder and fsyncs the parent. Only complete folders (the final
name and a `meta.pt`) are listed; a temporary folder left by a crash or a kill is ignored, and removed when the
next run starts in the folder (`remove_stale_temporaries`) and by every save. A checkpoint is pruned (`keep_last`)
only after a newer one is complete.

What `--resume` may change: `config_changes` sorts the differences between a checkpoint's config and the new one
into keys that shape the saved state (`STATE_KEYS`, never), keys that change the run's training (every key not
listed below; refused unless --allow-config-change) and keys free to change (`FREE_KEYS`, logged).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dinotron.train.errors import CheckpointNotFound

_NAME = re.compile(r"^checkpoint-(\d{8})$")
_TMP = re.compile(r"^\.checkpoint-\d{8}(\.discard)?\.tmp$")
META = "meta.pt"


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process whenever torch.distributed is not initialised: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def remove_stale_temporaries(directory: str | Path) -> list[str]:
    """Delete the temporary folders an interrupted save or deletion left in `directory` (`.checkpoint-<step>.tmp`,
    `.checkpoint-<step>.discard.tmp`); returns their names. Call on rank 0 only, while no save runs."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if _TMP.match(p.name))
    for path in stale:
        shutil.rmtree(path)
    return [p.name for p in stale]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | Path, step: int, *, sharded: dict, meta: dict, rank_state: dict,
                    keep_last: int = 3) -> Path:
    """Writes checkpoint `step`; a collective: every rank calls it with its own `sharded` (DCP state: tensors
    and DTensors in nested dicts) and `rank_state`; rank 0's `meta` is kept. Returns the checkpoint's path."""
    directory = Path(directory)
    rank = dist.get_rank() if _distributed() else 0
    path = checkpoint_path(directory, step)
    tmp = directory / f".{path.name}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():  # left by a crash or a kill; never a complete checkpoint
            if _TMP.match(stale.name):
                shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(sharded, checkpoint_id=tmp, no_dist=not _distributed())  # each rank its own shards, fsynced
    _write(tmp / f"rank-{rank}.pt", rank_state)
    _barrier()  # every rank's files are durable
    if rank == 0:
        _write(tmp / META, meta)
        _fsync(tmp)
        if path.exists():  # the same step saved again (a resumed run that stopped where it started)
            remove_checkpoint(path)
        os.replace(tmp, path)
        _fsync(directory)
        if keep_last > 0:
            for old in list_checkpoints(directory)[:-keep_last]:
                remove_checkpoint(old)
    _barrier()  # no rank goes on before the checkpoint exists
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete a complete checkpoint (pruning, a step saved again, --overwrite): first renamed to a temporary
    name (atomic), so that a crash while deleting leaves a folder that is ignored and removed by the next
    save, never a partial "checkpoint"."""
    trash = path.with_name(f".{path.name}.discard.tmp")  # not the new checkpoint's .<name>.tmp
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def load_meta(path: str | Path) -> dict:
    """Rank 0's meta of a complete checkpoint (step, config, loader, scaler)."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointNotFound(f"not a complete checkpoint (no {META}): {path}")
    try:
        return torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def load_rank_state(path: str | Path, rank: int) -> dict | None:
    """What rank `rank` saved (its RNG states), or None when the checkpoint was written by fewer ranks."""
    file = Path(path) / f"rank-{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None


def load_sharded(path: str | Path, state: dict) -> None:
    """Loads the checkpoint's DCP state into `state` in place (resharded to this world size; works without
    torch.distributed too, e.g. for export). Every rank must call it."""
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=Path(path), no_dist=not _distributed())
    except Exception as e:
        raise RuntimeError(f"cannot load the sharded state of checkpoint {path}: {e}") from e


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- what a resume may change -------------------------------------------------------------------
# Dotted config keys; a prefix covers the keys under it. Every key in neither tuple is a training key.

# The shapes of the saved tensors: a checkpoint does not load into a model built with other values.
STATE_KEYS = ("model.arch", "model.img_size", "model.num_registers", "model.layerscale", "model.timm_kwargs",
              "dino.head", "ibot.separate_head", "ibot.head")

# Free to change on resume: where and how often the run writes, logs and evaluates; how the same computation is
# spread and run (engine, numerics, recomputation, the attention kernel); where the shards are, which loader reads
# them and how fast (a resume checks that they hold the same number of samples), and what it does with a bad sample;
# when to stop (the schedules span optim.epochs whatever train.max_steps); and how the global batch is split
# (data.batch_size_per_gpu, train.grad_accum_steps), whereas the global batch itself, GLOBAL_BATCH below, is a
# training key. The sample order (data.read_order, data.shuffle_buffer) and which images count as bad
# (data.max_image_pixels) are training keys.
FREE_KEYS = ("train.output_dir", "train.max_steps", "train.log_every", "train.tensorboard", "train.checkpoint_every",
             "train.keep_last", "train.progress", "train.collapse_patience", "train.parallel", "train.precision",
             "train.activation_checkpointing", "train.grad_accum_steps", "fsdp", "model.compile", "model.attention",
             "data.train_shards", "data.loader", "data.device", "data.num_threads", "data.read_ahead",
             "data.read_threads", "data.on_error", "data.max_bad_fraction", "data.batch_size_per_gpu", "evaluation")

GLOBAL_BATCH = "global batch (data.batch_size_per_gpu x ranks x train.grad_accum_steps)"


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: dict, saved_world: int, current: dict, world: int) -> dict[str, list[str]]:
    """The differences between a checkpoint's config (`saved`, written by `saved_world` ranks) and `current` (to run
    on `world` ranks), both plain dicts (`config.to_dict`) of every key, as "key: old -> new" lines sorted into
    {"state": STATE_KEYS, "training": every other key and GLOBAL_BATCH, "free": FREE_KEYS}."""
    old, new = _leaves(saved), _leaves(current)
    for tree, ranks, leaves in ((saved, saved_world, old), (current, world, new)):
        leaves[GLOBAL_BATCH] = tree["data"]["batch_size_per_gpu"] * ranks * tree["train"]["grad_accum_steps"]
    changes: dict[str, list[str]] = {"state": [], "training": [], "free": []}
    missing = object()
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b:
            continue
        kind = "state" if _under(key, STATE_KEYS) else "free" if _under(key, FREE_KEYS) else "training"
        show = [("(unset)" if v is missing else _short(v)) for v in (a, b)]
        changes[kind].append(f"{key}: {show[0]} -> {show[1]}")
    return changes
