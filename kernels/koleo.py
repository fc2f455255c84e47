"""KoLeo regulariser (dinov2's KoLeoLoss, lightly's signature) in Triton: search, distance, backward.

    loss = -1/B sum_i log(||xn_i - xn_nn(i) + eps_d||_p + eps),   xn = x / max(||x||_2, eps),
    nn(i) = argmax_{j != i} <xn_i, xn_j>   (first index on ties, as torch.max; a lone row is its own)

eps_d is nn.PairwiseDistance's eps: eps, as in lightly, except under dinov2's KoLeoLoss.forward(x, eps),
whose PairwiseDistance keeps 1e-8 (koleo_loss's distance_eps).
Forward, program (i, s) takes query row block i and key split s: every block of BLOCK_N key rows of
the split goes through tl.dot on the raw features, each column is divided by its key's norm (summed
from the same tiles; the query's own norm does not change its argmax), and a running max/argmax is
kept per query row, self excluded. With one split (small batches: one launch) the same program then
gathers its rows' neighbours and computes the distance and -log(d + eps); with several (large batches,
or a small local batch against all-gathered keys, so that every SM has work) the splits fold their
best (similarity, index) into one int64 per row by atomic max, and a finishing kernel does that
step. Nothing of size B x B is ever stored: besides the (B, D) input and gradient there are a few
(B,) vectors.
Backward, one program per BLOCK_M rows: the gradient of each pair's distance goes to both x_i and
x_nn(i), through the L2 normalisation, by fp32 atomic adds (a row that is the neighbour of several
rows receives several contributions; with three or more the order of the adds, hence the last bits,
may vary from run to run).

With group=..., the keys are the rows of every rank (all-gathered with gradient, in Python before the
op) and the queries this rank's rows, which sit at `offset` among the keys.

The ops: koleo_loss checks its arguments and calls one torch.library op, dinotron::koleo(keys, offset,
B, eps, distance_eps, p, backend) -> (loss, neighbours, norms). The backend is an argument, resolved in
Python before the call (backend.resolve_backend): the Triton kernels, or the eager reference through
the same op (reference.koleo_neighbours, then reference.koleo_pair_loss). Its registered backward
runs a second op for the Triton backend, dinotron::koleo_backward, and for the eager one autograd
through reference.koleo_pair_loss again at the saved neighbours (autograd records nothing inside an
op). torch.compile sees one node per op; without a group nothing reads the device from the host, so
CUDA graphs capture forward and backward. The eager reference runs on CPU (without TRITON_INTERPRET),
for float64 (lightly computes in fp64, the kernels in fp32: resolve_backend) and for the norm degrees
the kernels leave out, p = inf, p < 1 and NaN, which nn.PairwiseDistance takes. The loss is in x's
dtype as lightly's, computed in fp32 (fp64 for fp64); NaN or inf in x gives NaN as in lightly, unless
check_finite=True (one host sync) makes it a ValueError.

fp32 inputs: the search's tl.dot follows torch.backends.cuda.matmul.allow_tf32 as torch.mm does
(tf32 if allowed, as dinov2's train.py sets it, else tf32x3, about as accurate as fp32); fp16/bf16
products are exact. The distance is always computed in fp32 from the rows themselves, so rounding
can only swap neighbours whose similarities tie to within the dot's rounding.
Exact duplicate rows push each other with gradients ~ 1 / (B eps sqrt(D)) that cancel; a third
row's pull on them is then lost in fp32 rounding, here as in the eager reference.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import nn

from dinotron.kernels import layout, reference
from dinotron.kernels.backend import interpreter_enabled, resolve_backend


@triton.jit
def _row_norms(K, rows, row_mask, D, stride, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """||K[rows]||_2 in fp32, shape (BLOCK_M,)."""
    sq = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(K + rows[:, None] * stride + ks[None, :], mask=row_mask[:, None] & (ks < D)[None, :], other=0.0)
        v = v.to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    return tl.sqrt(sq)


@triton.jit
def _pair_slice(K, q_rows, nn_rows, row_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr):
    """One BLOCK_K slice of the pairs (i, nn(i)): xn_i, xn_nn, |diff|^p and s = sign(diff) |diff|^(p-1),
    where diff = xn_i - xn_nn + dist_eps (s is the derivative of |diff|^p / p)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (ks < D)[None, :]
    xq = tl.load(K + q_rows[:, None] * stride + ks[None, :], mask=mask, other=0.0).to(tl.float32) / den_q[:, None]
    xn = tl.load(K + nn_rows[:, None] * stride + ks[None, :], mask=mask, other=0.0).to(tl.float32) / den_n[:, None]
    diff = tl.where(mask, xq - xn + dist_eps, 0.0)
    if P_IS_2:
        s = diff
        powered = diff * diff
    else:
        a = tl.abs(diff)
        log_a = tl.log2(tl.where(a > 0, a, 1.0))
        powered = tl.where(a > 0, tl.exp2(p * log_a), 0.0)
        s = tl.where(a > 0, tl.where(diff > 0, 1.0, -1.0) * tl.exp2((p - 1) * log_a), 0.0)
    return ks, mask, xq, xn, s, powered


