"""Memory-efficient attention: flash-style Triton kernels, dense (B, H, N, D) and packed varlen.

softmax(q @ k^T * scale) @ v without an N x N matrix in memory. The forward streams K/V blocks with
an online softmax and saves the logsumexp per query row (fp32); the backward recomputes the
probabilities block by block in two launches (dQ per query tile, which also stores
delta = rowsum(dO * O); then dK, dV per key tile). fp16/bf16 inputs, fp32 accumulation, head dim
D in {64, 128}, any sequence length.

Tiles. ViT sequences are 257 (global crop), 50 (local crop) or 1370 tokens. A sequence of L rows
runs as cdiv(L, BLOCK) CTAs (BLOCK = BLOCK_M query rows in the forward and dQ launches, BLOCK_N key
rows in the dK/dV launch): full tiles, then one last tile for the rows left, run as a TAIL-row tile
when they fit in TAIL (16, 32 or 64) and as a masked BLOCK-row tile otherwise. The inner loops
(keys, or queries for dK/dV) take full blocks, then TAIL-row steps. One CTA per BLOCK rows is the
fewest a BLOCK allows; covering the rows left with several TAIL-row tiles, as before, spent a CTA
(and a whole pass over K/V) per TAIL rows:
    N=1370 BLOCK_M=128 TAIL_M=16: 10 + 6 tail CTAs = 16 (37 % of the CTAs for 90 rows, 7 %)
                                  -> 11 CTAs (-31 %), at +2.3 % MMA rows (1408 vs 1376)
    N=1370 BLOCK_M=64:  21 + 2 = 23 -> 22 CTAs;  N=50 BLOCK_M=64: 4 tiles of 16 rows -> 1 of 64
    N=257: unchanged, 4 + 1 (BLOCK_M=64) or 2 + 1 (128) CTAs, the last a 16-row tile holding 1 row.

Varlen (as flash-attn's varlen API and xformers' BlockDiagonalMask): q/k/v (total_tokens, H, D)
with int32 offsets cu_seqlens (n_seqs + 1,); each sequence attends only to itself, so a step's global
and local crops go through one launch. max_seqlen is a host int (flash-attn's convention): it sizes
the grid, so nothing is read back from the device; the offsets' values are checked on the device
(torch._assert_async, see checks.check_cu_seqlens).

Compact varlen schedule. A launch's work items are the row tiles of every sequence, in order.
tile_schedule builds on the device (one small launch, no host sync) the running sum of
cdiv(length, BLOCK) per sequence for each BLOCK in SCHEDULE_BLOCKS; program w finds its (sequence,
tile) by binary search of that row (log2(n_seqs) loads from L2). Empty sequences own no item. The
grid, sized on the host from shapes and max_seqlen, is the upper bound on the item count for
n_seqs sequences of T tokens, min(n_seqs * cdiv(max_seqlen, BLOCK), (T + n_seqs * (BLOCK - 1)) //
BLOCK), reached when every length is 1 mod BLOCK; programs past the last item exit at once. At the
packed ViT-S step (128 images x (2 x 257 + 8 x 50) tokens, 1280 sequences; CTAs per head, x 6 heads):
    BLOCK  work items  grid (empty)    before: grid (empty), sized n_seqs x tiles of 257 tokens
     16      8448      8512 (0.8 %)
     32      4352      4896 (11 %)
     64      2304      3088 (25 %)     8960 (40 %, 5376 items with TAIL 16)
    128      1792      2184 (18 %)    11520 (58 %, 4864 items with TAIL 16)
A grid with no empty program needs the exact count on the host, or a persistent grid of
cdiv(T, BLOCK) programs looping over items; that loop costs ptxas 55 registers (170 vs 115 at
64 x 64 tiles, 4 warps, D=64: the tile's loop-invariant state stays live across items) and moving
the tile into a non-inlined function serialises its wgmma (ptxas C7510), so the bound is kept.

Backward: 7 matmuls (dQ launch: S = Q K^T, dP = dO V^T, dQ = dS K; dK/dV launch: S^T, dV = P^T dO,
dP^T, dK = dS^T Q), kept over FA2's 5 (one launch per key tile, dQ accumulated across key tiles),
because no deterministic 5-matmul form is cheaper on the roofline (3.0 TB/s, 700 TFLOP/s; E = the
bytes of one (T, H, D) bf16 tensor, R = T x H x 4 bytes):
    7 matmuls, 2 launches: 12 E + 4 R  (q, k, v, dO read twice, o once; dq, dk, dv written)
    5 matmuls, fp32 atomics into dq (FA2): 15 E + 3 R (delta pass reads o, dO; zeroed and written-back
      fp32 dq, then cast) and run-to-run differences in dq's last bits
    5 matmuls, one dq partial per key tile (deterministic, as FA2's deterministic mode): + 4 E per key tile
    5 matmuls, one program per (sequence, head) accumulating dq in order: deterministic, ~12 E if its
      q, dO and fp32 dq stay in L2 between key tiles, but that is N x D x 12 bytes per program (700 KiB
      at N=1370 for ~264 resident programs, over H200's 50 MB L2) and its grid is only B x H
    5 matmuls, key tiles adding to dq in order behind a per-tile semaphore (FA3's deterministic mode):
      ~15 E, but a spin-wait that cannot be checked without a GPU (a deadlock would hang training)
The packed ViT-S step and the N=257 / N=50 shapes are memory-bound (bytes time > MMA time in the
table below), so cutting 2 of 7 matmuls buys nothing there while every form above adds bytes; only
N=1370 is MMA-bound (7 matmuls 1230 us vs 879 us at 5, with atomics).

Roofline per call (HBM bytes, K/V re-reads from L2 not counted; useful FLOPs; time = the larger of
bytes / 3.0 TB/s and FLOPs / 700 TFLOP/s, bf16):
    shape                                  forward                   backward (7 matmuls)
    N=257  B=128  H=6  D=64  (ViT-S global)  102 MB  13 GF   34 us mem    306 MB   45 GF  102 us mem
    N=50   B=1024 H=6  D=64  (ViT-S local)   159 MB   4 GF   53 us mem    477 MB   14 GF  159 us mem
    N=1370 B=32   H=16 D=64  (ViT-L 518 px)  362 MB 246 GF  351 us MMA   1089 MB  861 GF 1230 us MMA
    N=1370 B=32   H=8  D=128                 361 MB 246 GF  351 us MMA   1083 MB  861 GF 1230 us MMA
    packed ViT-S step, 1280 seqs, H=6 D=64   362 MB  30 GF  121 us mem   1089 MB  105 GF  363 us mem

Grid (CTAs per launch) by row tile, against 132 SMs x 1-7 CTAs per SM (configs below): every target
shape fills the GPU many times over, so tile size is chosen by the autotuner, not by the SM count.
    BLOCK  N=257 B=128 H=6  N=50 B=1024 H=6  N=1370 B=32 H=16  N=1370 B=32 H=8  packed step (x 6 heads)
     32          6912            12288            22016            11008          29376
     64          3840             6144            11264             5632          18528
    128          2304             6144             5632             2816          13104

Configs (sm_90 cubins from Triton 3.8 and its ptxas, bf16, varlen; the dense and fp16 cubins of the
configs nearest the limits spill neither, at most 4 registers more), per tile BLOCK_M x BLOCK_N /
TAIL_M x TAIL_N: warps w and stages s, registers per thread (r), shared memory (K = KiB, pipelining
buffers included) and CTAs per SM by registers and shared memory; LOCAL and STACK are 0 in every one.
Before, the configs were chosen without the head dim: 14 of the 112 (config, launch, D) cubins
spilled (up to 184 B of stack) and the largest used 226 KiB.
    fwd D=64: 128x128/16x32 w8s3 179r 112K 1, w8s2 176r 80K 1, w4s3 248r 112K 2, w4s2 248r 80K 2; 128x64/64x16
        w8s3 110r 64K 2, w8s2 110r 48K 2, w4s3 230r 64K 2, w4s2 222r 48K 2; 128x64/16x16 w8s3 110r 64K 2, w8s2
        110r 48K 2, w4s3 230r 64K 2, w4s2 222r 48K 2; 128x32/16x16 w8s3 98r 40K 2, w8s2 98r 32K 2, w4s3 153r 40K
        3, w4s2 153r 32K 3; 64x64/64x64 w8s3 114r 104K 2, w8s2 106r 72K 2, w4s3 122r 104K 2, w4s2 122r 72K 3;
        64x64/16x16 w8s3 109r 56K 2, w8s2 108r 40K 2, w4s3 116r 56K 4, w4s2 115r 40K 4; 64x32/16x16 w8s3 72r 32K
        3, w8s2 66r 24K 3, w4s3 82r 32K 5, w4s2 82r 24K 5; 32x32/16x16 w8s3 92r 22K 2, w8s2 94r 14K 2, w4s3 96r
        22K 5, w4s2 72r 14K 7
    fwd D=128: 128x128/16x32 w8s2 232r 160K 1; 128x64/64x16 w8s3 182r 128K 1, w8s2 178r 96K 1; 128x64/16x16 w8s3
        188r 128K 1, w8s2 184r 96K 1; 128x32/16x16 w8s3 128r 80K 2, w8s2 128r 64K 2, w4s3 246r 80K 2, w4s2 246r
        64K 2; 64x64/64x64 w8s2 120r 144K 1, w4s2 168r 144K 1; 64x64/16x16 w8s3 116r 112K 2, w8s2 112r 80K 2,
        w4s3 168r 112K 2, w4s2 168r 80K 2; 64x32/16x16 w8s3 100r 64K 2, w8s2 100r 48K 2, w4s3 150r 64K 3, w4s2
        150r 48K 3; 32x32/16x16 w8s2 79r 26K 3, w4s3 128r 42K 4, w4s2 101r 26K 4
    dq D=64: 128x64/16x16 w8s2 127r 64K 2; 64x128/16x16 w8s2 202r 80K 1; 64x64/16x16 w8s2 124r 48K 2, w4s3 128r
        64K 3, w4s2 126r 48K 4; 64x32/16x16 w4s2 94r 32K 5; 32x64/16x16 w4s2 134r 26K 3; 32x32/16x16 w4s2 94r
        18K 5
    dq D=128: 128x64/16x16 w8s2 188r 128K 1; 64x64/16x16 w8s2 141r 96K 1, w4s2 192r 96K 2; 64x32/16x16 w8s2 113r
        64K 2, w4s2 160r 64K 3; 32x64/16x16 w8s2 156r 52K 1, w4s2 230r 50K 2; 32x32/16x16 w4s2 160r 34K 3
    dkdv D=64: 64x128/16x16 w8s2 208r 64K 1; 64x64/16x16 w8s2 165r 48K 1, w4s3 195r 65K 2, w4s2 210r 48K 2;
        64x32/16x16 w4s2 168r 26K 3; 32x64/16x16 w4s2 149r 32K 3; 32x32/16x16 w4s2 128r 18K 4
    dkdv D=128: 64x64/16x16 w8s2 215r 96K 1; 64x32/16x16 w8s2 166r 52K 1, w4s2 226r 50K 2; 32x64/16x16 w8s2 160r
        64K 1, w4s2 255r 64K 2; 32x32/16x16 w4s2 194r 34K 2

torch.library ops: dinotron::attention (q, k, v, cu_seqlens or None, max_seqlen, scale, backend)
-> (out, lse) with its fake and autograd, the backward being the op dinotron::attention_backward.
torch.compile sees one node and CUDA graphs capture it: the Python around it (argument checks,
autocast, the backend choice) reads only shapes, dtypes and devices. backend, resolved before the
call, picks the Triton kernels or kernels/reference.py inside the op (forward, and a backward that
recomputes the softmax), so CPU runs take the same path as the GPU.

timm integration (duck-typed, timm is never imported here): `swap_timm_attention(model)` makes
every timm ViT `Attention` module run these kernels, and `packed_sequences(cu_seqlens, max_seqlen)`
makes swapped modules that receive x of shape (1, total_tokens, C) attend within each sequence.
timm's `EvaAttention` (the DINOv3 and EVA-02 ViTs) is swapped too: q and k of the patch tokens are
rotated by the block's rotary embedding in torch ops, as timm's apply_rot_embed_cat (prefix tokens
unrotated), then go to the same op. Packed, the rotation takes one [sin | cos] row per token
(`pack_rope`: each crop size its own grid's rows, the prefix tokens a rotation by 0). The rotation
reads q and k and writes them once more before the kernel (4 E of the roofline above per layer, fwd);
fusing it into the kernel's Q/K loads is left for later.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dinotron.kernels import reference
from dinotron.kernels.backend import BACKENDS, interpreter_enabled, resolve_backend
from dinotron.kernels.checks import check_cu_seqlens, check_positive, check_qkv

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MAX_GRID_YZ = 65535  # CUDA limit on grid dims 1 and 2 (heads; dense sequences)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels. Programs: axis 0 = work items (row tiles), axis 1 = head; dense launches add
# axis 2 = sequence. Adjacent work items are tiles of one (sequence, head), which share its K/V in L2.
# ----------------------------------------------------------------------------------------------

SCHEDULE_BLOCKS = (16, 32, 64, 128)  # the tile sizes the varlen schedule has a row for
_SCAN_CHUNK = 1024  # sequences per step of the schedule's running sum


@triton.jit
def _schedule_kernel(CU, TILES, n_seqs, CHUNK: tl.constexpr):
    """Program r: TILES[r, s] = sum over sequences before s of cdiv(length, 16 << r), s in [0, n_seqs]:
    the first work item of each sequence in the compact varlen schedule for (16 << r)-row tiles."""
    row = tl.program_id(0)
    block = 16 << row
    out = TILES + row * (n_seqs + 1)
    tl.store(out, 0)
    carried = tl.full([], 0, tl.int32)
    for s0 in range(0, n_seqs, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        mask = offs < n_seqs
        lengths = tl.load(CU + offs + 1, mask=mask, other=0) - tl.load(CU + offs, mask=mask, other=0)
        tiles = (lengths + block - 1) // block
        tl.store(out + 1 + offs, carried + tl.cumsum(tiles, 0), mask=mask)
        carried += tl.sum(tiles, 0)


@triton.jit
def _schedule_row(BLOCK: tl.constexpr):
    """Row of the schedule table for BLOCK-row tiles (SCHEDULE_BLOCKS[row] == BLOCK)."""
    tl.static_assert(BLOCK == 16 or BLOCK == 32 or BLOCK == 64 or BLOCK == 128)
    return BLOCK // 32 - BLOCK // 128


@triton.jit
def _locate(TILES, CU, n_seqs, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h,
            BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """This program's work item: its tile t within its sequence, the sequence's length, and the element
    offsets of the sequence's first row for this head in the inputs (q, k, v), the outputs (o, dO, dq,
    dk, dv) and the per-row fp32 buffers (lse, delta). Varlen: item w = program_id(0), found by binary
    search in the schedule row (the last sequence whose first item is <= w: empty sequences own no
    item; past the last item, t * BLOCK >= length and the program has nothing to do). Dense: tile
    program_id(0) of sequence program_id(2), N tokens each."""
    w, head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if IS_VARLEN:
        tiles = TILES + _schedule_row(BLOCK) * (n_seqs + 1)
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + n_seqs  # invariant: tiles[lo] <= w < tiles[hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            below = tl.load(tiles + mid) <= w
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        t = w - tl.load(tiles + lo)
        first = tl.load(CU + lo)
        length = tl.load(CU + lo + 1) - first
        seq = 0  # packed: the token offset `first` places the sequence
        start = first.to(tl.int64)
    else:
        t = w
        length = N
        seq = tl.program_id(2).to(tl.int64)
        start = 0
    return (t, length, seq * s_in_b + head * s_in_h + start * s_in_n, seq * s_out_b + head * s_out_h + start * s_out_n,
            seq * s_lse_b + head * s_lse_h + start)


@triton.jit
def _load_rows(ptr, offs, stride, length, offs_d, MASK: tl.constexpr):
    """(len(offs), D) block of a row-major (rows, D) matrix; rows >= length read as 0 if MASK."""
    ptrs = ptr + offs[:, None] * stride + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=offs[:, None] < length, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_cols(ptr, offs, stride, length, offs_d, MASK: tl.constexpr):
    """The same block transposed, (D, len(offs))."""
    ptrs = ptr + offs[None, :] * stride + offs_d[:, None]
    if MASK:
        return tl.load(ptrs, mask=offs[None, :] < length, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_vec(ptr, offs, length, MASK: tl.constexpr):
    if MASK:
        return tl.load(ptr + offs, mask=offs < length, other=0.0)
    return tl.load(ptr + offs)


# In the tile functions s_in / s_out are the row strides of the inputs and of the outputs.


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, s_in, start_n, length, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online-softmax update of one query tile with keys [start_n, start_n + BLOCK_N); log2 domain."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kT = _load_cols(K, offs_n, s_in, length, offs_d, MASK)
    v = _load_rows(V, offs_n, s_in, length, offs_d, MASK)
    s = tl.dot(q, kT) * qk_scale
    if MASK:
        s = tl.where(offs_n[None, :] < length, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _fwd_tile(Q, K, V, OUT, LSE, s_in, s_out, start_m, length, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, offs_m, s_in, length, offs_d, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = length // BLOCK_N * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, s_in, start_n, length, qk_scale, HEAD_DIM, BLOCK_N, False)
    for start_n in range(n_full, length, TAIL_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, s_in, start_n, length, qk_scale, HEAD_DIM, TAIL_N, True)
    acc = acc / l_i[:, None]
    mask_m = offs_m < length
    tl.store(OUT + offs_m[:, None] * s_out + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, K, V, s_in, start_n, length, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """dQ contribution of keys [start_n, start_n + BLOCK_N): dS = P * (dO V^T - delta), dQ += dS K."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kT = _load_cols(K, offs_n, s_in, length, offs_d, MASK)
    vT = _load_cols(V, offs_n, s_in, length, offs_d, MASK)
    p = tl.exp2(tl.dot(q, kT) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(offs_n[None, :] < length, p, 0.0)
    ds = p * (tl.dot(do, vT) - delta[:, None])
    return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT))


