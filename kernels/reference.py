"""Eager PyTorch reference of every dinotron op.

These follow facebookresearch/dinov2's math (dinov2/loss/*.py) and are the oracle for the tests and
the fallback on CPU, run inside the same torch.library ops as the kernels. Arithmetic is fp32 whatever the
input dtype (float64 for float64 inputs, which only this path takes); results are in that dtype unless stated.
The torch.distributed-aware ops reduce across ranks when a process group is initialised, as dinov2.
They take zero teacher rows (a rank whose batch has no masked patch) and still run every collective,
contributing zero sums and a zero row count, so that all ranks make the same calls whatever the data.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinotron.kernels.checks import (
    check_cu_seqlens,
    check_dino_loss_input,
    check_ibot_loss_input,
    check_nonempty,
    check_positive,
    check_qkv,
    check_same_device,
    check_tensor,
)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _center_vector(center: torch.Tensor, K: int) -> torch.Tensor:
    check_tensor("center", center)
    if center.numel() != K:
        raise ValueError(
            f"center has {center.numel()} elements (shape {tuple(center.shape)}) but the logits have K={K}"
        )
    return center.reshape(K)


@torch.no_grad()
def softmax_center_teacher(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((teacher_logits - center) / teacher_temp) over the last dim.

    teacher_logits: (..., K) float, K > 0, any number of rows (zero too); center: K elements, e.g.
    (1, K), any float dtype. Returns (..., K) probabilities (float32, float64 for float64 logits).
    """
    check_tensor("teacher_logits", teacher_logits)
    check_nonempty("teacher_logits", teacher_logits, teacher_logits.ndim - 1)
    check_positive("teacher_temp", teacher_temp)
    acc = acc_dtype(teacher_logits)
    K = teacher_logits.shape[-1]
    return torch.softmax((teacher_logits.to(acc) - _center_vector(center, K).to(acc)) / teacher_temp, dim=-1)


