"""Memory-efficient attention: flash-style Triton kernels, dense (B, H, N, D) and packed varlen.

softmax(q @ k^T * scale) @ v without an N x N matrix in memory. The forward streams K/V blocks with
an online softmax and saves the logsumexp per query row (fp32); the backward recomputes the
probabilities block by block in two launches (dQ per query tile, which also stores
delta = rowsum(dO * O); then dK, dV per key tile). fp16/bf16 inputs, fp32 accumulation, head dim
D in {64, 128}, any sequence length.

Ragged edges: ViT sequences are 257 (global crop), 50 (local crop) or 1370 tokens, so a plain
tiling wastes up to a third of a launch on a last tile that holds one row. Here each sequence is
covered by L // BLOCK tiles of BLOCK rows and then by TAIL-row tiles (TAIL = 16 or 32), in the
grid (query tiles) and in the inner loops (key tiles) alike: with BLOCK_M = 128, BLOCK_N = 64 and
TAILs of 16, a 257-token head runs two 128-row tiles and one 16-row tile, each looping over four
64-key blocks and one 16-key block. The autotuner picks the sizes per sequence length.

Varlen (as flash-attn's varlen API and xformers' BlockDiagonalMask): q/k/v (total_tokens, H, D)
with int32 offsets cu_seqlens (n_seqs + 1,); each sequence attends only to itself, so a step's global
and local crops go through one launch. max_seqlen is a host int (flash-attn's convention): it sizes
the grid, so nothing is read back from the device; the offsets' values are checked on the device
(torch._assert_async, see checks.check_cu_seqlens).

torch.library ops: dinotron::attention (q, k, v, cu_seqlens or None, max_seqlen, scale, backend)
-> (out, lse) with its fake and autograd, the backward being the op dinotron::attention_backward.
torch.compile sees one node and CUDA graphs capture it: the Python around it (argument checks,
autocast, the backend choice) reads only shapes, dtypes and devices. backend, resolved before the
call, picks the Triton kernels or kernels/reference.py inside the op (forward, and a backward that
recomputes the softmax), so CPU runs take the same path as the GPU.

timm integration (duck-typed, timm is never imported here): `swap_timm_attention(model)` makes
every timm ViT `Attention` module run these kernels, and `packed_sequences(cu_seqlens, max_seqlen)`
makes swapped modules that receive x of shape (1, total_tokens, C) attend within each sequence.
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
MAX_GRID_YZ = 65535  # CUDA limit on grid dims 1 and 2 (heads, sequences)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels. Programs: axis 0 = row tile of one sequence, axis 1 = head, axis 2 = sequence,
# so the tiles of one (sequence, head) run side by side and share its K/V in L2.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program(CU, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h, IS_VARLEN: tl.constexpr):
    """This program's row tile t, its sequence's length, and the element offsets of the sequence's
    first row for this head in the inputs (q, k, v), the outputs (o, dO, dq, dk, dv) and the
    per-row fp32 buffers (lse, delta). Dense sequences are N tokens each."""
    t, head, seq = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        first = tl.load(CU + seq)
        length = tl.load(CU + seq + 1) - first
        start = first.to(tl.int64)
    else:
        start = 0
        length = N
    return (t, length, seq * s_in_b + head * s_in_h + start * s_in_n, seq * s_out_b + head * s_out_h + start * s_out_n,
            seq * s_lse_b + head * s_lse_h + start)


@triton.jit
def _tile_start(t, length, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Tile t of a sequence: tiles [0, length // BLOCK) hold BLOCK rows, later ones TAIL rows."""
    n_big = length // BLOCK
    return tl.where(t < n_big, t * BLOCK, n_big * BLOCK + (t - n_big) * TAIL), t < n_big


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