@triton.jit
def _dq_tile(Q, K, V, OUT, DO, DQ, LSE, DELTA, s_in, s_out, start_m, length, scale, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr):
    """dQ of one query tile; first delta = rowsum(dO * O), stored for the dK/dV kernel."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < length
    q = _load_rows(Q, offs_m, s_in, length, offs_d, True)
    do = _load_rows(DO, offs_m, s_out, length, offs_d, True)
    o = _load_rows(OUT, offs_m, s_out, length, offs_d, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=mask_m)
    lse2 = _load_vec(LSE, offs_m, length, True)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = length // BLOCK_N * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, K, V, s_in, start_n, length, qk_scale, HEAD_DIM, BLOCK_N, False)
    for start_n in range(n_full, length, TAIL_N):
        dq = _dq_step(dq, q, do, lse2, delta, K, V, s_in, start_n, length, qk_scale, HEAD_DIM, TAIL_N, True)
    tl.store(DQ + offs_m[:, None] * s_out + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, s_in, s_out, start_m, length, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr):
    """dK/dV contribution of queries [start_m, start_m + BLOCK_M), computed transposed (keys x queries)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qT = _load_cols(Q, offs_m, s_in, length, offs_d, MASK)
    do = _load_rows(DO, offs_m, s_out, length, offs_d, MASK)
    lse2 = _load_vec(LSE, offs_m, length, MASK)
    delta = _load_vec(DELTA, offs_m, length, MASK)
    pT = tl.exp2(tl.dot(k, qT) * qk_scale - lse2[None, :])
    if MASK:
        pT = tl.where(offs_m[None, :] < length, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)
    dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


