"""Checkpoints through torch.distributed.checkpoint (DCP): a folder per step, every rank writes its own shards.

`checkpoint-<step:08d>/` holds DCP's files for the sharded state (model and optimiser: under FSDP2 each
rank writes its shards, and DCP reshards them on load for any world size), `meta.pt` (rank 0: step,
config, loader position, loss scaler) and `rank-<r>.pt` (each rank's RNG states).

Atomic: everything is written into `.checkpoint-<step>.tmp/` (files fsynced), then, once every rank has
finished (a barrier), rank 0 renames the folder and fsyncs the parent. Only complete folders (the final
name and a `meta.pt`) are listed; a temporary folder left by a crash or a kill is ignored and removed by
the next save. A checkpoint is pruned (`keep_last`) only after a newer one is complete.
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
        raise FileNotFoundError(f"not a complete checkpoint (no {META}): {path}")
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
