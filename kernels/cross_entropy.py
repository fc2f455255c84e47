"""DINO and iBOT cross-entropy, fused with the teacher targets: Triton kernels, autograd Function, modules.

For student view v and row b (S views, T teacher views, B rows, K prototypes):

    P_v[b]  = sum_{u != v} p_u[b]              DINO: every teacher view but the same crop
    P_v[b]  = p_v[b]                           iBOT: the same patch (S = T = 1)
    ce[v,b] = -sum_k P_v[b,k] log_softmax(z_v[b])[k] = lse_v[b] * sum_k P_v[b,k] - sum_k P_v[b,k] z_v[b,k]
    loss    = scale * sum_{v,b} w[b] ce[v,b]   z = student_logits / student_temp

so each student row needs one pass: an online log-sum-exp over K blocks and two dot products
with P, which is the sum of the teacher views minus the own view (no T x S pair expansion). One
program takes one batch row b and all views at once, an (S, BLOCK_K) student tile against the
(T, BLOCK_K) teacher tile of the same row, so the teacher is read once per row, not once per pair;
K is split between programs when there are few rows, and a one-program kernel folds the per-split
(max, sum, dot, mass) partials into lse, mass and the scalar loss (deterministic: no atomics). The
targets are either given probabilities or teacher logits with their centring (layout.TeacherTargets),
recomputed on the fly, so softmax-centred and Sinkhorn-Knopp targets are never stored.
Backward, same grid: grad[v,b,k] = g * scale * w[b] / student_temp * (mass[v,b] softmax(z_v[b])[k] - P_v[b,k]),
written once, in the logits' dtype. Everything accumulates in fp32; inputs may be fp32, fp16 or bf16.
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
from dinotron.kernels.layout import TeacherTargets, k_splits, tile, view_table
from dinotron.kernels.sinkhorn_knopp import sinkhorn_knopp_targets
from dinotron.kernels.softmax_center import softmax_center_targets


@triton.jit
def _row_setup(S_PTR, S_OFFSETS, s_row_stride, T_PTR, T_OFFSETS, t_row_stride, ROW_LSE, n_rows, K,
               n_s_views, n_t_views, cols_per_split, V_PAD: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
               S_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr):
    """Program (row, split): per view v, pointers to row `row` of the student and teacher views and
    the teacher row's lse; and the split's columns [k_start, k_end)."""
    row = tl.program_id(0)
    k_start = tl.program_id(1) * cols_per_split
    k_end = tl.minimum(k_start + cols_per_split, K)
    v = tl.arange(0, V_PAD)
    s_valid = v < n_s_views
    t_valid = v < n_t_views
    row64 = row.to(tl.int64)
    s_rows = S_PTR + tl.multiple_of(tl.load(S_OFFSETS + v, mask=s_valid, other=0), S_ALIGN) + row64 * s_row_stride
    t_rows = T_PTR + tl.multiple_of(tl.load(T_OFFSETS + v, mask=t_valid, other=0), T_ALIGN) + row64 * t_row_stride
    t_lse = tl.zeros((V_PAD,), tl.float32)
    if TEACHER_LOGITS:
        t_lse = tl.load(ROW_LSE + v * n_rows + row, mask=t_valid, other=0.0)
    return row, k_start, k_end, v, s_valid, t_valid, s_rows, t_rows, t_lse


@triton.jit
def _tiles(s_rows, s_valid, t_rows, t_valid, t_lse, COL, k, k_mask, s_scale, logit_scale, col_scale,
           TEACHER_LOGITS: tl.constexpr, EXCLUDE_SAME_VIEW: tl.constexpr):
    """(V_PAD, BLOCK_K) tiles: student z = logits * s_scale (0 off the mask) and the paired targets P."""
    z = tl.load(s_rows[:, None] + k[None, :], mask=s_valid[:, None] & k_mask[None, :],
                other=0.0).to(tl.float32) * s_scale
    t_mask = t_valid[:, None] & k_mask[None, :]
    p = tl.load(t_rows[:, None] + k[None, :], mask=t_mask, other=0.0).to(tl.float32)
    if TEACHER_LOGITS:
        col = tl.load(COL + k, mask=k_mask, other=0.0).to(tl.float32)
        p = tl.where(t_mask, tl.exp(p * logit_scale + col_scale * col[None, :] - t_lse[:, None]), 0.0)
    if EXCLUDE_SAME_VIEW:
        p = tl.sum(p, axis=0)[None, :] - p
    return z, p


@triton.jit
def _ce_fwd_kernel(
    S_PTR, S_OFFSETS, s_row_stride, T_PTR, T_OFFSETS, t_row_stride, COL, ROW_LSE, PARTIAL,
    n_rows, K, n_s_views, n_t_views, cols_per_split, s_scale, logit_scale, col_scale,
    V_PAD: tl.constexpr, BLOCK_K: tl.constexpr, TEACHER_LOGITS: tl.constexpr, EXCLUDE_SAME_VIEW: tl.constexpr,
    S_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr,
):
    """Program (b, split): PARTIAL[{max, sum, dot, mass}, split, v, b] over the split's columns."""
    row, k_start, k_end, v, s_valid, t_valid, s_rows, t_rows, t_lse = _row_setup(
        S_PTR, S_OFFSETS, s_row_stride, T_PTR, T_OFFSETS, t_row_stride, ROW_LSE, n_rows, K, n_s_views, n_t_views,
        cols_per_split, V_PAD, TEACHER_LOGITS, S_ALIGN, T_ALIGN,
    )
    m = tl.full((V_PAD,), float("-inf"), tl.float32)
    s = tl.zeros((V_PAD,), tl.float32)
    dot = tl.zeros((V_PAD,), tl.float32)
    mass = tl.zeros((V_PAD,), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        z, p = _tiles(s_rows, s_valid, t_rows, t_valid, t_lse, COL, k, k_mask, s_scale, logit_scale, col_scale,
                      TEACHER_LOGITS, EXCLUDE_SAME_VIEW)
        z_lse = tl.where(k_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_lse - m_new[:, None]), axis=1)
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
            s += tl.load(at + plane, mask=mask, other=0.0) * tl.exp(tl.load(at, mask=mask, other=0.0) - m)
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
    S_PTR, S_OFFSETS, s_row_stride, T_PTR, T_OFFSETS, t_row_stride, COL, ROW_LSE, LSE, MASS, WEIGHT, GRAD_LOSS,
    GRAD, grad_view_stride, n_rows, K, n_s_views, n_t_views, cols_per_split, s_scale, logit_scale, col_scale, scale,
    V_PAD: tl.constexpr, BLOCK_K: tl.constexpr, TEACHER_LOGITS: tl.constexpr, EXCLUDE_SAME_VIEW: tl.constexpr,
    S_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """Program (b, split): GRAD[v, b, k] for the split's columns; GRAD is (S, B, K) contiguous."""
    row, k_start, k_end, v, s_valid, t_valid, s_rows, t_rows, t_lse = _row_setup(
        S_PTR, S_OFFSETS, s_row_stride, T_PTR, T_OFFSETS, t_row_stride, ROW_LSE, n_rows, K, n_s_views, n_t_views,
        cols_per_split, V_PAD, TEACHER_LOGITS, S_ALIGN, T_ALIGN,
    )
    lse = tl.load(LSE + v * n_rows + row, mask=s_valid, other=0.0)
    mass = tl.load(MASS + v * n_rows + row, mask=s_valid, other=0.0)
    coef = tl.load(GRAD_LOSS).to(tl.float32) * scale * s_scale
    if HAS_WEIGHT:
        coef *= tl.load(WEIGHT + row)
    g_rows = GRAD + v.to(tl.int64) * grad_view_stride + row.to(tl.int64) * K
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        z, p = _tiles(s_rows, s_valid, t_rows, t_valid, t_lse, COL, k, k_mask, s_scale, logit_scale, col_scale,
                      TEACHER_LOGITS, EXCLUDE_SAME_VIEW)
        g = coef * (mass[:, None] * tl.exp(z - lse[:, None]) - p)
        tl.store(g_rows[:, None] + k[None, :], g.to(GRAD.dtype.element_ty), mask=s_valid[:, None] & k_mask[None, :])