@triton.jit
def _dkdv_tile(Q, K, V, DO, DK, DV, LSE, DELTA, s_in, s_out, start_n, length, scale, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, offs_n, s_in, length, offs_d, True)
    v = _load_rows(V, offs_n, s_in, length, offs_d, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = length // BLOCK_M * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, s_in, s_out, start_m, length, qk_scale,
                            HEAD_DIM, BLOCK_M, False)
    for start_m in range(m_full, length, TAIL_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, s_in, s_out, start_m, length, qk_scale,
                            HEAD_DIM, TAIL_M, True)
    mask_n = (offs_n < length)[:, None]
    tl.store(DK + offs_n[:, None] * s_out + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask_n)
    tl.store(DV + offs_n[:, None] * s_out + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_n)


@triton.jit
def _bwd_tile(Q, K, V, OUT, DO, DQ, DK, DV, LSE, DELTA, s_in, s_out, start, length, scale, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr,
              TAIL_N: tl.constexpr, DKDV: tl.constexpr, LAST: tl.constexpr):
    """The row tile from row `start`, of keys (dK, dV) if DKDV, else of queries (delta, dQ); of TAIL
    rows if LAST, else of BLOCK rows."""
    if DKDV:
        _dkdv_tile(Q, K, V, DO, DK, DV, LSE, DELTA, s_in, s_out, start, length, scale, qk_scale,
                   HEAD_DIM, TAIL_N if LAST else BLOCK_N, BLOCK_M, TAIL_M)
    else:
        _dq_tile(Q, K, V, OUT, DO, DQ, LSE, DELTA, s_in, s_out, start, length, scale, qk_scale,
                 HEAD_DIM, TAIL_M if LAST else BLOCK_M, BLOCK_N, TAIL_N)


