"""Input validation shared by the reference ops and the Triton kernels.

Every check raises ValueError naming the offending argument, so a wrong shape, dtype or device
never turns into a silent wrong loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

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


def view_list(name: str, views) -> list[torch.Tensor]:
    """Views as a list of V (B, K) tensors, from a (V, B, K) tensor or a sequence of (B, K) tensors.

    Checks one shape, dtype and device for all views and B, K > 0; copies nothing.
    """
    if isinstance(views, torch.Tensor):
        check_tensor(name, views, ndim=3)
        check_nonempty(name, views, 0)
        out = list(views.unbind(0))
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
                raise ValueError(
                    f"{name}[{i}] is {v.dtype} on {v.device} but {name}[0] is {views[0].dtype} on {views[0].device}"
                )
        out = list(views)
    check_nonempty(f"{name}[0]", out[0], 0)
    check_nonempty(f"{name}[0]", out[0], 1)
    return out


def check_dino_loss_input(
    student_views, teacher_views, student_temp: float, reduction: str = "mean",
    names=("student_logits_per_view", "teacher_probs_per_view"),
):
    """Student (S views) and teacher (T views) of one (B, K) shape on one device, with cross-view pairs.

    Returns (student list, teacher list, number of pairs S * T - min(S, T)).
    """
    check_positive("student_temp", student_temp)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    student, teacher = view_list(names[0], student_views), view_list(names[1], teacher_views)
    check_same_device(**{names[0]: student[0], names[1]: teacher[0]})
    if teacher[0].shape != student[0].shape:
        raise ValueError(
            f"{names[1]} views are (B, K)={tuple(teacher[0].shape)} but {names[0]} views are {tuple(student[0].shape)}"
        )
    n_pairs = len(student) * len(teacher) - min(len(student), len(teacher))
    if n_pairs == 0:
        raise ValueError(f"no cross-view pairs: {len(student)} student view(s) and {len(teacher)} teacher view(s)")
    return student, teacher, n_pairs


def check_ibot_loss_input(
    student, teacher, masks, student_temp: float, names=("student_patch_logits", "teacher_patch_probs")
) -> torch.Tensor:
    """iBOT's patch logits/targets, dense (B, N, K) or masked-only (M, K), against masks (B, N) or
    (B, H, W) bool. Returns the masks flattened to (B, N); reads the masked count on the host."""
    check_positive("student_temp", student_temp)
    check_tensor("masks", masks, ndim=(2, 3), floating=False)
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")
    check_tensor(names[0], student, ndim=(2, 3))
    check_tensor(names[1], teacher, ndim=(2, 3))
    check_same_device(**{names[0]: student, names[1]: teacher, "masks": masks})
    if student.shape != teacher.shape:
        raise ValueError(f"{names[0]} has shape {tuple(student.shape)} but {names[1]} has {tuple(teacher.shape)}")
    check_nonempty(names[0], student, -1)
    flat = masks.flatten(1)
    B, N = flat.shape
    check_nonempty("masks", flat)
    if student.ndim == 3:
        if student.shape[:2] != (B, N):
            raise ValueError(
                f"dense {names[0]} must be (B, N, K) = ({B}, {N}, K) to match masks {tuple(masks.shape)}, "
                f"got {tuple(student.shape)}"
            )
    else:
        M = int(flat.sum())
        if student.shape[0] != M:
            raise ValueError(f"masked {names[0]} has {student.shape[0]} rows but masks has {M} True entries")
    return flat


def check_finite_result(name: str, inputs: str, *values: torch.Tensor, all_ranks: bool = False) -> None:
    """ValueError if any of `values`, computed from `inputs`, holds NaN or inf. One device-to-host sync.

    all_ranks: with torch.distributed initialised, the verdict is all-reduced (a collective: every rank
    must call it), so that every rank raises or none does, even a rank whose own values are empty; for
    the ops that all-reduce anyway, whose other ranks would otherwise wait in their next collective.
    """
    finite = torch.stack([torch.isfinite(v).all() for v in values]).all()
    everywhere = all_ranks and dist.is_available() and dist.is_initialized()
    if everywhere:
        finite = finite.to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        where = " on at least one rank" if everywhere else ""
        raise ValueError(
            f"{name} is not finite: {inputs} hold NaN or inf{where} (pass check_finite=False to skip this check)"
        )


def check_qkv(q, k, v, layout: str) -> None:
    """q, k, v: tensors of one shape on one device, with as many dims as `layout` names, e.g. "(B, H, N, D)"."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=layout.count(",") + 1)
    check_same_device(q=q, k=k, v=v)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one {layout} shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens: int | None = None) -> list[int]:
    """Check packed-sequence offsets (flash-attn's varlen convention) and return them as ints.

    cu_seqlens: 1-D integer tensor (n_seqs + 1,), starting at 0, non-decreasing, ending at
    total_tokens if given; max_seqlen: an int >= every cu_seqlens[i + 1] - cu_seqlens[i].
    Reads the offsets on the host.
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, floating=False)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 (or int64) tensor of offsets, got {cu_seqlens.dtype}")
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2 or offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold n_seqs + 1 >= 2 offsets, got {offsets[:8]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got a step of {min(lengths)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({max(lengths)}), got {max_seqlen!r}")
    if total_tokens is not None and offsets[-1] != total_tokens:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]} but the packed tensors hold {total_tokens} tokens")
    return offsets
