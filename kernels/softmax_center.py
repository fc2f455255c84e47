"""DINO's softmax-centred teacher targets and the centre's EMA update, in one pass over the logits.

    p[r, k] = softmax_k((x[r, k] - c[k]) / teacher_temp)
    c_new   = momentum * c + (1 - momentum) * mean_r x[r, k]      (mean over all ranks' rows)

Layout (Sinkhorn-Knopp's, sinkhorn_knopp.py): the R rows are cut into groups of 256 and the K columns
into slabs of BLOCK_K; a tile is one slab of one group, and one program streams a tile's rows once, in
(BLOCK_R, BLOCK_K) blocks. On those blocks it sums the columns for the centre (over the group's rows,
in row order: local to the program, no atomics) and takes each row's (max, sum of exps) over the slab,
stored as a partial. The program that finishes a group's last slab (a per-group counter incremented
after the partials are stored: nobody waits, no co-residency is assumed) folds the group's partials in
slab order into the rows' log-sum-exp. Every sum has a fixed order whatever the programs' finishing
order: the log-sum-exp and the centre are bit-identical between runs. The centre's column sums are one
(G, K) partial per group, G = ceil(R / 256), which _center_ema_kernel adds in group order and applies
the EMA to. With probabilities requested a second launch over the same tiles writes exp(z - lse) (its
reads of the logits partly from L2); the fused DINO/iBOT losses ask only for the log-sum-exp and
recompute p inside the cross-entropy kernel (layout.TeacherTargets), so the (R, K) probabilities are
never stored. No autograd: teacher targets carry no gradient, as in dinov2.
Zero rows (a rank whose batch has no masked patch) launch no kernel but still join the centre's
all_reduce with zero sums and a zero count; no row on any rank leaves the centre unchanged.

- Grid: G x ceil(K / BLOCK_K) tiles, at most one wave of _CTAS_PER_SM = 2 programs per SM (program p takes
  the tiles p, p + grid, ...: persistent). BLOCK_R 16 x BLOCK_K 256 blocks. DINO (R = 2 x 128 teacher
  rows, K = 65536): 1 group x 256 slabs, 256 programs of one tile each (was 64 programs of 4 rows, 64
  atomic adds per column); iBOT's ~16384 masked rows: 64 groups x 256 slabs = 16384 tiles on 264 programs
  (62 or 63 each).
- Bytes at R = 256, K = 65536: one read of the logits, 33.5 MB bf16 (11 us at 3.0 TB/s), 67 MB fp32
  (22 us); the partials 2 x 256 slabs x R fp32 (512 KiB), the column sums G x K fp32 (256 KiB). The
  folding program then reads the partials from L2 (sinkhorn_knopp._fold_row_partials: the max, then max
  and sum, 768 KiB in 32 dependent (16, 256) loads): a serial tail estimated at ~7 us, the largest cost
  after the read itself. The probabilities add a second read (from L2 where the logits stay there: bf16
  fits an H100's 50 MB) and the fp32 (R, K) write, 67 MB (22 us). At R = 16384 (bf16 2.1 GB, 716 us) the
  partials and column sums add 32 + 16 MB (1.6% + 0.8%), and the 64 folds overlap other tiles' streaming,
  but the last. Exps: one per element (16.8 M at R = 256), 4.7 us of MUFU (132 SMs x 16 a clock at 1.7 GHz),
  under the memory time.
- sm_90 compile (Triton 3.8 + ptxas, 8 warps, BLOCK_R 16 x BLOCK_K 256; registers / dynamic shared memory
  / CTAs per SM; no spills, STACK and LOCAL 0, in every variant: R, B multiples of 16 or not): the
  log-sum-exp pass with the centre's sums bf16 115 / 20 KiB / 2, fp32 64-100 / 36 KiB / 2-4; without them
  bf16 95-111 / 16 KiB / 2, fp32 64-80 / 32 KiB / 3-4; the probabilities' pass bf16 104 / 24 KiB / 2, fp32
  64-70 / 32 KiB / 3-4. The tiles stream through cp.async.cg 16-byte copies (no ld.global in the streaming
  loops), the column bias is read with ld.global.v4 (in the blocks' shape: a (256,) vector would be one
  scalar load a thread), the probabilities written with st.global.v4; the fold's loads are
  ld.global.cg.v4 when R is a multiple of 16 (scalar otherwise). Smaller blocks spill: ptxas keeps
  8 x 256 bf16 with the centre's sums to 64 registers and spills (16-byte stack frame). Was (one row block a
  program, BLOCK_R 4 x BLOCK_K 1024 with the sums, 1 x 4096 without; no spills): bf16 61 / 28 KiB / 4, fp32
  55 / 40 KiB / 4; probabilities bf16 60 / 48 KiB / 4, fp32 80 / 64 KiB / 3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinotron.kernels import layout, reference
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.checks import check_finite_result, check_nonempty, check_positive, check_same_device, check_tensor
from dinotron.kernels.layout import TeacherTargets, ViewTable, lse_pivot, rows_table, tile, view_table
from dinotron.kernels.sinkhorn_knopp import _fold_row_partials, _slab_tile

# Rows per group (the fold's row block): R = 256 is one group, whose column sums are one K-vector
_GROUP_ROWS = 256
# Programs per SM the grid counts on: the sm_90 compile (module docstring) fits 2 CTAs of 8 warps per SM (the
# log-sum-exp pass with the centre's sums: 100 registers in fp32, 115 in bf16), so a grid of 2 x SMs is one wave
_CTAS_PER_SM = 2


@triton.jit
def _row_lse_kernel(
    X, BIAS, LSE, PROBS, COLSUM, PARTIAL, COUNTER,
    n_rows, K, rows_per_view, view_stride, row_stride, scale, bias_scale,
    HAS_BIAS: tl.constexpr, WITH_COLSUM: tl.constexpr, WRITE_PROBS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    """Program p, tiles p, p + P, ... (tile t: row group t // n_slabs of GROUP_ROWS rows, column slab t % n_slabs of
    BLOCK_K) of the rows of a view table; z = x * scale + bias_scale * BIAS[k].

    Without WRITE_PROBS: PARTIAL[{max, sum}, slab, r] = (max, sum of exp(z - max)) over the slab's columns,
    with WITH_COLSUM COLSUM[group, k] = sum of x over the group's rows; the last program to finish a group
    folds its partials into LSE[r] = logsumexp_k(z) and resets the group's COUNTER.
    WRITE_PROBS (LSE known): PROBS[r, k] = exp(z - LSE[r]), (n_rows, K) contiguous.
    """
    n_slabs = tl.cdiv(K, BLOCK_K)
    n_groups = tl.cdiv(n_rows, GROUP_ROWS)
    for t in range(tl.program_id(0), n_groups * n_slabs, tl.num_programs(0)):
        group = t // n_slabs
        slab = t - group * n_slabs
        k = slab * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        if HAS_BIAS:  # the slab's column bias, once for all its rows, in the blocks' shape (every row the same):
            # 16-byte loads, where a (BLOCK_K,) vector would spread one column a thread, a scalar load each
            cols = tl.broadcast_to(k[None, :], (BLOCK_R, BLOCK_K))
            bias = bias_scale * tl.load(BIAS + cols, mask=cols < K, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        r_first = group * GROUP_ROWS
        r_end = tl.minimum(r_first + GROUP_ROWS, n_rows)
        if WRITE_PROBS:
            for r0 in tl.range(r_first, r_end, BLOCK_R, num_stages=3):  # pipelined: cp.async of the next blocks
                x, r, r_mask = _slab_tile(X, r0, k, k_mask, r_end, rows_per_view, view_stride, row_stride, BLOCK_R)
                lse = tl.load(LSE + r, mask=r_mask, other=float("inf"))  # exp(-inf) = 0 off the rows
                tl.store(PROBS + r.to(tl.int64)[:, None] * K + k[None, :],
                         tl.exp(x * scale + bias - lse[:, None]), mask=r_mask[:, None] & k_mask[None, :])
        else:
            colsum = tl.zeros((BLOCK_K,), tl.float32)
            for r0 in tl.range(r_first, r_end, BLOCK_R, num_stages=3):
                x, r, r_mask = _slab_tile(X, r0, k, k_mask, r_end, rows_per_view, view_stride, row_stride, BLOCK_R)
                if WITH_COLSUM:  # 1. the centre's column sums, row block after row block
                    colsum += tl.sum(x, axis=0)
                # 2. per row, the (max, sum) of its exps over the slab's columns
                z = tl.where(k_mask[None, :], x * scale + bias, float("-inf"))
                m_row = tl.max(z, axis=1)
                s_row = tl.sum(tl.exp(z - lse_pivot(m_row)[:, None]), axis=1)
                tl.store(PARTIAL + slab * n_rows + r, m_row, mask=r_mask)
                tl.store(PARTIAL + n_slabs * n_rows + slab * n_rows + r, s_row, mask=r_mask)
            if WITH_COLSUM:
                tl.store(COLSUM + group * K + k, colsum, mask=k_mask)
            # 3. the last program to finish one of the group's slabs folds the group's partials, in slab order
            tl.debug_barrier()  # every thread's partial stores precede the counter's release
            done = tl.atomic_add(COUNTER + group, 1, sem="acq_rel", scope="gpu")
            if done == n_slabs - 1:
                _fold_row_partials(PARTIAL, LSE, n_slabs, n_rows, group, n_groups, BLOCK_S, GROUP_ROWS)
                tl.store(COUNTER + group, 0)  # ready for the next launch


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
    """Launch _row_lse_kernel over the R = V * B rows of `table`: once for the log-sum-exp (and column sums),
    a second time for the probabilities.

    Returns (lse (R,) float32, probabilities (R, K) float32 or None, column sums (G, K) float32 of the
    G = ceil(R / 256) row groups, or None). R = 0 launches nothing and gives empty results and zero
    column sums (1, K).
    """
    V, B, K = table.shape
    R = V * B
    device = table.base.device
    if R == 0:
        return (torch.empty(0, dtype=torch.float32, device=device),
                torch.empty(0, K, dtype=torch.float32, device=device) if write_probs else None,
                torch.zeros(1, K, dtype=torch.float32, device=device) if with_colsum else None)
    block_k = max(16, min(tile(256), triton.next_power_of_2(K)))  # K = 65536: 256 slabs
    # (BLOCK_R, BLOCK_K) blocks of 4096 elements (K = 65536: 16 x 256): no spills (module docstring)
    block_r = min(tile(4096) // block_k, triton.next_power_of_2(R), _GROUP_ROWS)
    n_slabs, n_groups = triton.cdiv(K, block_k), triton.cdiv(R, _GROUP_ROWS)
    grid = (min(n_groups * n_slabs, _CTAS_PER_SM * layout.num_sms(device)),)
    lse = torch.empty(R, dtype=torch.float32, device=device)
    colsum = torch.empty(n_groups, K, dtype=torch.float32, device=device) if with_colsum else None
    partial = torch.empty(2, n_slabs, R, dtype=torch.float32, device=device)
    counter = torch.zeros(n_groups, dtype=torch.int32, device=device)  # the kernel leaves it at 0 again
    launch = dict(X=table.base, BIAS=bias, LSE=lse, PARTIAL=partial, COUNTER=counter, n_rows=R, K=K,
                  rows_per_view=B, view_stride=table.view_stride, row_stride=table.row_stride, scale=scale,
                  bias_scale=bias_scale, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_K=block_k,
                  BLOCK_S=tile(16), GROUP_ROWS=_GROUP_ROWS, num_warps=8)  # the fold's (BLOCK_S, GROUP_ROWS) tiles
    _row_lse_kernel[grid](PROBS=None, COLSUM=colsum, WITH_COLSUM=with_colsum, WRITE_PROBS=False, **launch)
    probs = None
    if write_probs:
        probs = torch.empty(R, K, dtype=torch.float32, device=device)
        _row_lse_kernel[grid](PROBS=probs, COLSUM=None, WITH_COLSUM=False, WRITE_PROBS=True, **launch)
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
