"""DINO and iBOT cross-entropy, fused with the teacher targets: Triton kernels, torch.library op, modules.

For student view v and row b (S views, T teacher views, B rows, K prototypes):

    P_v[b]  = sum_u p_u[b]                     DINO as dinov2's DINOLoss.forward: every pair
    P_v[b]  = sum_{u != v} p_u[b]              DINO as lightly's (ignore_diagonal): all but the same crop
    P_v[b]  = p_v[b]                           iBOT: the same patch (S = T = 1)
    ce[v,b] = -sum_k P_v[b,k] log_softmax(z_v[b])[k] = lse_v[b] * sum_k P_v[b,k] - sum_k P_v[b,k] z_v[b,k]
    loss    = scale * sum_{v,b} w[b] ce[v,b]   z = student_logits / student_temp

so each student row needs one pass: an online log-sum-exp over K blocks and two dot products
with P, the sum of the teacher views (minus the own view) (no T x S pair expansion). One
program takes one batch row b and all views at once, an (S, BLOCK_K) student tile against the
(T, BLOCK_K) teacher tile of the same row, so the teacher is read once per row, not once per pair;
K is split between programs when there are few rows, and a one-program kernel folds the per-split
(max, sum, dot, mass) partials into lse, mass and the scalar loss (deterministic: no atomics). The
targets are either given probabilities or teacher logits with their centring (layout.TeacherTargets),
recomputed on the fly, so softmax-centred and Sinkhorn-Knopp targets are never stored.
Backward, same grid: grad[v,b,k] = g * scale * w[b] / student_temp * (mass[v,b] softmax(z_v[b])[k] - P_v[b,k]),
written once, in the logits' dtype. Everything accumulates in fp32; inputs may be fp32, fp16 or bf16.

Tiles and grid: the student tile is (S_PAD, BLOCK_K), S_PAD = next_pow2(S), BLOCK_K = 4096 / S_PAD; the
teacher tile (T_PAD, BLOCK_K), T_PAD = next_pow2(T), so the targets' exps run on the T real teacher rows
(DINO: 2, not S_PAD = 16), and the own view a student row drops is selected from it (T_PAD selects, no
exp). Splits start at multiples of BLOCK_K (blocks_per_split * BLOCK_K) and blocks are masked against K
only, so the column blocks' 16-byte alignment is visible to the compiler whatever the split count; with
the 16-divisible row and view strides the JIT specialises, the loads are 16-byte vectors for any view
count, iBOT's S = T = 1 included. Both streaming loops are software-pipelined (tl.range num_stages=3:
the next two blocks are copied by cp.async while one is reduced). layout.k_splits sizes the (B, splits)
grid to one wave of _CTAS_PER_SM programs per SM: B = 128 on 132 SMs gives 2 splits of 128 blocks,
256 programs (was 5 splits, 640 programs for 396 slots: 1.6 waves); B = 64, 4 splits; iBOT's thousands
of masked rows, one split each.

Cost, DINO at B = 128, K = 65536, S = 2 + 8, T = 2 (the fused-loss step of DINOLoss; issue 15):
    forward   reads the S + T views once:          12 x 128 x 65536 x 2 B = 201 MB bf16 (403 MB fp32)
    backward  reads them again, writes the grad:   201 + 168 = 369 MB bf16 (738 MB fp32)
    teacher   softmax centring pass (softmax_center.py): 33.5 MB bf16 (67 MB fp32)
    in all 604 MB bf16 -> 201 us at 3.0 TB/s; 1208 MB fp32 -> 403 us (against the 0.40 ms target).
Exps: S + T per row and column in each kernel (100 M, 27 us of MUFU at 132 SMs x 16/clk), under the
memory time; the padded teacher tile made it S + 16 (218 M, 59 us, near bf16's memory time of 67 us).
sm_90 compile (Triton 3.8 + ptxas, 8 warps, num_stages 3; registers / dynamic shared memory / CTAs per SM
by registers and shared memory; no spills, STACK and LOCAL 0 in every case):
    _ce_fwd_kernel DINO (S_PAD 16, T_PAD 2, BLOCK_K 256, teacher logits)  bf16  80 / 22 KiB / 3   fp32 128 / 40 KiB / 2
    _ce_bwd_kernel DINO                                                 bf16  80 / 21 KiB / 3   fp32  93 / 40 KiB / 2
    _ce_fwd_kernel iBOT (S_PAD = T_PAD = 1, BLOCK_K 4096)                 bf16  48 / 64 KiB / 3   fp32  58 / 96 KiB / 2
    _ce_bwd_kernel iBOT                                                 bf16  32 / 64 KiB / 3   fp32  40 / 96 KiB / 2
The student tile streams through cp.async.cg 16-byte copies (2 per thread per block), the teacher and
centre rows through 4-byte ones (2 rows x 256 columns are 2 elements a thread); the one ld.global left
is the teacher rows' lse, before the loop.

The op dinotron::cross_entropy (with dinotron::cross_entropy_backward as its registered autograd, and
fake implementations for torch.compile) runs these kernels, or the same math eagerly from
kernels/reference.py (CPU, float64, backend="eager"): torch.compile and CUDA graphs see one node, and
nothing in it reads a device value on the host. The teacher targets come from the ops of
softmax_center.py / sinkhorn_knopp.py. The finite checks are opt-in (check_finite=True: one host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from dinotron.kernels import reference
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.checks import (
    check_dino_loss_input,
    check_finite_result,
    check_ibot_loss_input,
    check_positive,
    check_same_device,
)
from dinotron.kernels.layout import (
    TeacherTargets,
    in_place_views,
    k_splits,
    lse_pivot,
    scattered,
    tile,
    view_table,
)
from dinotron.kernels.sinkhorn_knopp import sinkhorn_knopp_targets
from dinotron.kernels.softmax_center import softmax_center_targets, update_center


@triton.jit
def _row_setup(S_PTR, s_view_stride, s_row_stride, T_PTR, t_view_stride, t_row_stride, ROW_LSE, n_rows, K,
               n_s_views, n_t_views, blocks_per_split, S_PAD: tl.constexpr, T_PAD: tl.constexpr,
               BLOCK_K: tl.constexpr, TEACHER_LOGITS: tl.constexpr):
    """Program (row, split): pointers to row `row` of each student view v < S_PAD and teacher view u < T_PAD,
    the teacher rows' lse, and the split's columns [k_start, k_end). k_start is a multiple of BLOCK_K by
    construction (blocks_per_split * BLOCK_K), so the compiler sees 16-byte aligned column blocks whatever
    blocks_per_split is, and loads vectorise (with 16-divisible row strides, which the JIT specialises)."""
    row = tl.program_id(0)
    k_start = tl.program_id(1) * blocks_per_split * BLOCK_K
    k_end = tl.minimum(k_start + blocks_per_split * BLOCK_K, K)
    v = tl.arange(0, S_PAD)
    u = tl.arange(0, T_PAD)
    s_valid = v < n_s_views
    t_valid = u < n_t_views
    row64 = row.to(tl.int64)
    s_rows = S_PTR + v.to(tl.int64) * s_view_stride + row64 * s_row_stride
    t_rows = T_PTR + u.to(tl.int64) * t_view_stride + row64 * t_row_stride
    t_lse = tl.zeros((T_PAD,), tl.float32)
    if TEACHER_LOGITS:
        t_lse = tl.load(ROW_LSE + u * n_rows + row, mask=t_valid, other=0.0)
    return row, k_start, k_end, v, s_valid, u, t_valid, s_rows, t_rows, t_lse


@triton.jit
def _tiles(s_rows, v, s_valid, t_rows, u, t_valid, t_lse, COL, k, K, s_scale, logit_scale, col_scale,
           TEACHER_LOGITS: tl.constexpr, EXCLUDE_SAME_VIEW: tl.constexpr, T_PAD: tl.constexpr):
    """Tiles of the block k (BLOCK_K columns; only the last block of a row has columns >= K): the student's
    z = logits * s_scale, (S_PAD, BLOCK_K), 0 off the mask, and the paired targets P of each student view,
    from a (T_PAD, BLOCK_K) teacher tile (the exps run on the T real teacher rows only, not on S_PAD)."""
    k_mask = k < K
    z = tl.load(s_rows[:, None] + k[None, :], mask=s_valid[:, None] & k_mask[None, :],
                other=0.0).to(tl.float32) * s_scale
    t_mask = t_valid[:, None] & k_mask[None, :]
    p = tl.load(t_rows[:, None] + k[None, :], mask=t_mask, other=0.0).to(tl.float32)
    if TEACHER_LOGITS:
        col = tl.load(COL + k, mask=k_mask, other=0.0).to(tl.float32)
        p = tl.where(t_mask, tl.exp(p * logit_scale + col_scale * col[None, :] - t_lse[:, None]), 0.0)
    total = tl.sum(p, axis=0)[None, :] + tl.zeros_like(z)  # every teacher view (S = T = 1: the patch, iBOT)
    if EXCLUDE_SAME_VIEW:  # less the own view: student row v takes teacher row v (T_PAD selects, no exp)
        for own in tl.static_range(T_PAD):
            p_own = tl.sum(tl.where(u[:, None] == own, p, 0.0), axis=0)
            total = tl.where(v[:, None] == own, total - p_own[None, :], total)
    return z, total, k_mask


@triton.jit
def _ce_fwd_kernel(
    S_PTR, s_view_stride, s_row_stride, T_PTR, t_view_stride, t_row_stride, COL, ROW_LSE, PARTIAL,
    n_rows, K, n_s_views, n_t_views, blocks_per_split, s_scale, logit_scale, col_scale,
    S_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
    EXCLUDE_SAME_VIEW: tl.constexpr,
):
    """Program (b, split): PARTIAL[{max, sum, dot, mass}, split, v, b] over the split's columns."""
    row, k_start, k_end, v, s_valid, u, t_valid, s_rows, t_rows, t_lse = _row_setup(
        S_PTR, s_view_stride, s_row_stride, T_PTR, t_view_stride, t_row_stride, ROW_LSE, n_rows, K, n_s_views,
        n_t_views, blocks_per_split, S_PAD, T_PAD, BLOCK_K, TEACHER_LOGITS,
    )
    m = tl.full((S_PAD,), float("-inf"), tl.float32)
    s = tl.zeros((S_PAD,), tl.float32)
    dot = tl.zeros((S_PAD,), tl.float32)
    mass = tl.zeros((S_PAD,), tl.float32)
    # num_stages=3: the loads of the next two blocks are issued (cp.async into shared memory) while this
    # one is reduced; the block's addresses do not depend on loaded data, so the loop pipelines
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=3):
        z, p, k_mask = _tiles(s_rows, v, s_valid, t_rows, u, t_valid, t_lse, COL, k0 + tl.arange(0, BLOCK_K), K,
                              s_scale, logit_scale, col_scale, TEACHER_LOGITS, EXCLUDE_SAME_VIEW, T_PAD)
        z_lse = tl.where(k_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, axis=1))
        pivot = lse_pivot(m_new)
        s = s * tl.exp(m - pivot) + tl.sum(tl.exp(z_lse - pivot[:, None]), axis=1)
        m = m_new
        dot += tl.sum(p * z, axis=1)
        mass += tl.sum(p, axis=1)
    n_out = n_s_views * n_rows
    plane = tl.num_programs(1) * n_out
    out = PARTIAL + tl.program_id(1) * n_out + v * n_rows + row
    tl.store(out, m, mask=s_valid)
    tl.store(out + plane, s, mask=s_valid)
    tl.store(out + 2 * plane, dot, mask=s_valid)
    tl.store(out + 3 * plane, mass, mask=s_valid)