def _launch_config(S: int, T: int, B: int, K: int, device: torch.device) -> dict:
    v_pad = triton.next_power_of_2(max(S, T))
    block_k = max(16, min(tile(4096) // v_pad, triton.next_power_of_2(K)))
    splits, cols_per_split = k_splits(B, K, block_k, device)
    return dict(v_pad=v_pad, block_k=block_k, splits=splits, cols_per_split=cols_per_split)


def _target_args(targets: TeacherTargets) -> tuple:
    t = targets.views
    return (t.base, t.offsets, t.row_stride, targets.col, targets.row_lse)


class DinoCrossEntropy(torch.autograd.Function):
    """scale * sum_{v,b} w[b] CE(P_v[b], softmax(student_v[b] / student_temp)) on the kernels above.

    student: S views of (B, K), given as separate tensors, or as one (S, B, K) tensor if `stacked`;
    targets: T views of (B, K) (TeacherTargets); weight: (B,) float32 or None; exclude_same_view:
    DINO's pairing (True) or iBOT's (False, S = T = 1). Returns a float32 scalar; the gradient goes
    to the student only, in its dtype.
    """

    @staticmethod
    def forward(ctx, targets: TeacherTargets, student_temp: float, scale: float, weight, exclude_same_view: bool,
                stacked: bool, *student: torch.Tensor) -> torch.Tensor:
        table = view_table(student[0].unbind(0) if stacked else student)
        S, B, K = table.shape
        T = targets.views.n_views
        device = table.base.device
        cfg = _launch_config(S, T, B, K, device)
        partial = torch.empty(4, cfg["splits"], S, B, dtype=torch.float32, device=device)
        _ce_fwd_kernel[(B, cfg["splits"])](
            table.base, table.offsets, table.row_stride, *_target_args(targets), partial,
            B, K, S, T, cfg["cols_per_split"], 1.0 / student_temp, targets.logit_scale, targets.col_scale,
            V_PAD=cfg["v_pad"], BLOCK_K=cfg["block_k"], TEACHER_LOGITS=targets.row_lse is not None,
            EXCLUDE_SAME_VIEW=exclude_same_view, S_ALIGN=table.align, T_ALIGN=targets.views.align, num_warps=8,
        )
        lse, mass = torch.empty(2, S, B, dtype=torch.float32, device=device)
        loss = torch.empty((), dtype=torch.float32, device=device)
        _ce_combine_kernel[(1,)](
            partial, weight, lse, mass, loss, S * B, B, cfg["splits"], scale,
            HAS_WEIGHT=weight is not None, BLOCK=min(1024, triton.next_power_of_2(S * B)), num_warps=4,
        )
        ctx.save_for_backward(*student, lse, mass, *(() if weight is None else (weight,)))
        ctx.targets, ctx.student_temp, ctx.scale, ctx.exclude_same_view, ctx.stacked = (
            targets, student_temp, scale, exclude_same_view, stacked
        )
        ctx.n_student, ctx.has_weight = len(student), weight is not None
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        saved = ctx.saved_tensors
        student, (lse, mass) = saved[: ctx.n_student], saved[ctx.n_student: ctx.n_student + 2]
        weight = saved[-1] if ctx.has_weight else None
        table = view_table(student[0].unbind(0) if ctx.stacked else student)
        S, B, K = table.shape
        targets = ctx.targets
        cfg = _launch_config(S, targets.views.n_views, B, K, table.base.device)
        grad = torch.empty(S, B, K, dtype=table.base.dtype, device=table.base.device)
        _ce_bwd_kernel[(B, cfg["splits"])](
            table.base, table.offsets, table.row_stride, *_target_args(targets), lse, mass, weight,
            grad_loss.contiguous(), grad, B * K,
            B, K, S, targets.views.n_views, cfg["cols_per_split"], 1.0 / ctx.student_temp,
            targets.logit_scale, targets.col_scale, ctx.scale,
            V_PAD=cfg["v_pad"], BLOCK_K=cfg["block_k"], TEACHER_LOGITS=targets.row_lse is not None,
            EXCLUDE_SAME_VIEW=ctx.exclude_same_view, S_ALIGN=table.align, T_ALIGN=targets.views.align,
            HAS_WEIGHT=weight is not None, num_warps=8,
        )
        grads = (grad,) if ctx.stacked else grad.unbind(0)
        return (None,) * 6 + tuple(grads)


def _check_no_teacher_grad(teacher, name: str) -> None:
    """ValueError if a teacher tensor would need a gradient, which the fused kernels do not give."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in teacher):
        raise ValueError(
            f"{name} requires grad, but the fused kernels give no gradient to the teacher targets: detach them "
            "(dinov2 runs the teacher under torch.no_grad) or use backend='eager'"
        )


def fused_dino_loss(student_arg, student: list[torch.Tensor], targets: TeacherTargets, n_pairs: int,
                    student_temp: float, reduction: str, teacher_name: str = "teacher_probs_per_view") -> torch.Tensor:
    """dino_loss on the kernels; student_arg is what the caller passed (a (S, B, K) tensor or views)."""
    _check_no_teacher_grad(targets.views.views, teacher_name)
    B = student[0].shape[0]
    scale = 1.0 / (B * (n_pairs if reduction == "mean" else 1))
    stacked = isinstance(student_arg, torch.Tensor)
    inputs = (student_arg,) if stacked else tuple(student)
    return DinoCrossEntropy.apply(targets, float(student_temp), scale, None, True, stacked, *inputs)


def fused_ibot_loss(student: torch.Tensor, targets: TeacherTargets, flat_masks: torch.Tensor, student_temp: float,
                    teacher_name: str = "teacher_patch_probs") -> torch.Tensor:
    """ibot_patch_loss on the kernels, for masked-only (M, K) student rows."""
    _check_no_teacher_grad(targets.views.views, teacher_name)
    M = student.shape[0]
    if M == 0:  # no masked patch in the batch: the loss is 0, as the reference's empty sum
        return student.float().sum() * 0.0
    counts = flat_masks.sum(dim=1)
    weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts, output_size=M)
    return DinoCrossEntropy.apply(targets, float(student_temp), 1.0 / flat_masks.shape[0], weight, False, True,
                                  student[None])


def dino_loss(student_logits_per_view, teacher_probs_per_view, student_temp: float = 0.1, reduction: str = "mean", *,
              backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """DINO cross-entropy over all (student view, teacher view) pairs except a view with itself.

    student_logits_per_view: S views of (B, K) logits, a list or an (S, B, K) tensor (the tensor
    form also gets its gradient as one tensor; a list's views each get a view of one gradient buffer).
    teacher_probs_per_view: T views of (B, K) target probabilities (list or (T, B, K) tensor), the
    first views the same crops as the student's. fp32/fp16/bf16. reduction="mean" averages over the
    S*T - min(S, T) pairs (lightly), "sum" sums them (dinov2's DINOLoss). Returns a float32 scalar.
    check_finite=False skips the NaN/inf check of the loss (one device-to-host sync).
    """
    student, teacher, n_pairs = check_dino_loss_input(student_logits_per_view, teacher_probs_per_view, student_temp,
                                                      reduction)
    if resolve_backend(backend, student[0], teacher[0]) == "eager":
        loss = reference.dino_loss(student_logits_per_view, teacher_probs_per_view, student_temp, reduction)
    else:
        targets = TeacherTargets(view_table(teacher))
        loss = fused_dino_loss(student_logits_per_view, student, targets, n_pairs, student_temp, reduction)
    if check_finite:
        check_finite_result("dino_loss", "student_logits_per_view or teacher_probs_per_view", loss.detach())
    return loss


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
                    student_temp: float = 0.1, *, backend: str | None = None,
                    check_finite: bool = True) -> torch.Tensor:
    """iBOT masked-patch cross-entropy with dinov2's per-image 1/n_masked weighting.

    masks: (B, N) or (B, H, W) bool, True where the student's patch was masked.
    student_patch_logits / teacher_patch_probs: dense (B, N, K) (only masked patches count) or
    masked-only (M, K), M = masks.sum(), rows in the order of masks.flatten(1).nonzero().
    loss = -1/B sum_b 1/max(n_b, 1) sum_{masked p of b} sum_k t[p, k] log_softmax(s[p] / student_temp)[k].
    Returns a float32 scalar. No masked patch (M = 0) gives 0, as dinov2's empty sum, still in the
    graph of student_patch_logits (a zero gradient). check_finite=False skips the NaN/inf check (one host sync).
    """
    flat = check_ibot_loss_input(student_patch_logits, teacher_patch_probs, masks, student_temp)
    if resolve_backend(backend, student_patch_logits, teacher_patch_probs, masks) == "eager":
        loss = reference.ibot_patch_loss(student_patch_logits, teacher_patch_probs, masks, student_temp)
    else:
        s, t = student_patch_logits, teacher_patch_probs
        if s.ndim == 3:
            s, t = s[flat], t[flat]
        loss = fused_ibot_loss(s, TeacherTargets(view_table([t])), flat, student_temp)
    if check_finite:
        check_finite_result("ibot_patch_loss", "student_patch_logits or teacher_patch_probs", loss.detach())
    return loss


class _CenteredTeacher(nn.Module):
    """Teacher targets from teacher logits: DINO's softmax centring (centre EMA buffer `center`)
    or dinov2's Sinkhorn-Knopp; what DINOLoss and IBOTPatchLoss share."""

    def __init__(self, center_shape, center_mode, center_momentum, centering, sinkhorn_iterations, backend,
                 check_finite):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        if centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'softmax' or 'sinkhorn_knopp', got {centering!r}")
        self.register_buffer("center", torch.zeros(center_shape))
        self.center_momentum, self.centering, self.sinkhorn_iterations = center_momentum, centering, sinkhorn_iterations
        self.backend, self.check_finite = backend, check_finite

    def _targets(self, teacher: list[torch.Tensor], teacher_temp: float, eager: bool):
        """(targets, new centre or None): (T, B, K) float32 probabilities if eager, else TeacherTargets."""
        check_positive("teacher_temp", teacher_temp)
        reference._center_vector(self.center, teacher[0].shape[-1])
        check_same_device(teacher_out=teacher[0], center=self.center)  # move the module with .to(device)
        if eager:
            stacked = torch.stack(teacher)
            if self.centering == "sinkhorn_knopp":
                probs = reference.sinkhorn_knopp_teacher(stacked.flatten(0, 1), teacher_temp, self.sinkhorn_iterations)
                return probs.view(stacked.shape), None
            return (reference.softmax_center_teacher(stacked, self.center, teacher_temp),
                    reference.update_center(self.center, stacked, self.center_momentum))
        table = view_table(teacher)
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_targets(table, teacher_temp, self.sinkhorn_iterations)[0], None
        return softmax_center_targets(table, self.center, teacher_temp, self.center_momentum)

    def _finish(self, name: str, loss: torch.Tensor, new_center: torch.Tensor | None) -> torch.Tensor:
        if self.check_finite:
            centre = [] if new_center is None else [new_center]
            check_finite_result(name, "the student or teacher outputs (or the centre)", loss.detach(), *centre)
        if new_center is not None:
            self.center.copy_(new_center)
        return loss


class DINOLoss(_CenteredTeacher):
    """lightly's DINOLoss (same constructor and forward), on the fused kernels for CUDA tensors.

    forward(teacher_out, student_out, teacher_temp=None, epoch=None): teacher_out T views and
    student_out S views of (B, output_dim) logits (lists, or (V, B, K) tensors), the teacher's views
    the first (global) crops of the student's. Returns the float32 cross-entropy averaged over the
    S*T - min(S, T) cross-view pairs (reduction="sum" sums them, as dinov2), then updates the centre
    buffer (1, 1, output_dim) by EMA with the teacher's batch mean (all ranks). centering=
    "sinkhorn_knopp" uses dinov2's Sinkhorn-Knopp targets over all T*B teacher rows instead, and
    leaves the centre alone. The teacher temperature is teacher_temp if given, else the warm-up
    schedule at `epoch`, else the constructor's teacher_temp. The teacher gets no gradient.
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, centering: str = "softmax", sinkhorn_iterations: int = 3,
                 reduction: str = "mean", backend: str | None = None, check_finite: bool = True):
        super().__init__((1, 1, output_dim), center_mode, center_momentum, centering, sinkhorn_iterations, backend,
                         check_finite)
        self.teacher_temp, self.student_temp, self.reduction = teacher_temp, student_temp, reduction
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def forward(self, teacher_out, student_out, teacher_temp: float | None = None,
                epoch: int | None = None) -> torch.Tensor:
        if teacher_temp is None:
            warming_up = epoch is not None and epoch < self.warmup_teacher_temp_epochs
            teacher_temp = float(self.teacher_temp_schedule[epoch]) if warming_up else self.teacher_temp
        names = ("student_out", "teacher_out")
        student, teacher, n_pairs = check_dino_loss_input(student_out, teacher_out, self.student_temp, self.reduction,
                                                          names)
        _check_no_teacher_grad(teacher, "teacher_out")
        eager = resolve_backend(self.backend, student[0], teacher[0], self.center) == "eager"
        with torch.no_grad():
            targets, new_center = self._targets(teacher, float(teacher_temp), eager)
        if eager:
            loss = reference.dino_loss(student_out, targets, self.student_temp, self.reduction)
        else:
            loss = fused_dino_loss(student_out, student, targets, n_pairs, self.student_temp, self.reduction,
                                   "teacher_out")
        return self._finish("DINOLoss", loss, new_center)


class IBOTPatchLoss(_CenteredTeacher):
    """lightly's IBOTPatchLoss (same constructor and forward), on the fused kernels for CUDA tensors.

    forward(teacher_out, student_out, mask, teacher_temp=None): teacher and student logits of the
    masked patches, (M, output_dim) with M = mask.sum() (or dense (B, N, output_dim)); mask (B, H, W)
    or (B, N) bool. Returns dinov2's iBOT loss, -1/B sum_b 1/n_masked_b sum_{masked p of b} CE,
    as float32, then updates the centre buffer (1, output_dim) with the teacher rows' mean.
    centering="sinkhorn_knopp" uses Sinkhorn-Knopp over the M masked rows (dinov2) instead.
    M = 0 (no masked patch) gives a loss of 0 with a zero gradient; the centre then moves with the
    other ranks' rows, or stays put when no rank has one: every rank must call forward each step.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9, *, centering: str = "softmax",
                 sinkhorn_iterations: int = 3, backend: str | None = None, check_finite: bool = True):
        super().__init__((1, output_dim), center_mode, center_momentum, centering, sinkhorn_iterations, backend,
                         check_finite)
        self.teacher_temp, self.student_temp = teacher_temp, student_temp

    def forward(self, teacher_out: torch.Tensor, student_out: torch.Tensor, mask: torch.Tensor,
                teacher_temp: float | None = None) -> torch.Tensor:
        teacher_temp = self.teacher_temp if teacher_temp is None else teacher_temp
        flat = check_ibot_loss_input(student_out, teacher_out, mask, self.student_temp, ("student_out", "teacher_out"))
        s, t = (student_out[flat], teacher_out[flat]) if student_out.ndim == 3 else (student_out, teacher_out)
        _check_no_teacher_grad([t], "teacher_out")
        eager = resolve_backend(self.backend, s, t, mask, self.center) == "eager"
        with torch.no_grad():
            targets, new_center = self._targets([t], float(teacher_temp), eager)
        if eager:
            loss = reference.ibot_patch_loss(s, targets[0], mask, self.student_temp)
        else:
            loss = fused_ibot_loss(s, targets, flat, self.student_temp, "teacher_out")
        return self._finish("IBOTPatchLoss", loss, new_center)
