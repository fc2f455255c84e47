"""DINOv3's Gram anchoring loss (dinov3/loss/gram_loss.py, GramLoss) in Triton: fused Gram + MSE + backward.

For image b with patch features x (student, N x D) and y (the Gram teacher's, N x D), as dinov3's
GramLoss.forward(output_feats, target_feats, img_level=True):

    xn = x / max(||x||_2, 1e-12),  yn = y / max(||y||_2, 1e-12)    (F.normalize; apply_norm=True)
    S = xn xn^T,  T = yn yn^T                                       (N x N, fp32: dinov3 calls .float())
    remove_neg:               S = S [S >= 0],  T = T [T >= 0]       (sim[sim < 0] = 0 on both)
    remove_only_teacher_neg:  T = T [T >= 0]                        (see below)
    loss = 1 / (B N^2) sum_b sum_ij (S_ij - T_ij)^2                 (nn.MSELoss: the mean over B x N x N)

img_level=False (dinov3's batch-level Gram) flattens the B x N rows into one image of B * N rows first:
the mean is then over (B N)^2 pairs. dinov3's remove_only_teacher_neg runs
`target_sim[target_sim < 0] = 0` and then `student_sim[(student_sim < 0) & (target_sim < 0)] = 0`,
which tests the teacher after its in-place clip and so selects nothing: the student's similarities
are left as they are, and that is what is reproduced here (the tests transcribe dinov3's lines).
Both flags together are refused, as dinov3 asserts. Defaults: GramLoss(apply_norm=True,
img_level=True, remove_neg=True, remove_only_teacher_neg=False), forward(..., img_level=True), as
dinov3's class (its constructor's img_level is stored nowhere: forward's decides). dinov3's training
configs differ from the class: ssl_default_config.yaml has gram.normalized=true, img_level=false,
remove_neg=false, remove_only_teacher_neg=false, loss_weight=1.0; dinov3_vit7b16_gram_anchor.yaml
(the Gram anchoring run) the same with img_level=true and a loss weight schedule 0 -> 2.0. The loss
is fp32, as dinov3's; the gradient reaches the student only (the Gram teacher is a frozen snapshot:
a teacher that requires grad is refused rather than silently given none).

Kernels. The normalisation is inside the kernels, not a normalised copy: _row_norms_kernel stores
every row's ||x|| and ||y|| (fp32, (2, B, N), kept for the backward); the similarity tiles are tl.dot of
the raw features (fp32 accumulation) scaled by r_i r_j, r = 1 / max(||x||, eps): F.normalize's result
with one rounding fewer. The normalisation's gradient is written out in the backward's gradient kernel,
not left to autograd:
    dL/dx_a = 4 g / (B N^2) r_a (sum_j G_aj r_j x_j - [||x_a|| >= eps] r_a x_a sum_j G_aj S_aj),
    G_aj = (S_aj - T_aj) [S_aj >= 0 if remove_neg],  g = d out / d loss
(S is symmetric, so each pair (a, j) reaches x_a through both S_aj and S_ja: MSE's 2 times 2).
- Forward, _gram_fwd_kernel: one program per image and (i, j) tile of 64 x 64 pairs, i <= j (S and T
  are symmetric: a tile above the diagonal counts twice, one below does no work), flattened with i
  fastest so that one image's tiles run together and its rows stay in L2: the student and teacher
  tiles over D in BLOCK_K steps, the clipped squared difference, its sum into a (B * tiles^2,) fp32
  partial. The loss is their torch sum / (B N^2): a fixed order, no atomics.
- Backward, by chunks of row blocks (64 rows of one image): _gram_strip_kernel, one program per row
  block, recomputes the student and teacher tiles of its rows against every column tile (over all of
  D), and stores the strip G r_n (64 x N, fp32) into its slot of a scratch buffer and sum_n G S per
  row; _gram_grad_kernel, one program per row block and BLOCK_D features (features fastest: the
  programs reading one strip run together, the strip is read from HBM about once), accumulates
  sum_n (G r_n) x_n[:, features] with tl.dot and writes the gradient rows once, in the student's
  dtype. Deterministic: no atomics. A chunk holds 2 row blocks per SM, fewer if its strips would
  exceed half the patches' element count.
Memory: nothing of N x N per image is stored for either model. Beside the inputs and the (B, N, D)
gradient: the (2, B, N) norms, (B, N) row sums, (B * tiles^2,) partials and the chunk's scratch,
at most half the patches' element count in fp32 (one strip, 64 x N, if that is more).

Precision. The similarity dots: bf16/fp16 products are exact in fp32; fp32 features follow
torch.backends.cuda.matmul.allow_tf32 as torch.matmul does (tf32 if allowed, as dinov3's train.py
sets it, else tf32x3, about fp32). The gradient's dot (G r_n) @ x_n: bf16 features split G r_n into
two bf16 parts (high and low, ~16 significant bits, each product exact); fp16 features (whose range
G r_n may leave) use fp32 operands in tf32x3; fp32 features follow allow_tf32 again.

Cost on an H100/H200 (132 SMs, 3.0 TB/s, ~700 dense bf16 TFLOP/s reachable), image level, bf16, the
tile counts with their padding (MACs x 2 = FLOPs):
- B = 32, N = 1369 (518 px at patch 14), D = 1024 (ViT-L), 22 tiles per side:
  forward: norms 1369 programs, 179 MB read, 60 us; tiles grid 15488 (253 upper tiles an image),
  2 x 253 x 64^2 x 1024 MACs x 32 images = 136 GFLOP, 0.19 ms at 700 TFLOP/s (HBM: the features once,
  179 MB, 60 us): compute-bound, ~0.25 ms in all.
  backward: 3 chunks (248, 248, 208 row blocks; scratch 248 x 64 x 1408 fp32 = 89 MB); strips
  2 x 484 x 64^2 x 1024 MACs x 32 = 260 GFLOP, 0.37 ms; gradient (bf16: two dots for the split G)
  the same 260 GFLOP, 0.37 ms; HBM: scratch written and read once (2 x 254 MB), features per chunk
  (3 x 90 MB), gradient 90 MB: 0.87 GB, 0.29 ms: ~0.75 ms compute-bound at the roofline.
  dinov3's eager path holds S, T, the masks and the MSE's gradient, each 32 x 1369^2 fp32 = 240 MB,
  and does 2 x 123 GFLOP forward and 123 GFLOP (dS @ xn) backward in tf32 plus ~10 passes over them.
- B = 128, N = 256 (224 px at 14), D = 384 (ViT-S), 4 tiles per side: forward: norms 50 MB, 17 us;
  tiles grid 2048 (10 upper tiles an image), 8.1 GFLOP, 12 us, bytes 50 MB, 17 us: memory-bound, ~35 us.
  backward: 2 chunks (264, 248; scratch 17 MB); strips 12.9 GFLOP, 18 us; gradient 12.9 GFLOP, 18 us;
  HBM: scratch 2 x 34 MB, features 50 + 25 MB, gradient 25 MB: 170 MB, 56 us: ~60 us, memory-bound.
sm_90 compile (Triton 3.8 + ptxas, cuobjdump, specialised as the JIT does at these two shapes; lowered
in tests/test_gram.py): no spills anywhere, shared memory <= 144 KiB (227 KiB allowed), every
tile loop on cp.async and wgmma. bf16 (fp16 the same but where noted; fp32 in tf32x3):
  _row_norms_kernel   48 regs (fp32 80), 10 CTAs/SM, v4 loads
  _gram_fwd_kernel    164 regs (N = 256: 150), 48 KiB, 3 CTAs/SM, 39 waves at N = 1369
                      (fp32: BLOCK_K 32, 230 regs, 56 KiB, 2 CTAs/SM)
  _gram_strip_kernel  221 regs (N = 256: 234), 48 KiB, 2 CTAs/SM, ~1 wave a chunk
                      (fp32: BLOCK_K 32, 8 warps, 226 regs, 56 KiB, 1 CTA/SM)
  _gram_grad_kernel   BLOCK_D 128, 164 regs, 80 KiB, 2 CTAs/SM, 7.5 waves a chunk at N = 1369
                      (fp16: 239 regs, 144 KiB, 1 CTA/SM; fp32: BLOCK_D 64, 186 regs, 112 KiB, 2 CTAs/SM)

The ops: gram_loss checks its arguments and calls dinotron::gram(student, teacher, normalize,
remove_neg, remove_only_teacher_neg, backend) -> (loss, norms), whose registered backward runs
dinotron::gram_backward (the two backward kernels) for the Triton backend and autograd through
reference.gram_loss for the eager one (CPU, float64). torch.compile sees one node; nothing reads a
device value on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from dinotron.kernels import layout, reference
from dinotron.kernels.backend import interpreter_enabled, resolve_backend

_EPS = 1e-12  # F.normalize's default eps, which dinov3's GramLoss uses


@triton.jit
def _row_norms_kernel(
    S, T, NORMS,  # S, T: (B, N, D) with unit feature stride; NORMS: (2, B * N) fp32
    n_rows, N, D, stride_sb, stride_sn, stride_tb, stride_tn,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """||x||_2 and ||y||_2 in fp32 of BLOCK_R patch rows of both models."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    b, n = (r // N).to(tl.int64), (r % N).to(tl.int64)
    s_rows, t_rows = b * stride_sb + n * stride_sn, b * stride_tb + n * stride_tn
    sq_s = tl.zeros((BLOCK_R,), tl.float32)
    sq_t = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (ks < D)[None, :]
        xs = tl.load(S + s_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(T + t_rows[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sq_s += tl.sum(xs * xs, axis=1)
        sq_t += tl.sum(xt * xt, axis=1)
    tl.store(NORMS + r, tl.sqrt(sq_s), mask=r_mask)
    tl.store(NORMS + n_rows + r, tl.sqrt(sq_t), mask=r_mask)


@triton.jit
def _inverse_norms(NORMS, rows, mask, eps, NORMALIZE: tl.constexpr):
    """1 / max(||x||, eps) of `rows` (flat b * N + n indices); 1 without normalisation."""
    if NORMALIZE:
        return 1.0 / tl.maximum(tl.load(NORMS + rows, mask=mask, other=1.0), eps)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _similarity(X, base, m, n, mask_m, mask_n, r_m, r_n, d_end, stride_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 tile r_m <x_m, x_n> r_n of one image (rows at X + base + row * stride_n),
    over features 0 .. d_end - 1."""
    rows_m, rows_n = m.to(tl.int64) * stride_n, n.to(tl.int64) * stride_n
    dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d_end
        a = tl.load(X + base + rows_m[:, None] + ks[None, :], mask=mask_m[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(X + base + rows_n[None, :] + ks[:, None], mask=k_mask[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584)
            a, bt = a.to(tl.float32), bt.to(tl.float32)
        dots = tl.dot(a, bt, dots, input_precision=PRECISION)
    return dots * r_m[:, None] * r_n[None, :]


@triton.jit
def _difference(sim_s, sim_t, CLIP_STUDENT: tl.constexpr, CLIP_TEACHER: tl.constexpr):
    """S - T after dinov3's clips (sim[sim < 0] = 0: NaN stays NaN)."""
    if CLIP_STUDENT:
        sim_s = tl.where(sim_s < 0, 0.0, sim_s)
    if CLIP_TEACHER:
        sim_t = tl.where(sim_t < 0, 0.0, sim_t)
    return sim_s - sim_t


@triton.jit
def _gram_fwd_kernel(
    S, T, NORMS_S, NORMS_T, PARTIAL,  # NORMS_*: (B * N,) fp32 (None without normalisation); PARTIAL: (B * tiles^2,)
    N, D, tiles, stride_sb, stride_sn, stride_tb, stride_tn, eps,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, NORMALIZE: tl.constexpr, CLIP_STUDENT: tl.constexpr,
    CLIP_TEACHER: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i, j, b), flattened with i fastest (one image's tiles run together, its rows stay in L2):
    the sum of the squared clipped differences over tile (i, j) of image b, twice above the diagonal."""
    pid = tl.program_id(0)
    pid_m, pid_n, b = pid % tiles, (pid // tiles) % tiles, pid // (tiles * tiles)
    upper = pid_n >= pid_m
    d_end = tl.where(upper, D, 0)  # a tile below the diagonal does no work: its mirror counts twice
    m = pid_m * BLOCK + tl.arange(0, BLOCK)
    n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask_m, mask_n = m < N, n < N
    # 1. the inverse norms of the tile's rows and columns
    rs_m = _inverse_norms(NORMS_S, b * N + m, mask_m, eps, NORMALIZE)
    rs_n = _inverse_norms(NORMS_S, b * N + n, mask_n, eps, NORMALIZE)
    rt_m = _inverse_norms(NORMS_T, b * N + m, mask_m, eps, NORMALIZE)
    rt_n = _inverse_norms(NORMS_T, b * N + n, mask_n, eps, NORMALIZE)
    # 2. the student and teacher similarity tiles, fp32
    sim_s = _similarity(S, b.to(tl.int64) * stride_sb, m, n, mask_m, mask_n, rs_m, rs_n, d_end, stride_sn,
                        BLOCK, BLOCK, BLOCK_K, S_PRECISION, UPCAST)
    sim_t = _similarity(T, b.to(tl.int64) * stride_tb, m, n, mask_m, mask_n, rt_m, rt_n, d_end, stride_tn,
                        BLOCK, BLOCK, BLOCK_K, T_PRECISION, UPCAST)
    # 3. the clipped squared difference, summed
    diff = tl.where(mask_m[:, None] & mask_n[None, :], _difference(sim_s, sim_t, CLIP_STUDENT, CLIP_TEACHER), 0.0)
    weight = tl.where(pid_n > pid_m, 2.0, tl.where(upper, 1.0, 0.0))
    tl.store(PARTIAL + pid, weight * tl.sum(diff * diff))


@triton.jit
def _grad_dot(g, x, acc, PRECISION: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + g @ x for fp32 g (BLOCK_M, BLOCK_N) and features x (BLOCK_N, BLOCK_D): with SPLIT, g as the sum
    of two parts in x's dtype (each product exact, ~16 significant bits of g), else in fp32 at PRECISION."""
    if SPLIT:
        hi = g.to(x.dtype)
        lo = (g - hi.to(tl.float32)).to(x.dtype)
        if UPCAST:  # triton#11584, as in _similarity
            hi, lo, x = hi.to(tl.float32), lo.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(hi, x, acc)
        return tl.dot(lo, x, acc)
    return tl.dot(g, x.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _gram_strip_kernel(
    S, T, NORMS_S, NORMS_T, SCRATCH, ROW_DOT,  # SCRATCH: (programs, BLOCK_M, n_pad) fp32; ROW_DOT: (B * N,) fp32
    N, D, tiles, work0, n_pad, stride_sb, stride_sn, stride_tb, stride_tn, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORMALIZE: tl.constexpr,
    CLIP_STUDENT: tl.constexpr, CLIP_TEACHER: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program p, work item w = work0 + p (row block w % tiles of image w // tiles): the strip G_mn r_n of
    its BLOCK_M rows against every column n into SCRATCH[p], and sum_n G_mn S_mn into ROW_DOT."""
    pid = tl.program_id(0)
    work = work0 + pid
    pid_m, b = work % tiles, work // tiles
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = m < N
    s_base, t_base = b.to(tl.int64) * stride_sb, b.to(tl.int64) * stride_tb
    strip = SCRATCH + pid.to(tl.int64) * BLOCK_M * n_pad + tl.arange(0, BLOCK_M)[:, None] * n_pad
    rs_m = _inverse_norms(NORMS_S, b * N + m, mask_m, eps, NORMALIZE)
    rt_m = _inverse_norms(NORMS_T, b * N + m, mask_m, eps, NORMALIZE)
    g_dot_s = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n < N
        rs_n = _inverse_norms(NORMS_S, b * N + n, mask_n, eps, NORMALIZE)
        rt_n = _inverse_norms(NORMS_T, b * N + n, mask_n, eps, NORMALIZE)
        # 1. the similarity tiles, over all of D
        sim_s = _similarity(S, s_base, m, n, mask_m, mask_n, rs_m, rs_n, D, stride_sn, BLOCK_M, BLOCK_N, BLOCK_K,
                            S_PRECISION, UPCAST)
        sim_t = _similarity(T, t_base, m, n, mask_m, mask_n, rt_m, rt_n, D, stride_tn, BLOCK_M, BLOCK_N, BLOCK_K,
                            T_PRECISION, UPCAST)
        # 2. G = d (S' - T')^2 / 2 d S: zero where the student's similarity was clipped, and off the image
        g = _difference(sim_s, sim_t, CLIP_STUDENT, CLIP_TEACHER)
        if CLIP_STUDENT:
            g = tl.where(sim_s < 0, 0.0, g)
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        if NORMALIZE:
            g_dot_s += tl.sum(g * sim_s, axis=1)
        tl.store(strip + n[None, :], g * rs_n[None, :])
    if NORMALIZE:
        tl.store(ROW_DOT + b * N + m, g_dot_s, mask=mask_m)


@triton.jit
def _gram_grad_kernel(
    S, NORMS_S, ROW_DOT, SCRATCH, GRAD_LOSS, DS,  # DS: (B, N, D) contiguous, in S's dtype
    N, D, tiles, work0, n_pad, d_blocks, stride_sb, stride_sn, eps, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    G_PRECISION: tl.constexpr, SPLIT_G: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (f, p), f fastest (the feature blocks of one strip run together): d loss / d x for the rows of
    work item work0 + p, features block f: sum_n (G r_n) x_n[:, f], through the normalisation."""
    pid = tl.program_id(0)
    pid_d, p = pid % d_blocks, pid // d_blocks
    work = work0 + p
    pid_m, b = work % tiles, work // tiles
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = m < N
    fs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_f = fs < D
    s_base = b.to(tl.int64) * stride_sb
    strip = SCRATCH + p.to(tl.int64) * BLOCK_M * n_pad + tl.arange(0, BLOCK_M)[:, None] * n_pad
    # 1. acc = sum_n (G r_n) x_n[:, features]
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        x_n = tl.load(S + s_base + n.to(tl.int64)[:, None] * stride_sn + fs[None, :],
                      mask=(n < N)[:, None] & mask_f[None, :], other=0.0)
        acc = _grad_dot(tl.load(strip + n[None, :]), x_n, acc, G_PRECISION, SPLIT_G, UPCAST)
    # 2. through the normalisation: J^T v = (v - xn <xn, v> [||x|| >= eps]) / max(||x||, eps)
    grad = acc
    if NORMALIZE:
        norm_m = tl.load(NORMS_S + b * N + m, mask=mask_m, other=1.0)
        rs_m = 1.0 / tl.maximum(norm_m, eps)
        projection = tl.where(norm_m >= eps, rs_m * tl.load(ROW_DOT + b * N + m, mask=mask_m, other=0.0), 0.0)
        x_m = tl.load(S + s_base + m.to(tl.int64)[:, None] * stride_sn + fs[None, :],
                      mask=mask_m[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
        grad = rs_m[:, None] * (acc - projection[:, None] * x_m)
    grad = grad * (scale * tl.load(GRAD_LOSS).to(tl.float32))
    out = DS + b.to(tl.int64) * N * D + m.to(tl.int64)[:, None] * D + fs[None, :]
    tl.store(out, grad.to(DS.dtype.element_ty), mask=mask_m[:, None] & mask_f[None, :])


# Tile sizes, keyed by whether an operand is fp32 (then tl.dot splits both operands in three for tf32x3,
# tripling their registers) or, for the gradient kernel, by the student's dtype; the largest without
# spills on sm_90 (module docstring). 64 x 64 similarity tiles: the smallest at which wgmma runs with one
# warpgroup per 64 rows. BLOCK_D bounds the gradient kernel's (64, BLOCK_D) fp32 accumulator.
_FWD = {False: dict(BLOCK=64, BLOCK_K=64, num_warps=4), True: dict(BLOCK=64, BLOCK_K=32, num_warps=4)}
_STRIP = {False: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4),
          True: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8)}
_GRAD = {torch.bfloat16: dict(BLOCK_D=128, num_warps=4), torch.float16: dict(BLOCK_D=128, num_warps=4),
         torch.float32: dict(BLOCK_D=64, num_warps=4)}
_CHUNK_PER_SM = 2  # row blocks per chunk and SM: two waves of the strip kernel's programs
_NORMS = dict(BLOCK_R=32, BLOCK_K=128, num_warps=4)


def _chunk(work: int, strip: int, patches: int, device: torch.device) -> int:
    """Row blocks per backward chunk: _CHUNK_PER_SM per SM, at most every one, and few enough that the
    chunk's strips (`strip` fp32 elements each) hold at most half as many elements as the patches: the
    scratch stays below half an fp32 copy of the student's patches whatever N (dinov3's batch-level Gram)."""
    return max(1, min(work, _CHUNK_PER_SM * layout.num_sms(device), patches // (2 * strip)))


def _fp32(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float32 for t in tensors)


def _precisions(dtype: torch.dtype) -> dict:
    """tl.dot's input precisions for features of `dtype` (module docstring, Precision)."""
    if dtype == torch.float32:  # as torch.matmul: tf32 if allowed (dinov3's train.py allows it), else ~fp32
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
        return dict(GRAM=precision, G=precision, SPLIT_G=False)
    return dict(GRAM=None, G="tf32x3" if dtype == torch.float16 else None, SPLIT_G=dtype == torch.bfloat16)


def _unit_feature_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its features are contiguous (a (B, N, D) slice of the tokens is read in place), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _triton_forward(student: torch.Tensor, teacher: torch.Tensor, normalize: bool, remove_neg: bool,
                    remove_only_teacher_neg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms and forward kernels: (loss fp32, the rows' norms (2, B, N) fp32, or (0,) without normalisation)."""
    s, t = _unit_feature_stride(student), _unit_feature_stride(teacher)
    B, N, D = s.shape
    strides = dict(stride_sb=s.stride(0), stride_sn=s.stride(1), stride_tb=t.stride(0), stride_tn=t.stride(1))
    norms = torch.empty((2, B, N) if normalize else (0,), dtype=torch.float32, device=s.device)
    if normalize:
        _row_norms_kernel[(triton.cdiv(B * N, _NORMS["BLOCK_R"]),)](
            S=s, T=t, NORMS=norms, n_rows=B * N, N=N, D=D, **strides, **_NORMS,
        )
    cfg = _FWD[_fp32(s, t)]
    tiles = triton.cdiv(N, cfg["BLOCK"])
    partial = torch.empty(B * tiles * tiles, dtype=torch.float32, device=s.device)
    _gram_fwd_kernel[(B * tiles * tiles,)](
        S=s, T=t, NORMS_S=norms[0] if normalize else None, NORMS_T=norms[1] if normalize else None,
        PARTIAL=partial, N=N, D=D, tiles=tiles, **strides, eps=_EPS, NORMALIZE=normalize,
        CLIP_STUDENT=remove_neg, CLIP_TEACHER=remove_neg or remove_only_teacher_neg,
        S_PRECISION=_precisions(s.dtype)["GRAM"], T_PRECISION=_precisions(t.dtype)["GRAM"],
        UPCAST=interpreter_enabled(), **cfg,
    )
    return partial.sum() / (B * N * N), norms


def _triton_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, norms: torch.Tensor,
                     normalize: bool, remove_neg: bool, remove_only_teacher_neg: bool) -> torch.Tensor:
    """The backward kernels, chunk by chunk of row blocks: d loss / d student (B, N, D), contiguous, in the
    student's dtype."""
    s, t = _unit_feature_stride(student), _unit_feature_stride(teacher)
    B, N, D = s.shape
    strip_cfg = _STRIP[_fp32(s, t)]
    block_m, block_n = strip_cfg["BLOCK_M"], strip_cfg["BLOCK_N"]
    tiles, n_pad = triton.cdiv(N, block_m), triton.cdiv(N, block_n) * block_n
    chunk = _chunk(B * tiles, block_m * n_pad, B * N * D, s.device)
    scratch = torch.empty(chunk * block_m * n_pad, dtype=torch.float32, device=s.device)
    row_dot = torch.empty(B * N, dtype=torch.float32, device=s.device) if normalize else None
    grad = torch.empty((B, N, D), dtype=s.dtype, device=s.device)
    norms_s, norms_t = (norms[0], norms[1]) if normalize else (None, None)
    precision, grad_cfg = _precisions(s.dtype), _GRAD[s.dtype]
    d_blocks = triton.cdiv(D, grad_cfg["BLOCK_D"])
    for work0 in range(0, B * tiles, chunk):
        items = min(chunk, B * tiles - work0)
        _gram_strip_kernel[(items,)](
            S=s, T=t, NORMS_S=norms_s, NORMS_T=norms_t, SCRATCH=scratch, ROW_DOT=row_dot, N=N, D=D, tiles=tiles,
            work0=work0, n_pad=n_pad, stride_sb=s.stride(0), stride_sn=s.stride(1), stride_tb=t.stride(0),
            stride_tn=t.stride(1), eps=_EPS, NORMALIZE=normalize, CLIP_STUDENT=remove_neg,
            CLIP_TEACHER=remove_neg or remove_only_teacher_neg, S_PRECISION=precision["GRAM"],
            T_PRECISION=_precisions(t.dtype)["GRAM"], UPCAST=interpreter_enabled(), **strip_cfg,
        )
        _gram_grad_kernel[(items * d_blocks,)](
            S=s, NORMS_S=norms_s, ROW_DOT=row_dot, SCRATCH=scratch, GRAD_LOSS=grad_loss, DS=grad, N=N, D=D,
            tiles=tiles, work0=work0, n_pad=n_pad, d_blocks=d_blocks, stride_sb=s.stride(0), stride_sn=s.stride(1),
            eps=_EPS, scale=4.0 / (B * N * N), BLOCK_M=block_m, BLOCK_N=block_n, NORMALIZE=normalize,
            G_PRECISION=precision["G"], SPLIT_G=precision["SPLIT_G"], UPCAST=interpreter_enabled(), **grad_cfg,
        )
    return grad


# The ops: the forward returns the rows' norms, which its Triton backward reads instead of recomputing.
@torch.library.custom_op(
    "dinotron::gram", mutates_args=(),
    schema="(Tensor student, Tensor teacher, bool normalize, bool remove_neg, bool remove_only_teacher_neg, "
           "str backend) -> (Tensor, Tensor)",
)
def _gram_op(student, teacher, normalize, remove_neg, remove_only_teacher_neg, backend):
    """Image-level Gram loss of (B, N, D) student and teacher patches: (loss fp32 (float64 for float64 on
    the eager backend), norms: (2, B, N) fp32 for the Triton backward with normalisation, else (0,))."""
    if backend == "eager":
        loss = reference.gram_loss(student, teacher, normalize=normalize, remove_neg=remove_neg,
                                   remove_only_teacher_neg=remove_only_teacher_neg)
        return loss, student.new_empty(0, dtype=torch.float32)
    return _triton_forward(student, teacher, normalize, remove_neg, remove_only_teacher_neg)


@torch.library.custom_op(
    "dinotron::gram_backward", mutates_args=(),
    schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor norms, bool normalize, bool remove_neg, "
           "bool remove_only_teacher_neg) -> Tensor",
)
def _gram_backward_op(grad_loss, student, teacher, norms, normalize, remove_neg, remove_only_teacher_neg):
    """d loss / d student of dinotron::gram's Triton backend, (B, N, D) contiguous in the student's dtype."""
    return _triton_backward(grad_loss, student, teacher, norms, normalize, remove_neg, remove_only_teacher_neg)


@_gram_op.register_fake
def _(student, teacher, normalize, remove_neg, remove_only_teacher_neg, backend):
    loss_dtype = reference.acc_dtype(student, teacher) if backend == "eager" else torch.float32
    norms_shape = (2, *student.shape[:2]) if backend == "triton" and normalize else (0,)
    return student.new_empty((), dtype=loss_dtype), student.new_empty(norms_shape, dtype=torch.float32)


@_gram_backward_op.register_fake
def _(grad_loss, student, teacher, norms, normalize, remove_neg, remove_only_teacher_neg):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, *flags, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.flags, ctx.backend = flags, backend


def _gram_grad(ctx, grad_loss, _grad_norms):
    student, teacher, norms = ctx.saved_tensors
    normalize, remove_neg, remove_only_teacher_neg = ctx.flags
    if ctx.backend == "triton":
        grad = _gram_backward_op(grad_loss, student, teacher, norms, *ctx.flags)
    else:  # the reference again, through autograd (which records nothing inside an op)
        with torch.enable_grad():
            s = student.detach().requires_grad_()
            loss = reference.gram_loss(s, teacher, normalize=normalize, remove_neg=remove_neg,
                                       remove_only_teacher_neg=remove_only_teacher_neg)
            (grad,) = torch.autograd.grad(loss, s, grad_loss)
    return grad, None, None, None, None, None


_gram_op.register_autograd(_gram_grad, setup_context=_setup_context)


def gram_loss(
    student_patches: torch.Tensor,
    teacher_patches: torch.Tensor,
    *,
    normalize: bool = True,
    remove_neg: bool = True,
    remove_only_teacher_neg: bool = False,
    img_level: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """dinov3's Gram anchoring loss, GramLoss(apply_norm=normalize, remove_neg=..., remove_only_teacher_neg=...)
    (output_feats=student_patches, target_feats=teacher_patches, img_level=...); math in the module docstring.

    student_patches, teacher_patches: (B, N, D) patch tokens of one shape and device (img_level=False also
    takes (B * N, D)), float32/float16/bfloat16 (float64 runs the eager reference); their dtypes may differ.
    Returns the fp32 scalar loss (float64 for float64), whose gradient reaches student_patches only:
    teacher_patches must not require grad (the Gram teacher is a frozen snapshot). normalize: F.normalize
    the features first (dinov3's apply_norm); remove_neg / remove_only_teacher_neg: dinov3's clips of
    negative similarities (not both). img_level=False: one Gram matrix over all B * N rows (dinov3's
    batch level). Memory: the (B, N, D) gradient and O(B N) fp32 beside it, never N x N per image; no
    host sync (one torch.library op). backend: see kernels/backend.py.
    """
    reference.check_gram_input(student_patches, teacher_patches, remove_neg, remove_only_teacher_neg, img_level)
    if teacher_patches.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_patches requires grad, but the Gram loss differentiates the student's patches "
                         "only (dinov3's Gram teacher is a frozen snapshot): pass teacher_patches.detach()")
    chosen = resolve_backend(backend, student_patches, teacher_patches)
    if not img_level:  # one image of every row: its Gram matrix is dinov3's batch-level one
        D = student_patches.shape[-1]
        student_patches, teacher_patches = student_patches.reshape(1, -1, D), teacher_patches.reshape(1, -1, D)
    loss, _ = _gram_op(student_patches, teacher_patches, normalize, remove_neg, remove_only_teacher_neg, chosen)
    return loss


class GramLoss(nn.Module):
    """dinov3's GramLoss(apply_norm=True, img_level=True, remove_neg=True, remove_only_teacher_neg=False):
    forward(output_feats (B, N, D), target_feats (B, N, D), img_level=True) -> the fp32 loss, see gram_loss.
    As in dinov3, the constructor's img_level is accepted and unused: forward's img_level decides.
    backend: gram_loss's (keyword-only).
    """

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, *, backend: str | None = None):
        super().__init__()
        reference.check_gram_flags(remove_neg, remove_only_teacher_neg)
        self.apply_norm, self.remove_neg, self.remove_only_teacher_neg = apply_norm, remove_neg, remove_only_teacher_neg
        self.backend = backend

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True) -> torch.Tensor:
        return gram_loss(output_feats, target_feats, normalize=self.apply_norm, remove_neg=self.remove_neg,
                         remove_only_teacher_neg=self.remove_only_teacher_neg, img_level=img_level,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"apply_norm={self.apply_norm}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}")