@triton.jit
def _ce_combine_kernel(PARTIAL, WEIGHT, LSE, MASS, LOSS, n_out, n_rows, n_splits, scale,
                       HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: per (v, b) fold the splits into lse and mass; LOSS = scale * sum w[b] (lse * mass - dot)."""
    plane = n_splits * n_out
    total = tl.zeros((BLOCK,), tl.float32)
    for i0 in range(0, n_out, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < n_out
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        for sp in range(n_splits):
            m = tl.maximum(m, tl.load(PARTIAL + sp * n_out + i, mask=mask, other=0.0))
        s = tl.zeros((BLOCK,), tl.float32)
        dot = tl.zeros((BLOCK,), tl.float32)
        mass = tl.zeros((BLOCK,), tl.float32)
        for sp in range(n_splits):
            at = PARTIAL + sp * n_out + i
            s += tl.load(at + plane, mask=mask, other=0.0) * tl.exp(tl.load(at, mask=mask, other=0.0) - lse_pivot(m))
            dot += tl.load(at + 2 * plane, mask=mask, other=0.0)
            mass += tl.load(at + 3 * plane, mask=mask, other=0.0)
        lse = m + tl.log(tl.where(mask, s, 1.0))
        ce = lse * mass - dot
        if HAS_WEIGHT:
            ce *= tl.load(WEIGHT + i % n_rows, mask=mask, other=0.0)
        total += tl.where(mask, ce, 0.0)
        tl.store(LSE + i, lse, mask=mask)
        tl.store(MASS + i, mass, mask=mask)
    tl.store(LOSS, tl.sum(total, axis=0) * scale)


@triton.jit
def _ce_bwd_kernel(
    S_PTR, s_view_stride, s_row_stride, T_PTR, t_view_stride, t_row_stride, COL, ROW_LSE, LSE, MASS, WEIGHT,
    GRAD_LOSS, GRAD, grad_view_stride, n_rows, K, n_s_views, n_t_views, blocks_per_split, s_scale, logit_scale,
    col_scale, scale,
    S_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
    EXCLUDE_SAME_VIEW: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """Program (b, split): GRAD[v, b, k] for the split's columns; GRAD is (S, B, K) contiguous."""
    row, k_start, k_end, v, s_valid, u, t_valid, s_rows, t_rows, t_lse = _row_setup(
        S_PTR, s_view_stride, s_row_stride, T_PTR, t_view_stride, t_row_stride, ROW_LSE, n_rows, K, n_s_views,
        n_t_views, blocks_per_split, S_PAD, T_PAD, BLOCK_K, TEACHER_LOGITS,
    )
    lse = tl.load(LSE + v * n_rows + row, mask=s_valid, other=0.0)
    mass = tl.load(MASS + v * n_rows + row, mask=s_valid, other=0.0)
    coef = tl.load(GRAD_LOSS).to(tl.float32) * scale * s_scale
    if HAS_WEIGHT:
        coef *= tl.load(WEIGHT + row)
    g_rows = GRAD + v.to(tl.int64) * grad_view_stride + row.to(tl.int64) * K
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=3):  # pipelined as the forward's loop
        k = k0 + tl.arange(0, BLOCK_K)
        z, p, k_mask = _tiles(s_rows, v, s_valid, t_rows, u, t_valid, t_lse, COL, k, K, s_scale, logit_scale,
                              col_scale, TEACHER_LOGITS, EXCLUDE_SAME_VIEW, T_PAD)
        g = coef * (mass[:, None] * tl.exp(z - lse[:, None]) - p)
        tl.store(g_rows[:, None] + k[None, :], g.to(GRAD.dtype.element_ty), mask=s_valid[:, None] & k_mask[None, :])