# Autotune space, per launch and head dim: (BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, num_warps, num_stages);
# TAIL == BLOCK is plain masked tiling. Every entry compiles for sm_90 with no spill (cuobjdump LOCAL and
# STACK 0) and at most 200 KiB of shared memory (227 KiB is the limit; the margin is for Triton 3.6 on
# the GPUs, measured here with 3.8): the figures are in the module docstring.
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "TAIL_M", "TAIL_N")
_FWD_TILES = [(128, 128, 16, 32), (128, 64, 64, 16), (128, 64, 16, 16), (128, 32, 16, 16), (64, 64, 64, 64),
              (64, 64, 16, 16), (64, 32, 16, 16), (32, 32, 16, 16)]
_FWD = [(*tile, warps, stages) for tile in _FWD_TILES for warps in (8, 4) for stages in (3, 2)]
_FWD_128_LEFT_OUT = {  # spilling (bytes of stack)
    (128, 128, 16, 32, 4, 3), (128, 128, 16, 32, 4, 2), (128, 64, 64, 16, 4, 3), (128, 64, 64, 16, 4, 2),  # 536-88
    (128, 64, 16, 16, 4, 3), (128, 64, 16, 16, 4, 2), (32, 32, 16, 16, 8, 3),  # 80-88, 16
    (128, 128, 16, 32, 8, 3), (64, 64, 64, 64, 8, 3), (64, 64, 64, 64, 4, 3),  # 224, 208, 208 KiB of shared memory
}
_CONFIGS = {
    ("fwd", 64): _FWD,
    ("fwd", 128): [c for c in _FWD if c not in _FWD_128_LEFT_OUT],
    ("dq", 64): [(128, 64, 16, 16, 8, 2), (64, 128, 16, 16, 8, 2), (64, 64, 16, 16, 8, 2), (64, 64, 16, 16, 4, 3),
                 (64, 64, 16, 16, 4, 2), (64, 32, 16, 16, 4, 2), (32, 64, 16, 16, 4, 2), (32, 32, 16, 16, 4, 2)],
    ("dq", 128): [(128, 64, 16, 16, 8, 2), (64, 64, 16, 16, 8, 2), (64, 64, 16, 16, 4, 2), (64, 32, 16, 16, 8, 2),
                  (64, 32, 16, 16, 4, 2), (32, 64, 16, 16, 8, 2), (32, 64, 16, 16, 4, 2), (32, 32, 16, 16, 4, 2)],
    # left out: 128 x 64 (24 B of stack at D=64, 184 B at D=128), 64 x 64 at 4 warps for D=128 (88 B)
    ("dkdv", 64): [(64, 128, 16, 16, 8, 2), (64, 64, 16, 16, 8, 2), (64, 64, 16, 16, 4, 3), (64, 64, 16, 16, 4, 2),
                   (64, 32, 16, 16, 4, 2), (32, 64, 16, 16, 4, 2), (32, 32, 16, 16, 4, 2)],
    ("dkdv", 128): [(64, 64, 16, 16, 8, 2), (64, 32, 16, 16, 8, 2), (64, 32, 16, 16, 4, 2), (32, 64, 16, 16, 8, 2),
                    (32, 64, 16, 16, 4, 2), (32, 32, 16, 16, 4, 2)],
}


def _params(config: triton.Config) -> tuple[int, ...]:
    return (*(config.kwargs[k] for k in _TILE_KEYS), config.num_warps, config.num_stages)


