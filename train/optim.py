"""AdamW parameter groups with dinov2's multipliers, and per-step schedule application."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from dinotron.train.config import OptimConfig
from dinotron.train.parallel import full_tensor

_EMBEDDINGS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, n_blocks + 1 for what follows the blocks."""
    if any(e in name for e in _EMBEDDINGS):
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else n_blocks + 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, LayerScale gammas (all 1-D) and the learned tokens / position embedding."""
    return param.ndim <= 1 or any(t in name for t in ("pos_embed", "cls_token", "reg_token", "mask_token"))


def param_groups(student: nn.ModuleDict, cfg: OptimConfig) -> list[dict]:
    """Groups of student parameters sharing (lr_multiplier, wd_multiplier, is_last_layer).

    Backbone: layer-wise lr decay layerwise_decay ** (n_blocks + 1 - layer_id), patch embedding
    x patch_embed_lr_mult. Heads: multiplier 1; their last (prototype) layer follows the
    last-layer lr schedule, which is 0 while frozen.
    """
    groups: dict[tuple, dict] = {}
    for part_name, part in student.items():
        n_blocks = len(part.vit.blocks) if part_name == "backbone" else 0
        for name, param in part.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = cfg.layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks)) if n_blocks else 1.0
            if "patch_embed" in name:
                lr_mult *= cfg.patch_embed_lr_mult
            wd_mult = 0.0 if no_weight_decay(name, param) else 1.0
            key = (lr_mult, wd_mult, "last_layer" in name)
            group = groups.setdefault(
                key, {"params": [], "names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                      "is_last_layer": key[2]}
            )
            group["params"].append(param)
            group["names"].append(f"{part_name}.{name}")
    return list(groups.values())


def build_optimizer(student: nn.ModuleDict, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over param_groups; fused on CUDA for plain tensors, foreach for FSDP2's sharded (DTensor) ones."""
    from torch.distributed.tensor import DTensor

    params = list(student.parameters())
    fused = all(p.is_cuda for p in params) and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(param_groups(student, cfg), lr=0.0, betas=(cfg.adamw_beta1, cfg.adamw_beta2),
                             fused=fused or None)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, last_layer_lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def clip_gradients(student: nn.ModuleDict, max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each part (backbone, heads) to max_norm separately, as dinov2; returns the norms. With FSDP2's
    sharded gradients the norm is taken over every rank's shards (a collective on every rank)."""
    norms = {}
    for name, part in student.items():
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        norm = full_tensor(torch.nn.utils.get_total_norm(grads))
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(part.parameters(), max_norm, norm)
        norms[name] = norm
    return norms