# CTAs per SM the sizing of the grid counts on: the sm_90 compile of both kernels at S_PAD 16 x BLOCK_K 256
# (module docstring) fits 2 CTAs of 8 warps per SM in fp32 (128 / 93 registers) and 3 in bf16; 2 keeps the
# grid within one wave in either dtype
_CTAS_PER_SM = 2


def _launch_config(S: int, T: int, B: int, K: int, device: torch.device) -> dict:
    s_pad, t_pad = triton.next_power_of_2(S), triton.next_power_of_2(T)
    block_k = max(16, min(tile(4096) // s_pad, triton.next_power_of_2(K)))  # a (S_PAD, BLOCK_K) tile: 4096 elements
    splits, blocks_per_split = k_splits(B, K, block_k, device, _CTAS_PER_SM)
    return dict(s_pad=s_pad, t_pad=t_pad, block_k=block_k, splits=splits, blocks_per_split=blocks_per_split)


def _tables(student, stacked, teacher):
    """The student's and the teacher's view tables, and the launch configuration the two kernels share."""
    table, t = view_table(student[0].unbind(0) if stacked else student), view_table(teacher)
    S, B, K = table.shape
    return table, t, _launch_config(S, t.n_views, B, K, table.base.device)


def _eager_terms(student, stacked, teacher, row_lse, col, logit_scale, col_scale):
    """The reference's (S, B, K) student logits and (T, B, K) targets, these in the compute dtype."""
    s = student[0] if stacked else torch.stack(student)
    return s, reference.lazy_targets(teacher, row_lse, col, logit_scale, col_scale, reference.acc_dtype(s, teacher[0]))


# The op: scale * sum_{v,b} w[b] CE(P_v[b], softmax(student_v[b] / student_temp)) -> (loss, lse, mass).
# student: S views of (B, K) (or, if stacked, one (S, B, K) tensor); teacher + row_lse/col/scales: the
# targets (layout.TeacherTargets); weight: (B,) or None; exclude_same_view: DINO's pairing without a view
# and itself (lightly) or every pair (dinov2's DINOLoss.forward, iBOT). lse, mass: (S, B), for the backward.
@torch.library.custom_op(
    "dinotron::cross_entropy", mutates_args=(),
    schema="(Tensor[] student, bool stacked, Tensor[] teacher, Tensor? row_lse, Tensor? col, Tensor? weight, "
           "float student_temp, float logit_scale, float col_scale, float scale, bool exclude_same_view, "
           "str backend) -> (Tensor, Tensor, Tensor)",
)
def _cross_entropy_op(student, stacked, teacher, row_lse, col, weight, student_temp, logit_scale, col_scale, scale,
                      exclude_same_view, backend):
    if backend == "eager":
        s, targets = _eager_terms(student, stacked, teacher, row_lse, col, logit_scale, col_scale)
        out = reference.cross_entropy(s, targets, weight, student_temp, scale, exclude_same_view)
        return tuple(t.contiguous() for t in out)  # contiguous, as the fake implementation says
    table, t, cfg = _tables(student, stacked, teacher)
    S, B, K = table.shape
    device = table.base.device
    partial = torch.empty(4, cfg["splits"], S, B, dtype=torch.float32, device=device)
    _ce_fwd_kernel[(B, cfg["splits"])](
        table.base, table.view_stride, table.row_stride, t.base, t.view_stride, t.row_stride, col, row_lse, partial,
        B, K, S, t.n_views, cfg["blocks_per_split"], 1.0 / student_temp, logit_scale, col_scale,
        S_PAD=cfg["s_pad"], T_PAD=cfg["t_pad"], BLOCK_K=cfg["block_k"], TEACHER_LOGITS=row_lse is not None,
        EXCLUDE_SAME_VIEW=exclude_same_view, num_warps=8,
    )
    lse, mass = (torch.empty(S, B, dtype=torch.float32, device=device) for _ in range(2))  # outputs: no aliasing
    loss = torch.empty((), dtype=torch.float32, device=device)
    _ce_combine_kernel[(1,)](
        partial, weight, lse, mass, loss, S * B, B, cfg["splits"], scale,
        HAS_WEIGHT=weight is not None, BLOCK=min(1024, triton.next_power_of_2(S * B)), num_warps=4,
    )
    return loss, lse, mass


@torch.library.custom_op(
    "dinotron::cross_entropy_backward", mutates_args=(),
    schema="(Tensor grad_loss, Tensor[] student, bool stacked, Tensor[] teacher, Tensor? row_lse, Tensor? col, "
           "Tensor? weight, Tensor lse, Tensor mass, float student_temp, float logit_scale, float col_scale, "
           "float scale, bool exclude_same_view, str backend) -> Tensor",
)
def _cross_entropy_backward_op(grad_loss, student, stacked, teacher, row_lse, col, weight, lse, mass, student_temp,
                               logit_scale, col_scale, scale, exclude_same_view, backend):
    """d loss / d student, (S, B, K) in the student's dtype: g * scale * w[b] / student_temp * (mass softmax(z) - P)."""
    if backend == "eager":
        s, targets = _eager_terms(student, stacked, teacher, row_lse, col, logit_scale, col_scale)
        grad = reference.cross_entropy_backward(grad_loss, s, targets, weight, mass, student_temp, scale,
                                                exclude_same_view)
        return grad.contiguous()
    table, t, cfg = _tables(student, stacked, teacher)
    S, B, K = table.shape
    grad = torch.empty(S, B, K, dtype=table.base.dtype, device=table.base.device)
    _ce_bwd_kernel[(B, cfg["splits"])](
        table.base, table.view_stride, table.row_stride, t.base, t.view_stride, t.row_stride, col, row_lse, lse, mass,
        weight, grad_loss.contiguous(), grad, B * K, B, K, S, t.n_views, cfg["blocks_per_split"],
        1.0 / student_temp, logit_scale, col_scale, scale,
        S_PAD=cfg["s_pad"], T_PAD=cfg["t_pad"], BLOCK_K=cfg["block_k"], TEACHER_LOGITS=row_lse is not None,
        EXCLUDE_SAME_VIEW=exclude_same_view, HAS_WEIGHT=weight is not None, num_warps=8,
    )
    return grad


@_cross_entropy_op.register_fake
def _(student, stacked, teacher, row_lse, col, weight, student_temp, logit_scale, col_scale, scale,
      exclude_same_view, backend):
    S = student[0].shape[0] if stacked else len(student)
    acc = reference.acc_dtype(student[0], teacher[0])
    lse = student[0].new_empty(S, student[0].shape[-2], dtype=acc)
    return student[0].new_empty((), dtype=acc), lse, torch.empty_like(lse)


@_cross_entropy_backward_op.register_fake
def _(grad_loss, student, stacked, teacher, row_lse, col, weight, lse, mass, *args):
    return student[0].new_empty(*lse.shape, student[0].shape[-1])


def _setup_context(ctx, inputs, output):
    student, stacked, teacher, row_lse, col, weight, *numbers = inputs
    _, lse, mass = output
    ctx.mark_non_differentiable(lse, mass)
    ctx.save_for_backward(*student, *teacher, row_lse, col, weight, lse, mass)
    ctx.n_views, ctx.stacked, ctx.numbers = (len(student), len(teacher)), stacked, numbers


def _backward(ctx, grad_loss, _grad_lse, _grad_mass):
    S, T = ctx.n_views
    saved = ctx.saved_tensors
    student, teacher = list(saved[:S]), list(saved[S:S + T])
    grad = _cross_entropy_backward_op(grad_loss, student, ctx.stacked, teacher, *saved[S + T:], *ctx.numbers)
    return ([grad] if ctx.stacked else list(grad.unbind(0))), None, [None] * T, *(None,) * 9


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _cross_entropy(student_arg, student: list[torch.Tensor], targets: TeacherTargets, weight, student_temp: float,
                   scale: float, exclude_same_view: bool, backend: str) -> torch.Tensor:
    """The op on checked inputs; student_arg is what the caller passed (a (S, B, K) tensor or views).

    Views in separate allocations (lightly's lists) are stacked here, once, when running eagerly: the op
    then reads one (S, B, K) tensor in forward and backward, and the stack's backward is free (views of
    the gradient). Under torch.compile, whose tracer does not look at storages, the op stacks them
    itself when it must (once in forward, once in backward)."""
    stacked = isinstance(student_arg, torch.Tensor)
    if not stacked and scattered(student):
        student_arg, stacked = torch.stack(student), True
    teacher = in_place_views([t.detach() for t in targets.views])
    return _cross_entropy_op(
        [student_arg] if stacked else list(student), stacked, teacher, targets.row_lse,
        targets.col, weight, float(student_temp), float(targets.logit_scale), float(targets.col_scale), float(scale),
        exclude_same_view, backend,
    )[0]


def _teacher_needs_grad(teacher) -> bool:
    """Whether the caller back-propagates into the teacher (lightly allows it): then the loss is the
    reference's autograd graph, since the op gives the student its gradient only."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in teacher)


def dino_loss(student_output_list, teacher_out_softmaxed_centered_list, *, student_temp: float = 0.1,
              ignore_diagonal: bool = False, reduction: str = "sum", backend: str | None = None,
              check_finite: bool = False) -> torch.Tensor:
    """dinov2's DINOLoss.forward(student_output_list, teacher_out_softmaxed_centered_list), fused.

    -sum over every (student view, teacher view) pair of the batch mean of sum_k t log_softmax(s / student_temp).
    student_output_list: S views of (B, K) logits, a list/tuple (dinov2's `.chunk`) or an (S, B, K)
    tensor (its gradient then comes as one tensor); teacher_out_softmaxed_centered_list: T views of
    (B, K) probabilities. fp32/fp16/bf16 (float64 on the eager path). Keyword-only extras:
    ignore_diagonal=True skips the pairs of a view with itself (lightly's DINOLoss: the first views are
    the same crops) and reduction="mean" divides by the number of pairs (lightly). Returns a float32
    (float64) scalar. A teacher that requires grad gets its gradient through the eager reference.
    check_finite=True raises ValueError on a NaN/inf loss (one device-to-host sync).
    """
    student, teacher, n_pairs = check_dino_loss_input(student_output_list, teacher_out_softmaxed_centered_list,
                                                      student_temp, reduction, ignore_diagonal)
    if _teacher_needs_grad(teacher):
        loss = reference.dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp=student_temp,
                                   ignore_diagonal=ignore_diagonal, reduction=reduction)
    else:
        scale = 1.0 / (student[0].shape[0] * (n_pairs if reduction == "mean" else 1))
        loss = _cross_entropy(student_output_list, student, TeacherTargets(teacher), None, student_temp, scale,
                              ignore_diagonal, resolve_backend(backend, student[0], teacher[0]))
    if check_finite:
        check_finite_result("dino_loss", "student_output_list or teacher_out_softmaxed_centered_list", loss.detach())
    return loss


def _masked_rows(student, teacher, flat, n_masked_patches, masks_weight):
    """(student rows, teacher rows, per-row weights) of iBOT's loss, without reading the mask on the host:
    dense (B, N, K) input keeps every row and weighs the unmasked ones 0."""
    if student.ndim == 3:
        counts = flat.sum(dim=1, keepdim=True).clamp(min=1)
        return student.flatten(0, 1), teacher.flatten(0, 1), (flat / counts).flatten()
    n = student.shape[0] if n_masked_patches is None else n_masked_patches
    if masks_weight is None:
        counts = flat.sum(dim=1)
        masks_weight = (1.0 / counts.clamp(min=1)).repeat_interleave(counts, output_size=n)
    return student[:n], teacher[:n], masks_weight


def _ibot_loss(student, teacher, flat, n_masked_patches, masks_weight, student_temp, backend, targets=None):
    """iBOT's loss on checked inputs; targets: lazy TeacherTargets of `teacher`'s masked rows (the modules')."""
    s, t, weight = _masked_rows(student, teacher, flat, n_masked_patches, masks_weight)
    if s.shape[0] == 0:  # no masked patch: 0, as dinov2's empty sum, still in the student's graph
        return s.to(reference.acc_dtype(s, t)).sum() * 0.0
    weight = weight.to(reference.acc_dtype(s, t))
    targets = TeacherTargets([t]) if targets is None else targets
    return _cross_entropy(s[None], [s], targets, weight, student_temp, 1.0 / flat.shape[0], False, backend)


def ibot_patch_loss(student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                    student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                    masks_weight: torch.Tensor | None = None, *, student_temp: float = 0.1,
                    backend: str | None = None, check_finite: bool = False) -> torch.Tensor:
    """dinov2's iBOTPatchLoss.forward_masked (same positional arguments), fused; dense input as its .forward.

    student_masks_flat: (B, N) or (B, H, W) bool, True where the student's patch was masked.
    student / teacher: masked-only (M, K) rows in the order of masks.flatten(1).nonzero(), of which the
    first n_masked_patches count (dinov2 pads them; default all, and then M must equal the masked count,
    asserted on the device), or dense (B, N, K) (only masked patches count). masks_weight: (n_masked,)
    per-row weights, default 1 / (masked patches of the row's image).
    loss = -1/B sum_rows w * sum_k t log_softmax(s / student_temp): a float32 (float64) scalar; 0 with a
    zero gradient when no patch is masked. A teacher that requires grad gets its gradient through the
    eager reference. check_finite=True raises ValueError on a NaN/inf loss (one host sync).
    """
    flat = check_ibot_loss_input(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                                 student_temp, n_masked_patches, masks_weight)
    if _teacher_needs_grad([teacher_patch_tokens_masked]):
        loss = reference.ibot_patch_loss(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                                         n_masked_patches, masks_weight, student_temp=student_temp)
    else:
        backend = resolve_backend(backend, student_patch_tokens_masked, teacher_patch_tokens_masked, flat)
        loss = _ibot_loss(student_patch_tokens_masked, teacher_patch_tokens_masked, flat, n_masked_patches,
                          masks_weight, student_temp, backend)
    if check_finite:
        check_finite_result("ibot_patch_loss", "student_patch_tokens_masked or teacher_patch_tokens_masked",
                            loss.detach())
    return loss


class Center(nn.Module):
    """lightly's Center module: an EMA centre buffer `center` of shape `size` (1 where the mean runs).

    value: the centre; update(x): center * momentum + mean(x) * (1 - momentum), the mean over the
    dims of size 1 and over all ranks with torch.distributed initialised (rows counted, as dinov2).
    """

    def __init__(self, size: tuple[int, ...], mode: str = "mean", momentum: float = 0.9):
        super().__init__()
        if mode != "mean":
            raise ValueError(f"Unknown mode '{mode}'. Valid modes are ['mean'].")
        self.size, self.momentum = tuple(size), momentum
        self.dim = tuple(i for i, n in enumerate(self.size) if n == 1)
        self.register_buffer("center", torch.zeros(self.size))

    @property
    def value(self) -> torch.Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        K = self.center.shape[-1]
        self.center.copy_(update_center(self.center, x.reshape(-1, K), self.momentum))


class _CenteredTeacher(nn.Module):
    """Teacher targets from teacher logits: DINO's softmax centring (an EMA centre) or dinov2's
    Sinkhorn-Knopp; what DINOLoss and IBOTPatchLoss share. Subclasses say where the centre lives."""

    def __init__(self, center_mode, centering, sinkhorn_iterations, backend, check_finite):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        if centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'softmax' or 'sinkhorn_knopp', got {centering!r}")
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.backend, self.check_finite = backend, check_finite

    def _center(self) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, teacher: list[torch.Tensor], teacher_temp: float, backend: str):
        """(lazy TeacherTargets, new centre or None) of the teacher views (two ops at most)."""
        check_positive("teacher_temp", teacher_temp)
        center = self._center()
        reference._center_vector(center, teacher[0].shape[-1])
        check_same_device(teacher_out=teacher[0], center=center)  # move the module with .to(device)
        teacher = in_place_views([t.detach() for t in teacher])
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_targets(teacher, teacher_temp, self.sinkhorn_iterations, backend), None
        return softmax_center_targets(teacher, center, teacher_temp, self.center_momentum, backend)

    def _differentiable_targets(self, teacher: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """lightly's softmax((teacher - center) / teacher_temp), in autograd, for a teacher that requires grad."""
        if self.centering == "sinkhorn_knopp":
            raise ValueError("Sinkhorn-Knopp targets carry no gradient (dinov2 computes them under no_grad): detach "
                             "teacher_out or use centering='softmax'")
        stacked = torch.stack(teacher)
        return torch.softmax((stacked - self._center().to(stacked.dtype)) / teacher_temp, dim=-1)

    def _finish(self, name: str, loss: torch.Tensor, new_center: torch.Tensor | None) -> torch.Tensor:
        if self.check_finite:
            centre = [] if new_center is None else [new_center]
            check_finite_result(name, "the student or teacher outputs (or the centre)", loss.detach(), *centre)
        if new_center is not None:
            self._center().copy_(new_center)
        return loss


class DINOLoss(_CenteredTeacher):
    """lightly's DINOLoss (same constructor, forward, update_center and state), on the fused op.

    forward(teacher_out, student_out, teacher_temp=None, epoch=None): teacher_out T views and
    student_out S views of (B, output_dim) logits (lists, or (V, B, K) tensors), the teacher's views
    the first (global) crops of the student's. Returns the cross-entropy averaged over the
    S*T - min(S, T) cross-view pairs (float32; float64 for float64 input), then updates the centre
    buffer (1, 1, output_dim) by EMA with the teacher's batch mean (all ranks). The teacher
    temperature is teacher_temp if given, else the warm-up schedule at `epoch`, else the
    constructor's. Keyword-only extras: reduction="sum" sums the pairs (dinov2); centering=
    "sinkhorn_knopp" uses dinov2's Sinkhorn-Knopp targets over all T*B teacher rows and leaves the
    centre alone; check_finite=True raises on a NaN/inf loss or centre (one host sync). A teacher that
    requires grad is back-propagated through its softmax, as lightly (on the eager reference).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, centering: str = "softmax", sinkhorn_iterations: int = 3,
                 reduction: str = "mean", backend: str | None = None, check_finite: bool = False):
        super().__init__(center_mode, centering, sinkhorn_iterations, backend, check_finite)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.teacher_temp, self.student_temp, self.reduction = teacher_temp, student_temp, reduction
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self._warmup_temps = self.teacher_temp_schedule.tolist()  # read per step without a tensor-to-float

    def _center(self) -> torch.Tensor:
        return self.center

    def forward(self, teacher_out, student_out, teacher_temp: float | None = None,
                epoch: int | None = None) -> torch.Tensor:
        if teacher_temp is None:
            warming_up = epoch is not None and epoch < self.warmup_teacher_temp_epochs
            teacher_temp = self._warmup_temps[epoch] if warming_up else self.teacher_temp
        student, teacher, n_pairs = check_dino_loss_input(student_out, teacher_out, self.student_temp, self.reduction,
                                                          True, ("student_out", "teacher_out"))
        backend = resolve_backend(self.backend, student[0], teacher[0], self.center)
        if _teacher_needs_grad(teacher):
            targets = self._differentiable_targets(teacher, float(teacher_temp))
            loss = reference.dino_loss(student_out, targets, student_temp=self.student_temp, ignore_diagonal=True,
                                       reduction=self.reduction)
            new_center = update_center(self.center, torch.stack(teacher).detach(), self.center_momentum,
                                       backend=backend)
        else:
            targets, new_center = self._targets(teacher, float(teacher_temp), backend)
            scale = 1.0 / (student[0].shape[0] * (n_pairs if self.reduction == "mean" else 1))
            loss = _cross_entropy(student_out, student, targets, None, self.student_temp, scale, True, backend)
        return self._finish("DINOLoss", loss, new_center)

    @torch.no_grad()
    def update_center(self, teacher_out) -> None:
        """lightly's: EMA of the centre with the mean of teacher_out ((V, B, K) tensor or V views of (B, K))."""
        teacher = torch.stack(list(teacher_out)) if not isinstance(teacher_out, torch.Tensor) else teacher_out
        self.center.copy_(update_center(self.center, teacher.reshape(-1, teacher.shape[-1]), self.center_momentum,
                                        backend=self.backend))


class IBOTPatchLoss(_CenteredTeacher):
    """lightly's IBOTPatchLoss (same constructor, forward and state: a `Center` module at `center`), fused.

    forward(teacher_out, student_out, mask, teacher_temp=None): teacher and student logits of the
    masked patches, (M, output_dim) with M = mask.sum() (or dense (B, N, output_dim)); mask (B, H, W)
    or (B, N) bool. Returns dinov2's iBOT loss, -1/B sum_b 1/n_masked_b sum_{masked p of b} CE
    (float32; float64 for float64 input), then updates the centre (1, output_dim) with the teacher
    rows' mean. Keyword-only extras: centering="sinkhorn_knopp" (dinov2) over the masked rows, and
    check_finite. M = 0 (no masked patch) gives a loss of 0 with a zero gradient; the centre then
    moves with the other ranks' rows, or stays put when no rank has one: every rank must call forward.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9, *, centering: str = "softmax",
                 sinkhorn_iterations: int = 3, backend: str | None = None, check_finite: bool = False):
        super().__init__(center_mode, centering, sinkhorn_iterations, backend, check_finite)
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center = Center(size=(1, output_dim), mode=center_mode, momentum=center_momentum)

    @property
    def center_momentum(self) -> float:
        return self.center.momentum

    def _center(self) -> torch.Tensor:
        return self.center.center

    def forward(self, teacher_out: torch.Tensor, student_out: torch.Tensor, mask: torch.Tensor,
                teacher_temp: float | None = None) -> torch.Tensor:
        teacher_temp = float(self.teacher_temp if teacher_temp is None else teacher_temp)
        flat = check_ibot_loss_input(student_out, teacher_out, mask, self.student_temp,
                                     names=("student_out", "teacher_out"))
        backend = resolve_backend(self.backend, student_out, teacher_out, mask, self._center())
        # dense input: the masked rows, found on the host (the masked-only form, lightly's, reads nothing back)
        s, t = (student_out[flat], teacher_out[flat]) if student_out.ndim == 3 else (student_out, teacher_out)
        if _teacher_needs_grad([t]):
            targets = self._differentiable_targets([t], teacher_temp)[0]
            loss = reference.ibot_patch_loss(s, targets, mask, student_temp=self.student_temp)
            new_center = update_center(self._center(), t.detach(), self.center_momentum, backend=backend)
        else:
            targets, new_center = self._targets([t], teacher_temp, backend)
            loss = _ibot_loss(s, t, flat, None, None, self.student_temp, backend, targets)
        return self._finish("IBOTPatchLoss", loss, new_center)