@triton.jit
def _root(v, p, P_IS_2: tl.constexpr):
    """v ** (1 / p) for v >= 0."""
    if P_IS_2:
        return tl.sqrt(v)
    return tl.where(v > 0, tl.exp2(tl.log2(tl.where(v > 0, v, 1.0)) / p), 0.0)


@triton.jit
def _finish_rows(K, nn_idx, NN, NORM_Q, NORM_NN, LOSS, m, m_mask, q_rows, D, stride, eps, dist_eps, p,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr):
    """Given the neighbours of query rows m: the distance, -log(d + eps), and what backward needs."""
    nn_rows = nn_idx.to(tl.int64)
    norm_q = _row_norms(K, q_rows, m_mask, D, stride, BLOCK_M, BLOCK_K)
    norm_n = _row_norms(K, nn_rows, m_mask, D, stride, BLOCK_M, BLOCK_K)
    den_q = tl.maximum(norm_q, eps)
    den_n = tl.maximum(norm_n, eps)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        _, _, _, _, _, powered = _pair_slice(K, q_rows, nn_rows, m_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                                             BLOCK_K, P_IS_2)
        total += tl.sum(powered, axis=1)
    distance = _root(total, p, P_IS_2)
    tl.store(NN + m, nn_idx, mask=m_mask)
    tl.store(NORM_Q + m, norm_q, mask=m_mask)
    tl.store(NORM_NN + m, norm_n, mask=m_mask)
    tl.store(LOSS + m, -tl.log(distance + eps), mask=m_mask)


@triton.jit
def _koleo_search_kernel(
    K, BEST, NN, NORM_Q, NORM_NN, LOSS,  # K: (N, D) keys, the queries are rows offset .. offset + B - 1
    B, N, D, offset, stride, keys_per_split, eps, dist_eps, p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MERGE: tl.constexpr,
    P_IS_2: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i, s): query row block i against the keys of split s. Without MERGE (one split) it
    finishes its rows itself; with MERGE it folds its best (similarity, index) into BEST (atomic max)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < B
    self_idx = m + offset
    q_rows = self_idx.to(tl.int64)
    n_start = tl.program_id(1) * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)

    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < n_end
        dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        key_sq = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            q = tl.load(K + q_rows[:, None] * stride + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            kt = tl.load(K + n.to(tl.int64)[None, :] * stride + ks[:, None], mask=k_mask[:, None] & n_mask[None, :],
                         other=0.0)
            kt32 = kt.to(tl.float32)
            key_sq += tl.sum(kt32 * kt32, axis=0)
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
                q, kt = q.to(tl.float32), kt32
            dots = tl.dot(q, kt, dots, input_precision=PRECISION)
        score = dots * (1.0 / tl.maximum(tl.sqrt(key_sq), eps))[None, :]
        excluded = (n[None, :] == self_idx[:, None]) | (n >= n_end)[None, :]
        score = tl.where(excluded, float("-inf"), score)
        block_best, block_arg = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = block_best > best  # strict: an earlier block keeps a tie
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, n0 + block_arg, best_idx)

    if not MERGE:
        _finish_rows(K, best_idx, NN, NORM_Q, NORM_NN, LOSS, m, m_mask, q_rows, D, stride, eps, dist_eps, p, BLOCK_M,
                     BLOCK_K, P_IS_2)
    else:
        # (similarity, index) as one int64 whose signed order is: larger similarity, then smaller index
        bits = best.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        packed = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - best_idx).to(tl.int64)
        tl.atomic_max(BEST + m, packed, mask=m_mask, sem="relaxed")


@triton.jit
def _koleo_finish_kernel(
    K, BEST, NN, NORM_Q, NORM_NN, LOSS, B, D, offset, stride, eps, dist_eps, p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < B
    packed = tl.load(BEST + m, mask=m_mask, other=0)
    nn_idx = 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)
    _finish_rows(K, nn_idx, NN, NORM_Q, NORM_NN, LOSS, m, m_mask, (m + offset).to(tl.int64), D, stride, eps, dist_eps,
                 p, BLOCK_M, BLOCK_K, P_IS_2)


