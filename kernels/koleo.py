"""KoLeo regulariser (dinov2's KoLeoLoss, lightly's signature) in Triton: search, distance, gradient.

    loss = -1/B sum_i log(||xn_i - xn_nn(i) + eps_d||_p + eps),   xn = x / max(||x||_2, eps),
    nn(i) = argmax_{j != i} <xn_i, xn_j>   (first index on ties, as torch.max; a lone row is its own)

eps_d is nn.PairwiseDistance's eps: eps, as in lightly, except under dinov2's KoLeoLoss.forward(x, eps),
whose PairwiseDistance keeps 1e-8 (koleo_loss's distance_eps).

The neighbour is the argmax of the fp32 score s_j = <x_i, x_j> / max(||x_j||, eps) (_exact_scores: fp32
products and sums; x_i's own norm does not change its argmax), whatever the dtype and the tf32 setting.
Programs take a block of query rows x a split of the keys (_search_plan), so that every SM has one from
B = 128 on; the splits' best (similarity, index) pairs meet as one packed int64 (larger similarity, then
smaller index: torch.max's first index on ties) by max, whose result does not depend on the order.
- Few keys (N <= _EXACT_MAX_KEYS = 384), _koleo_search_kernel: 8 query rows x 8-key steps of s on the CUDA
  cores, folded into BEST by atomic max; the last split of a query block to arrive (an atomic counter)
  finishes the block's rows. One launch.
- More keys, _koleo_candidates_kernel then _koleo_finish_kernel: the search runs on the tensor cores in a
  cheap precision (tf32 for fp32 rows, exact products for bf16 / fp16), score t_j = <x~_i, x~_j> /
  max(||x_j||, eps), each split keeping its two best keys by t. |t_j - s_j| <= tol ||x_i|| for every key
  (_rank_tolerance): tf32 rounds each operand by at most 2^-10 relative (truncated or to nearest), so a
  product by (2^-9 + 2^-20) |x_id x_jd|, and by Cauchy-Schwarz the sum by that x ||x_i|| ||x_j||; the
  fp32 sums of t, of s and of the norm add (D + 8) 2^-23 each, taken twice (the tensor cores' order of
  accumulation is not IEEE-sequential): tol = 2^-9 + 2^-20 + (D + 8) 2^-22 (2.05e-3 at D = 384), and
  (D + 8) 2^-22 for bf16 / fp16. So the fp32 winner w has t_w >= t_max - 2 tol ||x_i|| (the margin). The
  finishing kernel computes s for every candidate, and, for every split whose runner-up by t is within
  the margin of t_max (a third key of that split could be too), s for every key of the split; every key
  that can win is then scored in fp32, and the neighbour is the argmax of s over all keys, as on the
  exact path. Rows of random N(0, 1) features at B = 4096 (tf32 emulated on the CPU) have 0.35 other keys
  within the margin on average at D = 384 (0.52 at 768), and 2.4 % (3.8 %) of (row, split) pairs are
  searched again: each such pair costs keys_per_split x D fp32 multiply-adds on one program.
- When can the neighbour differ from the fp32 reference (reference.koleo_neighbours, an fp32 mm of the
  normalised rows)? Only where two keys' fp32 similarities tie to within fp32 rounding (a few ulps
  x sqrt(D), ~1e-6): s and the reference sum in different orders. Never from tf32 or bf16: exact ties
  (duplicates, symmetric rows) go to the first index on both sides.
- The gradient is computed in the forward, by the program that finishes a row: d loss / d x of each pair
  (i, nn(i)) for d loss = 1, through the L2 normalisation, added to G (N, D) fp32 at both rows by atomic
  adds (a row that is the neighbour of several rows receives several; with three or more the order of the
  adds, hence the last bits, may vary from run to run). The backward, _koleo_bwd_kernel, is grad_loss x G
  in x's dtype: no search and no second gather of the pairs, and a grid of 256 to 1024 elements a
  program. The cost: G is written even when no backward follows (B x D x 4 bytes).
Nothing of size B x B is ever stored: besides the (B, D) input, G and the gradient there are (B,) vectors
and the (splits, 2, B) candidates.

sm_90 (Triton 3.8's compiler and ptxas, no GPU: benchmarks/static_report.py, which compiles each launch as
the JIT specialises it; 132 SMs), at the benchmark's B = N = 128 and 4096, D = 384 and 768 (registers
and shared memory do not depend on D here), fp32 rows (bf16 in brackets where it differs); no kernel
spills (spill stores / loads, STACK and LOCAL all 0) and none needs more than 40 KiB of shared memory:

    B     kernel       grid                 warps  regs     smem       CTAs/SM  notes
    128   search       16 x 16 = 256        2      56       1 KiB      18       exact fp32, 8 x 8 x 32 steps
    128   bwd          192                  4      12-16    0          16       256 / 512 elements (D 384 / 768)
    4096  candidates   64 x 4 = 256         8      78 (70)  40 (20)    3        wgmma, cp.async, 64 x 64 x 32
    4096  finish       256                  4      56 (48)  2 (0.1)    9 (10)   16 rows a program
    4096  bwd          1536 / 3072          4      18 (20)  0          16       1024 elements a program
  Compiled without the JIT's divisibility specialisation (tests/lowering.py's way) the same tiles take
  127 / 14 / 163 (128) / 156 (160) / 26 (30) registers, still without spills; so do the tiles of other
  B: candidates at 32 rows (4 warps) 168 (164), at 16 rows (2 warps) 255 (248), finish at 8 rows (2
  warps) 247 (237), at 4 rows (2 warps) 215 (168). Before this design (one tl.dot search at 64 rows,
  tf32x3 by default, finishing and backward at 64 and 32 rows, 4 warps), compiled that way, every
  kernel used 255 registers and spilled (the fp32 tf32x3 search 672-688 bytes of stack, the backward
  168), on grids of 2 (search, B = 128) or 64 x 3 (4096) programs, a finishing kernel of 64 and a
  backward of 4 or 128.

Cost (bytes from DRAM, FLOPs; roofline at 3.0 TB/s and 700 bf16 / 350 tf32 TFLOP/s, CUDA-core fp32
taken at 67 TFLOP/s), fp32 rows, D = 384:
- B = 128: search 2 B N D = 12.6 MFLOP on the CUDA cores (0.19 us), 0.8 MB (x once, G zeroed and
  added to twice: 0.26 us); backward 0.4 MB (0.13 us). Both far below a launch's latency (a few us):
  what counts here is one launch each and every SM busy.
- B = 4096: candidates 2 B N D = 12.9 GFLOP in tf32 (37 us; bf16 rows 18 us), 6.3 MB of x from DRAM,
  while each query block rereads its keys from L2 (64 x 6.3 MB = 403 MB); finish: 2 x splits candidates
  x B x D reads (50 MB, L2), ~25 MB from DRAM (x, G's zeroing and atomic adds): 8 us, plus the
  re-searched splits; backward 12.6 MB (4.2 us). The old tf32x3 search was 3 tf32 products: 110 us.

With group=..., the keys are the rows of every rank (all-gathered with gradient, in Python before the
op) and the queries this rank's rows, which sit at `offset` among the keys.

The ops: koleo_loss checks its arguments and calls one torch.library op, dinotron::koleo(keys, offset,
B, eps, distance_eps, p, backend) -> (loss, neighbours, grad). The backend is an argument, resolved in
Python before the call (backend.resolve_backend): the Triton kernels, or the eager reference through
the same op (reference.koleo_neighbours, then reference.koleo_pair_loss). Its registered backward
runs a second op for the Triton backend, dinotron::koleo_backward(grad_loss, grad, dtype), and for the
eager one autograd through reference.koleo_pair_loss again at the saved neighbours (autograd records
nothing inside an op). torch.compile sees one node per op; without a group nothing reads the device
from the host, so CUDA graphs capture forward and backward. The eager reference runs on CPU (without
TRITON_INTERPRET), for float64 (lightly computes in fp64, the kernels in fp32: resolve_backend) and for
the norm degrees the kernels leave out, p = inf, p < 1 and NaN, which nn.PairwiseDistance takes. The
loss is in x's dtype as lightly's, computed in fp32 (fp64 for fp64); NaN or inf in x gives NaN as in
lightly (a NaN similarity wins the argmax, as in torch.max), unless check_finite=True (one host sync)
makes it a ValueError. In the Triton interpreter the candidate search truncates its tf32 operands as
the bound allows, so that tests meet the near-ties of a GPU.
Exact duplicate rows push each other with gradients ~ 1 / (B eps sqrt(D)) that cancel; a third
row's pull on them is then lost in fp32 rounding, here as in the eager reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import nn

from dinotron.kernels import layout, reference
from dinotron.kernels.backend import interpreter_enabled, resolve_backend

# (similarity, key index) as one int64 whose signed order is: larger similarity, then smaller index, so that
# a max over packed values is torch.max's argmax (first index on ties) and merges of splits are order-free.
# _NONE (below every packed similarity, -inf included) stands for "no key".
_NONE = tl.constexpr(-(2**63))


@triton.jit
def _pack(score, idx):
    score = tl.where(score != score, float("inf"), score)  # NaN wins, as in torch.max (a NaN loss, as lightly's)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)
    return tl.where(score == float("-inf"), _NONE, packed)


@triton.jit
def _unpack_idx(packed):
    return 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _unpack_score(packed):
    ordered = (packed >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return tl.where(packed == _NONE, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _best_in_tile(score, n0):
    """Packed best (R,) of a (R, C) score tile whose column c is key n0 + c; NaN counts as +inf, so that
    a NaN similarity wins as in torch.max (and the loss is NaN, as lightly's)."""
    score = tl.where(score != score, float("inf"), score)
    best, arg = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    return _pack(best, n0 + arg), arg


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
def _exact_scores(K, q_rows, q_mask, k_rows, k_mask, D, stride, eps, BLOCK_K: tl.constexpr):
    """The fp32 score <x_q, x_k> / max(||x_k||, eps) of query rows q_rows (R,) against key rows k_rows
    ((1, C): the same keys for every query, or (R, C): keys per query), shape (R, C): fp32 products and
    sums on the CUDA cores (the query's own norm does not change its ranking). The one definition of a
    similarity that the search, the re-ranking and the fallback all compare."""
    dots = tl.zeros((q_rows.shape[0], k_rows.shape[1]), tl.float32)
    key_sq = tl.zeros(k_rows.shape, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < D
        q = tl.load(K + q_rows[:, None] * stride + ks[None, :], mask=q_mask[:, None] & k_in[None, :], other=0.0)
        k = tl.load(K + k_rows.to(tl.int64)[:, :, None] * stride + ks[None, None, :],
                    mask=k_mask[:, :, None] & k_in[None, None, :], other=0.0).to(tl.float32)
        dots += tl.sum(q.to(tl.float32)[:, None, :] * k, axis=2)
        key_sq += tl.sum(k * k, axis=2)
    return dots / tl.maximum(tl.sqrt(key_sq), eps)


@triton.jit
def _exact_best(K, q_rows, q_mask, n_start, n_end, D, stride, eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed best (R,) of query rows q_rows (R,) over keys n_start .. n_end - 1, self excluded, by
    _exact_scores; _NONE where no key is left."""
    best = tl.full(q_rows.shape, _NONE, tl.int64)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < n_end
        score = _exact_scores(K, q_rows, q_mask, n[None, :], n_mask[None, :], D, stride, eps, BLOCK_K)
        score = tl.where((n[None, :] == q_rows[:, None]) | ~n_mask[None, :], float("-inf"), score)
        block_best, _ = _best_in_tile(score, n0)
        best = tl.maximum(best, block_best)
    return best


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
def _finish_rows(K, best, NN, LOSS, G, m, m_mask, q_rows, D, stride, eps, dist_eps, p, inv_B,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr):
    """Given the packed best neighbours of query rows m: nn(i), -log(d + eps), and the gradient of the mean
    loss (for d loss = 1) added into G (N, D) fp32 at both rows of each pair."""
    nn_idx = tl.where(best == _NONE, q_rows.to(tl.int32), _unpack_idx(best))  # no other key: itself
    nn_rows = nn_idx.to(tl.int64)
    norm_q = _row_norms(K, q_rows, m_mask, D, stride, BLOCK_M, BLOCK_K)
    norm_n = _row_norms(K, nn_rows, m_mask, D, stride, BLOCK_M, BLOCK_K)
    den_q = tl.maximum(norm_q, eps)
    den_n = tl.maximum(norm_n, eps)
    # first pass: the distance and the projections the normalisation's Jacobian needs
    total = tl.zeros((BLOCK_M,), tl.float32)
    q_dot_s = tl.zeros((BLOCK_M,), tl.float32)
    n_dot_s = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        _, _, xq, xn, s, powered = _pair_slice(K, q_rows, nn_rows, m_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                                               BLOCK_K, P_IS_2)
        total += tl.sum(powered, axis=1)
        q_dot_s += tl.sum(xq * s, axis=1)
        n_dot_s += tl.sum(xn * s, axis=1)
    distance = _root(total, p, P_IS_2)
    tl.store(NN + m, nn_idx, mask=m_mask)
    tl.store(LOSS + m, -tl.log(distance + eps), mask=m_mask)
    distance = tl.where(m_mask, distance, 1.0)  # 1 on padding rows: no 0 / 0
    if P_IS_2:
        d_pow = distance
    else:
        d_pow = tl.exp2((p - 1) * tl.log2(distance))
    # d loss / d diff = c * s, with d distance / d diff = s / distance^(p-1)
    c = -inv_B / ((distance + eps) * d_pow)
    # through xn = x / max(||x||, eps): J^T g = (g - xn <xn, g> [||x|| >= eps]) / max(||x||, eps)
    proj_q = tl.where(norm_q >= eps, c * q_dot_s, 0.0)
    proj_n = tl.where(norm_n >= eps, c * n_dot_s, 0.0)
    # second pass: both rows of each pair receive their part (fp32 atomics: a row may be several rows' neighbour)
    for k0 in range(0, D, BLOCK_K):
        ks, mask, xq, xn, s, _ = _pair_slice(K, q_rows, nn_rows, m_mask, k0, D, stride, den_q, den_n, dist_eps, p,
                                             BLOCK_K, P_IS_2)
        g = c[:, None] * s
        tl.atomic_add(G + q_rows[:, None] * D + ks[None, :], (g - xq * proj_q[:, None]) / den_q[:, None], mask=mask,
                      sem="relaxed")
        tl.atomic_add(G + nn_rows[:, None] * D + ks[None, :], (xn * proj_n[:, None] - g) / den_n[:, None], mask=mask,
                      sem="relaxed")


@triton.jit
def _root(v, p, P_IS_2: tl.constexpr):
    """v ** (1 / p) for v >= 0."""
    if P_IS_2:
        return tl.sqrt(v)
    return tl.where(v > 0, tl.exp2(tl.log2(tl.where(v > 0, v, 1.0)) / p), 0.0)


@triton.jit
def _koleo_search_kernel(
    K, BEST, COUNT, NN, LOSS, G,  # K: (N, D) keys, the queries are rows offset .. offset + B - 1
    B, N, D, offset, stride, keys_per_split, splits, eps, dist_eps, p, inv_B,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr,
):
    """Few keys (N <= _EXACT_MAX_KEYS): program (i, s) searches query block i against key split s in
    fp32 on the CUDA cores, folds its best into BEST (atomic max of packed values: the same result in
    any order), and the last split of block i to arrive finishes the block's rows."""
    pid_m = tl.program_id(0)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < B
    q_rows = (m + offset).to(tl.int64)
    n_start = tl.program_id(1) * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    best = _exact_best(K, q_rows, m_mask, n_start, n_end, D, stride, eps, BLOCK_N, BLOCK_K)
    tl.atomic_max(BEST + m, best, mask=m_mask, sem="relaxed")
    # every thread's atomic_max is done before the counter's release; the last arrival reads all of them
    tl.debug_barrier()
    if tl.atomic_add(COUNT + pid_m, 1, sem="acq_rel") == splits - 1:
        best = tl.load(BEST + m, mask=m_mask, other=_NONE, cache_modifier=".cg")
        _finish_rows(K, best, NN, LOSS, G, m, m_mask, q_rows, D, stride, eps, dist_eps, p, inv_B, BLOCK_M, BLOCK_K,
                     P_IS_2)


@triton.jit
def _koleo_candidates_kernel(
    K, CAND,  # CAND: (splits, 2, B) int64, each split's two best keys per query by the cheap score
    B, N, D, offset, stride, keys_per_split,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Many keys: program (i, s) scores query block i against key split s with tl.dot in the cheap
    precision (tf32 for fp32 rows, exact products for bf16 / fp16) and keeps each row's two best keys."""
    cols = tl.arange(0, BLOCK_N)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < B
    self_idx = m + offset
    q_rows = self_idx.to(tl.int64)
    n_start = tl.program_id(1) * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    first = tl.full((BLOCK_M,), _NONE, tl.int64)
    second = tl.full((BLOCK_M,), _NONE, tl.int64)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + cols
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
            if INTERPRETED:  # numpy multiplies bf16 bit patterns (triton#11584) and fp32 exactly: upcast, and
                q, kt = q.to(tl.float32), kt32  # round tf32 operands as the tensor cores may (truncation)
                if PRECISION == "tf32":
                    q = (q.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    kt = (kt.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            dots = tl.dot(q, kt, dots, input_precision=PRECISION)
        score = dots / tl.maximum(tl.sqrt(key_sq), eps)[None, :]
        score = tl.where((n[None, :] == self_idx[:, None]) | ~n_mask[None, :], float("-inf"), score)
        top, arg = _best_in_tile(score, n0)
        runner_up, _ = _best_in_tile(tl.where(cols[None, :] == arg[:, None], float("-inf"), score), n0)
        # the two best of {first, second, top, runner_up}, both pairs sorted
        second = tl.maximum(tl.minimum(first, top), tl.maximum(second, runner_up))
        first = tl.maximum(first, top)
    out = CAND + tl.program_id(1).to(tl.int64) * 2 * B + m
    tl.store(out, first, mask=m_mask)
    tl.store(out + B, second, mask=m_mask)


@triton.jit
def _koleo_finish_kernel(
    K, CAND, NN, LOSS, G,
    B, N, D, offset, stride, keys_per_split, splits, eps, dist_eps, p, inv_B, tol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, P_IS_2: tl.constexpr,
):
    """Re-ranks query block i's candidates in fp32, searches again in fp32 the splits where the cheap
    score leaves an unseen key a chance (module docstring: the margin), then finishes the rows."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    m = pid * BLOCK_M + r
    m_mask = m < B
    q_rows = (m + offset).to(tl.int64)
    # the margin: a key whose cheap score is below the best cheap score - 2 tol ||x_q|| cannot win in fp32
    margin = 2.0 * tol * _row_norms(K, q_rows, m_mask, D, stride, BLOCK_M, BLOCK_K)
    pair = tl.arange(0, 2)
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best = tl.full((BLOCK_M,), _NONE, tl.int64)
    for s in range(splits):  # the exact score of every candidate
        cand = tl.load(CAND + s * 2 * B + pair[None, :] * B + m[:, None], mask=m_mask[:, None], other=_NONE)
        top = tl.maximum(top, tl.max(_unpack_score(cand), axis=1))
        valid = cand != _NONE
        idx = _unpack_idx(cand)
        exact = _exact_scores(K, q_rows, m_mask, idx, valid, D, stride, eps, BLOCK_K)
        best = tl.maximum(best, tl.max(_pack(tl.where(valid, exact, float("-inf")), idx), axis=1))
    for s in range(splits):  # a split whose runner-up is within the margin may hide a third key: search it
        runner_up = _unpack_score(tl.load(CAND + (s * 2 + 1) * B + m, mask=m_mask, other=_NONE))
        unsure = m_mask & ~(runner_up < top - margin)
        n_start = s * keys_per_split
        n_end = tl.minimum(n_start + keys_per_split, N)
        for i in range(BLOCK_M):
            if tl.sum(tl.where(r == i, unsure, False).to(tl.int32)) > 0:
                row = tl.full((1,), pid * BLOCK_M + i + offset, tl.int64)
                found = _exact_best(K, row, row >= 0, n_start, n_end, D, stride, eps, BLOCK_N, BLOCK_K)
                best = tl.where(r == i, tl.maximum(best, tl.max(found, axis=0)), best)
    _finish_rows(K, best, NN, LOSS, G, m, m_mask, q_rows, D, stride, eps, dist_eps, p, inv_B, BLOCK_M, BLOCK_K,
                 P_IS_2)


@triton.jit
def _koleo_bwd_kernel(G, GRAD_LOSS, DK, numel, BLOCK: tl.constexpr):
    """d loss / d keys = grad_loss * G (the forward's gradient for d loss = 1), in keys' dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0) * tl.load(GRAD_LOSS).to(tl.float32)
    tl.store(DK + offs, g.to(DK.dtype.element_ty), mask=mask)


_EXACT_MAX_KEYS = 384  # up to here the fp32 CUDA-core search is cheap (module docstring), and from here on the
# candidate search has a program per SM
_EXACT_BLOCK = 8  # query rows and keys per program of the exact search: 256 programs at B = N = 128
_EXACT_BLOCK_K = 32  # (8, 8, 32) fp32 products per step: 32 per thread at 2 warps
_BLOCK_N = 64  # keys per tl.dot tile of the candidate search
_BLOCK_K = 32  # features per step: at 64 the fp32 candidate search and the finishing kernel spill on sm_90
_FALLBACK_BLOCK_N = 32  # keys per step of the finishing kernel's one-row fp32 search (64: 250 registers)
_MIN_KEYS_PER_SPLIT = 64  # a split adds two candidates per row to re-rank: it must scan many more keys


class _Plan(NamedTuple):
    """How the search covers B queries x N keys: the exact kernel or candidates + re-ranking, programs of
    block_m query rows x a split of keys_per_split keys (splits of them); the finishing kernel's programs
    take finish_block_m rows each."""

    exact: bool
    block_m: int
    splits: int
    keys_per_split: int
    finish_block_m: int = 0


def _search_plan(B: int, N: int, device: torch.device) -> _Plan:
    """Query blocks and key splits such that there is a program per SM (132 on an H100) whenever the
    tiles allow: the smallest tiles at small B, key splits on top."""
    sms = layout.num_sms(device)
    exact = N <= _EXACT_MAX_KEYS
    if exact:
        block_m, block_n, min_keys = _EXACT_BLOCK, _EXACT_BLOCK, _EXACT_BLOCK
    else:
        block_n, min_keys = _BLOCK_N, _MIN_KEYS_PER_SPLIT
        max_splits = max(1, N // min_keys)
        block_m = next((bm for bm in (64, 32) if triton.cdiv(B, bm) * max_splits >= sms), 16)  # 16: tl.dot's least
    row_blocks = triton.cdiv(B, block_m)
    wanted = max(1, min(triton.cdiv(sms, row_blocks), N // min_keys))
    keys_per_split = block_n * max(1, triton.cdiv(N, block_n) // wanted)  # rounded down: at least `wanted`
    # 16 rows a program at B = 4096 (256 programs), 8 or 4 below: B >= 528 fills 132 SMs (2 rows spill on sm_90)
    finish_block_m = 0 if exact else next((bm for bm in (16, 8) if triton.cdiv(B, bm) >= sms), 4)
    return _Plan(exact, block_m, triton.cdiv(N, keys_per_split), keys_per_split, finish_block_m)


def _rank_tolerance(dtype: torch.dtype, D: int) -> float:
    """tol: |cheap score - fp32 score| <= tol ||x_q|| for every key (module docstring): tf32 operands
    (10-bit mantissas, truncated or rounded: relative error <= 2^-10 each) plus both sums' fp32 rounding,
    taken at twice the sequential bound, (D + 8) 2^-23 each; bf16 / fp16 products are exact."""
    rounding = (D + 8) * 2.0**-22
    return 2.0**-9 + 2.0**-20 + rounding if dtype == torch.float32 else rounding


def _triton_forward(keys: torch.Tensor, offset: int, B: int, eps: float, distance_eps: float,
                    p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The search and finishing kernels: (mean loss in keys' dtype, neighbours (B,) int32, the gradient
    (N, D) fp32 of the mean loss for d loss = 1)."""
    keys = keys.contiguous()
    N, D = keys.shape
    device = keys.device
    nn_idx = torch.empty(B, dtype=torch.int32, device=device)
    loss_rows = torch.empty(B, dtype=torch.float32, device=device)
    grad = torch.zeros(N, D, dtype=torch.float32, device=device)
    plan = _search_plan(B, N, device)
    row_blocks = triton.cdiv(B, plan.block_m)
    rows = dict(B=B, N=N, D=D, offset=offset, stride=keys.stride(0), keys_per_split=plan.keys_per_split)
    finish = dict(splits=plan.splits, eps=eps, dist_eps=distance_eps, p=p, inv_B=1.0 / B, P_IS_2=p == 2)
    if plan.exact:
        _koleo_search_kernel[(row_blocks, plan.splits)](
            K=keys, BEST=torch.full((B,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device),
            COUNT=torch.zeros(row_blocks, dtype=torch.int32, device=device), NN=nn_idx, LOSS=loss_rows, G=grad,
            **rows, **finish, BLOCK_M=plan.block_m, BLOCK_N=_EXACT_BLOCK, BLOCK_K=_EXACT_BLOCK_K, num_warps=2,
        )
    else:
        cand = torch.empty(plan.splits, 2, B, dtype=torch.int64, device=device)
        precision = "tf32" if keys.dtype == torch.float32 else None  # fp16 / bf16: exact products
        _koleo_candidates_kernel[(row_blocks, plan.splits)](
            K=keys, CAND=cand, **rows, eps=eps, BLOCK_M=plan.block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
            PRECISION=precision, INTERPRETED=interpreter_enabled(),
            num_warps=plan.block_m // 8,  # a warp per 8 rows: with fewer the fp32 search spills on sm_90
        )
        _koleo_finish_kernel[(triton.cdiv(B, plan.finish_block_m),)](
            K=keys, CAND=cand, NN=nn_idx, LOSS=loss_rows, G=grad, **rows, **finish, tol=_rank_tolerance(keys.dtype, D),
            BLOCK_M=plan.finish_block_m, BLOCK_N=_FALLBACK_BLOCK_N, BLOCK_K=_BLOCK_K,
            num_warps=max(2, plan.finish_block_m // 4),  # 4 warps at 16 rows, 2 below (4 spill at 8 rows)
        )
    return loss_rows.mean().to(keys.dtype), nn_idx, grad


def _bwd_block(numel: int, device: torch.device) -> int:
    """Elements per backward program: a program per SM at least, 256 to 1024 elements (8 a thread)."""
    per_sm = triton.next_power_of_2(triton.cdiv(numel, layout.num_sms(device))) // 2
    return min(1024, max(256, per_sm))


def _triton_backward(grad_loss: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The backward kernel: grad_loss * the forward's gradient, (N, D) in `dtype`."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    block = _bwd_block(grad.numel(), grad.device)
    _koleo_bwd_kernel[(triton.cdiv(grad.numel(), block),)](
        G=grad, GRAD_LOSS=grad_loss.contiguous(), DK=out, numel=grad.numel(), BLOCK=block, num_warps=4,
    )
    return out


# The ops: the forward returns what its backward needs (the neighbours for the eager backward, the gradient for
# the Triton one), so that no backward searches again.
@torch.library.custom_op(
    "dinotron::koleo", mutates_args=(),
    schema="(Tensor keys, int offset, int B, float eps, float distance_eps, float p, str backend) "
           "-> (Tensor, Tensor, Tensor)",
)
def _koleo_op(keys, offset, B, eps, distance_eps, p, backend):
    """Mean KoLeo term of the B query rows keys[offset:offset + B], neighbours searched among all keys:
    (loss in keys' dtype, neighbours (B,) int32, grad: d loss / d keys (N, D) fp32 for d loss = 1 from the
    Triton backend, (0,) from eager)."""
    if backend == "eager":
        nn_idx = reference.koleo_neighbours(keys, offset, B, eps)
        loss = reference.koleo_pair_loss(keys, offset, nn_idx, eps, p, distance_eps)
        return loss, nn_idx.to(torch.int32), keys.new_empty(0, dtype=torch.float32)
    return _triton_forward(keys, offset, B, eps, distance_eps, p)


@torch.library.custom_op(
    "dinotron::koleo_backward", mutates_args=(),
    schema="(Tensor grad_loss, Tensor grad, ScalarType dtype) -> Tensor",
)
def _koleo_backward_op(grad_loss, grad, dtype):
    """d loss / d keys of dinotron::koleo's Triton backend from its forward's grad, (N, D) contiguous in dtype."""
    return _triton_backward(grad_loss, grad, dtype)


@_koleo_op.register_fake
def _(keys, offset, B, eps, distance_eps, p, backend):
    grad = keys.new_empty(keys.shape if backend == "triton" else (0,), dtype=torch.float32)
    return keys.new_empty(()), keys.new_empty(B, dtype=torch.int32), grad


@_koleo_backward_op.register_fake
def _(grad_loss, grad, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    keys, offset, _, eps, distance_eps, p, backend = inputs
    _, nn_idx, grad = output
    ctx.mark_non_differentiable(nn_idx, grad)
    ctx.save_for_backward(keys, nn_idx, grad)
    ctx.args, ctx.backend = (offset, eps, distance_eps, p), backend


def _koleo_grad(ctx, grad_loss, _grad_nn_idx, _grad_grad):
    keys, nn_idx, grad = ctx.saved_tensors
    offset, eps, distance_eps, p = ctx.args
    if ctx.backend == "triton":
        grad_keys = _koleo_backward_op(grad_loss, grad, keys.dtype)
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