def _configs(*launches: str) -> list[triton.Config]:
    """The union over head dims of these launches' configs (_for_head_dim prunes it at each call);
    one small config in the interpreter, where autotuning would only multiply the run time."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "TAIL_M": 16, "TAIL_N": 16}, num_warps=4, num_stages=1)]
    params = sorted({p for (launch, _), table in _CONFIGS.items() if launch in launches for p in table}, reverse=True)
    return [triton.Config(dict(zip(_TILE_KEYS, p[:4], strict=True)), num_warps=p[4], num_stages=p[5]) for p in params]


def _for_head_dim(configs, named_args, **kwargs) -> list[triton.Config]:
    """early_config_prune: the configs listed for this launch (forward, dQ or dK/dV) and HEAD_DIM."""
    if interpreter_enabled():
        return configs
    args = {**named_args, **kwargs}  # the launchers pass HEAD_DIM and DKDV by keyword
    launch = "fwd" if "DKDV" not in args else "dkdv" if args["DKDV"] else "dq"
    listed = _CONFIGS[launch, args["HEAD_DIM"]]
    # DINOTRON_AUTOTUNE_MAX=n: an even spread of n of them (from large tiles to small), for runs whose time is
    # counted, e.g. benchmarks/gpu_proof.py's 8 minutes (each config is one compile, ~1-2 s)
    cap = min(int(os.environ.get("DINOTRON_AUTOTUNE_MAX") or len(listed)), len(listed))
    allowed = {listed[i * len(listed) // cap] for i in range(cap)}
    return [c for c in configs if _params(c) in allowed]


_KEY = ["N", "HEAD_DIM", "IS_VARLEN"]  # the autotuner adds the tensors' dtypes


# Kernel arguments: Q, K, V share one layout (strides s_in_*), OUT, dO, dQ, dK, dV another (s_out_*),
# LSE and DELTA are fp32 per row (s_lse_*); *_b / *_h / *_n: sequence, head, token strides (elements).
# CU: cu_seqlens, TILES: the varlen schedule (both None dense), n_seqs their sequences.


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _for_head_dim})
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, CU, TILES,
              s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h, N, n_seqs, qk_scale,
              HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
    t, length, in_off, out_off, lse_off = _locate(TILES, CU, n_seqs, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h,
                                                  s_out_n, s_lse_b, s_lse_h, BLOCK_M, IS_VARLEN)
    Q, K, V, OUT, LSE = Q + in_off, K + in_off, V + in_off, OUT + out_off, LSE + lse_off
    start_m = t * BLOCK_M
    if length - start_m <= TAIL_M:  # the last tile, sized to the rows left (none: past the last work item)
        if start_m < length:
            _fwd_tile(Q, K, V, OUT, LSE, s_in_n, s_out_n, start_m, length, qk_scale, HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N)
    else:
        _fwd_tile(Q, K, V, OUT, LSE, s_in_n, s_out_n, start_m, length, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N)


@triton.autotune(configs=_configs("dq", "dkdv"), key=_KEY + ["DKDV"],
                 prune_configs_by={"early_config_prune": _for_head_dim})
@triton.jit
def _attn_bwd(Q, K, V, OUT, DO, DQ, DK, DV, LSE, DELTA, CU, TILES,
              s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h, N, n_seqs, scale, qk_scale,
              HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DKDV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
    """Two launches: DKDV=False, one work item per query tile (BLOCK_M, TAIL_M), writes delta and
    dQ; then DKDV=True, one per key tile (BLOCK_N, TAIL_N), loops over queries and writes dK and dV."""
    # (constexpr choices inline: the interpreter turns a constexpr bound to a local into a tensor)
    t, length, in_off, out_off, lse_off = _locate(TILES, CU, n_seqs, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h,
                                                  s_out_n, s_lse_b, s_lse_h, BLOCK_N if DKDV else BLOCK_M, IS_VARLEN)
    Q, K, V, LSE, DELTA = Q + in_off, K + in_off, V + in_off, LSE + lse_off, DELTA + lse_off
    OUT, DO, DQ, DK, DV = OUT + out_off, DO + out_off, DQ + out_off, DK + out_off, DV + out_off
    start = t * (BLOCK_N if DKDV else BLOCK_M)
    if length - start <= (TAIL_N if DKDV else TAIL_M):  # the last tile, sized to the rows left (if any)
        if start < length:
            _bwd_tile(Q, K, V, OUT, DO, DQ, DK, DV, LSE, DELTA, s_in_n, s_out_n, start, length, scale, qk_scale,
                      HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, DKDV, True)
    else:
        _bwd_tile(Q, K, V, OUT, DO, DQ, DK, DV, LSE, DELTA, s_in_n, s_out_n, start, length, scale, qk_scale,
                  HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, DKDV, False)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _tiles_per_sequence(length: int, block: int) -> int:
    """Row tiles of one sequence: full BLOCK-row tiles and one last tile for the rows left (run as a
    TAIL-row tile when they fit in TAIL, else as a masked BLOCK-row tile)."""
    return -(-length // block)


def varlen_programs(block: int, n_seqs: int, total: int, max_seqlen: int) -> int:
    """Grid size along axis 0 of a varlen launch, from host ints only (no host sync): an upper bound on
    its W = sum_s cdiv(length_s, block) work items, the most any n_seqs sequences of total tokens, none
    longer than max_seqlen, can need (cdiv(L, block) <= (L + block - 1) / block, summed). Programs
    past W exit at once."""
    return max(1, min(n_seqs * _tiles_per_sequence(max_seqlen, block), (total + n_seqs * (block - 1)) // block))


def tile_schedule(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The compact varlen schedule: int32 (len(SCHEDULE_BLOCKS), n_seqs + 1), row r the running sum
    of cdiv(length_s, SCHEDULE_BLOCKS[r]) (sequence s's work items are [row[s], row[s + 1])). One
    launch on cu_seqlens' device; nothing is read back."""
    n_seqs = cu_seqlens.numel() - 1
    tiles = cu_seqlens.new_empty(len(SCHEDULE_BLOCKS), n_seqs + 1)
    _schedule_kernel[(len(SCHEDULE_BLOCKS),)](cu_seqlens, tiles, n_seqs, CHUNK=_SCAN_CHUNK)
    return tiles


def _bhn_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(sequence, head, token) strides of a (B, H, N, D) tensor, or of a packed (T, H, D) one."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _one_layout(q, k, v):
    """q, k, v with one set of strides and contiguous rows (timm's q, k, v already have them)."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _new_like_timm(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Empty tensor shaped like q; dense ones are laid out (B, N, H, D) so that
    out.transpose(1, 2).reshape(B, N, H * D), timm's next step, is a free view."""
    if varlen:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2)


