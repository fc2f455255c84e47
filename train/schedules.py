"""Per-step schedules of learning rate, weight decay, teacher momentum and temperature (dinov2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinotron.train.config import Config


class CosineSchedule:
    """`warmup_steps` linear from `start_warmup_value` to `base`, then a half cosine to `final`
    reached at `total_steps`; `final` from then on. Indexable by step."""

    def __init__(self, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                 start_warmup_value: float = 0.0):
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
        self.final = final
        warmup = np.linspace(start_warmup_value, base, warmup_steps)
        decay = np.arange(total_steps - warmup_steps)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * decay / max(len(decay), 1)))
        self.values = np.concatenate([warmup, cosine])

    def __getitem__(self, step: int) -> float:
        return float(self.values[step]) if step < len(self.values) else self.final

    def __len__(self) -> int:
        return len(self.values)


def scaled_lr(base_lr: float, total_batch: int, rule: str) -> float:
    """The peak learning rate for a total batch (all ranks) under dinov2's scaling rules."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch / 1024)
    if rule == "linear_wrt_256":
        return base_lr * total_batch / 256
    return base_lr


@dataclass
class Schedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule  # lr, held at 0 while the last head layer is frozen
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr[step],
            "last_layer_lr": self.last_layer_lr[step],
            "wd": self.weight_decay[step],
            "momentum": self.momentum[step],
            "teacher_temp": self.teacher_temp[step],
        }


def build_schedules(cfg: Config, total_batch: int) -> Schedules:
    ep = cfg.train.epoch_length
    total = cfg.optim.epochs * ep
    peak = scaled_lr(cfg.optim.base_lr, total_batch, cfg.optim.scaling_rule)
    lr = CosineSchedule(peak, cfg.optim.min_lr, total, warmup_steps=cfg.optim.warmup_epochs * ep)
    last_layer = CosineSchedule(peak, cfg.optim.min_lr, total, warmup_steps=cfg.optim.warmup_epochs * ep)
    last_layer.values[: cfg.optim.freeze_last_layer_epochs * ep] = 0.0
    t = cfg.teacher
    warm = t.warmup_teacher_temp_epochs * ep
    return Schedules(
        lr=lr,
        last_layer_lr=last_layer,
        weight_decay=CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total),
        teacher_temp=CosineSchedule(t.teacher_temp, t.teacher_temp, warm, warmup_steps=warm,
                                    start_warmup_value=t.warmup_teacher_temp),
    )
