"""Property-based fuzzing (hypothesis) of every public kernel op: the Triton kernels (in the interpreter on
CPU tensors, backend="triton") against the eager reference, in value and gradient (issue 14).

Oracle: the same public op with backend="eager" (kernels/reference.py through the same torch.library op),
or kernels/reference.py itself, on the same rounded inputs; for KoLeo, reference.koleo_pair_loss at the
kernel's neighbours, which must be nearest to within the similarity rounding (SIM_TOL).
Hypothesis draws shapes (one row, K = 1, zero masked patches, empty sequences), layouts (contiguous,
permuted, transposed, row-strided, chunked lists of views of one tensor, unevenly spaced views, separate
tensors), dtypes (fp32, fp16, bf16; float64 only through the eager path), the kernels' tiling (the
interpreter's, or tiles of a few columns and 132 SMs, so rows span several K blocks and splits) and value
kinds (VALUE_KINDS: huge logits, ties, duplicated and constant rows, -inf entries and masked column
blocks, a NaN). Examples are derandomized and the database is off, so every run checks the same cases.
Each test checks that the kernels launched (helpers.spy_launches), so an eager fallback cannot pass.

Tolerances (compare: NaN where the reference has NaN, the same infinities, finite entries within
atol + rtol |expected|):
- the established ones (tests/test_losses.py, test_koleo.py, test_attention.py module docstrings):
  losses and probabilities rtol 1e-4, atol 1e-6; loss gradients rtol 1e-4 (fp32) / 1e-2 (one bf16 ulp,
  2^-7, with margin, fp16 / bf16), atol 1e-6 x the largest reference gradient; KoLeo rtol 1e-5 (fp32) or
  the dtype's eps (half losses), attention fp16 atol 4e-3, rtol 1e-2.
- plus a conditioning term for large logits: a log-probability z - lse (or a teacher exponent) built from
  fp32 numbers of magnitude `span` carries an absolute error of a few ulps of span, SPAN_ULPS * 2^-24 * span,
  whatever the summation order; a probability then carries that relative error. Fused cross-entropy
  (ce_tolerances): per (view, row) mass (delta_s + delta_t z_span) on the loss, coef mass (delta_s +
  2 delta_t) on the gradient, delta_s from the student's span, delta_t from the targets'. Sinkhorn-Knopp's
  n iterations each apply two 1-Lipschitz log-sum-exps, so its span counts 2n times. Negligible (< 1e-5)
  for O(1) logits; it dominates only for the +-1e4 ones. SPAN_ULPS is 8; the examples pass with 1, KoLeo's
  cancelled pushes aside (2.2).
- the centre: the mean of R rows up to xmax carries R * 2^-24 * xmax / R; rounded to the centre's dtype
  once on each side: rtol = that dtype's eps.
- KoLeo gradients: plus SPAN_ULPS ulps of the largest push that cancels (cancelled_push: duplicated or
  parallel rows push each other with 1 / (B (d + eps) ||x||), exactly opposite only in exact arithmetic).
- attention: the fp16 tolerance on O(1) values, its atol scaled by max(1, m / 4) for what the result is
  linear in, plus (2^-10 + SPAN_ULPS 2^-24 max|score|) x the largest term the result sums (softmax_terms):
  the fp16 roundings of P and dS, and the scores' conditioning. Infinities are compared after rounding the
  fp32 reference to fp16 (a gradient beyond 65504 is inf there).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from dinotron.kernels import (
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    attention,
    attention_varlen,
    cross_entropy,
    dino_loss,
    flash_attention,
    ibot_patch_loss,
    koleo,
    koleo_loss,
    layout,
    make_cu_seqlens,
    packed_sequences,
    reference,
    sinkhorn_knopp,
    sinkhorn_knopp_teacher,
    softmax_center,
    softmax_center_and_update_teacher,
    softmax_center_teacher,
    update_center,
)
from helpers import spy_launches

# NaN / inf inputs make numpy, under the interpreter, warn about the very values these tests compare.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# derandomize: the same examples on every run (CI reproducible); database off: nothing read or written; no
# shrinking: a failure reports the drawn example as is (shrinking interpreter runs takes minutes).
FUZZ = settings(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

U32 = 2.0 ** -24  # fp32 unit roundoff
# Module docstring: ulps of `span` in a log-probability. Measured over these examples: 1 suffices everywhere
# but KoLeo's cancelled pushes (2.2 needed); 8 leaves margin.
SPAN_ULPS = 8
SIM_TOL = 2.0 ** -16  # KoLeo: cosine similarities (|.| <= 1) of D <= 64 features summed in fp32 in another order
LOSS = dict(rtol=1e-4, atol=1e-6)  # losses and probabilities, fp32 accumulation (test_losses.py)
HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])

# ---- values ---------------------------------------------------------------------------------------

VALUE_KINDS = ("normal", "small", "huge", "ties", "duplicate_rows", "constant_rows", "neg_inf", "masked_block",
               "nan")
FINITE_KINDS = VALUE_KINDS[:6]
# Student logits: no -inf (a student's -inf logit makes every loss inf or NaN, 0 * -inf, whatever the
# backend), but a NaN.
STUDENT_KINDS = (*FINITE_KINDS, "nan")


def make_values(kind: str, shape, seed: int) -> torch.Tensor:
    """fp32 values of `shape` (..., K), rows along the last dim: 3 x N(0, 1), or
    small: 1e-3 x N(0, 1); huge: 1e4 x N(0, 1) (one-hot softmaxes, cancellation in lse - z);
    ties: integers in [-2, 2]; duplicate_rows: rows 2i and 2i+1 equal; constant_rows: each row one value;
    neg_inf: a quarter of the entries -inf; masked_block: the last half of the columns -inf in the last 80%
    of the rows (masked prototypes: every row and column keeps a finite entry when R > 1); nan: one NaN.
    The masked block trails; a leading one (a first K block or 32-row block wholly -inf, which made the
    kernels' online log-sum-exp NaN before layout.lse_pivot) has the regression tests at the end of this file."""
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = 3 * torch.randn(shape, generator=g)
    flat = x.view(-1, K)
    R = flat.shape[0]
    if kind == "small":
        x *= 1e-3 / 3
    elif kind == "huge":
        x *= 1e4 / 3
    elif kind == "ties":
        x.copy_(torch.randint(-2, 3, shape, generator=g).float())
    elif kind == "duplicate_rows":
        flat.copy_(flat[torch.arange(R) // 2].clone())
    elif kind == "constant_rows":
        flat.copy_(flat[:, :1].expand(R, K).clone())
    elif kind == "neg_inf":
        flat[torch.rand(flat.shape, generator=g) < 0.25] = -math.inf
    elif kind == "masked_block":
        flat[R - math.ceil(0.8 * R):, K - math.ceil(K / 2):] = -math.inf
    elif kind == "nan" and R:
        flat[R // 2, K // 2] = math.nan
    return x


def finite_max(*tensors) -> float:
    """The largest finite |entry| (0 if none)."""
    m = 0.0
    for t in tensors:
        t = t.detach().double()
        t = t[torch.isfinite(t)]
        if t.numel():
            m = max(m, t.abs().max().item())
    return m


# ---- layouts of V views of (B, K) ------------------------------------------------------------------

VIEW_LAYOUTS = ("tensor", "permuted", "chunks", "row_strided", "every_other_row", "transposed", "uneven", "separate")


def make_views(values: torch.Tensor, dtype, layout_: str, requires_grad: bool):
    """(leaf, arg): V views of values (V, B, K) in `dtype`, laid out as `layout_`; leaf is the one tensor
    they are views of (or copies of, for "separate"), the gradient's target. arg is what the op gets:
    tensor: (V, B, K) contiguous; permuted: a (V, B, K) view of a (B, V, K) tensor; chunks: dinov2's
    .chunk of a (V * B, K) tensor; row_strided: chunks of the first K columns of a (V * B, K + 3) tensor;
    every_other_row: views [v, ::2] of (V, 2B, K); transposed: views .t() of (V, K, B) (column stride B);
    uneven: views 0, 2, 3, ... of (V + 1, B, K) (one storage, uneven spacing for V >= 3); separate: a list of
    separate tensors."""
    V, B, K = values.shape
    v = values.to(dtype)
    if layout_ == "tensor":
        leaf = v.clone()
    elif layout_ == "permuted":
        leaf = v.transpose(0, 1).contiguous()
    elif layout_ in ("chunks", "separate"):
        leaf = v.reshape(V * B, K).clone()
    elif layout_ == "row_strided":
        leaf = torch.cat([v.reshape(V * B, K), torch.zeros(V * B, 3, dtype=dtype)], dim=1)
    elif layout_ == "every_other_row":
        leaf = torch.stack([v, torch.zeros_like(v)], dim=2).reshape(V, 2 * B, K)
    elif layout_ == "transposed":
        leaf = v.transpose(1, 2).contiguous()
    elif layout_ == "uneven":
        leaf = torch.cat([v[:1], torch.zeros_like(v[:1]), v[1:]])
    else:
        raise AssertionError(layout_)
    leaf.requires_grad_(requires_grad)
    if layout_ == "tensor":
        return leaf, leaf
    if layout_ == "permuted":
        return leaf, leaf.transpose(0, 1)
    if layout_ == "chunks":
        return leaf, leaf.chunk(V)
    if layout_ == "separate":
        return leaf, [c.clone() for c in leaf.chunk(V)]
    if layout_ == "row_strided":
        return leaf, list(leaf[:, :K].chunk(V))
    if layout_ == "every_other_row":
        return leaf, [leaf[i, ::2] for i in range(V)]
    if layout_ == "transposed":
        return leaf, [leaf[i].t() for i in range(V)]
    return leaf, [leaf[i] for i in [0, *range(2, V + 1)]]


ROW_LAYOUTS = ("contiguous", "row_strided", "transposed")


def make_rows(values: torch.Tensor, dtype, layout_: str, requires_grad: bool):
    """(leaf, arg): a (M, K) tensor: contiguous, the first K columns of (M, K + 5), or (K, M).t()."""
    M, K = values.shape
    v = values.to(dtype)
    if layout_ == "contiguous":
        leaf = v.clone().requires_grad_(requires_grad)
        return leaf, leaf
    if layout_ == "row_strided":
        leaf = torch.cat([v, torch.zeros(M, 5, dtype=dtype)], dim=1).requires_grad_(requires_grad)
        return leaf, leaf[:, :K]
    leaf = v.t().contiguous().requires_grad_(requires_grad)
    return leaf, leaf.t()


# ---- tiling and launches -----------------------------------------------------------------------------

TILINGS = st.sampled_from(["interpreter", "small"])


def set_tiling(mp: pytest.MonkeyPatch, tiling: str) -> None:
    """'small': tiles 16x below the GPU's (layout.tile(n) = n / 16: BLOCK_K 64 to 256 at K <= 300, the
    centre's BLOCK_R 1, its EMA 16 columns a program) on 132 SMs (layout.num_sms), so a row spans several K
    blocks split between programs, with a partial last block, as K = 65536 does on an H100;
    'interpreter': the interpreter's own (one block)."""
    if tiling == "small":
        for module in (cross_entropy, softmax_center, sinkhorn_knopp):
            mp.setattr(module, "tile", lambda elements: max(1, elements // 16))
        mp.setattr(layout, "num_sms", lambda device: 132)


LOSS_KERNELS = {
    "_ce_fwd_kernel": cross_entropy, "_ce_combine_kernel": cross_entropy, "_ce_bwd_kernel": cross_entropy,
    "_row_lse_kernel": softmax_center, "_center_ema_kernel": softmax_center, "_sinkhorn_kernel": sinkhorn_knopp,
}


def spy_all(mp: pytest.MonkeyPatch, kernels: dict) -> dict:
    return {name: spy_launches(mp, module, name) for name, module in kernels.items()}


def ran(launches: dict) -> set:
    """The kernels launched since the last call (then forgotten)."""
    names = {name for name, calls in launches.items() if calls}
    for calls in launches.values():
        calls.clear()
    return names


# ---- comparison ------------------------------------------------------------------------------------

def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """NaN exactly where expected has NaN, the same infinities (expected rounded to actual's dtype: a value
    beyond fp16's 65504 is inf there), finite entries within atol + rtol |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    if actual.dtype in HALF_DTYPES:
        e = torch.where(expected.detach().to(actual.dtype).isinf(), expected.detach().to(actual.dtype).double(), e)
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at {int(nan_a.sum())} entries, the reference at {int(nan_e.sum())} "
        f"(first difference at {tuple((nan_a != nan_e).nonzero()[0].tolist())})")
    inf = a.isinf() | e.isinf()
    assert torch.equal(a[inf], e[inf]), f"{what}: infinities differ: {a[inf].tolist()[:8]} vs {e[inf].tolist()[:8]}"
    both = ~(nan_a | inf)
    err, bound = (a - e).abs()[both], atol + rtol * e.abs()[both]
    if err.numel() and bool((err > bound).any()):
        i = int((err / bound).argmax())
        raise AssertionError(f"{what}: |actual - expected| = {err[i].item():.3e} > {bound[i].item():.3e} "
                             f"(expected {e[both][i].item():.6e}, actual {a[both][i].item():.6e}; "
                             f"rtol {rtol:.2e}, atol {atol:.2e})")


def grad_rtol(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2  # one bf16 ulp (2^-7) with margin for half gradients


def half_subnormal(dtype) -> float:
    """One subnormal step of a half dtype (gradients ~1e-4 x small values round there), 0 for fp32."""
    if dtype == torch.float32:
        return 0.0
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def ce_tolerances(dtype, student, student_temp, t_span, scale, weights_abs_sum, weight_max, n_student, mass_max,
                  ref_grad):
    """(loss tol, gradient tol) of the fused cross-entropy ce = sum_k P_k (lse - z_k) (module docstring):
    the student's log-probabilities lse - z_k (z = s / student_temp, lse up to max|z| + log K: z_span)
    carry delta_s = SPAN_ULPS u z_span absolute, the lazy targets P (exponents of span t_span) delta_t =
    SPAN_ULPS u t_span relative, which multiplies |lse - z| <= z_span in the loss. Per (v, b):
    |d ce| <= mass (delta_s + delta_t z_span), |d grad| <= coef mass (delta_s + 2 delta_t)."""
    K = student.shape[-1]
    z_span = 2 * finite_max(student) / student_temp + math.log(K)
    delta_s, delta_t = SPAN_ULPS * U32 * z_span, SPAN_ULPS * U32 * t_span
    per_row = mass_max * (delta_s + delta_t * z_span)
    loss = dict(rtol=LOSS["rtol"], atol=LOSS["atol"] + abs(scale) * n_student * weights_abs_sum * per_row)
    coef = abs(scale) * weight_max / student_temp
    grad = dict(rtol=grad_rtol(dtype), atol=1e-6 * finite_max(ref_grad) + coef * mass_max * (delta_s + 2 * delta_t)
                + half_subnormal(dtype))
    return loss, grad


def loss_and_grad(fn, leaf):
    loss = fn()
    if not leaf.requires_grad:
        return loss.detach(), None
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


def n_pairs(S: int, T: int, ignore_diagonal: bool) -> int:
    return S * T - (min(S, T) if ignore_diagonal else 0)


# ---- dino_loss --------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=12)
@given(S=st.integers(1, 4), T=st.integers(1, 3), B=st.integers(1, 8), K=st.integers(1, 300), dtype=DTYPES,
       s_layout=st.sampled_from(VIEW_LAYOUTS), t_layout=st.sampled_from(VIEW_LAYOUTS),
       s_kind=st.sampled_from(STUDENT_KINDS), t_kind=st.sampled_from(VALUE_KINDS), ignore_diagonal=st.booleans(),
       reduction=st.sampled_from(["sum", "mean"]), student_temp=st.sampled_from([0.1, 0.5, 1.0]),
       tiling=TILINGS, seed=st.integers(0, 2**16))
def test_dino_loss(S, T, B, K, dtype, s_layout, t_layout, s_kind, t_kind, ignore_diagonal, reduction, student_temp,
                   tiling, seed):
    """dino_loss, both pairings and reductions: teacher targets are softmaxes of the drawn values (-inf
    entries give exact zeros, NaN a NaN row), rounded to dtype."""
    assume(n_pairs(S, T, ignore_diagonal) > 0)
    leaf, student = make_views(make_values(s_kind, (S, B, K), seed), dtype, s_layout, True)
    _, teacher = make_views(torch.softmax(make_values(t_kind, (T, B, K), seed + 1), dim=-1), dtype, t_layout, False)
    kw = dict(student_temp=student_temp, ignore_diagonal=ignore_diagonal, reduction=reduction)
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        loss, grad = loss_and_grad(lambda: dino_loss(student, teacher, backend="triton", **kw), leaf)
        assert ran(launches) == {"_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_kernel"}
    ref_loss, ref_grad = loss_and_grad(lambda: dino_loss(student, teacher, backend="eager", **kw), leaf)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    scale = 1.0 / (B * (n_pairs(S, T, ignore_diagonal) if reduction == "mean" else 1))
    loss_tol, grad_tol = ce_tolerances(dtype, leaf, student_temp, 0.0, scale, B, 1.0, S, T, ref_grad)
    assert_matches(loss, ref_loss, what="loss", **loss_tol)
    assert_matches(grad, ref_grad, what="gradient", **grad_tol)


# ---- ibot_patch_loss --------------------------------------------------------------------------------

def make_masks(B: int, N: int, mask_rate: float, shape_2d: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(B, N, generator=g) < mask_rate
    if shape_2d and N % 2 == 0:
        return masks.view(B, 2, N // 2)  # (B, H, W)
    return masks


@settings(FUZZ, max_examples=12)
@given(B=st.integers(1, 6), N=st.integers(1, 12), K=st.integers(1, 300), dtype=DTYPES,
       form=st.sampled_from(["masked", "padded", "weighted", "dense"]), row_layout=st.sampled_from(ROW_LAYOUTS),
       mask_rate=st.sampled_from([0.0, 0.3, 1.0]), shape_2d=st.booleans(),
       s_kind=st.sampled_from(STUDENT_KINDS), t_kind=st.sampled_from(VALUE_KINDS),
       student_temp=st.sampled_from([0.1, 1.0]), tiling=TILINGS, seed=st.integers(0, 2**16))
def test_ibot_patch_loss(B, N, K, dtype, form, row_layout, mask_rate, shape_2d, s_kind, t_kind, student_temp, tiling,
                         seed):
    """ibot_patch_loss: masked-only rows (M = the masked count), padded with n_masked_patches (3 extra
    rows), with masks_weight (random positive weights), or dense (B, N, K) (a permuted view when
    row_layout is not contiguous); zero masked patches included (mask_rate 0)."""
    masks = make_masks(B, N, mask_rate, shape_2d, seed)
    flat = masks.flatten(1)
    M = int(flat.sum())
    kw = dict(student_temp=student_temp)
    if form == "dense":
        s_values = make_values(s_kind, (B, N, K), seed)
        t_values = torch.softmax(make_values(t_kind, (B, N, K), seed + 1), dim=-1)
        if row_layout == "contiguous":
            leaf = s_values.to(dtype).requires_grad_()
            student = leaf
        else:
            leaf = s_values.to(dtype).transpose(0, 1).contiguous().requires_grad_()
            student = leaf.transpose(0, 1)
        teacher = t_values.to(dtype)
        args, weights = (), (flat / flat.sum(1, keepdim=True).clamp(min=1)).flatten()
    else:
        rows = M + (3 if form == "padded" else 0)
        s_values = make_values(s_kind, (rows, K), seed)
        t_values = torch.softmax(make_values(t_kind, (rows, K), seed + 1), dim=-1)
        leaf, student = make_rows(s_values, dtype, row_layout, True)
        _, teacher = make_rows(t_values, dtype, ROW_LAYOUTS[(ROW_LAYOUTS.index(row_layout) + 1) % 3], False)
        default = (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat]  # dinov2's collate
        if form == "masked":
            args, weights = (), default
        elif form == "padded":
            args, weights = (M,), default
        else:
            weights = torch.rand(M, generator=torch.Generator().manual_seed(seed + 2)) + 0.1
            args = (None, weights)
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        loss, grad = loss_and_grad(lambda: ibot_patch_loss(student, teacher, masks, *args, backend="triton", **kw),
                                   leaf)
        # masked-only without a masked patch: 0 without a launch (dinov2's empty sum); dense: every row, weighted
        assert ran(launches) == ({"_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_kernel"}
                                 if M or form == "dense" else set())
    ref_loss, ref_grad = loss_and_grad(lambda: ibot_patch_loss(student, teacher, masks, *args, backend="eager", **kw),
                                       leaf)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    if M == 0 and (form != "dense" or "nan" not in (s_kind, t_kind)):  # dense: NaN * weight 0 is NaN, as dinov2
        assert loss.item() == 0.0 and not grad.any()
    w = weights.double().abs()
    loss_tol, grad_tol = ce_tolerances(dtype, student, student_temp, 0.0, 1.0 / B, float(w.sum()),
                                       float(w.max()) if w.numel() else 0.0, 1, 1.0, ref_grad)
    assert_matches(loss, ref_loss, what="loss", **loss_tol)
    assert_matches(grad, ref_grad, what="gradient", **grad_tol)


# ---- teacher targets: softmax centring, the centre, Sinkhorn-Knopp -------------------------------------

TEACHER_TEMPS = st.sampled_from([0.04, 0.1, 1.0])
MOMENTA = st.sampled_from([0.0, 0.5, 0.9, 0.996, 1.0])


def teacher_logits(values: torch.Tensor, dtype, layout_: str) -> torch.Tensor:
    """(V, B, K) values as a (V, B, K) tensor: contiguous, permuted from (B, V, K), row-strided (the first K
    columns of a wider tensor), or transposed from (V, K, B) (column stride B: the op copies it)."""
    v = values.to(dtype)
    V, B, K = v.shape
    if layout_ == "contiguous":
        return v
    if layout_ == "permuted":
        return v.transpose(0, 1).contiguous().transpose(0, 1)
    if layout_ == "row_strided":
        return torch.cat([v, torch.zeros(V, B, 2, dtype=dtype)], dim=-1)[..., :K]
    return v.transpose(1, 2).contiguous().transpose(1, 2)


def make_center(K: int, dtype, form: str, seed: int) -> torch.Tensor:
    """A centre of K elements: (1, K), (K,), (1, 1, K), or every other element of a (2K,) tensor."""
    c = torch.randn(2 * K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if form == "strided":
        return c[::2]
    return c[:K].reshape({"1K": (1, K), "K": (K,), "11K": (1, 1, K)}[form])


def softmax_span(logits, center, teacher_temp) -> float:
    """Span of softmax((x - c) / T)'s exponents: x / T, c / T and the row's lse (up to both plus log K)."""
    s = (finite_max(logits) + finite_max(center)) / teacher_temp
    return 2 * s + math.log(logits.shape[-1])


def center_tolerance(center_dtype, logits) -> dict:
    """The centre (module docstring): the mean's fp32 rounding, and one rounding to the centre's dtype."""
    return dict(rtol=max(LOSS["rtol"], torch.finfo(center_dtype).eps),
                atol=LOSS["atol"] + SPAN_ULPS * U32 * finite_max(logits))


@settings(FUZZ, max_examples=20)
@given(V=st.integers(1, 3), B=st.integers(0, 8), K=st.integers(1, 300), dtype=DTYPES,
       center_dtype=DTYPES, center_form=st.sampled_from(["1K", "K", "11K", "strided"]),
       layout_=st.sampled_from(["contiguous", "permuted", "row_strided", "transposed"]), two_d=st.booleans(),
       kind=st.sampled_from(VALUE_KINDS), teacher_temp=TEACHER_TEMPS, momentum=MOMENTA, tiling=TILINGS,
       seed=st.integers(0, 2**16))
def test_softmax_center_and_update(V, B, K, dtype, center_dtype, center_form, layout_, two_d, kind, teacher_temp,
                                   momentum, tiling, seed):
    """softmax_center_teacher, softmax_center_and_update_teacher and update_center on (B, K) or (V, B, K)
    logits (B = 0 included: no launch, the centre unchanged)."""
    logits = teacher_logits(make_values(kind, (V, B, K), seed), dtype, layout_)
    if two_d:
        logits = logits[0]
    center = make_center(K, center_dtype, center_form, seed + 1)
    rows = logits.numel() // K
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        probs = softmax_center_teacher(logits, center, teacher_temp, backend="triton")
        assert ran(launches) == ({"_row_lse_kernel"} if rows else set())
        fused_probs, fused_center = softmax_center_and_update_teacher(logits, center, teacher_temp, momentum,
                                                                      backend="triton")
        assert ran(launches) == ({"_row_lse_kernel", "_center_ema_kernel"} if rows else set())
        new_center = update_center(center, logits, momentum, backend="triton")
        assert ran(launches) == ({"_center_ema_kernel"} if rows else set())
    ref_probs = softmax_center_teacher(logits, center, teacher_temp, backend="eager")
    ref_center = update_center(center, logits, momentum, backend="eager")
    probs_tol = dict(rtol=LOSS["rtol"] + SPAN_ULPS * U32 * softmax_span(logits, center, teacher_temp),
                     atol=LOSS["atol"])
    for p in (probs, fused_probs):
        assert p.dtype == torch.float32
        assert_matches(p, ref_probs, what="probabilities", **probs_tol)
    for c in (fused_center, new_center):
        assert c.dtype == center.dtype and c.shape == center.shape
        assert_matches(c, ref_center, what="centre", **center_tolerance(center_dtype, logits))


def sinkhorn_span(logits64: torch.Tensor, teacher_temp: float, n_iterations: int) -> float:
    """Span of Sinkhorn-Knopp's exponents L - col - row (reference scalings in fp64), 2n log-sum-exps deep."""
    if logits64.shape[0] == 0:
        return 0.0
    row, col = reference.sinkhorn_knopp_scalings(logits64, teacher_temp, n_iterations)
    return 2 * n_iterations * (finite_max(logits64) / teacher_temp + finite_max(col) + finite_max(row))


@settings(FUZZ, max_examples=20)
@given(B=st.integers(0, 40), K=st.integers(1, 300), dtype=DTYPES,
       layout_=st.sampled_from(["contiguous", "row_strided", "transposed"]), kind=st.sampled_from(VALUE_KINDS),
       teacher_temp=TEACHER_TEMPS, n_iterations=st.integers(1, 4), tiling=TILINGS, seed=st.integers(0, 2**16))
def test_sinkhorn_knopp_teacher(B, K, dtype, layout_, kind, teacher_temp, n_iterations, tiling, seed):
    """sinkhorn_knopp_teacher on (B, K) logits, B up to 40: more than the column pass's 32-row block."""
    logits = teacher_logits(make_values(kind, (1, B, K), seed), dtype, layout_)[0]
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        probs = sinkhorn_knopp_teacher(logits, teacher_temp, n_iterations, backend="triton")
        assert ran(launches) == ({"_sinkhorn_kernel"} if B else set())
    expected = sinkhorn_knopp_teacher(logits, teacher_temp, n_iterations, backend="eager")
    assert probs.dtype == torch.float32
    span = sinkhorn_span(logits.double(), teacher_temp, n_iterations)
    assert_matches(probs, expected, rtol=LOSS["rtol"] + SPAN_ULPS * U32 * span, atol=LOSS["atol"],
                   what="probabilities")


# ---- the modules ----------------------------------------------------------------------------------------

def module_pair(cls, backends=("triton", "eager"), center_seed=0, **kw):
    """Two modules with one random centre (fp32 buffer), one per backend."""
    modules = [cls(backend=b, **kw) for b in backends]
    center = modules[0]._center()
    init = torch.randn(center.shape, generator=torch.Generator().manual_seed(center_seed))
    for m in modules:
        m._center().copy_(init)
    return modules


def targets_span(centering, teacher_values64, center, teacher_temp, n_iterations) -> float:
    if centering == "sinkhorn_knopp":
        return sinkhorn_span(teacher_values64.reshape(-1, teacher_values64.shape[-1]), teacher_temp, n_iterations)
    return softmax_span(teacher_values64, center, teacher_temp)


@settings(FUZZ, max_examples=10)
@given(S=st.integers(1, 4), T=st.integers(1, 3), B=st.integers(1, 8), K=st.integers(1, 300), dtype=DTYPES,
       s_layout=st.sampled_from(VIEW_LAYOUTS), t_layout=st.sampled_from(VIEW_LAYOUTS),
       s_kind=st.sampled_from(FINITE_KINDS), t_kind=st.sampled_from(VALUE_KINDS),
       centering=st.sampled_from(["softmax", "sinkhorn_knopp"]), reduction=st.sampled_from(["mean", "sum"]),
       teacher_temp=TEACHER_TEMPS, momentum=MOMENTA, n_iterations=st.integers(1, 3), tiling=TILINGS,
       seed=st.integers(0, 2**16))
def test_dino_loss_module(S, T, B, K, dtype, s_layout, t_layout, s_kind, t_kind, centering, reduction, teacher_temp,
                          momentum, n_iterations, tiling, seed):
    """DINOLoss (lightly's pairing) with softmax-centred or Sinkhorn-Knopp targets from teacher logits:
    loss, student gradient and the updated centre against the same module on the eager backend."""
    assume(n_pairs(S, T, True) > 0)
    leaf, student = make_views(make_values(s_kind, (S, B, K), seed), dtype, s_layout, True)
    t_values = make_values(t_kind, (T, B, K), seed + 1)
    _, teacher = make_views(t_values, dtype, t_layout, False)
    kw = dict(output_dim=K, teacher_temp=teacher_temp, center_momentum=momentum, centering=centering,
              sinkhorn_iterations=n_iterations, reduction=reduction)
    fused, eager = module_pair(DINOLoss, center_seed=seed, **kw)
    center = fused.center.clone()
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        loss, grad = loss_and_grad(lambda: fused(teacher, student), leaf)
        assert ran(launches) == ({"_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_kernel"}
                                 | ({"_row_lse_kernel", "_center_ema_kernel"} if centering == "softmax"
                                    else {"_sinkhorn_kernel"}))
    ref_loss, ref_grad = loss_and_grad(lambda: eager(teacher, student), leaf)
    t_span = targets_span(centering, t_values.to(dtype).double(), center, teacher_temp, n_iterations)
    scale = 1.0 / (B * (n_pairs(S, T, True) if reduction == "mean" else 1))
    loss_tol, grad_tol = ce_tolerances(dtype, leaf, fused.student_temp, t_span, scale, B, 1.0, S, T, ref_grad)
    assert_matches(loss, ref_loss, what="loss", **loss_tol)
    assert_matches(grad, ref_grad, what="gradient", **grad_tol)
    assert_matches(fused.center, eager.center, what="centre", **center_tolerance(torch.float32, t_values.to(dtype)))


@settings(FUZZ, max_examples=10)
@given(B=st.integers(1, 6), N=st.integers(1, 12), K=st.integers(1, 300), dtype=DTYPES, dense=st.booleans(),
       row_layout=st.sampled_from(ROW_LAYOUTS), mask_rate=st.sampled_from([0.0, 0.3, 1.0]), shape_2d=st.booleans(),
       s_kind=st.sampled_from(FINITE_KINDS), t_kind=st.sampled_from(VALUE_KINDS),
       centering=st.sampled_from(["softmax", "sinkhorn_knopp"]), teacher_temp=TEACHER_TEMPS, momentum=MOMENTA,
       tiling=TILINGS, seed=st.integers(0, 2**16))
def test_ibot_patch_loss_module(B, N, K, dtype, dense, row_layout, mask_rate, shape_2d, s_kind, t_kind, centering,
                                teacher_temp, momentum, tiling, seed):
    """IBOTPatchLoss on masked-only (M, K) rows or dense (B, N, K) tokens, zero masked patches included."""
    masks = make_masks(B, N, mask_rate, shape_2d, seed)
    flat = masks.flatten(1)
    M = int(flat.sum())
    shape = (B, N, K) if dense else (M, K)
    s_values, t_values = make_values(s_kind, shape, seed), make_values(t_kind, shape, seed + 1)
    if dense:
        leaf = s_values.to(dtype).requires_grad_()
        student, teacher = leaf, t_values.to(dtype)
    else:
        leaf, student = make_rows(s_values, dtype, row_layout, True)
        _, teacher = make_rows(t_values, dtype, row_layout, False)
    fused, eager = module_pair(IBOTPatchLoss, center_seed=seed, output_dim=K, teacher_temp=teacher_temp,
                               center_momentum=momentum, centering=centering)
    center = fused.center.center.clone()
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        launches = spy_all(mp, LOSS_KERNELS)
        loss, grad = loss_and_grad(lambda: fused(teacher, student, masks), leaf)
        expected = {"_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_kernel"}
        expected |= {"_row_lse_kernel", "_center_ema_kernel"} if centering == "softmax" else {"_sinkhorn_kernel"}
        assert ran(launches) == (expected if M else set())
    ref_loss, ref_grad = loss_and_grad(lambda: eager(teacher, student, masks), leaf)
    masked_t = t_values[flat] if dense else t_values
    t_span = targets_span(centering, masked_t.to(dtype).double(), center, teacher_temp, 3)
    w = (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat].double()
    loss_tol, grad_tol = ce_tolerances(dtype, s_values.to(dtype), fused.student_temp, t_span, 1.0 / B,
                                       float(w.sum()), float(w.max()) if M else 0.0, 1, 1.0, ref_grad)
    assert_matches(loss, ref_loss, what="loss", **loss_tol)
    assert_matches(grad, ref_grad, what="gradient", **grad_tol)
    assert_matches(fused.center.center, eager.center.center, what="centre",
                   **center_tolerance(torch.float32, masked_t.to(dtype)))


# ---- KoLeo ----------------------------------------------------------------------------------------------

KOLEO_KINDS = ("normal", "small", "huge", "ties", "duplicate_rows", "constant_rows")


def set_koleo_splits(mp: pytest.MonkeyPatch) -> None:
    """The search split between programs as on a 132-SM GPU, down to 16 keys a split (test_koleo's split_keys)."""
    mp.setattr(layout, "num_sms", lambda device: 132)
    mp.setattr(koleo, "_MIN_KEYS_PER_SPLIT", 16)


def cancelled_push(x: torch.Tensor, nn_idx: torch.Tensor, eps: float, p: float) -> float:
    """What rounding leaves of gradients that cancel (test_koleo.py: duplicates, parallel rows): row i's
    distance pushes i and nn(i) with 1 / (B (d_i + eps)) through the normalisation, 1 / max(||x||, eps); the
    terms cancel exactly only in exact arithmetic, leaving SPAN_ULPS fp32 ulps of the largest."""
    x64 = x.detach().double()
    norms = x64.norm(dim=-1).clamp(min=eps)
    xn = torch.nn.functional.normalize(x64, dim=-1, eps=eps)
    d = torch.nn.functional.pairwise_distance(xn, xn[nn_idx], p=p, eps=eps)
    push = 1 / (x.shape[0] * (d + eps)) * (1 / norms + 1 / norms[nn_idx])
    return SPAN_ULPS * U32 * finite_max(push)


def cosine(x: torch.Tensor, eps: float) -> torch.Tensor:
    xn = torch.nn.functional.normalize(x.detach().double(), dim=-1, eps=eps)
    return xn @ xn.t()


@settings(FUZZ, max_examples=20)
@given(B=st.integers(1, 80), D=st.integers(1, 64), dtype=DTYPES, kind=st.sampled_from(KOLEO_KINDS),
       transposed=st.booleans(), p=st.sampled_from([1.0, 2.0, 3.0]), eps=st.sampled_from([1e-8, 1e-3]),
       as_module=st.booleans(), split=st.booleans(), seed=st.integers(0, 2**16))
def test_koleo(B, D, dtype, kind, transposed, p, eps, as_module, split, seed):
    """koleo_loss / KoLeoLoss against reference.koleo_pair_loss at the kernel's neighbours, which must be
    nearest to within SIM_TOL (near-ties may pick either; exact ties the first index, as the reference)."""
    values = make_values(kind, (B, D), seed).to(dtype)
    leaf = (values.t().contiguous() if transposed else values.clone()).requires_grad_()
    x = leaf.t() if transposed else leaf

    def fn(backend):
        if as_module:
            return lambda: KoLeoLoss(p=p, eps=eps, backend=backend)(x)
        return lambda: koleo_loss(x, eps, p=p, backend=backend)

    with pytest.MonkeyPatch.context() as mp:
        if split:
            set_koleo_splits(mp)
        launches = spy_all(mp, {"_koleo_search_kernel": koleo, "_koleo_finish_kernel": koleo,
                                "_koleo_bwd_kernel": koleo})
        loss, grad = loss_and_grad(fn("triton"), leaf)
        assert {"_koleo_search_kernel", "_koleo_bwd_kernel"} <= ran(launches)
        _, nn_kernel, _ = koleo._koleo_op(x.detach(), 0, B, eps, eps, p, "triton")
    nn_kernel = nn_kernel.long()
    nn_ref = reference.koleo_neighbours(x.detach(), 0, B, eps)
    if B > 1:
        sims = cosine(x, eps)
        rows = torch.arange(B)
        assert bool((nn_kernel != rows).all()), "a row is its own neighbour"
        gap = sims[rows, nn_ref] - sims[rows, nn_kernel]
        assert bool((gap <= SIM_TOL).all()), f"neighbours not nearest: similarity gap {gap.max().item():.3e}"
    ref_loss, ref_grad = loss_and_grad(lambda: reference.koleo_pair_loss(x, 0, nn_kernel, eps, p), leaf)
    assert loss.dtype == dtype and grad.dtype == dtype
    if dtype == torch.float32:
        loss_tol = dict(rtol=1e-5, atol=1e-6)  # test_koleo.py: summation orders only
    else:
        loss_tol = dict(rtol=torch.finfo(dtype).eps, atol=1e-6)  # one rounding of the fp32 loss on each side
    assert_matches(loss, ref_loss, what="loss", **loss_tol)
    atol = 1e-6 * finite_max(ref_grad) + half_subnormal(dtype) + cancelled_push(x, nn_kernel, eps, p)
    assert_matches(grad, ref_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=atol, what="gradient")


@settings(FUZZ, max_examples=5)
@given(B=st.integers(1, 8), D=st.integers(1, 32), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_koleo_nan_gives_nan(B, D, dtype, seed):
    """NaN in x gives a NaN loss on both backends (lightly's behaviour; check_finite is off)."""
    x = make_values("nan", (B, D), seed).to(dtype)
    with pytest.MonkeyPatch.context() as mp:
        launches = spy_all(mp, {"_koleo_search_kernel": koleo})
        loss = koleo_loss(x, backend="triton")
        assert ran(launches) == {"_koleo_search_kernel"}
    assert loss.isnan() and koleo_loss(x, backend="eager").isnan()


# ---- attention --------------------------------------------------------------------------------------------

ATTN_KINDS = ("normal", "small", "huge", "ties", "duplicate_rows", "constant_rows")
ATTN_TOL = dict(atol=4e-3, rtol=1e-2)  # fp16, inputs N(0, 1) (max ~4): test_attention.py
ATTN_LAYOUTS = ("contiguous", "transposed", "packed", "mixed")


def attention_inputs(shape, kinds, layout_: str, seed: int):
    """(leaves, build): fp16 q, k (value kinds `kinds`, over 3: N(0, 1) for normal, 3e3 N(0, 1) for huge)
    and v ~ N(0, 1), as the leaves build(leaves) makes the op's q, k, v from: contiguous; transposed
    (dense: from (B, N, H, D), timm's q after its reshape; packed: from (H, T, D)); packed: timm's unbind of
    one qkv tensor, (B, N, 3, H, D) permuted (dense) or (T, 3, H, D) (packed); mixed: q contiguous,
    k transposed, v the first D of a wider last dim (the op copies them to one layout)."""
    vals = [make_values(kind, shape, seed + i) / 3 for i, kind in enumerate((*kinds, "normal"))]
    vals = [t.half() for t in vals]
    dense = len(shape) == 4
    if layout_ == "packed":
        if dense:
            leaf = torch.stack(vals, dim=2).transpose(1, 3).contiguous()  # (B, N, 3, H, D)
            return [leaf], lambda ls: ls[0].permute(2, 0, 3, 1, 4).unbind(0)
        leaf = torch.stack(vals, dim=1).contiguous()  # (T, 3, H, D)
        return [leaf], lambda ls: ls[0].unbind(1)
    forms = {"contiguous": ("c",) * 3, "transposed": ("t",) * 3}.get(layout_, ("c", "t", "w"))
    leaves, builders = [], []
    t_dims = (1, 2) if dense else (0, 1)
    for t, form in zip(vals, forms, strict=True):
        if form == "c":
            leaves.append(t.clone())
            builders.append(lambda x: x)
        elif form == "t":
            leaves.append(t.transpose(*t_dims).contiguous())
            builders.append(lambda x: x.transpose(*t_dims))
        else:
            leaves.append(torch.cat([t, torch.zeros_like(t[..., :8])], dim=-1))
            builders.append(lambda x: x[..., : shape[-1]])
    return leaves, lambda ls: tuple(b(x) for b, x in zip(builders, ls, strict=True))


def softmax_terms(q, k, v, grad_out, scale):
    """(max |score|, and the largest |term| summed into out, dq, dk, dv) in fp64, for (..., N, D) q, k, v:
    out = P v, dv = P^T dO, dq = scale dS k, dk = scale dS^T q with dS = P (dP - delta), dP = dO v^T."""
    q, k, v, do = (t.detach().double() for t in (q, k, v, grad_out))
    scores = q @ k.transpose(-2, -1) * scale
    p = torch.softmax(scores, dim=-1)
    dp = do @ v.transpose(-2, -1)
    ds = (p * (dp - (p * dp).sum(-1, keepdim=True))).abs()
    terms = (p @ v.abs(), scale * ds @ k.abs(), scale * ds.transpose(-2, -1) @ q.abs(), p.transpose(-2, -1) @ do.abs())
    return (finite_max(scores), *(finite_max(t) for t in terms))


def check_attention(fn_triton, fn_eager, leaves, build, grad_out, terms, n_bwd_launches=2):
    """fn(q, k, v) on the fp16 leaves through the kernels, against fn_eager on the fp32 upcasts: output and
    the leaves' gradients. Tolerance (module docstring): ATTN_TOL, its atol scaled by max(1, m / 4), m the
    largest |entry| of what the result is linear in (v for the output and dv, k for dq, q for dk; inputs of
    magnitude 4 being the established tolerance's), plus, relative to the largest term each result sums
    (softmax_terms), the kernels' fp16 roundings of P and dS (2^-11 each) and the scores' conditioning: scores
    up to smax carry SPAN_ULPS ulps of smax (delta), which P carries relatively."""
    leaves = [leaf.requires_grad_() for leaf in leaves]
    with pytest.MonkeyPatch.context() as mp:
        launches = spy_all(mp, {"_attn_fwd": flash_attention, "_attn_bwd": flash_attention})
        out = fn_triton(*build(leaves))
        grads = torch.autograd.grad(out, leaves, grad_out)
        assert len(launches["_attn_fwd"]) == 1 and len(launches["_attn_bwd"]) == n_bwd_launches
    up = [leaf.detach().float().requires_grad_() for leaf in leaves]
    ref_out = fn_eager(*build(up))
    ref_grads = torch.autograd.grad(ref_out, up, grad_out.float())
    assert out.dtype == torch.float16 and out.shape == ref_out.shape
    q, k, v = (max(1.0, finite_max(t) / 4) for t in build(leaves))
    s_max, t_out, t_dq, t_dk, t_dv = terms
    delta = 2.0**-10 + SPAN_ULPS * U32 * s_max
    assert_matches(out, ref_out, rtol=ATTN_TOL["rtol"], atol=ATTN_TOL["atol"] * v + delta * t_out, what="output")
    atols = [ATTN_TOL["atol"] * s + delta * t for s, t in ((k * v, t_dq), (q * v, t_dk), (v, t_dv))]
    atols = [max(atols)] if len(leaves) == 1 else atols  # one qkv leaf
    for g, r, atol in zip(grads, ref_grads, atols, strict=True):
        assert g.dtype == torch.float16
        assert_matches(g, r, rtol=ATTN_TOL["rtol"], atol=atol, what="gradient")


@settings(FUZZ, max_examples=8)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 40), D=st.sampled_from([64, 64, 128]),
       kinds=st.tuples(st.sampled_from(ATTN_KINDS), st.sampled_from(ATTN_KINDS)),
       layout_=st.sampled_from(ATTN_LAYOUTS), scale=st.sampled_from([None, 0.05, 1.0]), seed=st.integers(0, 2**16))
def test_attention(B, H, N, D, kinds, layout_, scale, seed):
    """attention on (B, H, N, D) fp16 (head dim 64 / 128, what the kernels take; bf16 needs a GPU)."""
    leaves, build = attention_inputs((B, H, N, D), kinds, layout_, seed)
    grad_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 7)).half()
    terms = softmax_terms(*build(leaves), grad_out, D**-0.5 if scale is None else scale)
    check_attention(lambda *qkv: attention(*qkv, scale=scale, backend="triton"),
                    lambda *qkv: attention(*qkv, scale=scale, backend="eager"), leaves, build, grad_out, terms)


@settings(FUZZ, max_examples=8)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0),
       extra=st.sampled_from([0, 7]), H=st.integers(1, 2), D=st.sampled_from([64, 64, 128]),
       kinds=st.tuples(st.sampled_from(ATTN_KINDS), st.sampled_from(ATTN_KINDS)),
       layout_=st.sampled_from(ATTN_LAYOUTS), offsets=st.sampled_from(["int32", "int64", "list", "packing"]),
       scale=st.sampled_from([None, 0.05, 1.0]), seed=st.integers(0, 2**16))
def test_attention_varlen(lengths, extra, H, D, kinds, layout_, offsets, scale, seed):
    """attention_varlen on packed (T, H, D) fp16: empty and one-token sequences, max_seqlen above the
    longest, offsets as int32 / int64 tensors, a list, or a packed_sequences block's PackedSequences."""
    cu, max_seqlen = make_cu_seqlens(lengths)
    max_seqlen += extra
    T = int(cu[-1])
    leaves, build = attention_inputs((T, H, D), kinds, layout_, seed)
    grad_out = torch.randn(T, H, D, generator=torch.Generator().manual_seed(seed + 7)).half()
    cu_arg = {"int32": cu, "int64": cu.long(), "list": cu.tolist()}.get(offsets)
    bounds = cu.tolist()
    scale_ = D**-0.5 if scale is None else scale
    per_sequence = [softmax_terms(*(t[a:b].transpose(0, 1) for t in (*build(leaves), grad_out)), scale_)
                    for a, b in zip(bounds, bounds[1:], strict=False)]
    terms = [max(column) for column in zip(*per_sequence, strict=True)]
    with packed_sequences(cu, max_seqlen) as packing:
        cu_arg = packing if offsets == "packing" else cu_arg
        check_attention(lambda *qkv: attention_varlen(*qkv, cu_arg, max_seqlen, scale=scale, backend="triton"),
                        lambda *qkv: attention_varlen(*qkv, cu_arg, max_seqlen, scale=scale, backend="eager"),
                        leaves, build, grad_out, terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_attention_triton_refuses_what_it_cannot_run(dtype):
    """backend="triton" raises on CPU inputs the kernels do not take (fp32, fp64; bf16 in the interpreter)
    rather than fall back; "auto" runs the reference on them."""
    q = torch.randn(1, 1, 4, 64, dtype=dtype)
    with pytest.raises(ValueError, match="triton"):
        attention(q, q, q, backend="triton")
    torch.testing.assert_close(attention(q, q, q, backend="auto"), reference.attention(q, q, q))


# ---- float64: the eager path --------------------------------------------------------------------------

@settings(FUZZ, max_examples=10)
@given(S=st.integers(1, 3), T=st.integers(1, 2), B=st.integers(1, 4), K=st.integers(1, 50),
       kind=st.sampled_from(VALUE_KINDS), seed=st.integers(0, 2**16))
def test_float64_runs_the_eager_reference(S, T, B, K, kind, seed):
    """float64 inputs: backend="triton" raises, "auto" runs the reference in float64 without a launch."""
    student = make_values(kind if kind in STUDENT_KINDS else "normal", (S, B, K), seed).double().requires_grad_()
    teacher = torch.softmax(make_values(kind, (T, B, K), seed + 1).double(), dim=-1)
    with pytest.raises(ValueError, match="float64"):
        dino_loss(student, teacher, backend="triton")
    with pytest.MonkeyPatch.context() as mp:
        launches = spy_all(mp, LOSS_KERNELS)
        loss = dino_loss(student, teacher, backend="auto")
        probs = softmax_center_teacher(teacher[0], torch.zeros(K), 0.1, backend="auto")
        assert ran(launches) == set()
    assert loss.dtype == probs.dtype == torch.float64
    expected = reference.dino_loss(student, teacher)
    assert_matches(loss, expected, rtol=1e-12, atol=0.0, what="loss")  # the same function: equal


# ---- regressions: the kernels' online log-sum-exp on a leading block wholly -inf ---------------------------
#
# Each loop keeps a running max m (start -inf) and sum s (start 0) and folds a block in with
# s * exp(m - m_new) + sum(exp(z - m_new)); while every entry so far was -inf, m_new = -inf and both terms were
# exp(-inf - -inf) = NaN, which then stayed: a row (column) whose first block (or a K split's every column) is
# wholly -inf got NaN instead of the log-sum-exp of its finite entries (found by this file's fuzzing; fixed by
# shifting by layout.lse_pivot(m_new), 0 where m_new is -inf). -inf logits are masked prototypes: dinov2's
# exp-space Sinkhorn-Knopp and torch.softmax give them probability 0 and the rest finite.


def test_sinkhorn_column_pass_with_a_leading_masked_row_block():
    """40 rows, column 0 -inf in the first 32 (a wholly -inf leading row block where the column pass's are <= 32):
    every probability NaN, the reference finite."""
    logits = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    logits[:32, 0] = -math.inf
    expected = sinkhorn_knopp_teacher(logits, 0.1, backend="eager")
    assert bool(expected.isfinite().all())
    assert bool(sinkhorn_knopp_teacher(logits, 0.1, backend="triton").isfinite().all())


def gpu_tile_sizes(mp: pytest.MonkeyPatch) -> None:
    """The GPU's tile sizes (test_losses.py's gpu_tiles) on 132 SMs."""
    for module in (cross_entropy, softmax_center, sinkhorn_knopp):
        mp.setattr(module, "tile", lambda elements: elements)
    mp.setattr(layout, "num_sms", lambda device: 132)


def test_softmax_center_with_a_leading_masked_column_block():
    """GPU tiles: the row pass's BLOCK_K is 4096 (1024 with the centre's column sums); a teacher row whose
    first 4096 of K = 5000 logits are -inf gets NaN probabilities, the reference finite ones."""
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
    logits[0, :4096] = -math.inf
    center = torch.zeros(1, 5000)
    expected = softmax_center_teacher(logits, center, 0.1, backend="eager")
    assert bool(expected.isfinite().all())
    with pytest.MonkeyPatch.context() as mp:
        gpu_tile_sizes(mp)
        assert bool(softmax_center_teacher(logits, center, 0.1, backend="triton").isfinite().all())


def test_cross_entropy_with_a_student_split_wholly_masked():
    """GPU tiles, 2 student views of one row, K = 5000 (BLOCK_K 2048, 3 splits on 132 SMs): view 0's first
    2048 logits -inf. The loss is +inf on both backends (the teacher has mass there), but the kernels' lse is
    NaN, so is the row's gradient, which the reference gives finite: -P / student_temp x scale at the
    masked logits."""
    student = torch.randn(2, 1, 5000, generator=torch.Generator().manual_seed(0))
    student[0, 0, :2048] = -math.inf
    student.requires_grad_()
    teacher = torch.softmax(torch.randn(2, 1, 5000, generator=torch.Generator().manual_seed(1)), dim=-1)
    _, expected = loss_and_grad(lambda: dino_loss(student, teacher, backend="eager"), student)
    assert bool(expected.isfinite().all())
    with pytest.MonkeyPatch.context() as mp:
        gpu_tile_sizes(mp)
        _, grad = loss_and_grad(lambda: dino_loss(student, teacher, backend="triton"), student)
    assert bool(grad.isfinite().all())
