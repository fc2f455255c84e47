"""Sinkhorn-Knopp teacher targets (SwAV / dinov2) in scaling-vector form, in log-space.

dinov2 normalises Q = exp(L), L = logits / teacher_temp (R rows, K prototypes), alternately over
prototypes and samples. Q is never stored here: it is exp(L[r, k] - b[k] - a[r]) for a prototype
scaling b and a sample scaling a, and each iteration recomputes the exps it needs from L:

    b[k] = logsumexp_r(L[r, k] - a[r]) + log(K / R)   the column pass
    a[r] = logsumexp_k(L[r, k] - b[k])                the row pass

Constant shifts (dinov2's 1/K, 1/B and the initial 1/sum Q) cancel in the next normalisation (log(K / R)
keeps b and a from drifting, reference.log_prototypes_per_row); the last row pass makes every row sum to
1, which is dinov2's Q * B. With torch.distributed initialised, b's log-sum-exp over rows is all-reduced
across ranks every iteration (a K-vector, as dinov2's all_reduce of the prototype sums; in log-space a
max and a sum all_reduce, as the reference). sinkhorn_knopp_teacher materialises the probabilities, as
dinov2's returns them; the fused losses keep (b, a) and recompute them in the cross-entropy kernel
(layout.TeacherTargets). A rank with zero rows launches no kernel (its b is -inf, an empty
log-sum-exp) but joins every iteration's all_reduce, so the other ranks get the targets of their rows
alone; its result is (0, K).

Design: one launch per iteration, each program owning column slabs of ALL rows. A column's log-sum-exp
over rows is then local to its program (no cross-program reduction, no atomics on data); only the row
pass needs every slab, so each program writes its slab's per-row (max, sum) partial, and the program
that finishes last (a counter incremented after the partials are stored: nobody waits for anybody, so
there is no co-residency assumption and no deadlock) folds the partials of all slabs in slab order
(deterministic whatever the finishing order) into a[r] for the next launch, and resets the counter.
    launch i:  b = colpass(L, a_{i-1}) (slab-local) ; partial[slab, r] = (max, sum)_k in slab (L - b) ;
               last program: a_i[r] = fold over slabs of partial[:, r]
So n_iterations launches (dinov2's 3: 3, was 6 dependent launches, 7 with the probabilities) give (b, a);
sinkhorn_knopp_teacher adds one launch writing exp(L - b - a). Distributed, the all_reduce of b splits
each iteration into its column launch and its row launch (the kernel's COL_PASS / ROW_PASS flags).
- Grid: ceil(K / BLOCK_K) slabs, at most one wave of _CTAS_PER_SM programs per SM (a program takes the
  slabs s, s + grid, ...). K = 65536, R = 256 (B = 128, both global crops): BLOCK_K 256 x BLOCK_R 16
  (4096-element tiles), 256 programs of 16 row blocks per pass; the loops are software-pipelined
  (tl.range num_stages=3: cp.async 16-byte copies into shared memory).
- Bytes at R = 256, K = 65536: each launch streams its slab twice (column pass, then row pass) and the
  last program reads 2 x slabs x R fp32 partials (512 KiB, ~3 us at one SM's L2 bandwidth). The second
  read of a slab (R x BLOCK_K: 128 KiB bf16, 256 KiB fp32) comes from L2 while it stays there: all 256
  slabs in flight are 33.5 MB in bf16, within an H100's 50 MB L2, 67 MB in fp32, partly beyond it. From
  HBM: bf16 3 x 33.5 = 100 MB, 34 us at 3.0 TB/s; fp32 from 3 x 67 = 201 MB (67 us) to twice that
  if no second read hits L2 (the review's figure for the previous design, 7 dependent launches of one
  pass each: 157 us fp32). sinkhorn_knopp_teacher adds a read and the fp32 (R, K) write: 33.5 or 67 MB
  + 67 MB. Exps: 2 per element per iteration, 101 M for 3 iterations, 28 us of MUFU (132 SMs x 16 a
  clock at 1.7 GHz), just under bf16's memory time.
- Many rows (iBOT's masked patches: more than _FOLD_IN_KERNEL_MAX slab x row partials) would make the
  last program's fold a long serial tail; _fold_kernel then folds them after each iteration, one more
  launch over row blocks sized to give every SM a program (_fold_blocks; R = 16384: 256 programs of 64
  rows).
- Co-residency: none assumed. A program waits for nothing (the counter is only read by the program
  that increments it); the partials' stores precede the increment (a CTA barrier, then one acq_rel
  atomic at GPU scope) and the last program reads them with L1-bypassing loads after its acquire.
- sm_90 compile (Triton 3.8 + ptxas, 8 warps, BLOCK_R 16 x BLOCK_K 256; registers / dynamic shared
  memory / CTAs per SM; no spills, STACK and LOCAL 0): one iteration (both passes and the fold; the
  first iteration, without a row scaling / the later ones) bf16 101 / 110, 20 KiB, 2, fp32 112 / 128,
  36 KiB, 2 (hence _CTAS_PER_SM = 2: 264 slots for the 256 slabs); without the fold bf16 80 / 106, fp32
  80 / 105 registers; the probabilities' launch bf16 48 / 16 KiB / 5, fp32 64 / 32 KiB / 4; _fold_kernel
  (64-row blocks) 58 registers, 2 KiB. The slab tiles stream through cp.async.cg 16-byte copies (no
  ld.global in the streaming loops); the fold's loads are ld.global.cg.v4, the loaded column scaling's
  ld.global.v4 (_slab_vector); the shift is loaded once, before the slab loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinotron.kernels import layout, reference
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.checks import check_finite_result
from dinotron.kernels.layout import (
    TeacherTargets,
    ViewTable,
    lse_pivot,
    row_pointers,
    rows_table,
    tile,
    view_table,
)

# Programs per SM the grid counts on: the sm_90 compile of the kernel (module docstring) fits 2 CTAs of 8
# warps per SM in fp32 and bf16, so a grid of 2 x SMs slabs is one wave
_CTAS_PER_SM = 2


@triton.jit
def _sinkhorn_kernel(
    X, ROW, COL, SHIFT, PARTIAL, COUNTER, PROBS,
    n_rows, K, rows_per_view, view_stride, row_stride, scale,
    HAS_ROW: tl.constexpr, COL_PASS: tl.constexpr, ROW_PASS: tl.constexpr, FOLD: tl.constexpr,
    WRITE_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program p, slabs p, p + P, ... of BLOCK_K columns over all n_rows rows of a view table, L = x * scale.

    COL_PASS: COL[k] = logsumexp_r(L[r, k] - ROW[r]) (ROW = 0 without HAS_ROW), plus SHIFT[0] when ROW_PASS
    follows in the same launch (distributed, the caller all-reduces COL and adds the shift itself).
    ROW_PASS: PARTIAL[{max, sum}, slab, r] of L[r, k] - COL[k] over the slab; with FOLD the last program to
    finish folds them into ROW[r] = logsumexp_k(L[r, k] - COL[k]) (else _fold_kernel does, next).
    WRITE_PROBS: PROBS[r, k] = exp(L[r, k] - COL[k] - ROW[r]), (n_rows, K) contiguous.
    """
    n_slabs = tl.cdiv(K, BLOCK_K)
    if COL_PASS and ROW_PASS:
        shift = tl.load(SHIFT)  # once, outside the slab loop
    for slab in range(tl.program_id(0), n_slabs, tl.num_programs(0)):
        k = slab * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        if COL_PASS:  # 1. the slab's column log-sum-exp over all rows, online over row blocks
            m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_K,), tl.float32)
            for r0 in tl.range(0, n_rows, BLOCK_R, num_stages=3):  # pipelined: cp.async of the next blocks
                x, r, r_mask = _slab_tile(X, r0, k, k_mask, n_rows, rows_per_view, view_stride, row_stride,
                                          BLOCK_R)
                z = x * scale
                if HAS_ROW:
                    z -= tl.load(ROW + r, mask=r_mask, other=0.0)[:, None]
                z = tl.where(r_mask[:, None], z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                pivot = lse_pivot(m_new)
                s = s * tl.exp(m - pivot) + tl.sum(tl.exp(z - pivot[None, :]), axis=0)
                m = m_new
            col = m + tl.log(s)
            if ROW_PASS:
                col += shift
            tl.store(COL + k, col, mask=k_mask)
        else:
            col = _slab_vector(COL, k, k_mask, BLOCK_R)
        if ROW_PASS:  # 2. per row, the (max, sum) of its exps over the slab's columns
            plane = n_slabs * n_rows
            for r0 in tl.range(0, n_rows, BLOCK_R, num_stages=3):
                x, r, r_mask = _slab_tile(X, r0, k, k_mask, n_rows, rows_per_view, view_stride, row_stride,
                                          BLOCK_R)
                z = tl.where(k_mask[None, :], x * scale - col[None, :], float("-inf"))
                m_row = tl.max(z, axis=1)
                s_row = tl.sum(tl.exp(z - lse_pivot(m_row)[:, None]), axis=1)
                tl.store(PARTIAL + slab * n_rows + r, m_row, mask=r_mask)
                tl.store(PARTIAL + plane + slab * n_rows + r, s_row, mask=r_mask)
        if WRITE_PROBS:  # exp(L - b - a), the rows' scalings known
            for r0 in tl.range(0, n_rows, BLOCK_R, num_stages=3):
                x, r, r_mask = _slab_tile(X, r0, k, k_mask, n_rows, rows_per_view, view_stride, row_stride,
                                          BLOCK_R)
                a = tl.load(ROW + r, mask=r_mask, other=0.0)
                tl.store(PROBS + r.to(tl.int64)[:, None] * K + k[None, :],
                         tl.exp(x * scale - col[None, :] - a[:, None]), mask=r_mask[:, None] & k_mask[None, :])
    if ROW_PASS and FOLD:  # 3. the last program to finish folds every slab's partials into ROW
        tl.debug_barrier()  # every thread's partial stores precede the counter's release
        done = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) - 1:
            _fold_row_partials(PARTIAL, ROW, n_slabs, n_rows, 0, 1, BLOCK_S, 256)
            tl.store(COUNTER, 0)  # ready for the next launch