def softmax_center_lse(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Each row's logsumexp((x - center) / teacher_temp): softmax_center_teacher's probabilities are
    exp((x - center) / teacher_temp - lse), the form the fused losses read their targets in."""
    acc = acc_dtype(teacher_logits)
    x = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(acc)
    return torch.logsumexp((x - center.reshape(-1).to(acc)) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA of the batch mean: center * momentum + mean(teacher_logits) * (1 - momentum).

    center: K elements; teacher_logits: (..., K), the mean is over every leading dim and, with
    torch.distributed initialised, over all ranks. Zero rows are allowed (see center_ema: a rank with
    none still joins the all_reduce; no row anywhere leaves the centre unchanged). Returns a new
    tensor shaped and typed like `center`.
    """
    check_tensor("teacher_logits", teacher_logits, ndim=(2, 3))
    check_nonempty("teacher_logits", teacher_logits, teacher_logits.ndim - 1)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    K = teacher_logits.shape[-1]
    _center_vector(center, K)
    rows = teacher_logits.reshape(-1, K).to(acc_dtype(teacher_logits, center))
    return center_ema(center, rows.sum(dim=0), rows.shape[0], momentum)


def center_ema(center: torch.Tensor, batch_sum: torch.Tensor, n_rows: int, momentum: float) -> torch.Tensor:
    """center * momentum + batch_sum / n_rows * (1 - momentum), with batch_sum (K,) float32 (float64)
    and n_rows all-reduced first when torch.distributed is initialised (every rank joins, one with zero
    rows with batch_sum 0 and n_rows 0). When no rank has a row the mean is undefined and the centre
    is returned unchanged rather than NaN; decided on the device, no host sync. Shaped and typed like `center`."""
    n = torch.full((), n_rows, dtype=batch_sum.dtype, device=batch_sum.device)
    if _distributed():
        dist.all_reduce(batch_sum)
        dist.all_reduce(n)
    old = center.to(batch_sum.dtype).reshape(batch_sum.shape)
    new = torch.where(n > 0, old * momentum + batch_sum / n.clamp(min=1.0) * (1.0 - momentum), old)
    return new.reshape(center.shape).to(center.dtype)


def _all_reduce_logsumexp(lse: torch.Tensor) -> torch.Tensor:
    """log(sum over ranks of exp(lse)), elementwise, without overflow; -inf (an empty sum) where every
    rank has -inf, as a rank with no row contributes."""
    if not _distributed():
        return lse
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = m.masked_fill(m == -math.inf, 0.0)  # -inf - -inf would be NaN; exp(-inf - 0) = 0 and log(0) = -inf
    s = torch.exp(lse - m)
    dist.all_reduce(s)
    return m + torch.log(s)


def check_sinkhorn_input(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int) -> None:
    """The argument checks sinkhorn_knopp_teacher shares with its Triton kernels (B = 0 rows is allowed)."""
    check_tensor("teacher_logits", teacher_logits, ndim=2)
    check_nonempty("teacher_logits", teacher_logits, 1)
    check_positive("teacher_temp", teacher_temp)
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")


def sinkhorn_knopp_scalings(teacher_logits: torch.Tensor, teacher_temp: float,
                            n_iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) with Sinkhorn-Knopp's targets exp(L - col[None, :] - row[:, None]), L = logits / temp.

    Each iteration sets col[k] = logsumexp_r(L[r, k] - row[r]) (all-reduced over ranks: the prototype
    normalisation; row = 0 at first; plus log_prototypes_per_row, as dinov2), then
    row[r] = logsumexp_k(L[r, k] - col[k]) (the sample
    normalisation, which makes every row sum to 1). This is dinov2's iteration in log-space, so no exp
    over- or underflows (its final factor B cancels with the 1/B in col). A rank with no row gets
    col = -inf (an empty sum) before the all_reduce and joins every one of them; its row is (0,).
    """
    L = teacher_logits.to(acc_dtype(teacher_logits)) / teacher_temp
    row = torch.zeros(L.shape[0], dtype=L.dtype, device=L.device)
    shift = log_prototypes_per_row(L.shape[0], L.shape[1], L.dtype, L.device)
    for _ in range(n_iterations):
        col = _all_reduce_logsumexp(torch.logsumexp(L - row[:, None], dim=0)) + shift
        row = torch.logsumexp(L - col[None, :], dim=1)
    return row, col


def log_prototypes_per_row(n_rows: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """log(K / B_total), B_total the rows of every rank (all-reduced, on the device; 1 if none): the
    constant dinov2's 1/K and 1/B normalisations add to col each iteration. It cancels in the next row
    normalisation, but without it row and col drift by log(K / B) per iteration and exp(L - col - row)
    loses fp32 precision to the cancellation."""
    rows = torch.full((), n_rows, dtype=dtype, device=device)
    if _distributed():
        dist.all_reduce(rows)
    return math.log(K) - torch.log(rows.clamp(min=1.0))


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV/DINOv2): rows are samples, columns are prototypes.

    teacher_logits: (B, K) float. Returns (B, K) float32 (float64 for float64 logits) whose rows each
    sum to 1 and whose columns each sum to about B_total / K (exactly in the limit of many
    iterations), where B_total is the number of rows over all ranks; see sinkhorn_knopp_scalings.
    B = 0 gives (0, K); a rank with no row still joins every all_reduce, so the other ranks' targets
    are those of their rows alone.
    """
    check_sinkhorn_input(teacher_logits, teacher_temp, n_iterations)
    row, col = sinkhorn_knopp_scalings(teacher_logits, teacher_temp, n_iterations)
    return torch.exp(teacher_logits.to(row.dtype) / teacher_temp - col[None, :] - row[:, None])


@torch.no_grad()
def dinov2_sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """dinov2's DINOLoss.sinkhorn_knopp_teacher as written (single process, exp space, so it overflows
    once |logits| / teacher_temp nears 88; in float64 for float64 logits, exact to ~1e-15 while it stays
    below 709): the transcription tests and benchmarks compare against."""
    Q = torch.exp(teacher_output.to(acc_dtype(teacher_output)) / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def lazy_targets(teacher: list[torch.Tensor], row_lse: torch.Tensor | None, col: torch.Tensor | None,
                 logit_scale: float, col_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The (T, B, K) targets the fused losses read: the teacher views themselves (row_lse None), or
    exp(x * logit_scale + col_scale * col - row_lse) from teacher logits x (layout.TeacherTargets)."""
    t = torch.stack(teacher).to(dtype)
    if row_lse is None:
        return t
    return torch.exp(t * logit_scale + col_scale * col.to(dtype) - row_lse.to(dtype).view(*t.shape[:2], 1))


def cross_entropy(student: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None, student_temp: float,
                  scale: float, exclude_same_view: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused losses' math, eagerly: (loss, lse, mass) for student logits (S, B, K) and targets (T, B, K).

    z = student / student_temp; student view v's target is P_v = sum_u p_u, less p_v if exclude_same_view
    (and v < T); lse = logsumexp(z), mass = sum_k P, loss = scale * sum_{v,b} w[b] (lse * mass - sum_k P z).
    P is never formed: -sum_k P_v log_softmax(z_v) is the summed targets' dot with it, less the own view's."""
    z = student.to(targets.dtype) / student_temp
    log_p = F.log_softmax(z, dim=-1)
    lse = z[..., 0] - log_p[..., 0]  # log_p = z - lse
    total = targets.sum(dim=0)
    ce = -torch.einsum("bk,sbk->sb", total, log_p)
    mass = total.sum(dim=-1).expand_as(ce).clone()
    if exclude_same_view:
        n = min(student.shape[0], targets.shape[0])
        ce[:n] += torch.einsum("vbk,vbk->vb", targets[:n], log_p[:n])
        mass[:n] -= targets[:n].sum(dim=-1)
    if weight is not None:
        ce = ce * weight.to(ce.dtype)
    return ce.sum() * scale, lse, mass


def cross_entropy_backward(grad_loss: torch.Tensor, student: torch.Tensor, targets: torch.Tensor,
                           weight: torch.Tensor | None, mass: torch.Tensor, student_temp: float, scale: float,
                           exclude_same_view: bool) -> torch.Tensor:
    """d loss / d student of cross_entropy: g * scale * w[b] / student_temp * (mass softmax(z) - P), in the
    student's dtype (one (S, B, K) buffer, updated in place)."""
    grad = torch.softmax(student.to(targets.dtype) / student_temp, dim=-1)  # exp(z - lse), recomputed fused
    grad.mul_(mass[..., None]).sub_(targets.sum(dim=0))
    if exclude_same_view:
        n = min(student.shape[0], targets.shape[0])
        grad[:n] += targets[:n]
    coef = grad_loss.to(targets.dtype) * scale / student_temp
    grad.mul_(coef if weight is None else coef * weight.to(targets.dtype)[:, None])
    return grad.to(student.dtype)


def dino_loss(student_output_list, teacher_out_softmaxed_centered_list, *, student_temp: float = 0.1,
              ignore_diagonal: bool = False, reduction: str = "sum") -> torch.Tensor:
    """dinov2's DINOLoss.forward: -sum over (student view, teacher view) pairs of the batch mean of
    sum_k t[b, k] * log_softmax(s[b] / student_temp)[k].

    student_output_list: S views of (B, K) logits, a list or an (S, B, K) tensor;
    teacher_out_softmaxed_centered_list: T views of (B, K) target probabilities (list or tensor).
    ignore_diagonal: skip the pairs of a view with itself (lightly's DINOLoss; the first views are
    the same crops); reduction="mean" divides by the number of pairs (lightly). Returns a scalar in
    the compute dtype (float32, float64 for float64 inputs).
    """
    student, teacher, n_pairs = check_dino_loss_input(student_output_list, teacher_out_softmaxed_centered_list,
                                                      student_temp, reduction, ignore_diagonal)
    acc = acc_dtype(student[0], teacher[0])
    student, teacher = torch.stack(student).to(acc), torch.stack(teacher).to(acc)
    T, S, B = teacher.shape[0], student.shape[0], student.shape[1]
    log_p = F.log_softmax(student / student_temp, dim=-1)
    ce = -torch.einsum("tbk,sbk->ts", teacher, log_p) / B  # (T, S) batch-mean per pair
    if ignore_diagonal:
        ce = ce.masked_fill(torch.eye(T, S, dtype=torch.bool, device=ce.device), 0.0)
    total = ce.sum()
    return total / n_pairs if reduction == "mean" else total


def ibot_patch_loss(student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                    student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                    masks_weight: torch.Tensor | None = None, *, student_temp: float = 0.1) -> torch.Tensor:
    """iBOT masked-patch cross-entropy: dinov2's iBOTPatchLoss.forward_masked (and .forward for dense input).

    student_masks_flat: (B, N) or (B, H, W) bool, True where the student's patch was masked.
    student / teacher: masked-only (M, K), rows in the order of masks.flatten(1).nonzero() (dinov2
    may pad them: only the first n_masked_patches rows count), or dense (B, N, K) (only masked
    patches count). masks_weight: (n_masked,) per-row weights, default 1 / (masked patches of the
    row's image). loss = -1/B sum_rows w * sum_k t log_softmax(s / student_temp). 0 (an empty sum,
    with a zero gradient) when no patch is masked.
    """
    flat = check_ibot_loss_input(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                                 student_temp, n_masked_patches, masks_weight)
    B, N = flat.shape
    s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
    if s.ndim == 3:
        s, t = s[flat], t[flat]
    elif n_masked_patches is not None:
        s, t = s[:n_masked_patches], t[:n_masked_patches]
    acc = acc_dtype(s, t)
    ce = -(t.to(acc) * F.log_softmax(s.to(acc) / student_temp, dim=-1)).sum(dim=-1)  # (M,)
    if masks_weight is None:
        masks_weight = (1.0 / flat.sum(dim=1).clamp(min=1).to(acc))[:, None].expand(B, N)[flat]
    return (ce * masks_weight.to(acc)).sum() / B


def head_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """features (..., D) @ weight (K, D)^T in the compute dtype, the weight first rounded to the features'
    dtype (as autocast's F.linear casts it; the fused-head kernels' dot operands): DINOHead's prototype
    layer without rounding its logits."""
    acc = acc_dtype(features)
    return features.to(acc) @ weight.to(features.dtype).to(acc).T


def teacher_head_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The teacher's prototype logits as DINOHead's Linear gives them, in the features' dtype: F.linear
    with the weight cast to that dtype. The fused losses keep these for Sinkhorn-Knopp (its iterations
    read every teacher row three times)."""
    return F.linear(features, weight.to(features.dtype))


def fused_head_teacher_scores(teacher: torch.Tensor, teacher_weight: torch.Tensor, col: torch.Tensor,
                              teacher_logits: torch.Tensor | None, teacher_temp: float) -> torch.Tensor:
    """The fused losses' (T, B, K) teacher targets are softmax_k of these scores: (t - col) / teacher_temp,
    t the head logits of the (T, B, D) features (softmax centring: col = the centre), or
    L / teacher_temp - col from the stored Sinkhorn-Knopp logits L (T * B, K) (col: its prototype scaling)."""
    if teacher_logits is None:
        return (head_logits(teacher, teacher_weight) - col.to(acc_dtype(teacher))) / teacher_temp
    acc = acc_dtype(teacher_logits)
    return (teacher_logits.to(acc) / teacher_temp - col.to(acc)).view(*teacher.shape[:2], teacher_logits.shape[-1])


def fused_head_loss(student: torch.Tensor, teacher: torch.Tensor, student_weight: torch.Tensor,
                    teacher_weight: torch.Tensor, center: torch.Tensor | None, weight: torch.Tensor | None,
                    student_temp: float, teacher_temp: float, center_momentum: float, sinkhorn_iterations: int,
                    scale: float, exclude_same_view: bool) -> tuple[torch.Tensor, ...]:
    """The head then the loss, eagerly: what dinotron::fused_head_loss computes, from (S, B, D) student and
    (T, B, D) teacher bottleneck features and (K, D) prototype weights (the logits are made here, (S, B, K)).

    Teacher targets: softmax centring with `center` (and its EMA update by update_center on the teacher
    logits), or Sinkhorn-Knopp (center None) on teacher_head_logits. Loss: cross_entropy (pairing and
    weights as there). Returns (loss, new centre (or an empty tensor), student lse (S*B,), student mix
    softmax(z) @ W (S*B, D), teacher lse (T*B,), teacher mix p @ W (T*B, D), col (K,), Sinkhorn's teacher
    logits (T*B, K) or an empty (0, K)); W is the student weight rounded to the features' dtype."""
    acc = acc_dtype(student, teacher)
    K, D = student_weight.shape
    if center is None:
        logits = teacher_head_logits(teacher.reshape(-1, D), teacher_weight)
        col = sinkhorn_knopp_scalings(logits, teacher_temp, sinkhorn_iterations)[1]
        new_center = torch.empty(0, dtype=acc, device=student.device)
    else:
        logits = None
        col = center.reshape(-1).to(acc, copy=True)  # an output: no alias of the input
        new_center = update_center(center, head_logits(teacher, teacher_weight), center_momentum)
    z_t = fused_head_teacher_scores(teacher, teacher_weight, col, logits, teacher_temp)
    targets = torch.softmax(z_t, dim=-1)
    s = head_logits(student, student_weight)
    loss, lse, _ = cross_entropy(s, targets, weight, student_temp, scale, exclude_same_view)
    values = student_weight.to(student.dtype).to(acc)
    s_mix = torch.softmax(s / student_temp, dim=-1).reshape(-1, K) @ values
    return (loss, new_center, lse.reshape(-1), s_mix, torch.logsumexp(z_t, dim=-1).reshape(-1),
            targets.reshape(-1, K) @ values, col, teacher.new_empty(0, K) if logits is None else logits)


def fused_head_loss_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                             student_weight: torch.Tensor, teacher_weight: torch.Tensor, weight: torch.Tensor | None,
                             col: torch.Tensor, teacher_logits: torch.Tensor | None, student_temp: float,
                             teacher_temp: float, scale: float,
                             exclude_same_view: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d student (S, B, D) in its dtype, d student_weight (K, D) in its dtype) of fused_head_loss,
    through the logits: cross_entropy_backward's d logits, then the head matmul's chain rule."""
    acc = acc_dtype(student, teacher)
    s = head_logits(student, student_weight)
    targets = torch.softmax(fused_head_teacher_scores(teacher, teacher_weight, col, teacher_logits, teacher_temp), -1)
    mass = cross_entropy(s, targets, weight, student_temp, scale, exclude_same_view)[2]
    d_logits = cross_entropy_backward(grad_loss, s, targets, weight, mass, student_temp, scale, exclude_same_view)
    d_student = d_logits @ student_weight.to(student.dtype).to(acc)
    d_weight = torch.einsum("sbk,sbd->kd", d_logits, student.to(acc))
    return d_student.to(student.dtype), d_weight.to(student_weight.dtype)


def check_koleo_input(x: torch.Tensor, eps: float, p: float, group=None, distance_eps: float | None = None) -> None:
    """The argument checks koleo_loss shares with its Triton kernel (shape, dtype, eps, p, rows).

    What lightly's KoLeoLoss computes passes: one row, float64, and any number p, as nn.PairwiseDistance
    takes it (inf, 0, negative, NaN); eps and distance_eps must be > 0.
    """
    check_tensor("x", x, ndim=2)
    check_nonempty("x", x, 1)
    check_positive("eps", eps)
    if distance_eps is not None:
        check_positive("distance_eps", distance_eps)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"p (the distance's norm degree) must be a number, as nn.PairwiseDistance's, got {p!r}")
    if group is None:
        check_nonempty("x", x, 0)
    elif not _distributed():
        raise ValueError("group was given but torch.distributed is not initialised")
    # With a group, a rank's row count is data: it is checked in all_gather_rows, on every rank together
    # after the ranks exchange shapes, so that no rank raises alone while the others wait in a collective.


class _AllGatherRows(torch.autograd.Function):
    """cat of every rank's (B, D) rows; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rows = group, slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every backend has all_reduce (gloo has no reduce_scatter)
        return grad[ctx.rows], None, None, None


def all_gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Rows of `x` from every rank of `group`, concatenated in rank order, and where this rank's rows start.

    Differentiable: the gradient of the gathered rows is summed over ranks and returned to the rank
    that owns them (as torch.distributed.nn.all_gather). Every rank must pass the same (B, D), B >= 1:
    the ranks exchange their shapes first (one host sync), so that all raise together otherwise.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) > 1:
        raise ValueError(f"every rank of the group must pass x of one shape (B, D), got {shapes} by rank")
    if x.shape[0] == 0:
        raise ValueError("the group holds 0 row(s) in all: KoLeo needs at least one")
    return _AllGatherRows.apply(x, group, rank, world), rank * x.shape[0]


def koleo_neighbours(keys: torch.Tensor, offset: int, B: int, eps: float) -> torch.Tensor:
    """nn(i) = argmax_j <xn_{offset + i}, xn_j> over the rows j != offset + i of keys (N, D), for the B queries
    keys[offset:offset + B], xn = F.normalize(keys, eps=eps); first index on ties (torch.max on CPU). A
    query with no other key (N = 1) is its own neighbour, as in lightly and dinov2. Returns (B,) int64."""
    with torch.no_grad(), torch.autocast(keys.device.type, enabled=False):
        xn = F.normalize(keys.to(acc_dtype(keys)), p=2, dim=-1, eps=eps)
        dots = xn[offset : offset + B] @ xn.t()
        rows = torch.arange(B, device=keys.device)
        dots[rows, rows + offset] = -math.inf
        return dots.argmax(dim=1)


def koleo_pair_loss(keys: torch.Tensor, offset: int, nn_idx: torch.Tensor, eps: float, p: float = 2.0,
                    distance_eps: float | None = None) -> torch.Tensor:
    """-mean_i log(||xn_{offset + i} - xn_nn(i) + distance_eps||_p + eps) at given neighbours nn_idx (B,), xn as
    in koleo_neighbours; distance_eps defaults to eps. Differentiable in keys; a scalar in keys' dtype."""
    with torch.autocast(keys.device.type, enabled=False):
        k = keys.to(acc_dtype(keys))  # one rounding of the gradient, at the end
        queries = F.normalize(k[offset : offset + nn_idx.shape[0]], p=2, dim=-1, eps=eps)
        neighbours = F.normalize(k[nn_idx], p=2, dim=-1, eps=eps)
        distances = F.pairwise_distance(queries, neighbours, p=p, eps=eps if distance_eps is None else distance_eps)
        return -torch.log(distances + eps).mean().to(keys.dtype)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, *, p: float = 2.0, group=None,
               distance_eps: float | None = None) -> torch.Tensor:
    """KoLeo regulariser: -mean_i log(||xn_i - xn_nn(i) + eps||_p + eps), xn = F.normalize(x, eps=eps).

    x: (B, D) float, B >= 1 (a lone row is its own neighbour, as in lightly and dinov2). nn(i)
    maximises <xn_i, xn_j> over j != i (first index on ties, as torch.max on CPU). eps is used three
    times as in lightly: in F.normalize, inside nn.PairwiseDistance and in the log; distance_eps, if
    given, replaces the second (dinov2's KoLeoLoss.forward(x, eps) keeps nn.PairwiseDistance's at
    1e-8). p is the distance's norm degree (lightly's KoLeoLoss(p=...)), any number it takes.
    group: a torch.distributed process group; the neighbours are then searched among the rows of
    every rank of the group (all-gathered with gradient, as dinov3's KoLeoLossDistributed), the mean
    is over this rank's rows. Autocast is disabled inside, as in dinov2. Computed in fp32 (float64 for
    float64 x); returns a scalar in x's dtype, as lightly's.
    """
    check_koleo_input(x, eps, p, group, distance_eps)
    keys, offset = (x, 0) if group is None else all_gather_rows(x, group)
    nn_idx = koleo_neighbours(keys, offset, x.shape[0], eps)
    return koleo_pair_loss(keys, offset, nn_idx, eps, p=p, distance_eps=distance_eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v, plain math in fp32 (float64 if an input is float64).

    q, k, v: (B, H, N, D), any float dtype; scale defaults to D ** -0.5. Returns (B, H, N, D) in q's dtype.
    """
    check_qkv(q, k, v, "(B, H, N, D)")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    acc = acc_dtype(q, k, v)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    return (torch.softmax(scores, dim=-1) @ v.to(acc)).to(q.dtype)


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of <attention(q, k, v, scale), grad_out>, in q's, k's and v's dtypes.

    The softmax P is recomputed, then dV = P^T dO, dS = P * (dO V^T - rowsum(P * dO V^T)),
    dQ = dS K * scale, dK = dS^T Q * scale: plain math in attention's precision, no autograd (the
    kernels' eager backend runs it inside a torch.library op, where autograd records nothing).
    """
    check_qkv(q, k, v, "(B, H, N, D)")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    acc = acc_dtype(q, k, v)
    q_, k_, v_, do = (t.to(acc) for t in (q, k, v, grad_out))
    p = torch.softmax((q_ @ k_.transpose(-2, -1)) * scale, dim=-1)
    dp = do @ v_.transpose(-2, -1)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq, dk, dv = (ds @ k_) * scale, (ds.transpose(-2, -1) @ q_) * scale, p.transpose(-2, -1) @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _per_sequence(fn, cu_seqlens: torch.Tensor, *packed: torch.Tensor) -> list[torch.Tensor]:
    """fn on (count, H, length, D) views of the packed (total_tokens, H, D) tensors, once per run of
    `count` consecutive sequences of one length; its outputs (a tensor or a tuple) packed back into
    (total_tokens, H, D) tensors, returned as a list. Reads the offsets on the host."""
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:], strict=False)]
    outs = []
    for length, run in itertools.groupby(zip(offsets, lengths, strict=False), key=lambda pair: pair[1]):
        run = list(run)
        start, count = run[0][0], len(run)
        views = (t[start:start + count * length].unflatten(0, (count, length)).transpose(1, 2) for t in packed)
        result = fn(*views)
        outs.append([r.transpose(1, 2).flatten(0, 1) for r in (result if isinstance(result, tuple) else (result,))])
    return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: `attention` within each sequence.

    q, k, v: (total_tokens, H, D); sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    (cu_seqlens: (n_seqs + 1,) int32 offsets from 0 to total_tokens, max_seqlen >= every length).
    Each run of consecutive equal-length sequences is one batched call. Returns (total_tokens, H, D) in q's dtype.
    Reads the offsets on the host (a sync for offsets on a GPU).
    """
    check_qkv(q, k, v, "(total_tokens, H, D)")
    check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens=q.shape[0])
    return _per_sequence(lambda *qkv: attention(*qkv, scale), cu_seqlens, q, k, v)[0]


def attention_varlen_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of <attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale), grad_out>:
    attention_backward within each sequence. Reads the offsets on the host."""
    check_qkv(q, k, v, "(total_tokens, H, D)")
    check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens=q.shape[0])
    return tuple(_per_sequence(lambda *t: attention_backward(*t, scale), cu_seqlens, grad_out, q, k, v))