def _configs(tiles: Sequence[tuple[int, int, int, int]], fits) -> list[triton.Config]:
    """Autotune space: (BLOCK_M, BLOCK_N, TAIL_M, TAIL_N) x num_warps {4, 8} x num_stages {2, 3},
    kept where fits(block_m, block_n, num_warps); one small config in the interpreter, where
    autotuning would only multiply the run time."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "TAIL_M": 16, "TAIL_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TAIL_M": tm, "TAIL_N": tn}, num_warps=w, num_stages=s)
        for bm, bn, tm, tn in tiles
        for w in (4, 8)
        for s in (2, 3)
        if fits(bm, bn, w)
    ]


# (BLOCK_M, BLOCK_N, TAIL_M, TAIL_N); TAIL == BLOCK is plain masked tiling.
_FWD_TILES = [(128, 64, 16, 16), (128, 128, 16, 32), (128, 32, 16, 16), (64, 64, 16, 16), (64, 32, 16, 16),
              (64, 64, 64, 64), (128, 64, 128, 64), (32, 32, 16, 16)]
_BWD_TILES = [(64, 64, 16, 16), (64, 128, 16, 16), (32, 64, 16, 16), (32, 128, 16, 32), (128, 64, 16, 16),
              (64, 64, 64, 64), (32, 32, 16, 16)]


# Register budgets, from ptxas on sm_90 (Triton 3.6, D=64, no GPU run): with 4 warps the forward
# spills past a 128 x 64 tile, the backward (more live tiles: q, k, v, dO and fp32 dq or dk + dv)
# past 64 x 64; 8 warps are only tried on the larger tiles.
def _fwd_fits(bm: int, bn: int, warps: int) -> bool:
    return bm * bn <= 128 * 64 and bn <= 64 if warps == 4 else bm * bn >= 128 * 64


def _bwd_fits(bm: int, bn: int, warps: int) -> bool:
    return max(bm, bn) <= 64 if warps == 4 else bm * bn >= 64 * 64


_KEY = ["N", "HEAD_DIM", "IS_VARLEN"]  # the autotuner adds the tensors' dtypes


# Kernel arguments: Q, K, V share one layout (strides s_in_*), OUT, dO, dQ, dK, dV another (s_out_*),
# LSE and DELTA are fp32 per row (s_lse_*); *_b / *_h / *_n: sequence, head, token strides (elements).


@triton.autotune(configs=_configs(_FWD_TILES, _fwd_fits), key=_KEY)
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, CU,
              s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h, N, qk_scale,
              HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
    t, length, in_off, out_off, lse_off = _program(CU, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n,
                                                   s_lse_b, s_lse_h, IS_VARLEN)
    Q, K, V, OUT, LSE = Q + in_off, K + in_off, V + in_off, OUT + out_off, LSE + lse_off
    start_m, big = _tile_start(t, length, BLOCK_M, TAIL_M)
    if big:
        _fwd_tile(Q, K, V, OUT, LSE, s_in_n, s_out_n, start_m, length, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N)
    elif start_m < length:
        _fwd_tile(Q, K, V, OUT, LSE, s_in_n, s_out_n, start_m, length, qk_scale, HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N)


@triton.autotune(configs=_configs(_BWD_TILES, _bwd_fits), key=_KEY + ["DKDV"])
@triton.jit
def _attn_bwd(Q, K, V, OUT, DO, DQ, DK, DV, LSE, DELTA, CU,
              s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n, s_lse_b, s_lse_h, N, scale, qk_scale,
              HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, DKDV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
    """Two launches: DKDV=False, one program per query tile, writes delta and dQ; then DKDV=True,
    one per key tile (BLOCK_N, TAIL_N), loops over queries and writes dK and dV."""
    t, length, in_off, out_off, lse_off = _program(CU, N, s_in_b, s_in_h, s_in_n, s_out_b, s_out_h, s_out_n,
                                                   s_lse_b, s_lse_h, IS_VARLEN)
    Q, K, V, LSE, DELTA = Q + in_off, K + in_off, V + in_off, LSE + lse_off, DELTA + lse_off
    OUT, DO, DQ, DK, DV = OUT + out_off, DO + out_off, DQ + out_off, DK + out_off, DV + out_off
    if DKDV:
        start_n, big = _tile_start(t, length, BLOCK_N, TAIL_N)
        if big:
            _dkdv_tile(Q, K, V, DO, DK, DV, LSE, DELTA, s_in_n, s_out_n, start_n, length, scale, qk_scale,
                       HEAD_DIM, BLOCK_N, BLOCK_M, TAIL_M)
        elif start_n < length:
            _dkdv_tile(Q, K, V, DO, DK, DV, LSE, DELTA, s_in_n, s_out_n, start_n, length, scale, qk_scale,
                       HEAD_DIM, TAIL_N, BLOCK_M, TAIL_M)
    else:
        start_m, big = _tile_start(t, length, BLOCK_M, TAIL_M)
        if big:
            _dq_tile(Q, K, V, OUT, DO, DQ, LSE, DELTA, s_in_n, s_out_n, start_m, length, scale, qk_scale,
                     HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N)
        elif start_m < length:
            _dq_tile(Q, K, V, OUT, DO, DQ, LSE, DELTA, s_in_n, s_out_n, start_m, length, scale, qk_scale,
                     HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def num_tiles(n: int, block: int, tail: int, varlen: bool) -> int:
    """Grid size along axis 0: row tiles of an n-token sequence (dense), or the most any sequence
    of at most n tokens needs (varlen): n // block big tiles, then tail-row tiles."""
    exact = n // block + -(-(n % block) // tail)
    if not varlen or n < block:
        return exact
    # a shorter sequence may have one big tile fewer but block - 1 leftover rows
    return max(exact, n // block - 1 + -(-(block - 1) // tail))


def _grid(n: int, heads: int, n_seqs: int, varlen: bool, block: str, tail: str):
    return lambda meta: (num_tiles(n, meta[block], meta[tail], varlen), heads, n_seqs)


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
    """A _row_buffer, the kernels' stride arguments, and (n_seqs, heads, n) for the grid, n being N
    dense or max_seqlen packed. Reads shapes only: no host sync."""
    varlen = cu_seqlens is not None
    rows = _row_buffer(q, varlen)
    if varlen:
        rows_strides, grid = (0, rows.stride(0)), (cu_seqlens.numel() - 1, q.shape[1], max_seqlen)
    else:
        rows_strides, grid = (rows.stride(0), rows.stride(1)), tuple(q.shape[:3])
    return rows, (*_bhn_strides(q, varlen), *_bhn_strides(out, varlen), *rows_strides), grid


def attention_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    """Run the forward kernel on q, k, v laid out by _one_layout. Returns out (like q) and, per query
    row, the base-2 logsumexp of the scores in log2 units, log2 sum_j exp2(q_i . k_j * scale * log2(e)):
    fp32, (B, H, N) or (H, T)."""
    varlen = cu_seqlens is not None
    o = _new_like_timm(q, varlen)
    lse, strides, (n_seqs, heads, n) = _launch_args(q, o, cu_seqlens, max_seqlen)
    _attn_fwd[_grid(n, heads, n_seqs, varlen, "BLOCK_M", "TAIL_M")](
        q, k, v, o, lse, cu_seqlens, *strides, n, scale * LOG2E, HEAD_DIM=q.shape[-1], IS_VARLEN=varlen,
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    """Run the two backward kernels: returns (dq, dk, dv) shaped like q, laid out like o."""
    varlen = cu_seqlens is not None
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)  # empty_like keeps o's (dense, non-overlapping) strides
    dq, dk, dv = (torch.empty_like(o) for _ in range(3))
    delta, strides, (n_seqs, heads, n) = _launch_args(q, o, cu_seqlens, max_seqlen)
    for dkdv, block, tail in ((False, "BLOCK_M", "TAIL_M"), (True, "BLOCK_N", "TAIL_N")):
        _attn_bwd[_grid(n, heads, n_seqs, varlen, block, tail)](
            q, k, v, o, do, dq, dk, dv, lse, delta, cu_seqlens, *strides, n, scale, scale * LOG2E,
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
    if q.ndim == 4 and max(q.shape[:2]) > MAX_GRID_YZ:
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
        n_seqs = cu_seqlens.numel() - 1
        if n_seqs > MAX_GRID_YZ:
            raise ValueError(f"cu_seqlens packs {n_seqs} sequences; at most {MAX_GRID_YZ} fit one launch")
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

# Classes whose forward is timm's standard ViT self-attention (timm 1.0.x moved it to timm.layers).
_TIMM_ATTENTION = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")}
_TIMM_ATTRIBUTES = ("qkv", "num_heads", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def is_timm_attention(module: torch.nn.Module) -> bool:
    """True for a timm ViT Attention (or a subclass that keeps its forward) with the attributes we use."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    return (
        owner is not None
        and (owner.__module__, owner.__qualname__) in _TIMM_ATTENTION
        and all(hasattr(module, name) for name in _TIMM_ATTRIBUTES)
    )


class SwappedForward:
    """The forward that swap_timm_attention installs on a timm Attention: a picklable callable
    (torch.save of a whole model and copy.deepcopy keep it, rebound to the copy)."""

    def __init__(self, module: torch.nn.Module, backend: str | None):
        self.module, self.backend = module, backend

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return _timm_attention_forward(self.module, x, attn_mask, is_causal, self.backend)


def _timm_attention_forward(self, x, attn_mask, is_causal, backend) -> torch.Tensor:
    """timm's Attention.forward (timm 1.0.x: q/k norms, optional scale norm and gate) with the
    attention product run by dinotron."""
    packing = _packing
    if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
        if packing is not None:
            raise ValueError("packed_sequences does not combine with attn_mask, is_causal or attention dropout")
        kwargs = {"attn_mask": attn_mask} if attn_mask is not None else {}
        if is_causal:
            kwargs["is_causal"] = True
        return type(self).forward(self, x, **kwargs)
    B, N, C = x.shape
    H = self.num_heads
    D = getattr(self, "head_dim", self.qkv.out_features // (3 * H))
    scale = getattr(self, "scale", D ** -0.5)
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x)
    if packing is None:
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = _autocast(self.q_norm(q), self.k_norm(k), v)
        if _op_backend(backend, q, k, v, strict=False) == "triton":
            out = _attention_op(q, k, v, None, N, scale, "triton")[0]
        else:  # timm's own product
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out = out.transpose(1, 2).reshape(B, N, H * D)
    else:
        if B != 1:  # N is checked against cu_seqlens on the device
            raise ValueError(f"inside packed_sequences a swapped Attention expects x of shape (1, total_tokens, C), "
                             f"got {tuple(x.shape)}")
        q, k, v = qkv.reshape(N, 3, H, D).unbind(1)
        out = _packed_attention(self.q_norm(q), self.k_norm(k), v, packing, scale, backend, strict=False)
        out = out.reshape(1, N, H * D)
    if getattr(self, "norm", None) is not None:
        out = self.norm(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def swap_timm_attention(model: torch.nn.Module, enable: bool = True, backend: str | None = None) -> torch.nn.Module:
    """Make every timm ViT Attention in `model` use dinotron attention (enable=False restores timm's).

    Sets each module's forward (an instance attribute, SwappedForward); parameters, buffers and
    state_dict keys are untouched, so checkpoints stay loadable by plain timm; copy.deepcopy (an
    EMA teacher) and pickling keep the swap.
    Where the kernel does not apply (CPU, float32 without autocast, D not in {64, 128}) the module
    runs torch's scaled_dot_product_attention (inside packed_sequences: the eager reference, through
    the same op as the kernel); with attn_mask, is_causal or attention dropout
    in training it runs timm's own forward. backend: as `attention`'s, for these modules.
    Raises ValueError if enable=True and the model has no timm Attention. Returns `model`.
    """
    modules = [m for m in model.modules() if is_timm_attention(m)]
    if enable and not modules:
        raise ValueError(f"swap_timm_attention found no timm ViT Attention module in {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for m in modules:
        if enable:
            m.forward = SwappedForward(m, backend)
        elif is_swapped(m):
            del m.forward
    return model


def is_swapped(module: torch.nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), SwappedForward)
