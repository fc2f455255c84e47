"""Input validation shared by the reference ops and the Triton kernels.

Every check raises ValueError naming the offending argument, so a wrong shape, dtype or device
never turns into a silent wrong loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, ndim: int | tuple[int, ...] | None = None, floating: bool = True) -> torch.Tensor:
    """Check that `x` is a tensor with `ndim` dims (one of, if a tuple) and a supported float dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.ndim not in allowed:
            dims = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {dims}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    return x


def check_nonempty(name: str, x: torch.Tensor, dim: int = 0) -> None:
    if x.shape[dim] == 0:
        raise ValueError(f"{name} is empty along dim {dim} (shape {tuple(x.shape)})")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must share one device, got {listing}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def stack_views(name: str, views) -> torch.Tensor:
    """Views as a (V, B, K) tensor: accepts a (V, B, K) tensor or a sequence of V (B, K) tensors."""
    if isinstance(views, torch.Tensor):
        check_tensor(name, views, ndim=3)
        stacked = views
    else:
        if not isinstance(views, Sequence) or len(views) == 0:
            raise ValueError(f"{name} must be a (V, B, K) tensor or a non-empty list of (B, K) tensors")
        for i, v in enumerate(views):
            check_tensor(f"{name}[{i}]", v, ndim=2)
            if v.shape != views[0].shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(v.shape)} but {name}[0] has {tuple(views[0].shape)}: "
                    "every view needs the same batch size B and number of prototypes K"
                )
            if v.dtype != views[0].dtype or v.device != views[0].device:
                raise ValueError(f"{name}[{i}] is {v.dtype} on {v.device} but {name}[0] is {views[0].dtype} on {views[0].device}")
        stacked = torch.stack(list(views))
    check_nonempty(name, stacked, 0)
    check_nonempty(name, stacked, 1)
    return stacked
