"""Scale-out on torch.distributed's own engine: process setup (torchrun or srun), then activation
checkpointing, per-block compile and FSDP2 or DDP.

`setup_distributed()` reads the launcher's environment (`launch_env`) and starts the process group.
`parallelize(model, cfg, world, device)` prepares a DinoV2 in place, in this order (as torchtitan and
dinov3 do), each step for the reason beside it:
1. activation checkpointing per transformer block: it wraps the block's forward, so it must be inside
   whatever compile and FSDP2 later wrap;
2. torch.compile per block (`model.compile`): a block is the unit FSDP2 gathers, so compiling blocks
   (not the whole backbone) keeps FSDP2's hooks outside the compiled graphs;
3. FSDP2 `fully_shard` on every block, on the rest of each backbone (patch embedding, tokens, final
   norm), on each head and on the student / teacher as roots, with explicit forward / backward prefetch of the next
   block; parameters in train.precision for compute, fp32 master weights and optimiser state,
   gradients reduce-scattered in fsdp.reduce_dtype. The teacher is sharded alike, so the EMA update
   works on local shards with no communication. Or DDP on the student (bucketed all-reduce
   overlapped with backward); the teacher is replicated and updated locally.

State dict keys do not change in any mode, so checkpoints and exports read the same.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinotron.train.config import Config

log = logging.getLogger(__name__)

Mode = Literal["fsdp2", "ddp", "none"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Selective checkpointing keeps what is costly to recompute: matmul and attention outputs (dinov3's choice).
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


class LaunchEnv(NamedTuple):
    """This process's place in the job, as `launch_env` reads it: rank of world, local rank (its GPU), rendezvous."""

    rank: int
    world: int
    local_rank: int
    master_addr: str | None  # None where the launcher leaves it to torch's env:// (torchrun) or world == 1
    master_port: str | None
    launcher: Literal["torchrun", "slurm", "none"]


# MASTER_PORT from SLURM_JOB_ID: jobs sharing a node get different ports unless their ids differ by a multiple
# of 12768; the ports stay below Linux's ephemeral range (32768-60999), where an outgoing connection may hold one.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 12768


def launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous of this process, read from `environ`; pure (no process group).

    torchrun's RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR / MASTER_PORT are left to torch) win; else srun's
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (`srun python -m dinotron.train.cli train ...`, one task per GPU),
    with MASTER_ADDR as exported or else the first host of SLURM_JOB_NODELIST, and MASTER_PORT as exported or
    else derived from SLURM_JOB_ID; else one process. Raises ValueError naming MASTER_ADDR where a multi-task
    SLURM_JOB_NODELIST is missing or not of the simple forms "node07", "node[01-04,09],gpu7", "r[1-2]-n[01-08]".
    """
    if "WORLD_SIZE" in environ:
        return LaunchEnv(int(environ.get("RANK", "0")), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")),
                         environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        world = int(environ["SLURM_NTASKS"])
        addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
        if world > 1:
            addr = addr or _first_host(environ.get("SLURM_JOB_NODELIST", ""))
            port = port or str(_SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % _SLURM_PORT_SPAN)
        return LaunchEnv(int(environ["SLURM_PROCID"]), world, int(environ.get("SLURM_LOCALID", "0")), addr, port,
                         "slurm")
    return LaunchEnv(0, 1, 0, None, None, "none")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: each [...] range becomes its first number ("node[01-04],gpu7" -> node01)."""
    first = re.match(r"(?:[^,\[\]]|\[[^\]]*\])+", nodelist)
    host = re.sub(r"\[(\d+)[-,\d]*\]", r"\1", first.group(0)) if first else ""
    whole = first is not None and nodelist[first.end():first.end() + 1] in ("", ",")
    if not (whole and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", host)):
        raise ValueError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}: export MASTER_ADDR "
                         "(e.g. MASTER_ADDR=$(scontrol show hostnames | head -n1)) before srun")
    return host


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, from `launch_env(os.environ)`: torchrun or srun, one process
    per GPU. Initialises torch.distributed (NCCL on GPUs, gloo on CPU) when world > 1 or under torchrun (so that
    train.parallel=fsdp2 / ddp also run on one rank), and it is not already."""
    env = launch_env(os.environ)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        index = 0 if visible == 1 else env.local_rank  # srun --gpus-per-task=1 shows each task its GPU as cuda:0
        if index >= visible:
            raise ValueError(f"local rank {env.local_rank} but {visible} GPUs visible: launch one process per GPU")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # before NCCL starts, so that its communicators use this GPU
    if (env.world > 1 or env.launcher == "torchrun") and not dist.is_initialized():
        if env.launcher == "slurm":  # what torchrun would export: env:// and anything started later read these
            os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank),
                              MASTER_ADDR=env.master_addr, MASTER_PORT=env.master_port)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info(f"{env.launcher}: {env.world} processes, rendezvous at "
                 f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def parallel_mode(cfg: Config, world: int) -> Mode:
    """train.parallel with "auto" resolved: fsdp2 when there are several ranks, none for one."""
    mode = cfg.train.parallel
    if mode == "auto":
        return "fsdp2" if world > 1 else "none"
    if mode == "none" and world > 1:  # the ranks would train separate models
        raise ValueError(f"train.parallel=none runs one process, not {world}: use fsdp2 or ddp (or auto)")
    if mode != "none" and world == 1 and not torch.distributed.is_initialized():
        raise ValueError(f"train.parallel={mode} needs torch.distributed: launch with torchrun or srun")
    return mode


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(block: nn.Module, mode: Literal["full", "selective"]) -> None:
    """Recompute `block`'s forward in backward (its state dict keys unchanged)."""
    forward = block.forward
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                  if mode == "selective" else None)

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # the teacher and evaluation: nothing to recompute
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = checkpointed