def _row_buffer(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Empty fp32 tensor with one entry per query row: (H, T) packed, (B, H, N) dense."""
    shape = (q.shape[1], q.shape[0]) if varlen else q.shape[:3]
    return q.new_empty(shape, dtype=torch.float32)


def _launch_args(q: torch.Tensor, out: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int):
    """A _row_buffer, the kernels' arguments from CU to n_seqs, and grid(block key) for the launch.
    Reads shapes only: no host sync (the varlen schedule is built on the device)."""
    varlen = cu_seqlens is not None
    rows = _row_buffer(q, varlen)
    if varlen:
        n_seqs, heads = cu_seqlens.numel() - 1, q.shape[1]
        args = (cu_seqlens, tile_schedule(cu_seqlens), *_bhn_strides(q, True), *_bhn_strides(out, True),
                0, rows.stride(0), max_seqlen, n_seqs)

        def grid(block: str):
            return lambda meta: (varlen_programs(meta[block], n_seqs, q.shape[0], max_seqlen), heads)
    else:
        B, heads, N = q.shape[:3]
        args = (None, None, *_bhn_strides(q, False), *_bhn_strides(out, False), rows.stride(0), rows.stride(1), N, 0)

        def grid(block: str):
            return lambda meta: (_tiles_per_sequence(N, meta[block]), heads, B)
    return rows, args, grid


def attention_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    """Run the forward kernel on q, k, v laid out by _one_layout. Returns out (like q) and, per query
    row, the base-2 logsumexp of the scores in log2 units, log2 sum_j exp2(q_i . k_j * scale * log2(e)):
    fp32, (B, H, N) or (H, T)."""
    varlen = cu_seqlens is not None
    o = _new_like_timm(q, varlen)
    lse, args, grid = _launch_args(q, o, cu_seqlens, max_seqlen)
    _attn_fwd[grid("BLOCK_M")](q, k, v, o, lse, *args, scale * LOG2E, HEAD_DIM=q.shape[-1], IS_VARLEN=varlen)
    return o, lse


def attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    """Run the two backward kernels: returns (dq, dk, dv) shaped like q, laid out like o."""
    varlen = cu_seqlens is not None
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)  # empty_like keeps o's (dense, non-overlapping) strides
    dq, dk, dv = (torch.empty_like(o) for _ in range(3))
    delta, args, grid = _launch_args(q, o, cu_seqlens, max_seqlen)
    for dkdv, block in ((False, "BLOCK_M"), (True, "BLOCK_N")):
        _attn_bwd[grid(block)](
            q, k, v, o, do, dq, dk, dv, lse, delta, *args, scale, scale * LOG2E,
            HEAD_DIM=q.shape[-1], IS_VARLEN=varlen, DKDV=dkdv,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library ops: one node for torch.compile, capturable in CUDA graphs. `backend` ("triton" or
# "eager", resolved in Python before the call) picks the kernels or the eager reference inside.
# ----------------------------------------------------------------------------------------------


def _reference(q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return reference.attention(q, k, v, scale)
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale)


def _reference_backward(grad_out, q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return reference.attention_backward(grad_out, q, k, v, scale)
    return reference.attention_varlen_backward(grad_out, q, k, v, cu_seqlens, max_seqlen, scale)


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    """The eager backend's lse output: empty, as its backward recomputes the forward."""
    return q.new_empty(0, dtype=torch.float32)


def _grad_like(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Empty gradient for input t: out's shape and layout, t's dtype."""
    return torch.empty_like(out, dtype=t.dtype)


@torch.library.custom_op(
    "dinotron::attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, SymInt max_seqlen, float scale, str backend) "
           "-> (Tensor, Tensor)",
)
def _attention_op(q, k, v, cu_seqlens, max_seqlen, scale, backend):
    """(out, lse). Dense: q, k, v (B, H, N, D), cu_seqlens None, max_seqlen N. Packed: q, k, v
    (T, H, D), cu_seqlens int32 (n_seqs + 1,) on q's device. out is laid out as _new_like_timm
    whatever the backend; lse is attention_forward's for "triton", _no_lse for "eager"."""
    if backend == "triton":
        return attention_forward(*_one_layout(q, k, v), cu_seqlens, max_seqlen, scale)
    out = _new_like_timm(q, cu_seqlens is not None).copy_(_reference(q, k, v, cu_seqlens, max_seqlen, scale))
    return out, _no_lse(q)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, backend):
    varlen = cu_seqlens is not None
    return _new_like_timm(q, varlen), _row_buffer(q, varlen) if backend == "triton" else _no_lse(q)


@torch.library.custom_op(
    "dinotron::attention_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, "
           "SymInt max_seqlen, float scale, str backend) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, backend):
    """(dq, dk, dv), laid out like out: the two backward kernels, or the reference's backward, which
    recomputes the softmax (written out: autograd records nothing inside an op's implementation)."""
    if backend == "triton":
        return attention_backward(grad_out, *_one_layout(q, k, v), out, lse, cu_seqlens, max_seqlen, scale)
    grads = _reference_backward(grad_out, q, k, v, cu_seqlens, max_seqlen, scale)
    return tuple(_grad_like(out, t).copy_(g) for t, g in zip((q, k, v), grads, strict=True))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, backend):
    return tuple(_grad_like(out, t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, scale, backend


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    grads = _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.backend)
    return *grads, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public ops: Triton where the kernel applies, the eager reference otherwise
# ----------------------------------------------------------------------------------------------


def _autocast(q, k, v):
    """Inside torch.autocast, cast to its dtype, as autocast does for scaled_dot_product_attention."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v


def _unsupported(q, k, v) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None if it can."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16 or bfloat16; float32 runs through the reference)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return "bfloat16 CPU tensors: the Triton interpreter computes bfloat16 on raw bits (triton-lang/triton#11584)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim D={q.shape[-1]} (the kernel takes D in {HEAD_DIMS})"
    if q.numel() == 0:
        return "empty inputs"
    if max(q.shape[:2] if q.ndim == 4 else q.shape[1:2]) > MAX_GRID_YZ:  # dense (B, H), packed H
        return f"shape {tuple(q.shape)}: at most {MAX_GRID_YZ} sequences and heads fit one launch"
    return None


def _op_backend(backend: str | None, q, k, v, strict: bool = True) -> str:
    """The op's backend, "triton" or "eager". backend as in resolve_backend; when Triton is asked for
    explicitly (argument or DINOTRON_BACKEND) but cannot take the inputs, raise if strict, else
    fall back (what the timm integration does)."""
    if resolve_backend(backend, q, k, v) == "eager":
        return "eager"
    reason = _unsupported(q, k, v)
    if reason is None:
        return "triton"
    requested = backend if backend is not None else os.environ.get("DINOTRON_BACKEND", "auto")
    if strict and requested == "triton":
        raise ValueError(f"backend='triton' cannot run attention on {reason}; use backend='auto' to fall back")
    return "eager"


def _default_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    check_positive("scale", scale)
    return float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v over each (batch, head), memory-efficient.

    q, k, v: (B, H, N, D), any strides. scale defaults to D ** -0.5. Triton (backend "triton", or
    "auto" on CUDA): fp16/bf16, D in {64, 128}. Otherwise (CPU, float32, other D under "auto") the
    eager reference, through the same op (dinotron::attention). Returns (B, H, N, D) in q's dtype
    (the autocast dtype inside torch.autocast), laid out (B, N, H, D) in memory. No host sync.
    """
    check_qkv(q, k, v, "(B, H, N, D)")
    scale = _default_scale(scale, q.shape[-1])
    q, k, v = _autocast(q, k, v)
    return _attention_op(q, k, v, None, q.shape[2], scale, _op_backend(backend, q, k, v))[0]


def _packed_attention(q, k, v, packing: PackedSequences, scale: float, backend: str | None,
                      strict: bool) -> torch.Tensor:
    q, k, v = _autocast(q, k, v)
    cu_seqlens = packing.cu_seqlens
    # host to device without waiting for the device (safe with pageable memory in this direction only)
    cu_seqlens = cu_seqlens.to(q.device, non_blocking=cu_seqlens.device.type == "cpu")
    torch._assert_async(cu_seqlens[-1] == q.shape[0],
                        f"cu_seqlens must end at {q.shape[0]}, the number of packed tokens in q")
    return _attention_op(q, k, v, cu_seqlens, packing.max_seqlen, scale, _op_backend(backend, q, k, v, strict))[0]


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, max_seqlen: int,
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention within each of several packed sequences (block-diagonal), as flash-attn's varlen API.

    q, k, v: (total_tokens, H, D); sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1].
    cu_seqlens: (n_seqs + 1,) integer offsets (int32 as flash-attn), starting at 0 and ending at
    total_tokens: a tensor, best on q's device (else one non-blocking copy per call), a list, or the
    PackedSequences that `packed_sequences(cu_seqlens, max_seqlen)` yields (checked once for many
    calls). max_seqlen: a host int >= the longest sequence (it sizes the grid). The offsets' values
    are checked on their device (check_cu_seqlens: on CUDA a bad one is a device-side assert), so the
    Triton path makes no host sync; the eager reference reads the offsets on the host. Dtypes and
    backends as `attention`. Returns (total_tokens, H, D).
    """
    check_qkv(q, k, v, "(total_tokens, H, D)")
    if isinstance(cu_seqlens, PackedSequences):
        packing = cu_seqlens
        if max_seqlen != packing.max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} differs from the packed sequences' {packing.max_seqlen}")
    else:
        packing = PackedSequences.of(cu_seqlens, max_seqlen)
    return _packed_attention(q, k, v, packing, _default_scale(scale, q.shape[-1]), backend, strict=True)


# ----------------------------------------------------------------------------------------------
# Packed multi-crop batches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedSequences:
    """Checked packing of sequences into one token axis: int32 offsets cu_seqlens (on the device
    they came on) and the host int max_seqlen."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def of(cls, cu_seqlens, max_seqlen: int) -> PackedSequences:
        """Check (check_cu_seqlens, without host sync) and convert; a list becomes a CPU tensor."""
        if not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int32)
        check_cu_seqlens(cu_seqlens, max_seqlen)
        return cls(cu_seqlens.to(torch.int32), max_seqlen)


