"""DINOHead's prototype layer fused into the DINO and iBOT losses: no rows x K logits on the student side.

DINOHead ends in an L2-normalised bottleneck f (D = 256) and a weight-normalised Linear W (K, D) to
K prototypes. Here the losses take f and W (and the teacher's f_t, W_t) instead of the logits:

    s = f W^T,  z = s / student_temp                          student logits, never stored
    p_u = softmax_k(t_u * logit_scale + col_scale * col)      teacher targets, t = f_t W_t^T
    loss = scale * sum_{v,b} w[b] (lse(z_v[b]) mass_v[b] - sum_k P_v[b,k] z_v[b,k])

with P_v[b] = the teacher views paired with student view v (dinov2's DINOLoss.forward: every view;
lightly's and the trainer's: all but the same crop; iBOT: the same patch, S = T = 1) and
mass_v[b] = sum_k P_v[b,k] (each p_u sums to 1). Softmax centring: col = the centre, col_scale =
-1/teacher_temp; Sinkhorn-Knopp: col = its prototype scaling, col_scale = -1 (row sums are 1).

The sums over K collapse into D-vectors. With V the student prototypes (W rounded to the dot dtype):

    sum_k P_v[b,k] z_v[b,k] = f_v[b] . Pmix_v[b] / student_temp,    Pmix = sum_{u paired} p_u V   (teacher mix)
    d loss / d f_v[b]       = c_v[b] (mass_v[b] Smix_v[b] - Pmix_v[b]),  Smix = softmax(z) V     (student mix)
    d loss / d W[k]         = sum_r c_r mass_r softmax(z_r)[k] f_r - sum_{teacher rows q} p_q[k] G_q
    c = g * scale * w[b] / student_temp,   G_u[b] = sum_{v paired with u} c_v[b] f_v[b]

So the forward is two flash-attention-like passes of one kernel (_head_softmax_kernel), each a loop
over K tiles with an online log-sum-exp and an accumulated (rows, D) mix = softmax(scores) @ V:
the teacher rows (scores f_t W_t^T, or for Sinkhorn-Knopp its stored logits) give lse_t and Pmix,
the student rows (scores f W^T) lse and Smix. The loss and d loss / d f are then (rows, D)
arithmetic; the backward's one kernel (_head_weight_grad_kernel) owns a tile of K prototypes and
loops over the student rows (recomputing their softmax from the saved lse) and the teacher rows
(recomputing p), accumulating dW with tl.dot: no atomics, deterministic. A d f kernel over row
blocks (dS @ W, recomputing the scores) is not needed: Smix, one more tl.dot per tile in the
forward, replaces it (two dots per tile in a backward pass).
Few rows (DINO's 2 x 128 teacher rows) would leave most SMs idle, so K is split between programs
(each split at least 4 * D columns, so that the (splits, rows, D) fp32 partials stay below rows x K / 4
elements; 2 * D columns, partials below rows x K / 2, as far as one wave needs where 4 * D would leave
SMs without a program: DINO's teacher at B = 128, K = 65536, 2 row blocks x 66 splits of 15 or 16 K tiles,
132 programs, where 64 splits of 16 tiles gave 128), and a combine in torch folds the splits' (max, sum, mix).

Precision. Scores: tl.dot on the features' dtype (W rounded to it on load, as autocast's F.linear
rounds it), fp32 accumulation: for bf16/fp16 features the products are exact; fp32 features use
tf32 when torch.backends.cuda.matmul.allow_tf32 is set (as torch.mm), else exact fp32 products. The mixes and
dW round their left operand (p, p * c, G) to the dot dtype, as flash attention rounds P: one
relative rounding (2^-8 bf16, 2^-11 fp16) per term of an fp32 sum; the unfused bf16 path rounds
every logit and every logit gradient to bf16 instead. Softmax-centred teacher logits are never
rounded (fp32 tiles). Sinkhorn-Knopp's iterations need the column sums of all teacher rows three
times, so the teacher's logits are made once (F.linear in the features' dtype: what DINOHead gives,
cuBLAS) and kept, T*B x K, until the backward; the existing Sinkhorn op gives the prototype scaling
col from them, and both passes read them tile by tile in place of f_t W_t^T. Student logits still
never exist. The centre's batch mean is mean_r f_t[r] W_t^T: a (D,) row sum and a K x D matvec
(_center_sums_kernel), then softmax_center.center_ema (its all_reduce across ranks, as dinov2's).

Cost per kernel on an H100/H200 (roofline: ~700 dense bf16 TFLOP/s reachable, 3.0 TB/s HBM), bf16,
K = 65536, D = 256, N rows; W is 32 MiB in bf16 (fp32 parameters are first cast: one K x D copy):
- _head_softmax_kernel, N rows: 4 N K D FLOPs (scores + mix), N K exps; HBM: keys + values (64 MiB
  for the teacher pass, 32 MiB for the student's, whose keys are its values), partials splits x N x D x 4;
  L2: (N / BLOCK_M) x 2 x 32 MiB. DINO teacher (N = 256): 17 GFLOP, 25 us vs 64 MiB, 22 us: balanced;
  DINO student (N = 1280): 86 GFLOP, 123 us (compute-bound); iBOT (N = 16384 each pass): 1.1 TFLOP,
  1.6 ms per pass, with 8 GiB from L2 (row blocks in flight sweep K together, so W tiles are shared there).
- _head_weight_grad_kernel: 4 (N_s + N_t) K D FLOPs; HBM: W_s, W_t (64 MiB), dW (K x D in W's dtype,
  64 MiB fp32), rows from L2: (K / BLOCK_K) x (N_s + 2 N_t) x D x 2 bytes. DINO: 103 GFLOP, 147 us
  (128 MiB: 45 us); iBOT: 2.2 TFLOP, 3.1 ms (13 GB from L2).
- _center_sums_kernel: K x D weights once (32 MiB, 11 us), 2 K D FLOPs.
- In torch: the split combine and the (rows, D) loss / d f arithmetic, O(splits x N x D).
Totals: DINO cls (B = 128, 2 + 8 views, 2 teacher views) 206 GFLOP, ~0.3 ms; iBOT (16384 rows)
4.4 TFLOP, ~6.3 ms. The unfused path at the same roofline: DINO 138 GFLOP of head matmuls (0.2 ms)
plus ~0.9 GB of bf16 logits, targets and gradients through HBM (0.3 ms); iBOT 2.2 TFLOP (3.1 ms) plus
~16 GiB (5.7 ms), and it holds 3 x 2 GiB of (rows, K) tensors. The fused op does about 1.5-2x the
FLOPs (the scores are recomputed in the backward, the mixes are extra dots) and moves no rows x K
bytes. cuBLAS on row chunks would write each chunk's logits to HBM and read them back for the
softmax (the unfused bytes, in pieces); the tile-level dots keep the softmax between them on chip.

sm_90 compile (Triton 3.8 + ptxas; tests/test_fused_head.py lowers every variant): registers, shared
memory and tile sizes beside _FWD_BLOCKS below; no spills, one 8-warp CTA per SM, wgmma for bf16/fp16.

The op dinotron::fused_head_loss (autograd: dinotron::fused_head_loss_backward) runs these kernels or
kernels/reference.py's head-then-loss math (backend "eager": the CPU path and the tests' oracle).
Nothing in it reads a device value on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from dinotron.kernels import reference
from dinotron.kernels.backend import interpreter_enabled, resolve_backend
from dinotron.kernels.checks import (
    check_finite_result,
    check_ibot_loss_input,
    check_positive,
    check_same_device,
    check_tensor,
)
from dinotron.kernels.layout import lse_pivot, num_sms, tile
from dinotron.kernels.sinkhorn_knopp import sinkhorn_knopp_targets
from dinotron.kernels.softmax_center import center_ema

MAX_D = 256  # the widest bottleneck the kernels take (D = 256 fills the register budget below)
# (BLOCK_M rows, BLOCK_K prototypes) per tile on a GPU, by the features' element size; BLOCK_D = D padded to
# a power of two. sm_90 compile at D = 256, num_warps=8, num_stages=2 (Triton 3.8, cuobjdump), no spills:
#   forward  bf16/fp16 (128, 64): 223-228 registers, 192 KiB shared (the row block, two stages of key + value
#            tiles), wgmma; from Sinkhorn's logits 253 registers, 128 KiB (bf16, benchmarks/static_report.py).
#            fp32 (32, 32): 128 (ieee) / <217 (tf32) registers, 100 KiB.
#   backward bf16/fp16 (64, 128): 248 registers, 192 KiB (from logits 216, 128 KiB), wgmma; fp32 (32, 32):
#            152 (ieee) / 154 (tf32) registers, 100 KiB.
# One 8-warp CTA per SM either way (registers), so the larger tiles halve the bytes each FLOP needs from L2:
# the forward reads 2 x BLOCK_K x D weights per BLOCK_M rows (128 FLOP/byte), the backward BLOCK_M x D rows
# per BLOCK_K prototypes (256 FLOP/byte). fp32's tf32x3 spills at D = 256 (600+ bytes of stack): fp32
# features use tf32 when allowed, else exact fp32 products ("ieee", no tensor cores).
_FWD_BLOCKS = {2: (128, 64), 4: (32, 32)}
_BWD_BLOCKS = {2: (64, 128), 4: (32, 32)}
_MIN_COLS_PER_D = 4  # a K split spans 4 * D columns at least (2 * D to fill one wave): partials <= rows x K / 4 (/ 2)


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the dot dtype; back in fp32 under UPCAST (the interpreter multiplies bf16 bit
    patterns in tl.dot, triton#11584, so there the rounded values are multiplied in fp32)."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_softmax_kernel(
    X, KEYS, VALUES, LOGITS, COL, PART_M, PART_L, PART_MIX,
    n_rows, K, D, x_stride, logits_stride, n_splits, logit_scale, col_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FROM_LOGITS: tl.constexpr,
    HAS_COL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (row block, K split of n_splits, whole K tiles each): over the split's prototypes k,
    z = scores * logit_scale + col_scale * COL[k] with scores = X[rows] . KEYS[k] (or LOGITS[rows, k]);
    stores the online max m, sum l = sum_k exp(z - m) and mix = sum_k exp(z - m) VALUES[k] (fp32) of each
    row. KEYS and VALUES: (K, D) contiguous, in X's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    n_k_blocks = tl.cdiv(K, BLOCK_K)  # split s: K tiles [s n / n_splits, (s + 1) n / n_splits), rounded down
    k_start = tl.program_id(1) * n_k_blocks // n_splits * BLOCK_K
    k_end = tl.minimum((tl.program_id(1) + 1) * n_k_blocks // n_splits * BLOCK_K, K)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dt = X.dtype.element_ty
    x = tl.load(X + rows64[:, None] * x_stride + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    x = _operand(x, dt, UPCAST)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    mix = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        k64 = k.to(tl.int64)
        # 1. the scores tile (BLOCK_M, BLOCK_K), fp32
        if FROM_LOGITS:
            s = tl.load(LOGITS + rows64[:, None] * logits_stride + k64[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        else:
            w = tl.load(KEYS + k64[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                        other=0.0)
            s = tl.dot(x, tl.trans(_operand(w, dt, UPCAST)), input_precision=PRECISION)
        z = s * logit_scale
        if HAS_COL:
            z += col_scale * tl.load(COL + k, mask=k_mask, other=0.0)[None, :]
        z = tl.where(k_mask[None, :], z, float("-inf"))
        # 2. online log-sum-exp, and the mix rescaled to the new max
        m_new = tl.maximum(m, tl.max(z, axis=1))
        pivot = lse_pivot(m_new)
        p = tl.exp(z - pivot[:, None])
        alpha = tl.exp(m - pivot)
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(VALUES + k64[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0)
        mix = mix * alpha[:, None] + tl.dot(_operand(p, dt, UPCAST), _operand(v, dt, UPCAST),
                                            input_precision=PRECISION)
        m = m_new
    out = tl.program_id(1) * n_rows + rows
    tl.store(PART_M + out, m, mask=r_mask)
    tl.store(PART_L + out, total, mask=r_mask)
    tl.store(PART_MIX + out.to(tl.int64)[:, None] * D + d[None, :], mix, mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _grad_rows(acc, w, X, V, LOGITS, LSE, COEF, COL, k, k_mask, n_rows, D, x_stride, v_stride, logits_stride,
               logit_scale, col_scale, dt, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               FROM_LOGITS: tl.constexpr, V_IS_X: tl.constexpr, HAS_COEF: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """acc (BLOCK_K, BLOCK_D) + sum over all rows r of c_r p_r[k] V[r]: p_r = exp(z_r - LSE[r]), z as in
    _head_softmax_kernel (scores X[r] . w, the key tile, or LOGITS[r, k]; COL on the teacher side),
    c_r = COEF[r] with HAS_COEF (the student), else -1 (the teacher, whose V = G holds the c's)."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    k64 = k.to(tl.int64)
    col = tl.zeros((BLOCK_K,), tl.float32)
    if not HAS_COEF:
        col = col_scale * tl.load(COL + k, mask=k_mask, other=0.0)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        row_tile = r_mask[:, None] & d_mask[None, :]
        # 1. the transposed scores (BLOCK_K, BLOCK_M), as the forward made them
        if FROM_LOGITS:
            s = tl.load(LOGITS + rows64[None, :] * logits_stride + k64[:, None],
                        mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        else:
            x = _operand(tl.load(X + rows64[:, None] * x_stride + d[None, :], mask=row_tile, other=0.0), dt, UPCAST)
            s = tl.dot(w, tl.trans(x), input_precision=PRECISION)
        z = s * logit_scale + col[:, None]
        # 2. c_r p_r[k] (0 on masked rows and prototypes), then acc += that tile @ V[rows]
        lse = tl.load(LSE + rows, mask=r_mask, other=0.0)
        if HAS_COEF:
            coef = tl.load(COEF + rows, mask=r_mask, other=0.0)
        else:
            coef = tl.where(r_mask, -1.0, 0.0)
        p = tl.where(k_mask[:, None], tl.exp(z - lse[None, :]), 0.0) * coef[None, :]
        if V_IS_X:
            v = x
        else:
            v = _operand(tl.load(V + rows64[:, None] * v_stride + d[None, :], mask=row_tile, other=0.0), dt, UPCAST)
        acc += tl.dot(_operand(p, dt, UPCAST), v, input_precision=PRECISION)
    return acc


@triton.jit
def _head_weight_grad_kernel(
    XS, WS, S_LSE, S_COEF, XT, WT, T_LOGITS, T_COL, T_LSE, G, DW,
    n_s_rows, n_t_rows, K, D, xs_stride, xt_stride, t_logits_stride, s_scale, t_logit_scale, t_col_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, T_FROM_LOGITS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program k-tile: DW[k] = sum_r S_COEF[r] softmax(z_r)[k] XS[r] - sum_q p_q[k] G[q] over the student
    rows r (z = XS WS^T * s_scale, normalised by S_LSE) and the teacher rows q (p from XT WT^T or T_LOGITS,
    T_COL and T_LSE), written once, in DW's dtype. WS, WT, G: (K, D), (K, D), (n_t_rows, D) contiguous,
    in XS's dtype."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    k64 = k.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    w_tile = k64[:, None] * D + d[None, :]
    w_mask = k_mask[:, None] & (d < D)[None, :]
    dt = XS.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    # 1. the student rows: their softmax times c_r * mass_r, times their features
    ws = _operand(tl.load(WS + w_tile, mask=w_mask, other=0.0), dt, UPCAST)
    acc = _grad_rows(acc, ws, XS, XS, XS, S_LSE, S_COEF, S_COEF, k, k_mask, n_s_rows, D, xs_stride, xs_stride, 0,
                     s_scale, 0.0, dt, BLOCK_M, BLOCK_K, BLOCK_D, False, True, True, PRECISION, UPCAST)
    # 2. the teacher rows: minus their targets times G
    wt = ws
    if not T_FROM_LOGITS:
        wt = _operand(tl.load(WT + w_tile, mask=w_mask, other=0.0), dt, UPCAST)
    acc = _grad_rows(acc, wt, XT, G, T_LOGITS, T_LSE, T_LSE, T_COL, k, k_mask, n_t_rows, D, xt_stride, D,
                     t_logits_stride, t_logit_scale, t_col_scale, dt, BLOCK_M, BLOCK_K, BLOCK_D, T_FROM_LOGITS,
                     False, False, PRECISION, UPCAST)
    tl.store(DW + w_tile, acc.to(DW.dtype.element_ty), mask=w_mask)


@triton.jit
def _center_sums_kernel(W, FSUM, OUT, K, D, w_stride, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[k] = W[k] . FSUM in fp32: the teacher logits' column sums sum_r t[r, k] from the teacher
    features' row sum FSUM (D,) (W in the features' dtype)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    w = tl.load(W + k.to(tl.int64)[:, None] * w_stride + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                other=0.0)
    f = tl.load(FSUM + d, mask=d_mask, other=0.0)
    tl.store(OUT + k, tl.sum(w.to(tl.float32) * f[None, :], axis=1), mask=k_mask)


# ---- launchers ------------------------------------------------------------------------------------------

def _dot_config(dtype: torch.dtype) -> dict:
    """tl.dot's input precision and the interpreter's bf16 work-around for features of `dtype`."""
    precision = None  # fp16/bf16 operands: exact products, fp32 accumulation
    if dtype == torch.float32:  # as torch.mm: tf32 if allowed (dinov2's train.py allows it), else fp32
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(PRECISION=precision, UPCAST=interpreter_enabled() and dtype == torch.bfloat16)


def _blocks(table: dict, dtype: torch.dtype, rows: int, K: int, D: int) -> dict:
    """The tile sizes of `table` for this dtype, shrunk to the rows and prototypes there are."""
    block_m, block_k = table[dtype.itemsize]
    return dict(BLOCK_M=max(16, min(tile(block_m), triton.next_power_of_2(rows))),
                BLOCK_K=max(16, min(tile(block_k), triton.next_power_of_2(K))),
                BLOCK_D=max(16, triton.next_power_of_2(D)))


def _softmax_mix(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, logits: torch.Tensor | None,
                 col: torch.Tensor | None, logit_scale: float, col_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (R,), mix (R, D)) fp32 of the R rows of x (R, D): z = scores * logit_scale + col_scale * col,
    scores = x keys^T (or `logits` (R, K)), lse = logsumexp_k z, mix = softmax_k(z) @ values. keys and
    values: (K, D) contiguous in x's dtype. K is split between programs when the row blocks are fewer
    than two per SM; the splits' (max, sum, mix) are folded here."""
    R, D = x.shape
    K = values.shape[0]
    if R == 0:  # an empty grid is an error on a GPU
        return x.new_empty(0, dtype=torch.float32), x.new_empty(0, D, dtype=torch.float32)
    cfg = _blocks(_FWD_BLOCKS, x.dtype, R, K, D)
    row_blocks, n_blocks = triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"])
    sms = num_sms(x.device)
    min_tiles = triton.cdiv(_MIN_COLS_PER_D * D, cfg["BLOCK_K"])  # K tiles a split spans at least
    splits = max(1, min(n_blocks // min_tiles, triton.cdiv(2 * sms, row_blocks)))
    if row_blocks * splits < sms:  # the bound leaves SMs without a program: halve it, up to one wave
        splits = max(splits, min(n_blocks // triton.cdiv(min_tiles, 2), triton.cdiv(sms, row_blocks)))
    part = torch.empty(2, splits, R, dtype=torch.float32, device=x.device)
    part_mix = torch.empty(splits, R, D, dtype=torch.float32, device=x.device)
    _head_softmax_kernel[(row_blocks, splits)](
        X=x, KEYS=keys, VALUES=values, LOGITS=logits, COL=col, PART_M=part[0], PART_L=part[1], PART_MIX=part_mix,
        n_rows=R, K=K, D=D, x_stride=x.stride(0), logits_stride=0 if logits is None else logits.stride(0),
        n_splits=splits, logit_scale=logit_scale, col_scale=col_scale,
        FROM_LOGITS=logits is not None, HAS_COL=col is not None, **cfg, **_dot_config(x.dtype), num_warps=8,
        num_stages=2,
    )
    # fold the splits: lse = M + log(sum_s l_s e^(m_s - M)), mix = sum_s mix_s e^(m_s - M) / that sum
    m = part[0].amax(dim=0)
    rescale = torch.exp(part[0] - m)
    total = (part[1] * rescale).sum(dim=0)
    return m + torch.log(total), torch.einsum("sr,srd->rd", rescale / total, part_mix)


def _center_sums(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(1, K) fp32 column sums of the logits rows @ weight^T, as weight @ (the rows' sum): one matvec.
    weight: (K, D) in the rows' dtype."""
    K, D = weight.shape
    out = torch.empty(1, K, dtype=torch.float32, device=weight.device)
    block_k = tile(64)
    _center_sums_kernel[(triton.cdiv(K, block_k),)](
        W=weight, FSUM=rows.float().sum(dim=0), OUT=out, K=K, D=D, w_stride=weight.stride(0), BLOCK_K=block_k,
        BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4,
    )
    return out


def _paired(views: torch.Tensor, n_out: int, exclude_same_view: bool) -> torch.Tensor:
    """(n_out, B, ...) sums over the A views (A, B, ...) paired with each of n_out views of the other side:
    all of them, less the same-index view (if exclude_same_view and that view exists)."""
    total = views.sum(dim=0, keepdim=True).expand(n_out, *views.shape[1:])
    if not exclude_same_view:
        return total
    n = min(views.shape[0], n_out)
    own = torch.cat([views[:n], views.new_zeros(n_out - n, *views.shape[1:])])
    return total - own


def _row_terms(S: int, T: int, B: int, t_mix: torch.Tensor, exclude_same_view: bool):
    """(mass (S, 1), Pmix (S, B, D)): each student view's target mass and teacher mix."""
    mass = _paired(t_mix.new_ones(T, 1), S, exclude_same_view)
    return mass, _paired(t_mix.view(T, B, t_mix.shape[-1]), S, exclude_same_view)


def _triton_forward(student, teacher, student_weight, teacher_weight, center, weight, student_temp, teacher_temp,
                    center_momentum, sinkhorn_iterations, scale, exclude_same_view):
    S, B, D = student.shape
    T, K = teacher.shape[0], student_weight.shape[0]
    dtype = student.dtype
    xs, xt = student.reshape(S * B, D).contiguous(), teacher.reshape(T * B, D).contiguous()
    ws, wt = student_weight.to(dtype).contiguous(), teacher_weight.to(dtype).contiguous()
    if center is None:  # Sinkhorn-Knopp: the teacher logits, once, for its iterations and both passes
        logits = reference.teacher_head_logits(xt, teacher_weight)
        col = sinkhorn_knopp_targets(list(logits.view(T, B, K).unbind(0)), teacher_temp, sinkhorn_iterations,
                                     "triton").col
        col_scale, new_center = -1.0, student.new_empty(0, dtype=torch.float32)
    else:
        logits = None
        col, col_scale = center.reshape(-1).to(torch.float32, copy=True), -1.0 / teacher_temp
        new_center = center_ema(center, _center_sums(wt, xt), T * B, center_momentum)
    t_lse, t_mix = _softmax_mix(xt, wt, ws, logits, col, 1.0 / teacher_temp, col_scale)
    s_lse, s_mix = _softmax_mix(xs, ws, ws, None, None, 1.0 / student_temp, 0.0)
    # loss = scale * sum w (lse * mass - f . Pmix / student_temp)
    mass, pmix = _row_terms(S, T, B, t_mix, exclude_same_view)
    ce = s_lse.view(S, B) * mass - torch.einsum("sbd,sbd->sb", xs.view(S, B, D).float(), pmix) / student_temp
    if weight is not None:
        ce = ce * weight
    return (ce.sum() * scale, new_center, s_lse, s_mix, t_lse, t_mix, col,
            xt.new_empty(0, K) if logits is None else logits)


def _triton_backward(grad_loss, student, teacher, student_weight, teacher_weight, weight, s_lse, s_mix, t_lse, t_mix,
                     col, logits, sinkhorn, student_temp, teacher_temp, scale, exclude_same_view):
    S, B, D = student.shape
    T, K = teacher.shape[0], student_weight.shape[0]
    dtype = student.dtype
    xs, xt = student.reshape(S * B, D).contiguous(), teacher.reshape(T * B, D).contiguous()
    ws, wt = student_weight.to(dtype).contiguous(), teacher_weight.to(dtype).contiguous()
    # c = g * scale * w / student_temp per student row; d f = c (mass Smix - Pmix)
    c = (grad_loss.float() * scale / student_temp).expand(S, B)
    if weight is not None:
        c = c * weight
    mass, pmix = _row_terms(S, T, B, t_mix, exclude_same_view)
    d_student = c[..., None] * (mass[..., None] * s_mix.view(S, B, D) - pmix)
    # G_u = sum over the student views paired with teacher view u of c f
    g = _paired(c[..., None] * xs.view(S, B, D).float(), T, exclude_same_view).reshape(T * B, D).to(dtype)
    d_weight = torch.empty(K, D, dtype=student_weight.dtype, device=student.device)
    cfg = _blocks(_BWD_BLOCKS, dtype, max(S, T) * B, K, D)
    _head_weight_grad_kernel[(triton.cdiv(K, cfg["BLOCK_K"]),)](
        XS=xs, WS=ws, S_LSE=s_lse, S_COEF=(c * mass).reshape(-1).contiguous(), XT=xt, WT=wt,
        T_LOGITS=logits if sinkhorn else None, T_COL=col, T_LSE=t_lse, G=g, DW=d_weight,
        n_s_rows=S * B, n_t_rows=T * B, K=K, D=D, xs_stride=xs.stride(0), xt_stride=xt.stride(0),
        t_logits_stride=logits.stride(0) if sinkhorn else 0, s_scale=1.0 / student_temp,
        t_logit_scale=1.0 / teacher_temp, t_col_scale=-1.0 if sinkhorn else -1.0 / teacher_temp,
        T_FROM_LOGITS=sinkhorn, **cfg, **_dot_config(dtype), num_warps=8, num_stages=2,
    )
    return d_student.to(dtype), d_weight


# ---- the ops ------------------------------------------------------------------------------------------
# loss = scale * sum_{v,b} w[b] CE(P_v[b], softmax(f_v[b] W^T / student_temp)) with the teacher targets of
# f_t W_t^T: softmax centring against `center` (then new centre = its EMA with the teacher rows' mean), or
# Sinkhorn-Knopp (center None). Outputs past the loss and the centre are the backward's (all non-differentiable).
_LOSS_SCHEMA = (
    "(Tensor student, Tensor teacher, Tensor student_weight, Tensor teacher_weight, Tensor? center, Tensor? weight, "
    "float student_temp, float teacher_temp, float center_momentum, int sinkhorn_iterations, float scale, "
    "bool exclude_same_view, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor student_weight, Tensor teacher_weight, Tensor? weight, "
    "Tensor s_lse, Tensor s_mix, Tensor t_lse, Tensor t_mix, Tensor t_col, Tensor t_logits, bool sinkhorn, "
    "float student_temp, float teacher_temp, float scale, bool exclude_same_view, str backend) -> (Tensor, Tensor)"
)


@torch.library.custom_op("dinotron::fused_head_loss", mutates_args=(), schema=_LOSS_SCHEMA)
def _fused_head_loss_op(student, teacher, student_weight, teacher_weight, center, weight, student_temp, teacher_temp,
                        center_momentum, sinkhorn_iterations, scale, exclude_same_view, backend):
    run = reference.fused_head_loss if backend == "eager" else _triton_forward
    return tuple(t.contiguous() for t in run(
        student, teacher, student_weight, teacher_weight, center, weight, student_temp, teacher_temp,
        center_momentum, sinkhorn_iterations, scale, exclude_same_view))


@torch.library.custom_op("dinotron::fused_head_loss_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _fused_head_loss_backward_op(grad_loss, student, teacher, student_weight, teacher_weight, weight, s_lse, s_mix,
                                 t_lse, t_mix, t_col, t_logits, sinkhorn, student_temp, teacher_temp, scale,
                                 exclude_same_view, backend):
    """(d student (S, B, D), d student_weight (K, D)), each in its input's dtype."""
    if backend == "eager":
        return reference.fused_head_loss_backward(grad_loss, student, teacher, student_weight, teacher_weight, weight,
                                                  t_col, t_logits if sinkhorn else None, student_temp, teacher_temp,
                                                  scale, exclude_same_view)
    return _triton_backward(grad_loss, student, teacher, student_weight, teacher_weight, weight, s_lse, s_mix, t_lse,
                            t_mix, t_col, t_logits, sinkhorn, student_temp, teacher_temp, scale, exclude_same_view)


@_fused_head_loss_op.register_fake
def _(student, teacher, student_weight, teacher_weight, center, weight, *args):
    acc = reference.acc_dtype(student, teacher)
    S, B, D = student.shape
    T, K = teacher.shape[0], student_weight.shape[0]
    new_center = student.new_empty(0, dtype=acc) if center is None else center.new_empty(center.shape)
    return (student.new_empty((), dtype=acc), new_center, student.new_empty(S * B, dtype=acc),
            student.new_empty(S * B, D, dtype=acc), student.new_empty(T * B, dtype=acc),
            student.new_empty(T * B, D, dtype=acc), student.new_empty(K, dtype=acc),
            teacher.new_empty(T * B if center is None else 0, K))


@_fused_head_loss_backward_op.register_fake
def _(grad_loss, student, teacher, student_weight, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format), torch.empty_like(
        student_weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, student_weight, teacher_weight, center, weight, student_temp, teacher_temp, *_, scale, \
        exclude_same_view, backend = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero (T*B, K) "gradient" of Sinkhorn's logits output
    ctx.save_for_backward(student, teacher, student_weight, teacher_weight, weight, *output[2:])
    ctx.numbers = (center is None, student_temp, teacher_temp, scale, exclude_same_view, backend)


def _backward(ctx, grad_loss, *_):
    d_student, d_weight = _fused_head_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.numbers)
    return d_student, None, d_weight, *(None,) * 10


_fused_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions and modules ------------------------------------------------------------------------

CENTERINGS = ("softmax", "sinkhorn_knopp")


def _check_inputs(student, teacher, student_weight, teacher_weight, center, centering, teacher_temp, student_temp,
                  sinkhorn_iterations, backend) -> str:
    """Shapes, dtypes, devices and numbers of the fused losses' inputs (host only); the resolved backend."""
    check_tensor("student_weight", student_weight, ndim=2)
    check_tensor("teacher_weight", teacher_weight, ndim=2)
    K, D = student_weight.shape
    if teacher_weight.shape != (K, D) or K == 0 or D == 0:
        raise ValueError(f"student_weight and teacher_weight must both be (K, D) prototypes with K, D > 0, got "
                         f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}")
    for name, x in (("student_features", student), ("teacher_features", teacher)):
        if x.shape[-1] != D:
            raise ValueError(f"{name} has {x.shape[-1]} features per row but the prototype weights have D={D} "
                             f"(pass the head's L2-normalised bottleneck, (rows, {D}))")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student_features and teacher_features must share one dtype (float32, float16 or bfloat16; "
                         f"float64 with backend='eager'), got {student.dtype} and {teacher.dtype}")
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    tensors = dict(student_features=student, teacher_features=teacher, student_weight=student_weight,
                   teacher_weight=teacher_weight)
    if centering == "softmax":
        if center is None:
            raise ValueError("centering='softmax' needs center (K elements, e.g. the (1, K) centre buffer)")
        reference._center_vector(center, K)
        tensors["center"] = center
    elif isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) or sinkhorn_iterations < 1:
        raise ValueError(f"sinkhorn_iterations must be an int >= 1, got {sinkhorn_iterations!r}")
    check_same_device(**tensors)
    check_positive("teacher_temp", teacher_temp)
    check_positive("student_temp", student_temp)
    if torch.is_grad_enabled() and (teacher.requires_grad or teacher_weight.requires_grad):
        raise ValueError("teacher_features and teacher_weight get no gradient from the fused losses (dinov2 runs the "
                         "teacher under no_grad): pass them detached")
    backend = resolve_backend(backend, *tensors.values())
    if backend == "triton" and D > MAX_D:
        raise ValueError(f"the fused-head kernels take D <= {MAX_D} features, got D={D}: use backend='eager'")
    return backend


def _views(name: str, x) -> torch.Tensor:
    """(V, B, D) from a (V, B, D) tensor or a list of V (B, D) tensors (stacked: a copy of rows x D)."""
    if not isinstance(x, torch.Tensor):
        if not isinstance(x, (list, tuple)) or not x:
            raise ValueError(f"{name} must be a (V, B, D) tensor or a non-empty list of (B, D) tensors")
        for i, v in enumerate(x):
            check_tensor(f"{name}[{i}]", v, ndim=2)
        if len({(v.shape, v.dtype, v.device) for v in x}) > 1:
            raise ValueError(f"{name}: every view must have one (B, D) shape, dtype and device")
        x = torch.stack(list(x))
    check_tensor(name, x, ndim=3)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} has no view or no row: shape {tuple(x.shape)}")
    return x


def _run(student, teacher, student_weight, teacher_weight, center, weight, centering, teacher_temp, student_temp,
         center_momentum, sinkhorn_iterations, scale, exclude_same_view, backend, check_finite, name):
    """The op on checked (S, B, D) / (T, B, D) features: (loss, new centre or None)."""
    if not 0.0 <= center_momentum <= 1.0:
        raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
    out = _fused_head_loss_op(student, teacher.detach(), student_weight, teacher_weight.detach(),
                              None if centering == "sinkhorn_knopp" else center.detach(), weight, float(student_temp),
                              float(teacher_temp), float(center_momentum), int(sinkhorn_iterations), float(scale),
                              exclude_same_view, backend)
    loss, new_center = out[0], (out[1] if centering == "softmax" else None)
    if check_finite:
        check_finite_result(name, "the features, weights or centre", loss.detach(),
                            *([] if new_center is None else [new_center]))
    return loss, new_center


def fused_head_dino_loss(
    student_features, teacher_features, student_weight: torch.Tensor, teacher_weight: torch.Tensor,
    center: torch.Tensor | None = None, *, teacher_temp: float = 0.04, student_temp: float = 0.1,
    center_momentum: float = 0.9, centering: str = "softmax", sinkhorn_iterations: int = 3,
    ignore_diagonal: bool = False, reduction: str = "sum", backend: str | None = None, check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DINO's loss on the heads' bottlenecks: dino_loss(f W^T views, teacher targets of f_t W_t^T), fused.

    student_features: (S, B, D) (or S views of (B, D)), the student head's L2-normalised bottleneck of
    every crop, view-major; teacher_features: (T, B, D), the teacher's of the global crops (the first T
    student views); fp32/fp16/bf16, one dtype (float64 on backend="eager"). student_weight /
    teacher_weight: (K, D) prototypes as the weight-normalised Linear holds them (any float dtype;
    rounded to the features' dtype for the products, as autocast does). center: K elements (softmax
    centring). Pairing as dino_loss: every (student, teacher) view pair summed (dinov2's
    DINOLoss.forward); ignore_diagonal=True, reduction="mean": lightly's, the trainer's. Targets:
    softmax((t - center) / teacher_temp) (centering="softmax") or dinov2's Sinkhorn-Knopp over all T*B
    teacher rows (centering="sinkhorn_knopp"; center unused).
    Returns (loss, a float32 (float64) scalar with gradients for student_features and student_weight;
    new centre: center * m + mean_rows(f_t W_t^T) * (1 - m), m = center_momentum, shaped and typed like
    center, all-reduced over ranks as update_center; None for Sinkhorn-Knopp). center_momentum=0 gives
    the batch mean itself. No host sync; check_finite=True adds one (ValueError on NaN/inf).
    Memory: no (rows, K) tensor for softmax centring; Sinkhorn-Knopp keeps the teacher's (T*B, K) logits.
    """
    student, teacher = _views("student_features", student_features), _views("teacher_features", teacher_features)
    backend = _check_inputs(student, teacher, student_weight, teacher_weight, center, centering, teacher_temp,
                            student_temp, sinkhorn_iterations, backend)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    (S, B, _), T = student.shape, teacher.shape[0]
    if teacher.shape[1] != B:
        raise ValueError(f"teacher_features has {teacher.shape[1]} rows per view but student_features has {B}")
    n_pairs = S * T - (min(S, T) if ignore_diagonal else 0)
    if n_pairs == 0:
        raise ValueError(f"no cross-view pairs: {S} student view(s) and {T} teacher view(s) with the same-view "
                         "pairs ignored")
    scale = 1.0 / (B * (n_pairs if reduction == "mean" else 1))
    return _run(student, teacher, student_weight, teacher_weight, center, None, centering, teacher_temp, student_temp,
                center_momentum, sinkhorn_iterations, scale, ignore_diagonal, backend, check_finite,
                "fused_head_dino_loss")


def fused_head_ibot_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, student_weight: torch.Tensor,
    teacher_weight: torch.Tensor, student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
    masks_weight: torch.Tensor | None = None, center: torch.Tensor | None = None, *, teacher_temp: float = 0.04,
    student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "softmax",
    sinkhorn_iterations: int = 3, backend: str | None = None, check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """iBOT's loss on the heads' bottlenecks: dinov2's iBOTPatchLoss.forward_masked of f W^T against the
    teacher targets of f_t W_t^T, fused.

    student_features / teacher_features: (M, D) masked patches' bottlenecks, in the order of
    student_masks_flat.flatten(1).nonzero() ((B, N) or (B, H, W) bool); the first n_masked_patches
    rows count (dinov2 pads them; default all, then M must equal the masked count, asserted on the
    device). masks_weight: (n,) per-row weights, default 1 / (masked patches of the row's image).
    Weights, centre and centring as fused_head_dino_loss; the centre takes the n counted teacher rows.
    loss = -1/B sum_rows w * sum_k p_t log_softmax(f W^T / student_temp): 0 with zero gradients when no
    patch is masked (the centre then stays, or moves with other ranks' rows). Returns (loss, new centre
    or None).
    """
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        check_tensor(name, x, ndim=2)
    backend = _check_inputs(student_features, teacher_features, student_weight, teacher_weight, center, centering,
                            teacher_temp, student_temp, sinkhorn_iterations, backend)
    flat = check_ibot_loss_input(student_features, teacher_features, student_masks_flat, student_temp,
                                 n_masked_patches, masks_weight, names=("student_features", "teacher_features"))
    n = student_features.shape[0] if n_masked_patches is None else n_masked_patches
    if masks_weight is None:
        counts = flat.sum(dim=1)
        masks_weight = (1.0 / counts.clamp(min=1)).repeat_interleave(counts, output_size=n)
    weight = masks_weight.to(reference.acc_dtype(student_features))
    return _run(student_features[None, :n], teacher_features[None, :n], student_weight, teacher_weight, center,
                weight, centering, teacher_temp, student_temp, center_momentum, sinkhorn_iterations,
                1.0 / flat.shape[0], False, backend, check_finite, "fused_head_ibot_loss")


class _FusedHeadLoss(nn.Module):
    """The centre buffer, temperatures and centring the two modules share."""

    def __init__(self, output_dim, teacher_temp, student_temp, center_momentum, centering, sinkhorn_iterations,
                 backend, check_finite):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.register_buffer("center", torch.zeros(1, output_dim))
        self.teacher_temp, self.student_temp, self.center_momentum = teacher_temp, student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.backend, self.check_finite = backend, check_finite

    def _options(self, teacher_temp: float | None) -> dict:
        return dict(teacher_temp=self.teacher_temp if teacher_temp is None else teacher_temp,
                    student_temp=self.student_temp, center_momentum=self.center_momentum, centering=self.centering,
                    sinkhorn_iterations=self.sinkhorn_iterations, backend=self.backend,
                    check_finite=self.check_finite)

    def _finish(self, loss: torch.Tensor, new_center: torch.Tensor | None) -> torch.Tensor:
        if new_center is not None:
            with torch.no_grad():
                self.center.copy_(new_center)
        return loss


class FusedHeadDINOLoss(_FusedHeadLoss):
    """fused_head_dino_loss with its centre: a (1, output_dim) buffer `center`, updated by each forward.

    forward(student_features, teacher_features, student_weight, teacher_weight, teacher_temp=None):
    as fused_head_dino_loss (teacher_temp defaults to the constructor's); returns the loss.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, centering: str = "softmax", sinkhorn_iterations: int = 3,
                 ignore_diagonal: bool = False, reduction: str = "sum", backend: str | None = None,
                 check_finite: bool = False):
        super().__init__(output_dim, teacher_temp, student_temp, center_momentum, centering, sinkhorn_iterations,
                         backend, check_finite)
        self.ignore_diagonal, self.reduction = ignore_diagonal, reduction

    def forward(self, student_features, teacher_features, student_weight: torch.Tensor, teacher_weight: torch.Tensor,
                teacher_temp: float | None = None) -> torch.Tensor:
        return self._finish(*fused_head_dino_loss(
            student_features, teacher_features, student_weight, teacher_weight, self.center,
            ignore_diagonal=self.ignore_diagonal, reduction=self.reduction, **self._options(teacher_temp)))


class FusedHeadIBOTLoss(_FusedHeadLoss):
    """fused_head_ibot_loss with its centre: a (1, output_dim) buffer `center`, updated by each forward.

    forward(student_features, teacher_features, student_weight, teacher_weight, student_masks_flat,
    n_masked_patches=None, masks_weight=None, teacher_temp=None): as fused_head_ibot_loss; returns the loss.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, centering: str = "softmax", sinkhorn_iterations: int = 3,
                 backend: str | None = None, check_finite: bool = False):
        super().__init__(output_dim, teacher_temp, student_temp, center_momentum, centering, sinkhorn_iterations,
                         backend, check_finite)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, student_weight: torch.Tensor,
                teacher_weight: torch.Tensor, student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                masks_weight: torch.Tensor | None = None, teacher_temp: float | None = None) -> torch.Tensor:
        return self._finish(*fused_head_ibot_loss(
            student_features, teacher_features, student_weight, teacher_weight, student_masks_flat, n_masked_patches,
            masks_weight, self.center, **self._options(teacher_temp)))
