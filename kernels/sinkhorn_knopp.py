"""Sinkhorn-Knopp teacher targets (SwAV / dinov2) in scaling-vector form, in log-space.

dinov2 normalises Q = exp(L), L = logits / teacher_temp (B rows, K prototypes), alternately over
prototypes and samples. Q is never stored here: it is exp(L[r, k] + b[k] + a[r]) for a prototype
scaling b and a sample scaling a, and each half-iteration recomputes the exps it needs from L:

    b[k] = -logsumexp_r(L[r, k] + a[r])     a kernel over column blocks, looping over the rows
    a[r] = -logsumexp_k(L[r, k] + b[k])     softmax_center's row kernel, with b as the column bias

Constant shifts (dinov2's 1/K, 1/B and the initial 1/sum Q) cancel in the next normalisation; the
last half-iteration makes every row sum to 1, which is dinov2's Q * B. With torch.distributed
initialised, b's log-sum-exp over rows is all-reduced across ranks every iteration (a K-vector, as
dinov2's all_reduce of the prototype sums; in log-space it takes a max and a sum all_reduce, as the
reference). sinkhorn_knopp_teacher materialises the probabilities, as dinov2's returns them; the
fused losses keep (b, a) and recompute them in the cross-entropy kernel (layout.TeacherTargets).
A rank with zero rows launches no kernel (its b is -inf, an empty log-sum-exp) but joins every
iteration's all_reduce, so the other ranks get the targets of their rows alone; its result is (0, K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinotron.kernels import reference
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.checks import check_finite_result
from dinotron.kernels.layout import TeacherTargets, ViewTable, lse_pivot, row_pointers, rows_table, tile, view_table
from dinotron.kernels.softmax_center import row_lse


@triton.jit
def _col_lse_kernel(
    X, ROW_LSE, OUT, n_rows, K, rows_per_view, view_stride, row_stride, scale,
    HAS_ROW_LSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[k] = logsumexp_r(x[r, k] * scale - ROW_LSE[r]) over the R rows of a view table."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_K,), tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < n_rows
        rows = row_pointers(X, tl.where(r_mask, r, 0), rows_per_view, view_stride, row_stride)
        x = tl.load(rows[:, None] + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        z = x * scale
        if HAS_ROW_LSE:
            z -= tl.load(ROW_LSE + r, mask=r_mask, other=0.0)[:, None]
        z = tl.where(r_mask[:, None], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        pivot = lse_pivot(m_new)
        s = s * tl.exp(m - pivot) + tl.sum(tl.exp(z - pivot[None, :]), axis=0)
        m = m_new
    tl.store(OUT + k, m + tl.log(s), mask=k_mask)


def _column_lse(table: ViewTable, scale: float, row: torch.Tensor | None) -> torch.Tensor:
    V, B, K = table.shape
    R = V * B
    if R == 0:  # no row: every column's log-sum-exp is the empty sum's, -inf, without a launch
        return torch.full((K,), float("-inf"), dtype=torch.float32, device=table.base.device)
    block_r = min(32, triton.next_power_of_2(R))
    block_k = max(16, min(tile(4096) // block_r, triton.next_power_of_2(K)))
    out = torch.empty(K, dtype=torch.float32, device=table.base.device)
    _col_lse_kernel[(triton.cdiv(K, block_k),)](
        table.base, row, out, R, K, B, table.view_stride, table.row_stride, scale,
        HAS_ROW_LSE=row is not None, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=8,
    )
    return out


def _scalings(table: ViewTable, teacher_temp: float, n_iterations: int,
              write_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row, col, probabilities if write_probs) of the R = V * B teacher rows of `table` (one matrix, as
    dinov2's Sinkhorn-Knopp over all global crops); reference.sinkhorn_knopp_scalings on the kernels."""
    scale = 1.0 / teacher_temp
    row, probs = None, None
    V, B, K = table.shape
    shift = reference.log_prototypes_per_row(V * B, K, torch.float32, table.base.device)
    for it in range(n_iterations):
        col = reference._all_reduce_logsumexp(_column_lse(table, scale, row)) + shift
        row, probs, _ = row_lse(table, scale, col, -1.0, write_probs=write_probs and it == n_iterations - 1)
    return row, col, probs