def check_gram_flags(remove_neg: bool, remove_only_teacher_neg: bool) -> None:
    """dinov3's GramLoss asserts that at most one of its two clips is on."""
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are exclusive (dinov3's GramLoss asserts it): "
                         "remove_neg clips both models' negative similarities, remove_only_teacher_neg the teacher's")


def check_gram_input(student_patches: torch.Tensor, teacher_patches: torch.Tensor, remove_neg: bool,
                     remove_only_teacher_neg: bool, img_level: bool) -> None:
    """The argument checks gram_loss shares with its Triton kernels: (B, N, D) patches of one shape and device
    ((B * N, D) also with img_level=False, as dinov3's), N and D >= 1, at most one clip."""
    ndim = 3 if img_level else (2, 3)
    check_tensor("student_patches", student_patches, ndim=ndim)
    check_tensor("teacher_patches", teacher_patches, ndim=ndim)
    check_same_device(student_patches=student_patches, teacher_patches=teacher_patches)
    if student_patches.shape != teacher_patches.shape:
        raise ValueError(f"student_patches has shape {tuple(student_patches.shape)} but teacher_patches has "
                         f"{tuple(teacher_patches.shape)}: one patch grid and feature width for both (dinov3 "
                         "resizes the Gram teacher's patch grid to the student's first)")
    for dim in range(student_patches.ndim):
        check_nonempty("student_patches", student_patches, dim)
    check_gram_flags(remove_neg, remove_only_teacher_neg)


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, *, normalize: bool = True,
              remove_neg: bool = True, remove_only_teacher_neg: bool = False, img_level: bool = True) -> torch.Tensor:
    """dinov3's GramLoss.forward (dinov3/loss/gram_loss.py) written plainly: it holds both Gram matrices.

    S = xn xn^T and T = yn yn^T per image (img_level; else over all B * N rows), xn = F.normalize(x) if
    normalize; remove_neg zeroes the negative entries of both, remove_only_teacher_neg those of T (dinov3
    then zeroes S where S < 0 and the already clipped T < 0: nowhere); the loss is mean((S - T)^2) over
    every entry. Computed in fp32 (float64 for float64 inputs), autocast off; differentiable in both.
    """
    check_gram_input(student_patches, teacher_patches, remove_neg, remove_only_teacher_neg, img_level)
    dtype = acc_dtype(student_patches, teacher_patches)
    with torch.autocast(student_patches.device.type, enabled=False):
        x, y = student_patches.to(dtype), teacher_patches.to(dtype)
        if normalize:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        if not img_level:
            x, y = x.flatten(0, -2), y.flatten(0, -2)
        student_sim, teacher_sim = x @ x.transpose(-1, -2), y @ y.transpose(-1, -2)
        if remove_neg or remove_only_teacher_neg:
            teacher_sim = torch.where(teacher_sim < 0, 0.0, teacher_sim)
        if remove_neg:
            student_sim = torch.where(student_sim < 0, 0.0, student_sim)
        return F.mse_loss(student_sim, teacher_sim)