# The packing of the innermost active packed_sequences block. A module global, not a ContextVar:
# torch.compile of torch 2.11 and older graph-breaks on ContextVar.get, but reads a global, guarding on
# max_seqlen and the offsets' shape, dtype and device, so a new packing of one shape reuses the graph.
_packing: PackedSequences | None = None


def make_cu_seqlens(seq_lengths: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 on the CPU, max_seqlen) for sequences of these lengths, in order,
    e.g. make_cu_seqlens([257] * n_global + [50] * n_local)."""
    lengths = [int(n) for n in seq_lengths]
    if not lengths or min(lengths) < 0:
        raise ValueError(f"seq_lengths must be a non-empty list of lengths >= 0, got {seq_lengths!r}")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32), max(lengths)


@contextmanager
def packed_sequences(cu_seqlens, max_seqlen: int) -> Iterator[PackedSequences]:
    """While active, every swapped timm Attention that receives x of shape (1, total_tokens, C)
    attends within each packed sequence (attention_varlen) instead of across all tokens.

    cu_seqlens / max_seqlen as in attention_varlen, checked once here; give cu_seqlens on the
    activations' device (a CPU one is copied at every layer, and under torch.compile keeps CUDA
    graphs off). Token-wise layers (norms, MLPs, LayerScale) need nothing more; per-sample ones do:
    timm's DropPath on a packed (1, T, C) batch would drop all sequences together. Activation
    checkpointing recomputes outside this block unless its context_fn re-enters it. The block is
    process-wide (a module global, which torch.compile reads), not per thread.
    """
    global _packing
    outer, _packing = _packing, PackedSequences.of(cu_seqlens, max_seqlen)
    try:
        yield _packing
    finally:
        _packing = outer


# ----------------------------------------------------------------------------------------------
# timm ViT integration (duck-typed: timm is not imported)
# ----------------------------------------------------------------------------------------------

_VIT_ATTRIBUTES = ("qkv", "num_heads", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
_EVA = ("timm.models.eva", "EvaAttention")
# The timm classes whose forward _timm_attention_forward reproduces, with the attributes it reads: the ViT
# self-attention (timm 1.0.x moved it to timm.layers) and Eva's (DINOv3, EVA-02 ViTs), which also rotates q and k.
_TIMM_ATTENTION = {
    ("timm.layers.attention", "Attention"): _VIT_ATTRIBUTES,
    ("timm.models.vision_transformer", "Attention"): _VIT_ATTRIBUTES,
    _EVA: _VIT_ATTRIBUTES + ("head_dim", "q_bias", "qkv_bias_separate", "num_prefix_tokens", "rotate_half"),
}


def _forward_owner(module: torch.nn.Module) -> tuple[str, str] | None:
    """(module, qualname) of the class whose forward `module` runs."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    return None if owner is None else (owner.__module__, owner.__qualname__)


def is_timm_attention(module: torch.nn.Module) -> bool:
    """True for a timm ViT Attention or Eva EvaAttention (or a subclass that keeps its forward) with the
    attributes we use."""
    attributes = _TIMM_ATTENTION.get(_forward_owner(module))
    return attributes is not None and all(hasattr(module, name) for name in attributes)


class SwappedForward:
    """The forward that swap_timm_attention installs on a timm Attention: a picklable callable
    (torch.save of a whole model and copy.deepcopy keep it, rebound to the copy)."""

    def __init__(self, module: torch.nn.Module, backend: str | None):
        self.module, self.backend = module, backend

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return _timm_attention_forward(self.module, x, None, attn_mask, is_causal, self.backend)


class SwappedEvaForward(SwappedForward):
    """SwappedForward of an EvaAttention, whose forward takes the rotary embedding `rope` second."""

    def __call__(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> torch.Tensor:
        return _timm_attention_forward(self.module, x, rope, attn_mask, is_causal, self.backend)


def _project_qkv(self, x: torch.Tensor, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, N, H, D) as timm projects them: one fused qkv linear, or EvaAttention's q/v biases (k has
    none; added in the linear, or after it when qkv_bias_separate) or its separate q/k/v projections."""
    B, N, _ = x.shape
    if self.qkv is None:
        return tuple(p(x).reshape(B, N, H, D) for p in (self.q_proj, self.k_proj, self.v_proj))
    if getattr(self, "q_bias", None) is None:
        qkv = self.qkv(x)
    else:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
    return qkv.reshape(B, N, 3, H, D).unbind(2)


def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's apply_rot_embed_cat: rope = [sin | cos] on the last axis (each D wide, broadcast against x);
    x * cos + turn(x) * sin, turn(x) = [-x2, x1] for halves (x1, x2) of x (half) or the pairs (x0, x1) -> (-x1, x0)
    (interleaved), in the promoted dtype (timm's rope is fp32), then x's dtype."""
    sin, cos = rope.chunk(2, -1)
    if half:
        x1, x2 = x.chunk(2, -1)
        turned = torch.cat([-x2, x1], -1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + turned * sin).to(x.dtype)