# The ops; teacher targets carry no gradient, so no autograd is registered.
@torch.library.custom_op("dinotron::sinkhorn_knopp_teacher", mutates_args=(),
                         schema="(Tensor teacher_logits, float teacher_temp, int n_iterations, str backend) -> Tensor")
def _sinkhorn_knopp_op(teacher_logits, teacher_temp, n_iterations, backend):
    if backend == "eager":
        return reference.sinkhorn_knopp_teacher(teacher_logits, teacher_temp, n_iterations).contiguous()  # as the fake
    return _scalings(rows_table(teacher_logits), teacher_temp, n_iterations, write_probs=True)[2]


@torch.library.custom_op("dinotron::sinkhorn_knopp_targets", mutates_args=(),
                         schema="(Tensor[] teacher, float teacher_temp, int n_iterations, str backend) "
                                "-> (Tensor, Tensor)")
def _sinkhorn_knopp_targets_op(teacher, teacher_temp, n_iterations, backend):
    """The fused losses' lazy Sinkhorn-Knopp targets of T views of (B, K) teacher logits: (row (T * B,), col (K,))."""
    if backend == "eager":
        return reference.sinkhorn_knopp_scalings(torch.stack(teacher).flatten(0, 1), teacher_temp, n_iterations)
    return _scalings(view_table(teacher), teacher_temp, n_iterations, write_probs=False)[:2]


@_sinkhorn_knopp_op.register_fake
def _(teacher_logits, teacher_temp, n_iterations, backend):
    return teacher_logits.new_empty(teacher_logits.shape, dtype=reference.acc_dtype(teacher_logits))


@_sinkhorn_knopp_targets_op.register_fake
def _(teacher, teacher_temp, n_iterations, backend):
    acc = reference.acc_dtype(teacher[0])
    return (teacher[0].new_empty(len(teacher) * teacher[0].shape[0], dtype=acc),
            teacher[0].new_empty(teacher[0].shape[-1], dtype=acc))


def sinkhorn_knopp_targets(teacher: list[torch.Tensor], teacher_temp: float, n_iterations: int,
                           backend: str) -> TeacherTargets:
    """Lazy Sinkhorn-Knopp targets of the teacher views, for the fused losses (one op)."""
    row, col = _sinkhorn_knopp_targets_op(teacher, teacher_temp, n_iterations, backend)
    return TeacherTargets(teacher, row_lse=row, col=col, col_scale=-1.0, logit_scale=1.0 / teacher_temp)


def sinkhorn_knopp_teacher(
    teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
    backend: str | None = None, check_finite: bool = False,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets, as dinov2's DINOLoss.sinkhorn_knopp_teacher (same arguments).

    teacher_logits: (B, K) float32/float16/bfloat16 (float64 on the eager path), rows are samples (all
    global crops of the batch), columns prototypes; B = 0 is allowed. Returns (B, K) float32 (float64):
    rows sum to 1, columns to about B_total / K (B_total: all ranks' rows); no gradient. With
    torch.distributed initialised every rank must call it, with zero rows too, and gets its own rows'
    targets ((0, K) for none). check_finite=True raises ValueError on a NaN/inf result (one host sync;
    all-reduced when distributed, so that a rank with no row raises with the others).
    """
    reference.check_sinkhorn_input(teacher_logits, teacher_temp, n_iterations)
    probs = _sinkhorn_knopp_op(teacher_logits.detach(), float(teacher_temp), n_iterations,
                               resolve_backend(backend, teacher_logits))
    if check_finite:
        check_finite_result("sinkhorn_knopp_teacher", "teacher_logits", probs, all_ranks=True)
    return probs