@triton.jit
def _koleo_bwd_kernel(
    K, NN, NORM_Q, NORM_NN, GRAD_LOSS, DK,  # DK: (N, D) fp32, zero-initialised
    B, D, offset, stride, stride_dk, eps, dist_eps, p, inv_B,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < B
    q_rows = (m + offset).to(tl.int64)
    nn_rows = tl.load(NN + m, mask=m_mask, other=0).to(tl.int64)
    norm_q = tl.load(NORM_Q + m, mask=m_mask, other=1.0)
    norm_n = tl.load(NORM_NN + m, mask=m_mask, other=1.0)
    den_q = tl.maximum(norm_q, eps)
    den_n = tl.maximum(norm_n, eps)

    total = tl.zeros((BLOCK_M,), tl.float32)
    q_dot_s = tl.zeros((BLOCK_M,), tl.float32)
    n_dot_s = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        _, _, xq, xn, s, powered = _pair_slice(K, q_rows, nn_rows, m_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                                               BLOCK_K, P_IS_2)
        total += tl.sum(powered, axis=1)
        q_dot_s += tl.sum(xq * s, axis=1)
        n_dot_s += tl.sum(xn * s, axis=1)
    distance = tl.where(m_mask, _root(total, p, P_IS_2), 1.0)  # 1 on padding rows: no 0 / 0
    if P_IS_2:
        d_pow = distance
    else:
        d_pow = tl.exp2((p - 1) * tl.log2(distance))
    # d loss / d diff = c * s, with d distance / d diff = s / distance^(p-1)
    c = -tl.load(GRAD_LOSS).to(tl.float32) * inv_B / ((distance + eps) * d_pow)
    # through xn = x / max(||x||, eps): J^T g = (g - xn <xn, g> [||x|| >= eps]) / max(||x||, eps)
    proj_q = tl.where(norm_q >= eps, c * q_dot_s, 0.0)
    proj_n = tl.where(norm_n >= eps, c * n_dot_s, 0.0)
    for k0 in range(0, D, BLOCK_K):
        ks, mask, xq, xn, s, _ = _pair_slice(K, q_rows, nn_rows, m_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                                             BLOCK_K, P_IS_2)
        g = c[:, None] * s
        dq = (g - xq * proj_q[:, None]) / den_q[:, None]
        dn = (xn * proj_n[:, None] - g) / den_n[:, None]
        tl.atomic_add(DK + q_rows[:, None] * stride_dk + ks[None, :], dq, mask=mask, sem="relaxed")
        tl.atomic_add(DK + nn_rows[:, None] * stride_dk + ks[None, :], dn, mask=mask, sem="relaxed")


_BLOCK_N = 64
_BLOCK_M_BWD = 32
_MIN_KEYS_PER_SPLIT = 256  # below this a split's work does not pay for the extra finishing launch


def _block_k(D: int) -> int:
    return min(64, max(16, triton.next_power_of_2(D)))


def _search_grid(B: int, N: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, splits, keys per split): query blocks of up to 64 rows (each key tile is reused by
    BLOCK_M queries), and the keys split between programs until every SM has one."""
    block_m = min(64, max(16, triton.next_power_of_2(B)))
    row_blocks = triton.cdiv(B, block_m)
    splits = max(1, min(triton.cdiv(layout.num_sms(device), row_blocks), N // _MIN_KEYS_PER_SPLIT))
    keys_per_split = triton.cdiv(triton.cdiv(N, splits), _BLOCK_N) * _BLOCK_N
    return block_m, triton.cdiv(N, keys_per_split), keys_per_split


def _dot_precision(dtype: torch.dtype) -> str | None:
    if dtype != torch.float32:
        return None  # fp16/bf16 operands: exact products, fp32 accumulation
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _triton_forward(keys: torch.Tensor, offset: int, B: int, eps: float, distance_eps: float,
                    p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The search (and finishing) kernels: (mean loss in keys' dtype, neighbours (B,) int32, the fp32
    norms (2, B) of the query rows and of their neighbours)."""
    keys = keys.contiguous()
    N, D = keys.shape
    nn_idx = torch.empty(B, dtype=torch.int32, device=keys.device)
    norms = torch.empty(2, B, dtype=torch.float32, device=keys.device)
    loss_rows = torch.empty(B, dtype=torch.float32, device=keys.device)
    block_m, splits, keys_per_split = _search_grid(B, N, keys.device)
    merge = splits > 1
    best = torch.full((B,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=keys.device) if merge else None
    common = dict(BLOCK_M=block_m, BLOCK_K=_block_k(D), P_IS_2=p == 2)
    _koleo_search_kernel[(triton.cdiv(B, block_m), splits)](
        keys, best, nn_idx, norms[0], norms[1], loss_rows,
        B, N, D, offset, keys.stride(0), keys_per_split, eps, distance_eps, p,
        BLOCK_N=_BLOCK_N, MERGE=merge, PRECISION=_dot_precision(keys.dtype), UPCAST=interpreter_enabled(), **common,
    )
    if merge:
        _koleo_finish_kernel[(triton.cdiv(B, block_m),)](
            keys, best, nn_idx, norms[0], norms[1], loss_rows, B, D, offset, keys.stride(0), eps, distance_eps, p,
            **common,
        )
    return loss_rows.mean().to(keys.dtype), nn_idx, norms


def _triton_backward(grad_loss: torch.Tensor, keys: torch.Tensor, nn_idx: torch.Tensor, norms: torch.Tensor,
                     offset: int, eps: float, distance_eps: float, p: float) -> torch.Tensor:
    """The backward kernel: d loss / d keys (N, D) in keys' dtype, accumulated in fp32."""
    keys = keys.contiguous()
    B, D = nn_idx.shape[0], keys.shape[1]
    grad_keys = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
    _koleo_bwd_kernel[(triton.cdiv(B, _BLOCK_M_BWD),)](
        keys, nn_idx, norms[0], norms[1], grad_loss.contiguous(), grad_keys,
        B, D, offset, keys.stride(0), grad_keys.stride(0), eps, distance_eps, p, 1.0 / B,
        BLOCK_M=_BLOCK_M_BWD, BLOCK_K=_block_k(D), P_IS_2=p == 2,
    )
    return grad_keys.to(keys.dtype)


# The ops: the forward returns what its backward needs besides keys (the neighbours, and for the Triton
# backward the row norms), so that no backward searches again.
@torch.library.custom_op(
    "dinotron::koleo", mutates_args=(),
    schema="(Tensor keys, int offset, int B, float eps, float distance_eps, float p, str backend) "
           "-> (Tensor, Tensor, Tensor)",
)
def _koleo_op(keys, offset, B, eps, distance_eps, p, backend):
    """Mean KoLeo term of the B query rows keys[offset:offset + B], neighbours searched among all keys:
    (loss in keys' dtype, neighbours (B,) int32, norms: (2, B) fp32 for the Triton backward, (0,) for eager)."""
    if backend == "eager":
        nn_idx = reference.koleo_neighbours(keys, offset, B, eps)
        loss = reference.koleo_pair_loss(keys, offset, nn_idx, eps, p, distance_eps)
        return loss, nn_idx.to(torch.int32), keys.new_empty(0, dtype=torch.float32)
    return _triton_forward(keys, offset, B, eps, distance_eps, p)


@torch.library.custom_op(
    "dinotron::koleo_backward", mutates_args=(),
    schema="(Tensor grad_loss, Tensor keys, Tensor nn_idx, Tensor norms, int offset, float eps, float distance_eps, "
           "float p) -> Tensor",
)
def _koleo_backward_op(grad_loss, keys, nn_idx, norms, offset, eps, distance_eps, p):
    """d loss / d keys of dinotron::koleo's Triton backend, (N, D) contiguous in keys' dtype."""
    return _triton_backward(grad_loss, keys, nn_idx, norms, offset, eps, distance_eps, p)


@_koleo_op.register_fake
def _(keys, offset, B, eps, distance_eps, p, backend):
    norms = keys.new_empty((2, B) if backend == "triton" else (0,), dtype=torch.float32)
    return keys.new_empty(()), keys.new_empty(B, dtype=torch.int32), norms


@_koleo_backward_op.register_fake
def _(grad_loss, keys, nn_idx, norms, offset, eps, distance_eps, p):
    return keys.new_empty(keys.shape)


def _setup_context(ctx, inputs, output):
    keys, offset, _, eps, distance_eps, p, backend = inputs
    _, nn_idx, norms = output
    ctx.mark_non_differentiable(nn_idx, norms)
    ctx.save_for_backward(keys, nn_idx, norms)
    ctx.args, ctx.backend = (offset, eps, distance_eps, p), backend


def _koleo_grad(ctx, grad_loss, _grad_nn_idx, _grad_norms):
    keys, nn_idx, norms = ctx.saved_tensors
    offset, eps, distance_eps, p = ctx.args
    if ctx.backend == "triton":
        grad_keys = _koleo_backward_op(grad_loss, keys, nn_idx, norms, *ctx.args)
    else:  # the eager pair loss again, at the saved neighbours, through autograd (which is off inside an op)
        with torch.enable_grad():
            k = keys.detach().requires_grad_()
            loss = reference.koleo_pair_loss(k, offset, nn_idx, eps, p, distance_eps)
            (grad_keys,) = torch.autograd.grad(loss, k, grad_loss, allow_unused=True)  # None: p = 0 has no gradient
    return grad_keys, None, None, None, None, None, None


_koleo_op.register_autograd(_koleo_grad, setup_context=_setup_context)


def _check_finite(x: torch.Tensor, group) -> None:
    """ValueError if x (on any rank of `group`) holds NaN or inf; the ranks agree, so none is left waiting."""
    if x.numel():  # one pass: a NaN or inf reaches the min or max
        finite = torch.isfinite(torch.stack(torch.aminmax(x))).all()
    else:  # no row on this rank (aminmax has no empty case): still join the group's all_reduce
        finite = torch.ones((), dtype=torch.bool, device=x.device)
    if group is not None:
        finite = finite.to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    if not bool(finite):
        where = "on at least one rank of the group" if group is not None else f"(shape {tuple(x.shape)})"
        raise ValueError(f"x holds non-finite values (NaN or inf) {where}: KoLeo's nearest neighbours are undefined")


def _backend(x: torch.Tensor, p: float, backend: str | None) -> str:
    """resolve_backend's choice, but the eager reference for the norm degrees the kernels leave out."""
    chosen = resolve_backend(backend, x)
    return chosen if 1 <= p < math.inf else "eager"


def koleo_loss(
    x: torch.Tensor,
    eps: float = 1e-8,
    *,
    p: float = 2.0,
    distance_eps: float | None = None,
    group=None,
    backend: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """KoLeo regulariser of the rows of x, as lightly's KoLeoLoss(p, eps) and dinov2's KoLeoLoss.

    x: (B, D) float32/float16/bfloat16/float64, B >= 1 (a lone row is its own neighbour, as in lightly:
    -log(||distance_eps * 1||_p + eps)). Returns a scalar in x's dtype, as lightly's (computed in fp32,
    fp64 for fp64); gradients flow to x. eps: F.normalize's, nn.PairwiseDistance's and the log's, as in
    lightly; distance_eps, if given, replaces nn.PairwiseDistance's (KoLeoLoss.forward(x, eps) passes the
    module's, as dinov2's keeps 1e-8). p: the distance's norm degree, any number nn.PairwiseDistance takes.
    NaN or inf in x gives a NaN loss, as lightly's; check_finite=True raises a ValueError instead, at the
    cost of one device-to-host sync (and, with a group, one all_reduce). Without a group and with
    check_finite=False there is no host sync: one torch.library op (module docstring).
    group: a torch.distributed process group whose ranks' rows are all candidate neighbours (dinov3's
    KoLeoLossDistributed; off by default, as in dinov2); every rank must call it with the same (B, D), and
    the gradient reaches each row's owner. The ranks exchange their shapes first (one host sync): a rank
    whose B differs (0 included) makes every rank raise, after the same collectives, none left waiting.
    Unlike dinov2's (diagonal filled with -1), a row never has itself as neighbour when there are others,
    as in lightly (-2): they differ only where every other row is exactly opposite (B = 2, x and -x).
    """
    reference.check_koleo_input(x, eps, p, group, distance_eps)
    chosen = _backend(x, p, backend)
    if check_finite:
        _check_finite(x, group)
    keys, offset = (x, 0) if group is None else reference.all_gather_rows(x, group)
    distance_eps = eps if distance_eps is None else distance_eps
    loss, _, _ = _koleo_op(keys, offset, x.shape[0], float(eps), float(distance_eps), float(p), chosen)
    return loss


class KoLeoLoss(nn.Module):
    """lightly's KoLeoLoss(p=2, eps=1e-8), also dinov2's KoLeoLoss(): forward(x (B, D), eps=None) -> a scalar
    in x's dtype, see koleo_loss. eps=None: the module's eps everywhere, as lightly's forward(x); an explicit
    eps (dinov2's forward(student_output, eps)) replaces it in F.normalize and the log, nn.PairwiseDistance
    keeping the module's (dinov2's PairwiseDistance(2, eps=1e-8)). group, backend, check_finite: koleo_loss's.
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, *, group=None, backend: str | None = None,
                 check_finite: bool = False):
        super().__init__()
        self.p, self.eps, self.group, self.backend, self.check_finite = p, eps, group, backend, check_finite

    def forward(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        return koleo_loss(x, self.eps if eps is None else eps, p=self.p, distance_eps=self.eps, group=self.group,
                          backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"
