"""Eager PyTorch reference of every dinotron op.

These follow facebookresearch/dinov2's math (dinov2/loss/*.py) and are the oracle for the tests and
the fallback on CPU. All arithmetic is fp32 whatever the input dtype; results are fp32 unless stated.
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
    check_tensor,
)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _center_vector(center: torch.Tensor, K: int) -> torch.Tensor:
    check_tensor("center", center)
    if center.numel() != K:
        raise ValueError(
            f"center has {center.numel()} elements (shape {tuple(center.shape)}) but the logits have K={K}"
        )
    return center.float().reshape(K)


@torch.no_grad()
def softmax_center_teacher(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((teacher_logits - center) / teacher_temp) over the last dim.

    teacher_logits: (..., K) float, K > 0, any number of rows (zero too); center: K elements, e.g.
    (1, K), any float dtype. Returns (..., K) float32 probabilities.
    """
    check_tensor("teacher_logits", teacher_logits)
    check_nonempty("teacher_logits", teacher_logits, teacher_logits.ndim - 1)
    check_positive("teacher_temp", teacher_temp)
    K = teacher_logits.shape[-1]
    return torch.softmax((teacher_logits.float() - _center_vector(center, K)) / teacher_temp, dim=-1)


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
    rows = teacher_logits.reshape(-1, K).float()
    return center_ema(center, rows.sum(dim=0), rows.shape[0], momentum)