@triton.jit
def _slab_tile(X, r0, k, k_mask, n_rows, rows_per_view, view_stride, row_stride, BLOCK_R: tl.constexpr):
    """The (BLOCK_R, BLOCK_K) fp32 tile of rows r0 + [0, BLOCK_R) at columns k (0 off the rows/columns)."""
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    rows = row_pointers(X, tl.where(r_mask, r, 0), rows_per_view, view_stride, row_stride)
    x = tl.load(rows[:, None] + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    return x, r, r_mask


@triton.jit
def _slab_vector(V, k, k_mask, BLOCK_R: tl.constexpr):
    """V[k] (0 off the columns) loaded as row 0 of a (BLOCK_R, BLOCK_K) tile, in the layout of the slab tiles:
    4-wide vector loads by the threads holding row 0 (a (BLOCK_K,) load spreads BLOCK_K = 256 elements over
    the 8 warps' 256 threads, one scalar load each); the sum over the tile's rows adds exact zeros."""
    first = (tl.arange(0, BLOCK_R) == 0)[:, None]
    at = V + k[None, :] + tl.zeros((BLOCK_R, 1), tl.int32)
    return tl.sum(tl.load(at, mask=first & k_mask[None, :], other=0.0), axis=0)


@triton.jit
def _fold_row_partials(PARTIAL, ROW, n_slabs, n_rows, first, step, BLOCK_S: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """ROW[r] = log(sum_slab sum[slab, r] * exp(max[slab, r])) for the row blocks first, first + step, ... of
    BLOCK_ROWS rows, folded in slab order (deterministic). The loads bypass L1 (.cg): the partials were
    written by other programs, through L2."""
    plane = n_slabs * n_rows
    for r0 in range(first * BLOCK_ROWS, n_rows, step * BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        r_mask = r < n_rows
        m = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
        for s0 in range(0, n_slabs, BLOCK_S):
            sl = s0 + tl.arange(0, BLOCK_S)
            at = PARTIAL + sl[:, None] * n_rows + r[None, :]
            mask = (sl < n_slabs)[:, None] & r_mask[None, :]
            m = tl.maximum(m, tl.max(tl.load(at, mask=mask, other=float("-inf"), cache_modifier=".cg"), axis=0))
        pivot = lse_pivot(m)
        total = tl.zeros((BLOCK_ROWS,), tl.float32)
        for s0 in range(0, n_slabs, BLOCK_S):
            sl = s0 + tl.arange(0, BLOCK_S)
            at = PARTIAL + sl[:, None] * n_rows + r[None, :]
            mask = (sl < n_slabs)[:, None] & r_mask[None, :]
            part_m = tl.load(at, mask=mask, other=float("-inf"), cache_modifier=".cg")
            part_s = tl.load(at + plane, mask=mask, other=0.0, cache_modifier=".cg")
            total += tl.sum(part_s * tl.exp(part_m - pivot[None, :]), axis=0)
        tl.store(ROW + r, m + tl.log(total), mask=r_mask)


@triton.jit
def _fold_kernel(PARTIAL, ROW, n_slabs, n_rows, BLOCK_S: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The row fold of _sinkhorn_kernel spread over programs (program p: row blocks p, p + P, ...), for
    many rows, whose partials one program would read too slowly (_FOLD_IN_KERNEL_MAX)."""
    _fold_row_partials(PARTIAL, ROW, n_slabs, n_rows, tl.program_id(0), tl.num_programs(0), BLOCK_S, BLOCK_ROWS)


# The last program folds the row partials itself up to this many (slabs x rows) of them: R = 256 rows
# (B = 128) x 256 slabs (K = 65536), 512 KiB of fp32 (max, sum), ~3 us at one SM's L2 bandwidth. More
# (iBOT's thousands of masked rows) are folded by _fold_kernel, one more launch per iteration over
# ceil(R / rows per program) programs (_fold_blocks), rather than serially by one program.
_FOLD_IN_KERNEL_MAX = 1 << 16


def _fold_blocks(R: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_S slabs, BLOCK_ROWS rows) of _fold_kernel's tiles: rows per program the largest power of two
    from 16 to 256 that still gives every SM a program (R = 16384 on 132 SMs: 64 rows, 256 programs), the
    tiles 4096 partials (16 per thread of 8 warps: 4-wide loads)."""
    rows = max(16, min(256, 1 << max(0, (R // layout.num_sms(device)).bit_length() - 1)))
    return tile(4096) // rows, rows


def _block_k(K: int) -> int:
    """Slab width: 256 columns (K = 65536: 256 slabs, one wave of 2 programs on each of 132 SMs), 16 at least."""
    return max(16, min(tile(256), triton.next_power_of_2(K)))


def _launch(table: ViewTable, scale: float, row, col, shift, partial, counter, probs=None, *, has_row: bool,
            col_pass: bool, row_pass: bool) -> None:
    V, B, K = table.shape
    R = V * B
    block_k = _block_k(K)
    block_r = min(tile(4096) // block_k, triton.next_power_of_2(R))  # (BLOCK_R, BLOCK_K) tiles of 4096 elements
    n_slabs = triton.cdiv(K, block_k)
    grid = min(n_slabs, _CTAS_PER_SM * layout.num_sms(table.base.device))
    fold = n_slabs * R <= _FOLD_IN_KERNEL_MAX
    _sinkhorn_kernel[(grid,)](
        X=table.base, ROW=row, COL=col, SHIFT=shift, PARTIAL=partial, COUNTER=counter, PROBS=probs,
        n_rows=R, K=K, rows_per_view=B, view_stride=table.view_stride, row_stride=table.row_stride, scale=scale,
        HAS_ROW=has_row, COL_PASS=col_pass, ROW_PASS=row_pass, FOLD=fold, WRITE_PROBS=probs is not None,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_S=tile(16), num_warps=8,  # the fold's (BLOCK_S, 256) tiles
    )
    if row_pass and not fold:
        block_s, block_rows = _fold_blocks(R, table.base.device)
        _fold_kernel[(triton.cdiv(R, block_rows),)](PARTIAL=partial, ROW=row, n_slabs=n_slabs, n_rows=R,
                                                    BLOCK_S=block_s, BLOCK_ROWS=block_rows, num_warps=8)


def _scalings(table: ViewTable, teacher_temp: float, n_iterations: int,
              write_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row, col, probabilities if write_probs) of the R = V * B teacher rows of `table` (one matrix, as
    dinov2's Sinkhorn-Knopp over all global crops); reference.sinkhorn_knopp_scalings on the kernel."""
    scale = 1.0 / teacher_temp
    V, B, K = table.shape
    R = V * B
    device = table.base.device
    shift = reference.log_prototypes_per_row(R, K, torch.float32, device)
    if R == 0:  # no row: every column's log-sum-exp is the empty sum's, -inf; no launch, every all_reduce
        for _ in range(n_iterations):
            col = reference._all_reduce_logsumexp(torch.full((K,), float("-inf"), device=device)) + shift
        probs = torch.empty(0, K, dtype=torch.float32, device=device) if write_probs else None
        return torch.empty(0, dtype=torch.float32, device=device), col, probs
    row = torch.empty(R, dtype=torch.float32, device=device)
    col = torch.empty(K, dtype=torch.float32, device=device)
    partial = torch.empty(2, triton.cdiv(K, _block_k(K)), R, dtype=torch.float32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)  # the kernel leaves it at 0 again
    buffers = (table, scale, row, col, shift, partial, counter)
    for it in range(n_iterations):
        if reference._distributed():  # the column log-sum-exp is all-reduced between the two passes
            _launch(*buffers, has_row=it > 0, col_pass=True, row_pass=False)
            col.copy_(reference._all_reduce_logsumexp(col) + shift)
            _launch(*buffers, has_row=True, col_pass=False, row_pass=True)
        else:
            _launch(*buffers, has_row=it > 0, col_pass=True, row_pass=True)
    probs = None
    if write_probs:
        probs = torch.empty(R, K, dtype=torch.float32, device=device)
        _launch(*buffers, probs, has_row=True, col_pass=False, row_pass=False)
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