def _fully_shard(part: nn.ModuleDict, cfg: Config, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns about every module output that is a view (cls token slices, split logits): the trainer
    # never modifies them in place, the case that warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    compute = _DTYPES[cfg.train.precision] if torch.cuda.is_available() else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                                  reduce_dtype=_DTYPES[cfg.fsdp.reduce_dtype] if compute != torch.float32 else None)
    shard = functools.partial(fully_shard, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    blocks = list(part["backbone"].vit.blocks)
    for block in blocks:
        shard(block)
    for module in part.values():  # the backbone's own unit: patch embedding, tokens, final norm (k-NN calls it)
        shard(module)
    shard(part)  # the root: one forward per step
    # Gather the next block while this one computes, and the previous one in backward.
    for block, following in zip(blocks, blocks[1:], strict=False):
        block.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([block])


def parallelize(model: nn.Module, cfg: Config, world: int, device: torch.device) -> Mode:
    """Prepares `model` (a DinoV2) in place for train.parallel; returns the mode it resolved to."""
    mode = parallel_mode(cfg, world)
    if cfg.train.activation_checkpointing != "none" and cfg.model.pack_crops:
        # the recomputation in backward would run outside the packed-sequence context of the forward
        raise ValueError("train.activation_checkpointing needs model.pack_crops=false")
    for part in (model.student, model.teacher):
        for block in part["backbone"].vit.blocks:
            if cfg.train.activation_checkpointing != "none" and part is model.student:
                checkpoint_block(block, cfg.train.activation_checkpointing)
            if cfg.model.compile:
                block.compile()
    if mode == "fsdp2":
        _fully_shard(model.student, cfg, cfg.fsdp.reshard_after_forward)
        # The teacher has no backward to reshard it: always after forward, so that the EMA update finds
        # the sharded fp32 parameters, not a gathered copy.
        _fully_shard(model.teacher, cfg, True)
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model.wrap_student(DistributedDataParallel(
            model.student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
        ))
    return mode


def local_tensors(tensors) -> list[torch.Tensor]:
    """Each tensor's local shard (DTensor) or the tensor itself: for updates that need no communication."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole (a collective: every rank must call it), any other tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
