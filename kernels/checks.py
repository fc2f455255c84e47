"""Input validation shared by the reference ops and the Triton kernels.

Every check raises ValueError naming the offending argument, so a wrong shape, dtype or device
never turns into a silent wrong loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: the eager path only


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
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
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
    student_views, teacher_views, student_temp: float, reduction: str = "sum", ignore_diagonal: bool = False,
    names=("student_output_list", "teacher_out_softmaxed_centered_list"),
):
    """Student (S views) and teacher (T views) of one (B, K) shape on one device, with at least one pair.

    Returns (student list, teacher list, number of pairs: S * T, less min(S, T) if ignore_diagonal).
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
    n_pairs = len(student) * len(teacher) - (min(len(student), len(teacher)) if ignore_diagonal else 0)
    if n_pairs == 0:
        raise ValueError(f"no cross-view pairs: {len(student)} student view(s) and {len(teacher)} teacher view(s) "
                         "with the same-view pairs ignored")
    return student, teacher, n_pairs


def check_ibot_loss_input(
    student, teacher, masks, student_temp: float, n_masked_patches=None, masks_weight=None,
    names=("student_patch_tokens_masked", "teacher_patch_tokens_masked"),
) -> torch.Tensor:
    """iBOT's patch logits/targets, dense (B, N, K) or masked-only (M, K) (dinov2 pads them: the first
    n_masked_patches rows count), against masks (B, N) or (B, H, W) bool, and masks_weight
    (n_masked,). Returns the masks flattened to (B, N). The masked count is data: that it matches the
    rows is asserted on the device (torch._assert_async, no host sync; on CUDA a failure is a device-side
    assert), except when n_masked_patches says it."""
    check_positive("student_temp", student_temp)
    check_tensor("student_masks_flat", masks, ndim=(2, 3), floating=False)
    if masks.dtype != torch.bool:
        raise ValueError(f"student_masks_flat must be a bool tensor, got {masks.dtype}")
    check_tensor(names[0], student, ndim=(2, 3))
    check_tensor(names[1], teacher, ndim=(2, 3))
    check_same_device(**{names[0]: student, names[1]: teacher, "student_masks_flat": masks})
    if student.shape != teacher.shape:
        raise ValueError(f"{names[0]} has shape {tuple(student.shape)} but {names[1]} has {tuple(teacher.shape)}")
    check_nonempty(names[0], student, -1)
    flat = masks.flatten(1)
    B, N = flat.shape
    check_nonempty("student_masks_flat", flat)
    if student.ndim == 3:
        if student.shape[:2] != (B, N):
            raise ValueError(
                f"dense {names[0]} must be (B, N, K) = ({B}, {N}, K) to match student_masks_flat "
                f"{tuple(masks.shape)}, got {tuple(student.shape)}"
            )
        if n_masked_patches is not None or masks_weight is not None:
            raise ValueError("n_masked_patches and masks_weight go with masked-only (M, K) patch tokens, not dense")
        return flat
    M = student.shape[0]
    if n_masked_patches is not None:
        if isinstance(n_masked_patches, bool) or not isinstance(n_masked_patches, int) \
                or not 0 <= n_masked_patches <= M:
            raise ValueError(f"n_masked_patches must be an int in [0, {M}] (the rows of {names[0]}), "
                             f"got {n_masked_patches!r}")
        M = n_masked_patches
    else:
        torch._assert_async(flat.sum() == M, f"{names[0]} has {M} rows but student_masks_flat has another number "
                                             "of True entries")
    if masks_weight is not None:
        check_tensor("masks_weight", masks_weight, ndim=1)
        if masks_weight.shape[0] != M:
            raise ValueError(f"masks_weight has {masks_weight.shape[0]} entries but {M} patches are masked")
        check_same_device(**{names[0]: student, "masks_weight": masks_weight})
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


def check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens: int | None = None) -> None:
    """Check packed-sequence offsets (flash-attn's varlen convention) without reading them on the host.

    On the host (ValueError): cu_seqlens is a 1-D int32 (or int64) tensor of n_seqs + 1 >= 2 offsets,
    max_seqlen an int >= 0. On cu_seqlens' device, with torch._assert_async (no host sync; compiles
    and is captured in CUDA graphs): the offsets start at 0, never decrease, differ by at most
    max_seqlen, and end at total_tokens if given. A failed device check raises RuntimeError with its
    message at once for CPU offsets; for CUDA offsets it is a device-side assert, reported at a later
    sync and fatal to the process's CUDA context: to learn which check failed, rerun with the
    offsets on the CPU.
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, floating=False)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 (or int64) tensor of offsets, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold n_seqs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a host int >= the longest sequence, got {max_seqlen!r}")
    lengths = cu_seqlens.diff()
    torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
    torch._assert_async((lengths >= 0).all(), "cu_seqlens must be non-decreasing")
    torch._assert_async((lengths <= max_seqlen).all(),
                        f"a sequence in cu_seqlens is longer than max_seqlen={max_seqlen}")
    if total_tokens is not None:
        torch._assert_async(cu_seqlens[-1] == total_tokens,
                            f"cu_seqlens must end at {total_tokens}, the number of packed tokens")