def pack_rope(ropes: Sequence[torch.Tensor], batches: Sequence[tuple[int, int]],
              num_prefix_tokens: int) -> torch.Tensor:
    """The rotary embedding a swapped EvaAttention takes inside packed_sequences: one row per packed token.

    ropes[i]: (n_i - num_prefix_tokens, 2 D) [sin | cos] rows of the patch grid of batch i (Eva._pos_embed's),
    whose b_i sequences of n_i tokens each (batches[i] = (b_i, n_i)) are packed in order. Prefix tokens (class,
    registers) get sin 0 and cos 1, a rotation by 0 that leaves them exactly as timm does (x * 1 + turn(x) * 0
    == x for finite x). Returns (sum b_i n_i, 2 D) in the ropes' dtype (fp32 for timm's: 8 D bytes per token,
    made once per forward and shared by the blocks)."""
    rows = []
    for rope, (b, n) in zip(ropes, batches, strict=True):
        if rope.ndim != 2 or rope.shape[0] != n - num_prefix_tokens:
            raise ValueError(f"pack_rope: a rope of shape {tuple(rope.shape)} for sequences of {n} tokens with "
                             f"{num_prefix_tokens} prefix tokens; expected ({n - num_prefix_tokens}, 2 * head_dim)")
        D = rope.shape[1] // 2
        identity = torch.cat([rope.new_zeros(num_prefix_tokens, D), rope.new_ones(num_prefix_tokens, D)], 1)
        rows.append(torch.cat([identity, rope]).repeat(b, 1))
    return torch.cat(rows)


def _timm_attention_forward(self, x, rope, attn_mask, is_causal, backend) -> torch.Tensor:
    """timm's Attention.forward (timm 1.0.x: q/k norms, optional scale norm and gate), or EvaAttention's
    (its q/k/v projections, then the rotation of q and k by `rope`), with the attention product run by dinotron.
    rope as EvaAttention takes it: rows for the N - num_prefix_tokens patch tokens, prefix tokens left as they
    are; inside packed_sequences a row for every packed token (pack_rope)."""
    packing = _packing
    if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
        if packing is not None:
            raise ValueError("packed_sequences does not combine with attn_mask, is_causal or attention dropout")
        kwargs = {"attn_mask": attn_mask} if attn_mask is not None else {}
        if is_causal:
            kwargs["is_causal"] = True
        if rope is not None:
            kwargs["rope"] = rope
        return type(self).forward(self, x, **kwargs)
    B, N, C = x.shape
    if packing is not None and B != 1:  # N is checked against cu_seqlens on the device
        raise ValueError(f"inside packed_sequences a swapped Attention expects x of shape (1, total_tokens, C), "
                         f"got {tuple(x.shape)}")
    H = self.num_heads
    D = getattr(self, "head_dim", None) or self.qkv.out_features // (3 * H)
    scale = getattr(self, "scale", D ** -0.5)
    # rows to rotate: packed, every token (pack_rope); else the patch tokens (a batch axis in front after timm's
    # patch dropout)
    rotated = N if packing is not None else N - getattr(self, "num_prefix_tokens", 0)
    if rope is not None and ((packing is not None and rope.ndim != 2) or rope.shape[-2] != rotated):
        where = "inside packed_sequences one row per packed token (pack_rope)" if packing is not None else \
            f"one row per patch token ({N} tokens, {self.num_prefix_tokens} prefix)"
        raise ValueError(f"rope of shape {tuple(rope.shape)}: expected ({rotated}, 2 * head_dim), {where}")
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = _project_qkv(self, x, H, D)
    if packing is None:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # as EvaAttention: the prefix tokens stay, the patch tokens turn
            npt = self.num_prefix_tokens
            q, k = (torch.cat([t[:, :, :npt], _rotate(t[:, :, npt:], rope, self.rotate_half)], 2).type_as(v)
                    for t in (q, k))
        q, k, v = _autocast(q, k, v)
        if _op_backend(backend, q, k, v, strict=False) == "triton":
            out = _attention_op(q, k, v, None, N, scale, "triton")[0]
        else:  # timm's own product
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out = out.transpose(1, 2).reshape(B, N, H * D)
    else:
        q, k, v = q[0], k[0], v[0]  # (T, H, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # every token turns, the prefix tokens by 0 (pack_rope)
            q, k = (_rotate(t, rope[:, None], self.rotate_half).type_as(v) for t in (q, k))
        out = _packed_attention(q, k, v, packing, scale, backend, strict=False)
        out = out.reshape(1, N, H * D)
    if getattr(self, "norm", None) is not None:
        out = self.norm(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def swap_timm_attention(model: torch.nn.Module, enable: bool = True, backend: str | None = None) -> torch.nn.Module:
    """Make every timm ViT Attention and Eva EvaAttention in `model` use dinotron attention (enable=False restores
    timm's).

    Sets each module's forward (an instance attribute, SwappedForward); parameters, buffers and
    state_dict keys are untouched, so checkpoints stay loadable by plain timm; copy.deepcopy (an
    EMA teacher) and pickling keep the swap. An EvaAttention rotates q and k by the rotary embedding its
    block passes (timm's math, in torch ops before the kernel), then runs the same product.
    Where the kernel does not apply (CPU, float32 without autocast, D not in {64, 128}) the module
    runs torch's scaled_dot_product_attention (inside packed_sequences: the eager reference, through
    the same op as the kernel); with attn_mask, is_causal or attention dropout
    in training it runs timm's own forward. backend: as `attention`'s, for these modules.
    Raises ValueError if enable=True and the model has no such module. Returns `model`.
    """
    modules = [m for m in model.modules() if is_timm_attention(m)]
    if enable and not modules:
        raise ValueError(f"swap_timm_attention found no timm ViT Attention or Eva EvaAttention module in "
                         f"{type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for m in modules:
        if enable:
            m.forward = (SwappedEvaForward if _forward_owner(m) == _EVA else SwappedForward)(m, backend)
        elif is_swapped(m):
            del m.forward
    return model


def is_swapped(module: torch.nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), SwappedForward)