def center_ema(center: torch.Tensor, batch_sum: torch.Tensor, n_rows: int, momentum: float) -> torch.Tensor:
    """center * momentum + batch_sum / n_rows * (1 - momentum), with batch_sum (K,) float32 and
    n_rows all-reduced first when torch.distributed is initialised (every rank joins, one with zero
    rows with batch_sum 0 and n_rows 0). When no rank has a row the mean is undefined and the centre
    is returned unchanged rather than NaN; decided on the device, no host sync. Shaped and typed like `center`."""
    n = torch.tensor(float(n_rows), device=batch_sum.device)
    if _distributed():
        dist.all_reduce(batch_sum)
        dist.all_reduce(n)
    old = center.float().reshape(batch_sum.shape)
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


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV/DINOv2): rows are samples, columns are prototypes.

    teacher_logits: (B, K) float. Returns (B, K) float32 whose rows each sum to 1 and whose
    columns each sum to about B_total / K (exactly in the limit of many iterations), where B_total
    is the number of rows over all ranks. B = 0 gives (0, K); a rank with no row still joins every
    all_reduce (its column log-sum-exps are -inf, an empty sum), so the other ranks' targets are those
    of their rows alone.

    Same iterations as dinov2's DINOLoss.sinkhorn_knopp_teacher, written in log-space so that no
    exp can overflow or underflow: Q = exp(L + log_r[None, :] + log_c[:, None]) with L the scaled
    logits; each iteration sets the prototype scaling log_r (rows of dinov2's K x B matrix sum to
    1/K), then the sample scaling log_c (columns sum to 1/B); the result is multiplied by B.
    """
    check_sinkhorn_input(teacher_logits, teacher_temp, n_iterations)
    L = teacher_logits.float() / teacher_temp
    B_total = torch.tensor(float(L.shape[0]), device=L.device)
    if _distributed():
        dist.all_reduce(B_total)
    K = L.shape[1]
    log_c = torch.zeros(L.shape[0], device=L.device)
    for _ in range(n_iterations):
        log_r = -_all_reduce_logsumexp(torch.logsumexp(L + log_c[:, None], dim=0)) - math.log(K)
        log_c = -torch.logsumexp(L + log_r[None, :], dim=1) - torch.log(B_total)
    return torch.exp(L + log_r[None, :] + log_c[:, None]) * B_total


@torch.no_grad()
def dinov2_sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """dinov2's DINOLoss.sinkhorn_knopp_teacher as written (single process, exp space, so it overflows
    once |logits| / teacher_temp nears 88): the transcription tests and benchmarks compare against."""
    Q = torch.exp(teacher_output.float() / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dino_loss(student_logits_per_view, teacher_probs_per_view, student_temp: float = 0.1,
              reduction: str = "mean") -> torch.Tensor:
    """DINO cross-entropy over all (student view, teacher view) pairs except a view with itself.

    student_logits_per_view: S views of (B, K) logits, a list or an (S, B, K) tensor; the first
    views are the same crops as the teacher's (global crops first).
    teacher_probs_per_view: T views of (B, K) target probabilities (list or (T, B, K) tensor).
    Each pair contributes -mean_b sum_k p_t[b, k] * log_softmax(s[b] / student_temp)[k].
    reduction="mean": average over the S*T - min(S, T) pairs (lightly's DINOLoss, and what dinov2's
    meta-arch reports); "sum": sum over pairs (dinov2's DINOLoss.forward). Returns a float32 scalar.
    """
    student, teacher, n_pairs = check_dino_loss_input(student_logits_per_view, teacher_probs_per_view, student_temp,
                                                      reduction)
    student, teacher = torch.stack(student), torch.stack(teacher)
    T, S, B = teacher.shape[0], student.shape[0], student.shape[1]
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)
    ce = -torch.einsum("tbk,sbk->ts", teacher.float(), log_p) / B  # (T, S) batch-mean per pair
    same_view = torch.eye(T, S, dtype=torch.bool, device=ce.device)
    total = ce.masked_fill(same_view, 0.0).sum()
    return total / n_pairs if reduction == "mean" else total


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT masked-patch cross-entropy with dinov2's per-image 1/n_masked weighting.

    masks: (B, N) or (B, H, W) bool, True where the student's patch was masked.
    student_patch_logits / teacher_patch_probs: either dense (B, N, K) (only masked patches count)
    or masked-only (M, K) with M = masks.sum(), rows in the order of masks.flatten(1).nonzero().
    loss = -1/B * sum_b 1/max(n_b, 1) * sum_{masked p of image b} sum_k t[p, k] log_softmax(s[p] / student_temp)[k].
    Returns a float32 scalar; 0 (an empty sum, with a zero gradient) when no patch is masked.
    """
    flat = check_ibot_loss_input(student_patch_logits, teacher_patch_probs, masks, student_temp)
    B, N = flat.shape
    if student_patch_logits.ndim == 3:
        s, t = student_patch_logits[flat], teacher_patch_probs[flat]
    else:
        s, t = student_patch_logits, teacher_patch_probs
    ce = -(t.float() * F.log_softmax(s.float() / student_temp, dim=-1)).sum(dim=-1)  # (M,)
    weights = (1.0 / flat.sum(dim=1).clamp(min=1).float())[:, None].expand(B, N)[flat]
    return (ce * weights).sum() / B


def check_koleo_input(x: torch.Tensor, eps: float, p: float, group=None) -> None:
    """The argument checks koleo_loss shares with its Triton kernel (shape, dtype, eps, p, rows)."""
    check_tensor("x", x, ndim=2)
    check_nonempty("x", x, 1)
    check_positive("eps", eps)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1 <= p < math.inf:
        raise ValueError(f"p (the distance's norm degree) must be a finite number >= 1, got {p!r}")
    if group is None and x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 rows to have a nearest neighbour, got shape {tuple(x.shape)}")
    if group is not None and not _distributed():
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
    that owns them (as torch.distributed.nn.all_gather). Every rank must pass the same (B, D).
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
    if world * x.shape[0] < 2:
        raise ValueError(f"the group holds {world * x.shape[0]} row(s) in all: a nearest neighbour needs at least 2")
    return _AllGatherRows.apply(x, group, rank, world), rank * x.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, *, p: float = 2.0, group=None) -> torch.Tensor:
    """KoLeo regulariser: -mean_i log(||x_i - x_nn(i) + eps||_p + eps) on L2-normalised rows.

    x: (B, D) float, B >= 2. nn(i) maximises <x_i, x_j> over j != i (first index on ties, as
    torch.max on CPU). eps is used three times as in dinov2 and lightly: in F.normalize, inside
    nn.PairwiseDistance and in the log. p is the distance's norm degree (lightly's KoLeoLoss(p=...)).
    group: a torch.distributed process group; the neighbours are then searched among the rows of
    every rank of the group (all-gathered with gradient, as dinov3's KoLeoLossDistributed), the mean
    is over this rank's rows. Autocast is disabled inside, as in dinov2. Returns a float32 scalar.
    """
    check_koleo_input(x, eps, p, group)
    with torch.autocast(x.device.type, enabled=False):
        xn = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        keys, offset = (xn, 0) if group is None else all_gather_rows(xn, group)
        with torch.no_grad():
            dots = xn @ keys.t()
            rows = torch.arange(x.shape[0], device=x.device)
            dots[rows, rows + offset] = -math.inf
            nn_idx = dots.argmax(dim=1)
        distances = F.pairwise_distance(xn, keys[nn_idx], p=p, eps=eps)
        return -torch.log(distances + eps).mean()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v, plain math in fp32.

    q, k, v: (B, H, N, D), any float dtype; scale defaults to D ** -0.5. Returns (B, H, N, D) in q's dtype.
    """
    check_qkv(q, k, v, "(B, H, N, D)")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: `attention` within each sequence.

    q, k, v: (total_tokens, H, D); sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    (cu_seqlens: (n_seqs + 1,) int32 offsets from 0 to total_tokens, max_seqlen >= every length).
    Each run of consecutive equal-length sequences is one batched call. Returns (total_tokens, H, D) in q's dtype.
    """
    check_qkv(q, k, v, "(total_tokens, H, D)")
    offsets = check_cu_seqlens(cu_seqlens, max_seqlen, total_tokens=q.shape[0])
    outs = []
    lengths = [end - start for start, end in zip(offsets, offsets[1:], strict=False)]
    for length, run in itertools.groupby(zip(offsets, lengths, strict=False), key=lambda pair: pair[1]):
        run = list(run)
        start, count = run[0][0], len(run)
        if length > 0:  # a run of `count` sequences of one length is a (count, length, H, D) view
            q_b, k_b, v_b = (t[start:start + count * length].unflatten(0, (count, length)).transpose(1, 2)
                             for t in (q, k, v))
            outs.append(attention(q_b, k_b, v_b, scale).transpose(1, 2).flatten(0, 1))
    return torch.cat(outs) if outs else torch.zeros_like(q)
