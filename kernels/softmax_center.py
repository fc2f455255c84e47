"""DINO's softmax-centred teacher targets and the centre's EMA update, in one pass over the logits.

    p[r, k] = softmax_k((x[r, k] - c[k]) / teacher_temp)
    c_new   = momentum * c + (1 - momentum) * mean_r x[r, k]      (mean over all ranks' rows)

One program takes BLOCK_R teacher rows: it streams their K columns once with an online max/sum
(the row's log-sum-exp), and on the same tiles adds the column sums of its rows into one float32
K-vector (atomic adds: the order of the R / BLOCK_R additions per column, hence the last bits of
the centre, may vary between runs); a second small kernel applies the EMA. With
probabilities requested the program reads its rows a second time (from L2) to write them; the fused
DINO/iBOT losses ask only for the log-sum-exp and recompute p inside the cross-entropy kernel
(layout.TeacherTargets), so the (R, K) probabilities are never stored. Sinkhorn-Knopp's row pass is
the same kernel with another column bias. No autograd: teacher targets carry no gradient, as in dinov2.
Zero rows (a rank whose batch has no masked patch) launch no kernel but still join the centre's
all_reduce with zero sums and a zero count; no row on any rank leaves the centre unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinotron.kernels import reference
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.checks import check_finite_result, check_nonempty, check_positive, check_same_device, check_tensor
from dinotron.kernels.layout import TeacherTargets, ViewTable, lse_pivot, row_pointers, rows_table, tile, view_table

_BLOCK_R_CENTER = 4  # rows per program when summing columns for the centre: R / 4 atomic adds per column


@triton.jit
def _row_lse_kernel(
    X, BIAS, LSE, PROBS, COLSUM,
    n_rows, K, rows_per_view, view_stride, row_stride, scale, bias_scale,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_COLSUM: tl.constexpr, WRITE_PROBS: tl.constexpr,
):
    """Rows r of the table: LSE[r] = logsumexp_k(z) with z = x * scale + bias_scale * BIAS[k];
    COLSUM[k] += sum over the program's rows of x (zero-initialised); PROBS[r, k] = exp(z - LSE[r])."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    rows = row_pointers(X, tl.where(r_mask, r, 0), rows_per_view, view_stride, row_stride)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(rows[:, None] + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if WITH_COLSUM:
            tl.atomic_add(COLSUM + k, tl.sum(x, axis=0), mask=k_mask, sem="relaxed")
        z = _biased(x, BIAS, k, k_mask, scale, bias_scale, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        pivot = lse_pivot(m_new)
        s = s * tl.exp(m - pivot) + tl.sum(tl.exp(z - pivot[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LSE + r, lse, mask=r_mask)
    if WRITE_PROBS:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            mask = r_mask[:, None] & k_mask[None, :]
            x = tl.load(rows[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
            z = _biased(x, BIAS, k, k_mask, scale, bias_scale, HAS_BIAS)
            tl.store(PROBS + r.to(tl.int64)[:, None] * K + k[None, :], tl.exp(z - lse[:, None]), mask=mask)


@triton.jit
def _biased(x, BIAS, k, k_mask, scale, bias_scale, HAS_BIAS: tl.constexpr):
    """x * scale + bias_scale * BIAS[k] on the valid columns, -inf on the others."""
    z = x * scale
    if HAS_BIAS:
        z += bias_scale * tl.load(BIAS + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(k_mask[None, :], z, float("-inf"))


@triton.jit
def _center_ema_kernel(
    PARTIAL, CENTER, OUT, n_partial, partial_stride, K, inv_count, momentum,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[k] = momentum * CENTER[k] + (1 - momentum) * inv_count * sum_p PARTIAL[p, k]."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    total = tl.zeros((BLOCK_K,), tl.float32)
    for p0 in range(0, n_partial, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_partial)[:, None] & k_mask[None, :]
        total += tl.sum(tl.load(PARTIAL + p.to(tl.int64)[:, None] * partial_stride + k[None, :], mask=mask,
                                other=0.0).to(tl.float32), axis=0)
    center = tl.load(CENTER + k, mask=k_mask, other=0.0).to(tl.float32)
    new = momentum * center + (1.0 - momentum) * inv_count * total
    tl.store(OUT + k, new.to(OUT.dtype.element_ty), mask=k_mask)


def row_lse(
    table: ViewTable, scale: float, bias: torch.Tensor | None = None, bias_scale: float = 0.0,
    write_probs: bool = False, with_colsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch _row_lse_kernel over the R = V * B rows of `table`.

    Returns (lse (R,) float32, probabilities (R, K) float32 or None, column sums (1, K) float32 or None).
    R = 0 launches nothing (an empty grid) and gives empty results and zero column sums.
    """
    V, B, K = table.shape
    R = V * B
    device = table.base.device
    if R == 0:
        return (torch.empty(0, dtype=torch.float32, device=device),
                torch.empty(0, K, dtype=torch.float32, device=device) if write_probs else None,
                torch.zeros(1, K, dtype=torch.float32, device=device) if with_colsum else None)
    block_r = min(tile(_BLOCK_R_CENTER if with_colsum else 1), triton.next_power_of_2(R))
    block_k = max(16, min(tile(4096) // block_r, triton.next_power_of_2(K)))
    programs = triton.cdiv(R, block_r)
    lse = torch.empty(R, dtype=torch.float32, device=device)
    probs = torch.empty(R, K, dtype=torch.float32, device=device) if write_probs else None
    colsum = torch.zeros(1, K, dtype=torch.float32, device=device) if with_colsum else None
    _row_lse_kernel[(programs,)](
        table.base, bias, lse, probs, colsum,
        R, K, B, table.view_stride, table.row_stride, scale, bias_scale,
        BLOCK_R=block_r, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, WITH_COLSUM=with_colsum, WRITE_PROBS=write_probs,
        num_warps=8,
    )
    return lse, probs, colsum


def center_ema(center: torch.Tensor, partial: torch.Tensor, n_rows: int, momentum: float) -> torch.Tensor:
    """New centre (shaped and typed like `center`) from partial column sums (P, K) of n_rows rows in all
    (the logits themselves, or their sums); with torch.distributed initialised the sums and row counts
    are all-reduced first, as dinov2 does (by every rank, one with n_rows = 0 too). No row in all: the
    centre, unchanged (a copy)."""
    if reference._distributed():
        return reference.center_ema(center, partial.float().sum(dim=0), n_rows, momentum)
    if n_rows == 0:  # the mean of no rows is undefined: keep the centre, as reference.center_ema
        return center.clone(memory_format=torch.contiguous_format)
    K = partial.shape[1]
    out = torch.empty(center.shape, dtype=center.dtype, device=center.device)
    block_k = tile(256)
    _center_ema_kernel[(triton.cdiv(K, block_k),)](
        partial, center.contiguous(), out, partial.shape[0], partial.stride(0), K, 1.0 / n_rows, momentum,
        BLOCK_P=16, BLOCK_K=block_k,
    )
    return out


def _check_teacher_args(teacher_logits, center, teacher_temp: float, ndim=None) -> int:
    """K, after checking the logits (K > 0; zero rows are allowed), the centre's size and the temperature."""
    check_tensor("teacher_logits", teacher_logits, ndim=ndim)
    check_nonempty("teacher_logits", teacher_logits, teacher_logits.ndim - 1)
    check_positive("teacher_temp", teacher_temp)
    K = teacher_logits.shape[-1]
    reference._center_vector(center, K)
    check_same_device(teacher_logits=teacher_logits, center=center)
    return K


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


def _softmax_center(teacher_logits, center, teacher_temp, momentum, backend):
    """(probabilities, new centre or None without momentum), on `backend`."""
    if backend == "eager":  # contiguous, as the fake implementations say, whatever the logits' strides
        probs = reference.softmax_center_teacher(teacher_logits, center, teacher_temp).contiguous()
        return probs, None if momentum is None else reference.update_center(center, teacher_logits, momentum)
    col = center.reshape(-1).contiguous()
    lse, probs, colsum = row_lse(rows_table(teacher_logits), 1.0 / teacher_temp, col, -1.0 / teacher_temp,
                                 write_probs=True, with_colsum=momentum is not None)
    new = None if momentum is None else center_ema(center, colsum, lse.shape[0], momentum)
    return probs.reshape(teacher_logits.shape), new


# The ops. Teacher targets carry no gradient (dinov2 runs the teacher under no_grad): no autograd is registered.
@torch.library.custom_op("dinotron::softmax_center_teacher", mutates_args=(),
                         schema="(Tensor teacher_logits, Tensor center, float teacher_temp, str backend) -> Tensor")
def _softmax_center_op(teacher_logits, center, teacher_temp, backend):
    return _softmax_center(teacher_logits, center, teacher_temp, None, backend)[0]


@torch.library.custom_op(
    "dinotron::softmax_center_and_update_teacher", mutates_args=(),
    schema="(Tensor teacher_logits, Tensor center, float teacher_temp, float momentum, str backend) "
           "-> (Tensor, Tensor)",
)
def _softmax_center_and_update_op(teacher_logits, center, teacher_temp, momentum, backend):
    return _softmax_center(teacher_logits, center, teacher_temp, momentum, backend)


@torch.library.custom_op("dinotron::update_center", mutates_args=(),
                         schema="(Tensor center, Tensor teacher_logits, float momentum, str backend) -> Tensor")
def _update_center_op(center, teacher_logits, momentum, backend):
    if backend == "eager":
        return reference.update_center(center, teacher_logits, momentum)
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return center_ema(center, rows if rows.stride(1) == 1 else rows.contiguous(), rows.shape[0], momentum)


@torch.library.custom_op(
    "dinotron::softmax_center_targets", mutates_args=(),
    schema="(Tensor[] teacher, Tensor center, float teacher_temp, float momentum, str backend) "
           "-> (Tensor, Tensor, Tensor)",
)
def _softmax_center_targets_op(teacher, center, teacher_temp, momentum, backend):
    """The fused losses' lazy softmax-centred targets of T views of (B, K) teacher logits (one pass over
    them): (row_lse (T * B,), col = the old centre (K,), the new centre); layout.TeacherTargets."""
    if backend == "eager":
        stacked = torch.stack(teacher)
        return (reference.softmax_center_lse(stacked, center, teacher_temp),
                center.reshape(-1).to(reference.acc_dtype(stacked), copy=True),
                reference.update_center(center, stacked, momentum))
    col = center.reshape(-1).to(torch.float32, copy=True)
    lse, _, colsum = row_lse(view_table(teacher), 1.0 / teacher_temp, col, -1.0 / teacher_temp, with_colsum=True)
    return lse, col, center_ema(center, colsum, lse.shape[0], momentum)


def _probs_like(teacher_logits):
    return teacher_logits.new_empty(teacher_logits.shape, dtype=reference.acc_dtype(teacher_logits))


@_softmax_center_op.register_fake
def _(teacher_logits, center, teacher_temp, backend):
    return _probs_like(teacher_logits)


@_softmax_center_and_update_op.register_fake
def _(teacher_logits, center, teacher_temp, momentum, backend):
    return _probs_like(teacher_logits), center.new_empty(center.shape)


@_update_center_op.register_fake
def _(center, teacher_logits, momentum, backend):
    return center.new_empty(center.shape)


@_softmax_center_targets_op.register_fake
def _(teacher, center, teacher_temp, momentum, backend):
    acc = reference.acc_dtype(teacher[0])
    rows = len(teacher) * teacher[0].shape[0]
    return (teacher[0].new_empty(rows, dtype=acc), teacher[0].new_empty(teacher[0].shape[-1], dtype=acc),
            center.new_empty(center.shape))


def softmax_center_targets(teacher: list[torch.Tensor], center: torch.Tensor, teacher_temp: float, momentum: float,
                           backend: str) -> tuple[TeacherTargets, torch.Tensor]:
    """Lazy softmax-centred targets of the teacher logits, and the updated centre (one op)."""
    lse, col, new_center = _softmax_center_targets_op(teacher, center, teacher_temp, momentum, backend)
    return TeacherTargets(teacher, row_lse=lse, col=col, col_scale=-1.0 / teacher_temp,
                          logit_scale=1.0 / teacher_temp), new_center


def _finite(name, check_finite, *values, all_ranks=False):
    if check_finite:  # a -inf logit has probability 0, but would make the centre -inf
        check_finite_result(name, "teacher_logits or center", *values, all_ranks=all_ranks)


def softmax_center_teacher(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float, *,
    backend: str | None = None, check_finite: bool = False,
) -> torch.Tensor:
    """softmax((teacher_logits - center) / teacher_temp) over the last dim, as dinov2.

    teacher_logits: (..., K) float32/float16/bfloat16 (float64 on the eager path), e.g. (B, K) or
    (V, B, K); center: K elements, e.g. (1, K). Any number of rows, zero too (then no kernel runs).
    Returns float32 (float64) probabilities shaped like teacher_logits; no gradient. check_finite=True
    raises ValueError on a NaN/inf result (one device-to-host sync).
    """
    _check_teacher_args(teacher_logits, center, teacher_temp)
    probs = _softmax_center_op(teacher_logits.detach(), center.detach(), float(teacher_temp),
                               resolve_backend(backend, teacher_logits, center))
    _finite("softmax_center_teacher", check_finite, probs)
    return probs


def softmax_center_and_update_teacher(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float, momentum: float = 0.9, *,
    backend: str | None = None, check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_center_teacher and update_center in one pass over the teacher logits.

    teacher_logits: (B, K) or (V, B, K). Returns (probabilities, float32 shaped like teacher_logits;
    the new centre, shaped and typed like `center`). The probabilities use the old centre, as
    dinov2's softmax_center_teacher followed by update_center (all-reduced over ranks likewise).
    Zero rows: empty probabilities, and the centre as update_center gives it. With torch.distributed
    initialised every rank must call it (it all-reduces whatever its rows), check_finite included
    (its verdict is all-reduced, so that a rank with zero rows raises with the others).
    """
    _check_teacher_args(teacher_logits, center, teacher_temp, ndim=(2, 3))
    _check_momentum(momentum)
    probs, new = _softmax_center_and_update_op(teacher_logits.detach(), center.detach(), float(teacher_temp),
                                               float(momentum), resolve_backend(backend, teacher_logits, center))
    _finite("softmax_center_and_update_teacher", check_finite, probs, new, all_ranks=True)
    return probs, new


def update_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9, *,
    backend: str | None = None, check_finite: bool = False,
) -> torch.Tensor:
    """EMA of the batch mean: center * momentum + mean(teacher_logits) * (1 - momentum), as dinov2.

    center: K elements; teacher_logits: (B, K) or (V, B, K), the mean is over every leading dim and,
    with torch.distributed initialised, over all ranks, which must all call it (a rank with zero
    rows contributes zero sums and a zero count). No row on any rank (or in the one process): the
    centre unchanged, not NaN. Returns a new tensor shaped and typed like `center`.
    """
    _check_teacher_args(teacher_logits, center, 1.0, ndim=(2, 3))
    _check_momentum(momentum)
    new = _update_center_op(center.detach(), teacher_logits.detach(), float(momentum),
                            resolve_backend(backend, teacher_logits, center))
    _finite("update_center", check_finite, new)
    return new
