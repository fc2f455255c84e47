"""The DINO / iBOT losses (softmax centring, Sinkhorn-Knopp, fused cross-entropy; torch.library ops running
the Triton kernels or the eager reference) against the eager reference, lightly 1.6.0's modules and
dinov2's literal formulas, and under torch.compile.

Oracles: kernels/reference.py (itself checked against hand-computed cases and loops in test_reference.py);
lightly's DINOLoss / IBOTPatchLoss / Center, called directly; dinov2's DINOLoss.forward,
iBOTPatchLoss.forward_masked and Sinkhorn-Knopp transcribed below (reference.dinov2_sinkhorn_knopp for the
latter), fed as dinov2's training loop feeds them; fp64 loops over view pairs.
Every test names the backend it runs and checks which one ran: the `launches` fixture records each
Triton kernel's launches (helpers.spy_launches), and `ran` says which kernels launched since the last
look; an eager run launches none, so a fallback cannot pass for the kernels nor the kernels for the
reference.
On CPU the kernels run in the Triton interpreter (backend="triton"); shapes stay small, but cover
K in {1000, 4096, 65536}, B in {1, 3, 64}, 2 global + {0, 2, 8} local views, fp32 and bf16. The
interpreter's tiles are 16x wider and it has one SM, so the test_gpu_tiles_* tests set the GPU's
tile sizes and SM counts: several K blocks per row, a partial last block, several splits per row.
Tolerances:
- fp32: rtol 1e-4 (probabilities, losses, gradients; atol 1e-6 x the largest gradient). The kernels
  sum in a different order than the reference; at B x K = 262144 the reference's own fp32 einsum is
  off by ~1e-5 relative against fp64 (the kernels by ~1e-7), so 1e-4 is not a free pass. Gradient
  entries are differences of terms as large as the largest gradient, hence an atol relative to it:
  measured at most 3e-8 x the largest beyond the rtol part.
- against dinov2's formulas (issue 13): rtol 1e-5 in fp32, gradients with the atol of 1e-6 x the largest
  (measured: losses within 1e-7, gradients within 3.4e-6 x the largest: sums of a few hundred terms in
  another order); in bf16 the error against a float64 evaluation of dinov2's formula is measured on
  both sides and compared (test_dinov2_bf16_error_within_dinov2s_own).
- bf16 / fp16 inputs: both sides see the same rounded values and compute in fp32, so losses keep
  the fp32 tolerance; gradients are rounded to bf16/fp16 once on each side, so two roundings of
  (nearly) equal fp32 values differ by up to one ulp, 2^-7 = 7.8e-3 relative in bf16: rtol 1e-2,
  and the fp32 atol (1e-6 x the largest; measured 1.2e-8 beyond the rtol part).
- float64 inputs run on the eager reference in float64: rtol 1e-10 against lightly in float64 (another
  order of sums of ~1e3 terms whose exponents reach 300: measured 5e-14; 1e-10 is still 1e6x below fp32's).
- torch.compile against eager: the same ops on the same inputs, so the fp32 tolerance (measured: equal).
- thresholds of single tests say their origin beside them.
"""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss

from dinotron.kernels import (
    DINOLoss,
    IBOTPatchLoss,
    cross_entropy,
    dino_loss,
    ibot_patch_loss,
    layout,
    reference,
    sinkhorn_knopp,
    sinkhorn_knopp_teacher,
    softmax_center,
    softmax_center_and_update_teacher,
    softmax_center_teacher,
    update_center,
)
from dinotron.kernels.layout import view_table
from helpers import dinov2_collate, dinov2_dino_forward, dinov2_ibot_forward, dinov2_ibot_forward_masked, spy_launches
from lowering import assert_lowers

FP32 = dict(rtol=1e-4, atol=1e-6)  # rtol: module docstring; atol: ~8 fp32 ulps (1.2e-7) of O(1) values
DINOV2 = dict(rtol=1e-5, atol=1e-6)  # fp32 against dinov2's formulas (issue 13: 1e-5 relative)
F64 = dict(rtol=1e-10, atol=1e-12)  # float64 against lightly in float64: module docstring
BACKENDS = ("triton", "eager")
LIGHTLY = dict(ignore_diagonal=True, reduction="mean")  # dino_loss with lightly's DINOLoss pairing


def grad_tol(dtype, grads, rtol=None):
    """Element-wise gradient tolerance (module docstring): rtol 1e-4 for fp32, 1e-2 (one bf16 ulp,
    2^-7, with margin) for gradients rounded to bf16/fp16; atol 1e-6 x the largest gradient."""
    scale = max(g.float().abs().max().item() for g in grads)
    if rtol is None:
        rtol = 1e-4 if dtype == torch.float32 else 1e-2
    return dict(rtol=rtol, atol=1e-6 * scale)


def make_views(S, T, B, K, dtype=torch.float32, device="cpu", teacher_logits=False):
    """S student views of (B, K) logits requiring grad, and T teacher views (probabilities, or logits)."""
    student = [(2 * torch.randn(B, K, device=device)).to(dtype).requires_grad_() for _ in range(S)]
    teacher = [3 * torch.randn(B, K, device=device) for _ in range(T)]
    if not teacher_logits:
        teacher = [torch.softmax(t, dim=-1) for t in teacher]
    return student, [t.to(dtype) for t in teacher]


def loss_and_grads(fn, student):
    loss = fn(student)
    return loss.detach(), torch.autograd.grad(loss, student)


def assert_same_loss_and_grads(actual, expected, dtype, loss_dtype=torch.float32):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == loss_dtype and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss.to(loss_dtype), **FP32)
    tol = grad_tol(dtype, ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), **tol)


def center_of(module) -> torch.Tensor:
    """A loss module's centre: DINOLoss's `center` buffer, IBOTPatchLoss's Center module's value (lightly's too)."""
    return module.center.value if isinstance(module.center, torch.nn.Module) else module.center


# ---- which backend ran ------------------------------------------------------------------------------

KERNELS = {
    "_ce_fwd_kernel": cross_entropy, "_ce_combine_kernel": cross_entropy, "_ce_bwd_kernel": cross_entropy,
    "_row_lse_kernel": softmax_center, "_center_ema_kernel": softmax_center, "_sinkhorn_kernel": sinkhorn_knopp,
}
CE_FWD = {"_ce_fwd_kernel", "_ce_combine_kernel"}  # the fused loss's forward
CE = CE_FWD | {"_ce_bwd_kernel"}  # its forward and backward
CENTERED = {"_row_lse_kernel", "_center_ema_kernel"}  # softmax centring with the centre's update
SINKHORN = {"_sinkhorn_kernel"}


@pytest.fixture
def launches(monkeypatch):
    """Every loss kernel's launches (helpers.spy_launches; the kernels still run), by kernel name."""
    return {name: spy_launches(monkeypatch, module, name) for name, module in KERNELS.items()}


def ran(launches) -> set:
    """The kernels launched since the last call (then forgotten): empty when the eager reference ran."""
    names = {name for name, calls in launches.items() if calls}
    for calls in launches.values():
        calls.clear()
    return names


def expect(backend, kernels) -> set:
    """What `ran` must give on `backend`: the kernels on "triton", nothing on "eager"."""
    return set(kernels) if backend == "triton" else set()


# ---- softmax centring and the centre update -------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((3, 1000), torch.float32), ((2, 64, 1000), torch.float32),
                                         ((2, 3, 4096), torch.bfloat16), ((1, 65536), torch.float32)])
def test_softmax_center_and_update_match_reference(launches, shape, dtype):
    K = shape[-1]
    logits = (3 * torch.randn(shape)).to(dtype)
    center = torch.randn(1, K)
    expected = reference.softmax_center_teacher(logits, center, 0.04)
    expected_center = reference.update_center(center, logits, 0.9)
    torch.testing.assert_close(softmax_center_teacher(logits, center, 0.04, backend="triton"), expected, **FP32)
    assert ran(launches) == {"_row_lse_kernel"}
    probs, new_center = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="triton")
    assert ran(launches) == CENTERED
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert new_center.shape == center.shape and new_center.dtype == center.dtype
    torch.testing.assert_close(probs, expected, **FP32)
    torch.testing.assert_close(new_center, expected_center, **FP32)
    torch.testing.assert_close(update_center(center, logits, 0.9, backend="triton"), expected_center, **FP32)
    assert ran(launches) == {"_center_ema_kernel"}
    # |z| = |logits - c| / temp reaches ~300, where fp32 spacing is 3e-5: each exp(z - lse) is off by
    # ~3e-5 relative, so the row sums by up to that; 5e-5 leaves margin
    torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=5e-5)


def test_centre_keeps_its_shape_and_dtype_and_is_not_modified(launches):
    logits = torch.randn(4, 100)
    for center in (torch.zeros(1, 1, 100), torch.randn(100).bfloat16()):
        before = center.clone()
        _, new = softmax_center_and_update_teacher(logits, center, 0.1, 0.8, backend="triton")
        assert ran(launches) == CENTERED
        assert new.shape == center.shape and new.dtype == center.dtype and torch.equal(center, before)
        torch.testing.assert_close(new, reference.update_center(center, logits, 0.8))


def test_teacher_ops_float64(launches):
    """float64 logits: backend "auto" (the default) runs the eager reference in float64; "triton" refuses them."""
    logits, center = 3 * torch.randn(6, 500, dtype=torch.float64), torch.randn(1, 500)
    probs = softmax_center_teacher(logits, center, 0.04)
    assert probs.dtype == torch.float64 and ran(launches) == set()
    # float64 on both sides, the same formula: rtol 1e-12 (measured 0)
    torch.testing.assert_close(probs, torch.softmax((logits - center.double()) / 0.04, dim=-1), rtol=1e-12, atol=0)
    probs, new = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="eager")
    assert probs.dtype == torch.float64 and new.dtype == torch.float32  # the centre keeps its dtype
    torch.testing.assert_close(new, (0.9 * center.double() + 0.1 * logits.mean(0, keepdim=True)).float())
    out = sinkhorn_knopp_teacher(logits / 10, 0.05, backend="auto")
    assert out.dtype == torch.float64 and ran(launches) == set()
    for call in (lambda: softmax_center_teacher(logits, center, 0.04, backend="triton"),
                 lambda: update_center(center, logits, backend="triton"),
                 lambda: sinkhorn_knopp_teacher(logits, 0.05, backend="triton")):
        with pytest.raises(ValueError, match="backend='triton' takes float32, float16 or bfloat16 tensors, got float64"
                           ):
            call()


# ---- Sinkhorn-Knopp -------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K,n_iterations,dtype", [(3, 1000, 3, torch.float32), (128, 4096, 3, torch.float32),
                                                    (2, 65536, 3, torch.bfloat16), (5, 100, 1, torch.float32)])
def test_sinkhorn_matches_reference_and_dinov2(launches, B, K, n_iterations, dtype):
    logits = (0.5 * torch.randn(B, K)).to(dtype)  # |logits| / temp < 88: dinov2's literal exp does not overflow
    out = sinkhorn_knopp_teacher(logits, 0.05, n_iterations, backend="triton")
    assert ran(launches) == SINKHORN
    assert out.dtype == torch.float32 and out.shape == (B, K)
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.05, n_iterations), **FP32)
    # dinov2 normalises in exp space: entries near fp32's subnormal range (1e-37 here) lose relative
    # precision (measured up to 1.7e-4), the smallest flush to 0 (atol 1e-9, a negligible probability)
    torch.testing.assert_close(out, reference.dinov2_sinkhorn_knopp(logits, 0.05, n_iterations), rtol=1e-3, atol=1e-9)


def test_sinkhorn_marginals_and_extreme_logits(launches):
    B, K = 32, 16
    logits = torch.randn(B, K)
    out = sinkhorn_knopp_teacher(logits, 1.0, backend="triton")  # 3 iterations, as dinov2
    # a row sums 16 fp32 terms: a few ulps of 1 (measured 4e-7); atol 1e-5 leaves margin
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    # not converged yet: rows are exact, columns not (measured 7e-3 relative; 1e-3 sits far above rounding)
    assert (out.sum(dim=0) - B / K).abs().max() > 1e-3 * B / K
    out = sinkhorn_knopp_teacher(logits, 1.0, n_iterations=10, backend="triton")
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((K,), B / K), rtol=1e-5, atol=0)  # measured 5e-7
    # logits whose exp overflows fp32 (dinov2's literal form gives inf/nan) stay finite in log-space
    logits = 50 * torch.randn(16, 32)
    out = sinkhorn_knopp_teacher(logits, 0.04, backend="triton")
    assert torch.isfinite(out).all() and not torch.isfinite(reference.dinov2_sinkhorn_knopp(logits, 0.04)).all()
    # |logits| / temp reaches ~4200, where fp32 spacing is 4.9e-4: the exponents, hence the probabilities
    # (relatively), carry ~5e-4 of rounding on either side; atol for the small ones (measured 6e-5)
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.04), rtol=1e-3, atol=1e-4)
    assert ran(launches) == SINKHORN




@pytest.mark.parametrize("B,K,n_iterations", [(32, 16, 3), (8, 1000, 30)])
def test_sinkhorn_fp32_error_does_not_grow_with_iterations(launches, B, K, n_iterations):
    """The kernels against dinov2's Sinkhorn-Knopp in float64 on the same fp32 values. |logits| / temp < 15:
    each exponent carries ~1e-6 of fp32 rounding (measured 3e-6 with normalised scalings, at any iteration
    count): rtol 1e-5. Scaling vectors that drift by log(K / B) per iteration (140 after 30 at B=8, K=1000)
    cancel in exp(L - col - row) only to fp32's spacing at their size, and fail it (measured 3e-5)."""
    logits = torch.randn(B, K)
    out = sinkhorn_knopp_teacher(logits, 0.3, n_iterations, backend="triton")
    assert ran(launches) == SINKHORN
    expected = reference.dinov2_sinkhorn_knopp(logits.double(), 0.3, n_iterations)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


# ---- dino_loss ------------------------------------------------------------------------------------



def dino_double_loop_fp64(student, teacher, student_temp, ignore_diagonal=False, reduction="sum"):
    """-mean_b sum_k t log_softmax(s / temp) per (s, t) pair (same-index pairs skipped if ignore_diagonal),
    summed or averaged over the pairs, in float64."""
    terms = [-(t.double() * F.log_softmax(s.double() / student_temp, dim=-1)).sum(-1).mean()
             for i, s in enumerate(student) for j, t in enumerate(teacher) if not (ignore_diagonal and i == j)]
    total = torch.stack(terms)
    return total.mean() if reduction == "mean" else total.sum()


PAIRINGS = {"dinov2": {}, "lightly": LIGHTLY}


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("K,B,n_local,dtype", [
    (1000, 3, 0, torch.float32), (1000, 64, 2, torch.bfloat16), (4096, 1, 2, torch.float16),
    (4096, 3, 8, torch.float32), (65536, 1, 8, torch.float32), (65536, 3, 0, torch.bfloat16),
])
def test_dino_loss_matches_reference(launches, pairing, K, B, n_local, dtype):
    kwargs = PAIRINGS[pairing]
    student, teacher = make_views(2 + n_local, 2, B, K, dtype)
    actual = loss_and_grads(lambda s: dino_loss(s, teacher, student_temp=0.1, backend="triton", **kwargs), student)
    assert ran(launches) == CE
    expected = loss_and_grads(lambda s: reference.dino_loss(s, teacher, student_temp=0.1, **kwargs), student)
    assert_same_loss_and_grads(actual, expected, dtype)
    # the kernel's blockwise fp32 sums are within 1e-6 of fp64 (the reference's einsum: ~1e-5 at B x K ~ 1e5)
    exact = dino_double_loop_fp64(student, teacher, 0.1, **kwargs)
    assert actual[0].item() == pytest.approx(exact.item(), rel=1e-6)


def assert_dino_loss_forms_and_pairings_match(device="cpu", dtype=torch.float32, launches=None):
    """Every input form (stacked, chunked, unaligned, reversed, repeated, transposed and separate views)
    and pairing (S < T, one global view; dinov2's and lightly's) against the reference. Views evenly spaced
    in one storage are read in place (the view table's base is the caller's memory, and so is the kernel's
    student pointer when `launches` records it); other views are stacked into one copy."""
    student, teacher = make_views(4, 2, 3, 1000, dtype, device)
    storages = {s.untyped_storage().data_ptr() for s in student}

    # one (S, B, K) tensor (gradient as one tensor) and a (T, B, K) teacher
    expected = loss_and_grads(lambda s: reference.dino_loss(s, teacher, student_temp=0.1), student)
    stacked = torch.stack(student).detach().requires_grad_()
    loss, (grad,) = loss_and_grads(lambda s: dino_loss(s[0], torch.stack(teacher), backend="triton"), [stacked])
    assert grad.shape == stacked.shape
    assert_same_loss_and_grads((loss, grad.unbind(0)), expected, dtype)
    if launches is not None:
        assert ran(launches) == CE

    # views chunked from one tensor: evenly spaced in one storage, read in place, B * K elements apart
    joined = torch.cat(student).detach().requires_grad_()
    table = view_table(list(joined.chunk(4)))
    assert table.base.data_ptr() == joined.data_ptr() and (table.n_views, table.view_stride, table.row_stride) == (
        4, 3000, 1000)
    # the same chunks in reverse order: evenly spaced too (a negative view stride), in place
    reverse = view_table(list(joined.chunk(4))[::-1])
    assert reverse.base.data_ptr() == joined[9:].data_ptr() and reverse.view_stride == -3000
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3]):  # the last one unevenly spaced: stacked
        loss, (grad,) = loss_and_grads(
            lambda s, order=order: dino_loss([s[0].chunk(4)[i] for i in order], teacher, backend="triton"), [joined])
        reordered = loss_and_grads(lambda s: reference.dino_loss(s, teacher, student_temp=0.1),
                                   [student[i] for i in order])
        assert_same_loss_and_grads((loss, [grad.chunk(4)[i] for i in order]), reordered, dtype)
        if launches is not None:
            pointers = {p.data_ptr() for p in launches["_ce_fwd_kernel"].arg("S_PTR")}
            in_place = order != [0, 2, 1, 3]
            assert (pointers == {joined.chunk(4)[order[0]].data_ptr()}) == in_place, (order, pointers)
            assert ran(launches) == CE
    assert view_table([joined.chunk(4)[i] for i in (0, 2, 1, 3)]).base.untyped_storage().data_ptr() != (
        joined.untyped_storage().data_ptr())

    # views 1001 elements apart at odd offsets (not 16-byte aligned), rows 4005 apart: in place too
    padded = torch.zeros(3, 1 + 4 * 1001, dtype=dtype, device=device)
    unaligned = []
    for i, s in enumerate(student):
        padded[:, 1 + 1001 * i: 1001 * (i + 1)] = s.detach()
        unaligned.append(padded[:, 1 + 1001 * i: 1001 * (i + 1)].detach().requires_grad_())
    table = view_table(unaligned)
    assert table.base.data_ptr() == unaligned[0].data_ptr() and (table.view_stride, table.row_stride) == (1001, 4005)
    # views of transposed tensors (column stride 3) and views in separate allocations: stacked (one copy)
    transposed = [s.detach().t().contiguous().t().requires_grad_() for s in student]
    assert transposed[0].stride() == (1, 3)
    for views in (transposed, student):
        table = view_table(views)
        assert table.base.untyped_storage().data_ptr() not in storages | {
            v.untyped_storage().data_ptr() for v in views}
        assert (table.n_views, table.view_stride, table.row_stride) == (4, 3000, 1000)
    # one view passed twice: evenly spaced with a view stride of 0, in place; its gradient sums both uses
    repeated = student[0].detach().requires_grad_()
    assert view_table([repeated, repeated]).view_stride == 0
    repeated_expected = loss_and_grads(lambda s: reference.dino_loss([s[0], s[0]], teacher), [repeated])
    for views, expected_views, in_place in ((unaligned, expected, True), (transposed, expected, False),
                                            ([repeated, repeated], repeated_expected, True)):
        unique = list({id(v): v for v in views}.values())
        actual = loss_and_grads(lambda s, views=views: dino_loss(views, teacher, backend="triton"), unique)
        assert_same_loss_and_grads(actual, expected_views, dtype)
        if launches is not None:
            pointers = {p.data_ptr() for p in launches["_ce_fwd_kernel"].arg("S_PTR")}
            assert (pointers == {views[0].data_ptr()}) == in_place, pointers
            assert ran(launches) == CE

    # more teacher views than student views, and one global view; both pairings (lightly's: student
    # view 0 pairs with no teacher view when T = 1)
    for S, T in [(2, 3), (5, 1)]:
        student, teacher = make_views(S, T, 3, 100, dtype, device)
        for kwargs in PAIRINGS.values():
            assert_same_loss_and_grads(
                loss_and_grads(lambda s: dino_loss(s, teacher, student_temp=0.07, backend="triton", **kwargs),
                               student),
                loss_and_grads(lambda s: reference.dino_loss(s, teacher, student_temp=0.07, **kwargs), student),
                dtype,
            )
            if launches is not None:
                assert ran(launches) == CE


def test_dino_loss_forms_and_pairings(launches):
    assert_dino_loss_forms_and_pairings_match(launches=launches)


def test_dino_loss_scales_with_the_upstream_gradient(launches):
    student, teacher = make_views(3, 2, 2, 300)
    _, grads = loss_and_grads(lambda s: 3.0 * dino_loss(s, teacher, backend="triton"), student)
    assert ran(launches) == CE
    _, ref_grads = loss_and_grads(lambda s: 3.0 * reference.dino_loss(s, teacher), student)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **grad_tol(torch.float32, ref_grads))


# ---- ibot_patch_loss ------------------------------------------------------------------------------







def ibot_inputs(B, N, K, dtype=torch.float32):
    masks = torch.rand(B, N) < 0.4
    masks[0, 0] = True
    masks[-1] = False  # an image without masked patches counts in the batch mean
    student = (2 * torch.randn(B, N, K)).to(dtype)
    teacher = torch.softmax(3 * torch.randn(B, N, K), dim=-1).to(dtype)
    return student, teacher, masks


@pytest.mark.parametrize(
    "B,N,K,dtype", [(3, 16, 1000, torch.float32), (4, 9, 4096, torch.bfloat16), (2, 4, 65536, torch.float32)]
)
def test_ibot_patch_loss_matches_reference(launches, B, N, K, dtype):
    student, teacher, masks = ibot_inputs(B, N, K, dtype)
    s, t = student[masks].requires_grad_(), teacher[masks]
    actual = loss_and_grads(lambda x: ibot_patch_loss(x[0], t, masks, student_temp=0.1, backend="triton"), [s])
    assert ran(launches) == CE
    assert_same_loss_and_grads(
        actual, loss_and_grads(lambda x: reference.ibot_patch_loss(x[0], t, masks, student_temp=0.1), [s]), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_patch_loss_padded_rows_and_weights(launches, backend):
    """dinov2's forward_masked arguments: rows padded to upperbound of which the first n_masked_patches count
    (their gradient is 0), masks_weight given or defaulted, or replaced by other weights."""
    _, _, masks = ibot_inputs(4, 12, 300)
    _, n, weight, upperbound = dinov2_collate(masks)
    student = (2 * torch.randn(upperbound, 300)).requires_grad_()
    teacher = torch.softmax(3 * torch.randn(upperbound, 300), dim=-1)
    other = 3 * torch.rand(n)
    for w in (weight, None, other):
        actual = loss_and_grads(lambda x, w=w: ibot_patch_loss(x[0], teacher, masks, n, w, backend=backend), [student])
        assert ran(launches) == expect(backend, CE)
        expected = loss_and_grads(lambda x, w=w: dinov2_ibot_forward_masked(x[0], teacher, masks, n, w), [student])
        assert_same_loss_and_grads(actual, expected, torch.float32)
        assert torch.equal(actual[1][0][n:], torch.zeros(upperbound - n, 300))
    if backend == "triton":
        ibot_patch_loss(student, teacher, masks, n, weight, backend=backend)
        assert launches["_ce_combine_kernel"].arg("HAS_WEIGHT") == [True]
        assert [s.shape for s in launches["_ce_fwd_kernel"].arg("S_PTR")] == [(n, 300)]  # the padding is not read


def test_ibot_patch_loss_dense_and_spatial_masks(launches):
    student, teacher, masks = ibot_inputs(3, 16, 200)
    dense = student.requires_grad_()
    expected = loss_and_grads(lambda x: dinov2_ibot_forward(x[0], teacher, masks), [dense])
    spatial = masks.reshape(3, 4, 4)
    actual = loss_and_grads(lambda x: ibot_patch_loss(x[0], teacher, spatial, backend="triton"), [dense])
    assert ran(launches) == CE
    assert_same_loss_and_grads(actual, expected, torch.float32)
    # no masked patch in the whole batch: the loss is 0, as dinov2's
    none = torch.zeros(3, 16, dtype=torch.bool)
    loss = ibot_patch_loss(torch.randn(0, 200), torch.randn(0, 200), none, backend="triton")
    assert loss.item() == 0.0 == dinov2_ibot_forward_masked(torch.randn(0, 200), torch.randn(0, 200), none).item()


# ---- dinov2's training loop (issue 13b) ---------------------------------------------------------------
# ssl_meta_arch.forward_backward calls DINOLoss.forward twice and iBOTPatchLoss.forward_masked once:
#   dino_loss(student_local_cls_tokens_after_head.chunk(n_local_crops), teacher_dino_softmaxed_centered_list)
#   dino_loss([student_global_cls_tokens_after_head], [teacher_dino_softmaxed_centered_list.flatten(0, 1)])
#   ibot_patch_loss.forward_masked(student_global_masked_patch_tokens_after_head,
#       masked_teacher_ibot_softmaxed_centered, student_masks_flat=masks, n_masked_patches=n_masked_patches,
#       masks_weight=masks_weight)
# teacher_dino_softmaxed_centered_list is (2, B, K), the teacher's crops swapped ("A is matched to B").

def dinov2_step(B=4, n_local=3, K=500, N=16, dtype=torch.float32):
    """The losses' inputs of one dinov2 step, made in fp32 and rounded to `dtype`: student local (n_local * B, K)
    and global (2B, K) cls logits, the swapped teacher probabilities (2, B, K), masks (2B, N), the collate's
    extras and the padded (upperbound, K) masked-patch student logits and teacher probabilities."""
    local = (2 * torch.randn(n_local * B, K)).to(dtype).requires_grad_()
    glob = (2 * torch.randn(2 * B, K)).to(dtype).requires_grad_()
    by_crop = torch.softmax(3 * torch.randn(2, B, K), dim=-1)
    teacher = torch.stack((by_crop[1], by_crop[0])).to(dtype)
    masks = torch.rand(2 * B, N) < 0.3
    masks[0, :2] = True
    masks[1] = False
    _, n, weight, upperbound = dinov2_collate(masks)
    patches = torch.zeros(upperbound, K, dtype=dtype)  # dinov2's buffer_tensor_patch_tokens, after the head
    patches[:n] = (2 * torch.randn(n, K)).to(dtype)
    patches.requires_grad_()
    patch_targets = torch.zeros(upperbound, K, dtype=dtype)
    patch_targets[:n] = torch.softmax(3 * torch.randn(n, K), dim=-1).to(dtype)
    return dict(local=local, glob=glob, teacher=teacher, masks=masks, n=n, weight=weight, patches=patches,
                patch_targets=patch_targets, n_local=n_local)


def dinov2_losses(step, dino, ibot):
    """The three losses as ssl_meta_arch calls them, with `dino` / `ibot` dinov2's functions or dinotron's."""
    n = step["n"]
    return {
        "local": dino(step["local"].chunk(step["n_local"]), step["teacher"]),
        "global": dino([step["glob"]], [step["teacher"].flatten(0, 1)]),
        # dinov2 slices the head's output to the masked rows ...
        "ibot": ibot(step["patches"][:n], step["patch_targets"][:n], step["masks"], n, step["weight"]),
        # ... which forward_masked also does for padded rows
        "ibot_padded": ibot(step["patches"], step["patch_targets"], step["masks"], n, step["weight"]),
        "ibot_default_weight": ibot(step["patches"][:n], step["patch_targets"][:n], step["masks"], n, None),
    }


def dinotron_dino(backend):
    return lambda student, teacher: dino_loss(student_output_list=student, teacher_out_softmaxed_centered_list=teacher,
                                              backend=backend)


def dinotron_ibot(backend):
    def ibot(s, t, masks, n, masks_weight):
        if masks_weight is None:  # the positional call
            return ibot_patch_loss(s, t, masks, n, backend=backend)
        return ibot_patch_loss(s, t, student_masks_flat=masks, n_masked_patches=n, masks_weight=masks_weight,
                               backend=backend)
    return ibot


def dinov2_ibot(s, t, masks, n, masks_weight):
    return dinov2_ibot_forward_masked(s, t, masks, n_masked_patches=n, masks_weight=masks_weight)


def step_inputs(step):
    return [step["local"], step["glob"], step["patches"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_training_loop_calls_fp32(launches, backend):
    """dinotron's dinov2-named functions, called as ssl_meta_arch calls dinov2's, equal dinov2's formulas:
    each loss and its gradients, and the step's total (dinov2's scales) with its gradients, within 1e-5."""
    step = dinov2_step()
    ours = dinov2_losses(step, dinotron_dino(backend), dinotron_ibot(backend))
    assert ran(launches) == expect(backend, CE_FWD)
    theirs = dinov2_losses(step, dinov2_dino_forward, dinov2_ibot)
    inputs = step_inputs(step)
    for name in ours:
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], theirs[name], **DINOV2)
        grads = torch.autograd.grad(ours[name], inputs, allow_unused=True, materialize_grads=True, retain_graph=True)
        expected = torch.autograd.grad(theirs[name], inputs, allow_unused=True, materialize_grads=True,
                                       retain_graph=True)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, **grad_tol(torch.float32, expected, rtol=1e-5))
    assert ran(launches) == expect(backend, {"_ce_bwd_kernel"})

    def total(losses):  # forward_backward's loss_accumulator with n_global_crops = 2, ibot_loss_scale = 1 / 2
        n_terms = (2 - 1) * 2 + max(step["n_local"] * 2, 1)
        return losses["local"] / n_terms + losses["global"] * 2 / n_terms + losses["ibot"] * 2 * 0.5

    ours_total, theirs_total = total(ours), total(theirs)
    torch.testing.assert_close(ours_total, theirs_total, **DINOV2)
    grads, expected = torch.autograd.grad(ours_total, inputs), torch.autograd.grad(theirs_total, inputs)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **grad_tol(torch.float32, expected, rtol=1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_bf16_error_within_dinov2s_own(launches, backend):
    """bf16 student logits and teacher probabilities, as a bf16 autocast step makes them. Each loss's error and
    its gradients' against dinov2's formula in float64 on the same bf16 values: dinotron reads the bf16 values
    and computes in fp32, rounding only its result (the gradient to bf16 once; the loss stays fp32), while
    dinov2's formula rounds the log-probabilities, their products and the sums to bf16. So dinotron's error
    is at most dinov2's own; the factor 2 covers an element where dinov2's roundings happen to cancel while
    ours sits at a bf16 ulp (the interpreter truncates to bf16, a GPU rounds to nearest). Measured: losses
    off by < 1e-7 relative (dinov2's bf16: 1e-4 to 4e-4), gradients' largest error 0.05x to 0.4x dinov2's. The loss
    must also keep the fp32 tolerance against float64."""
    step = dinov2_step(dtype=torch.bfloat16)
    ours = dinov2_losses(step, dinotron_dino(backend), dinotron_ibot(backend))
    dinov2_bf16 = dinov2_losses(step, dinov2_dino_forward, dinov2_ibot)
    inputs = step_inputs(step)
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    exact_step = {**step, **dict(zip(("local", "glob", "patches"), exact_inputs, strict=True)),
                  "teacher": step["teacher"].double(), "patch_targets": step["patch_targets"].double(),
                  "weight": step["weight"].double()}
    exact = dinov2_losses(exact_step, dinov2_dino_forward, dinov2_ibot)
    for name in ours:
        assert ours[name].dtype == torch.float32
        ours_error = (ours[name].double() - exact[name]).abs().item()
        dinov2_error = (dinov2_bf16[name].double() - exact[name]).abs().item()
        assert ours_error <= 2 * dinov2_error, (name, ours_error, dinov2_error)
        torch.testing.assert_close(ours[name].double(), exact[name].detach(), **FP32)
        grads = torch.autograd.grad(ours[name], inputs, allow_unused=True, materialize_grads=True)
        grads_dinov2 = torch.autograd.grad(dinov2_bf16[name], inputs, allow_unused=True, materialize_grads=True)
        grads_exact = torch.autograd.grad(exact[name], exact_inputs, allow_unused=True, materialize_grads=True)
        for g, g_dinov2, e in zip(grads, grads_dinov2, grads_exact, strict=True):
            assert g.dtype == torch.bfloat16
            ours_error, dinov2_error = ((x.double() - e).abs().max().item() for x in (g, g_dinov2))
            assert ours_error <= 2 * dinov2_error, (name, ours_error, dinov2_error)
    assert ran(launches) == expect(backend, CE)


# ---- the drop-in modules against lightly 1.6.0 (issue 13a) ----------------------------------------

# lightly's temperature arguments, one per step: an explicit teacher_temp, the warm-up schedule at an epoch
# (inside it and past its end), teacher_temp overriding epoch, the constructor's
DINO_STEPS = ({"teacher_temp": 0.07}, {"epoch": 3}, {"epoch": 12}, {"teacher_temp": 0.06, "epoch": 3}, {})
WARMUP = dict(warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,B,n_local", [(1000, 3, 2), (4096, 1, 8), (65536, 1, 0)])
def test_dino_module_matches_lightly(launches, backend, K, B, n_local):
    """Five steps (the centre moves; backward runs after forward updated it), with each of lightly's
    temperature arguments."""
    ours, theirs = DINOLoss(K, **WARMUP, backend=backend), LightlyDINOLoss(K, **WARMUP)
    for kwargs in DINO_STEPS:
        student, teacher = make_views(2 + n_local, 2, B, K, teacher_logits=True)
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: ours(teacher, s, **kwargs), student),
            loss_and_grads(lambda s: theirs(teacher, s, **kwargs), student),
            torch.float32,
        )
        assert ran(launches) == expect(backend, CE | CENTERED)
        assert ours.center.shape == theirs.center.shape == (1, 1, K)
        torch.testing.assert_close(ours.center, theirs.center, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_module_update_center_matches_lightly(launches, backend):
    """lightly's update_center(teacher_out): a (V, B, K) tensor (lightly's argument) or a list of views; then a
    step from the moved centre."""
    K = 500
    ours, theirs = DINOLoss(K, backend=backend), LightlyDINOLoss(K)
    for _ in range(2):
        teacher = 3 * torch.randn(2, 4, K)
        ours.update_center(teacher)
        theirs.update_center(teacher)
        assert ran(launches) == expect(backend, {"_center_ema_kernel"})
        torch.testing.assert_close(ours.center, theirs.center, **FP32)
    views = list(3 * torch.randn(2, 4, K))
    ours.update_center(views)
    theirs.update_center(torch.stack(views))
    torch.testing.assert_close(ours.center, theirs.center, **FP32)
    student, teacher = make_views(4, 2, 4, K, teacher_logits=True)
    assert_same_loss_and_grads(loss_and_grads(lambda s: ours(teacher, s), student),
                               loss_and_grads(lambda s: theirs(teacher, s), student), torch.float32)
    torch.testing.assert_close(ours.center, theirs.center, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_bf16_and_stacked_views(launches, backend):
    """bf16 inputs (DINOLoss's teacher as one (T, B, K) tensor) against lightly on the same values upcast to
    fp32 (lightly's DINOLoss cannot take bf16: its einsum mixes the fp32 teacher softmax with the bf16 student):
    both compute in fp32 from identical inputs, so the file's bf16 tolerance holds."""
    K, B = 4096, 3
    ours, theirs = DINOLoss(K, backend=backend), LightlyDINOLoss(K)
    for _ in range(2):
        student16, teacher16 = make_views(4, 2, B, K, torch.bfloat16, teacher_logits=True)
        student = [s.detach().float().requires_grad_() for s in student16]
        expected = loss_and_grads(lambda s: theirs([t.float() for t in teacher16], s), student)
        actual = loss_and_grads(lambda s: ours(torch.stack(teacher16), s), student16)
        assert ran(launches) == expect(backend, CE | CENTERED)
        assert_same_loss_and_grads(actual, expected, torch.bfloat16)
        torch.testing.assert_close(ours.center, theirs.center, **FP32)
    ours, theirs = IBOTPatchLoss(K, backend=backend), LightlyIBOTPatchLoss(K)
    masks = torch.rand(3, 2, 2) < 0.5
    masks[0, 0, 0] = True
    M = int(masks.sum())
    for _ in range(2):
        student16 = (2 * torch.randn(M, K)).bfloat16().requires_grad_()
        teacher16 = (3 * torch.randn(M, K)).bfloat16()
        student = student16.detach().float().requires_grad_()
        expected = loss_and_grads(lambda s: theirs(teacher16.float(), s[0], masks), [student])
        actual = loss_and_grads(lambda s: ours(teacher16, s[0], masks), [student16])
        assert ran(launches) == expect(backend, CE | CENTERED)
        assert_same_loss_and_grads(actual, expected, torch.bfloat16)
        torch.testing.assert_close(center_of(ours), center_of(theirs), **FP32)


# float64 steps use temperatures exact in fp32: lightly divides by torch.tensor(teacher_temp), an fp32 scalar
# (0.07 becomes 0.07000000030), dinotron by the Python float; at logits / temp ~ 300 the two would differ by
# 1e-6, far above float64's tolerance
WARMUP_64 = dict(warmup_teacher_temp=0.03125, teacher_temp=0.0625, warmup_teacher_temp_epochs=5)
DINO_STEPS_64 = ({"teacher_temp": 0.046875}, {"epoch": 2}, {})


@pytest.mark.parametrize("backend", [*BACKENDS, None])
def test_modules_float64_match_lightly(launches, backend):
    """Modules and inputs in float64 (.double(), as lightly's float64 use): the eager reference computes in
    float64, with backend "eager" or the default ("auto"); backend "triton" refuses float64."""
    K = 300
    ours, theirs = DINOLoss(K, **WARMUP_64, backend=backend).double(), LightlyDINOLoss(K, **WARMUP_64).double()
    ours_ibot = IBOTPatchLoss(K, teacher_temp=0.0625, backend=backend).double()
    theirs_ibot = LightlyIBOTPatchLoss(K, teacher_temp=0.0625).double()
    masks = torch.rand(4, 3, 3) < 0.4
    masks[0, 0, 0] = True
    M = int(masks.sum())
    for kwargs in DINO_STEPS_64:
        student, teacher = make_views(4, 2, 3, K, torch.float64, teacher_logits=True)
        patches, patch_teacher = (3 * torch.randn(M, K, dtype=torch.float64)).requires_grad_(), 3 * torch.randn(
            M, K, dtype=torch.float64)
        if backend == "triton":
            with pytest.raises(ValueError, match="backend='triton' takes float32, float16 or bfloat16 tensors"):
                ours(teacher, student, **kwargs)
            with pytest.raises(ValueError, match="backend='triton' takes float32, float16 or bfloat16 tensors"):
                ours_ibot(patch_teacher, patches, masks)
            return
        loss, grads = loss_and_grads(lambda s: ours(teacher, s, **kwargs), student)
        expected, expected_grads = loss_and_grads(lambda s: theirs(teacher, s, **kwargs), student)
        assert loss.dtype == torch.float64 and ours.center.dtype == torch.float64
        torch.testing.assert_close(loss, expected, **F64)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, **F64)
        torch.testing.assert_close(ours.center, theirs.center, **F64)
        temp = {"teacher_temp": kwargs["teacher_temp"]} if "teacher_temp" in kwargs else {}  # iBOT has no epoch
        loss, (grad,) = loss_and_grads(lambda s: ours_ibot(patch_teacher, s[0], masks, **temp), [patches])
        expected, (expected_grad,) = loss_and_grads(lambda s: theirs_ibot(patch_teacher, s[0], masks, **temp),
                                                    [patches])
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected, **F64)
        torch.testing.assert_close(grad, expected_grad, **F64)
        torch.testing.assert_close(center_of(ours_ibot), center_of(theirs_ibot), **F64)
        assert ran(launches) == set()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # NaN in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_nan_in_nan_out_as_lightly(launches, backend):
    """A NaN student logit makes the loss NaN and leaves the centre alone; a NaN teacher logit makes the loss
    and its column of the centre NaN: as lightly, with the default check_finite=False (no error, no sync)."""
    K = 64
    ours, theirs = DINOLoss(K, backend=backend), LightlyDINOLoss(K)
    ours_ibot, theirs_ibot = IBOTPatchLoss(K, backend=backend), LightlyIBOTPatchLoss(K)
    masks = torch.ones(2, 1, 2, dtype=torch.bool)
    for bad in ("student", "teacher"):
        student, teacher = make_views(3, 2, 2, K, teacher_logits=True)
        patches, patch_teacher = 2 * torch.randn(4, K), 3 * torch.randn(4, K)
        with torch.no_grad():
            (student[2] if bad == "student" else teacher[1])[1, 5] = math.nan
            (patches if bad == "student" else patch_teacher)[2, 5] = math.nan
        for module, oracle in ((ours, theirs), (ours_ibot, theirs_ibot)):
            args = (teacher, student) if module is ours else (patch_teacher, patches, masks)
            loss, expected = module(*args), oracle(*args)
            assert torch.isnan(loss) and torch.isnan(expected)
            torch.testing.assert_close(center_of(module), center_of(oracle), equal_nan=True, **FP32)
            assert torch.isnan(center_of(module)).any() == (bad == "teacher")
        assert ran(launches) == expect(backend, CE_FWD | CENTERED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_teacher_gradient_matches_lightly(launches, backend):
    """lightly back-propagates through the teacher's softmax when teacher_out requires grad: dinotron's
    modules then run the loss on the eager reference in autograd (the fused op gives the student its
    gradient only) and the centre update on `backend`; the teacher's and the student's gradients and the
    centre equal lightly's."""
    K = 200
    ours, theirs = DINOLoss(K, backend=backend), LightlyDINOLoss(K)
    for kwargs in ({}, {"epoch": 2}):
        student, teacher = make_views(4, 2, 3, K, teacher_logits=True)
        teacher = [t.requires_grad_() for t in teacher]
        inputs = [*teacher, *student]
        loss, grads = loss_and_grads(lambda x: ours(x[:2], x[2:], **kwargs), inputs)
        assert ran(launches) == expect(backend, {"_center_ema_kernel"})
        expected = loss_and_grads(lambda x: theirs(x[:2], x[2:], **kwargs), inputs)
        assert expected[1][0].abs().max() > 0
        assert_same_loss_and_grads((loss, grads), expected, torch.float32)
        torch.testing.assert_close(ours.center, theirs.center, **FP32)
    ours, theirs = IBOTPatchLoss(K, backend=backend), LightlyIBOTPatchLoss(K)
    masks = torch.rand(3, 2, 2) < 0.5
    masks[0, 0, 0] = True
    M = int(masks.sum())
    for temp in ({}, {"teacher_temp": 0.07}):
        inputs = [(3 * torch.randn(M, K)).requires_grad_(), (2 * torch.randn(M, K)).requires_grad_()]
        loss, grads = loss_and_grads(lambda x: ours(x[0], x[1], masks, **temp), inputs)
        assert ran(launches) == expect(backend, {"_center_ema_kernel"})
        expected = loss_and_grads(lambda x: theirs(x[0], x[1], masks, **temp), inputs)
        assert_same_loss_and_grads((loss, grads), expected, torch.float32)
        torch.testing.assert_close(center_of(ours), center_of(theirs), **FP32)
    # with grad disabled the teacher's requires_grad does not matter: the fused op runs
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs[0], inputs[1], masks), theirs(inputs[0], inputs[1], masks), **FP32)
    assert ran(launches) == expect(backend, CE_FWD | CENTERED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_with_lightly(launches, backend):
    """lightly's state loads into dinotron's modules and dinotron's into lightly's (strict: the same keys,
    "center" and "center.center", and shapes), after steps that moved the centre; the next step's losses,
    gradients and centres are then equal."""
    K, B = 300, 3
    masks = torch.rand(4, 2, 2) < 0.5
    masks[0, 0, 0] = True
    M = int(masks.sum())

    def dino_step(module):
        student, teacher = make_views(4, 2, B, K, teacher_logits=True)
        return loss_and_grads(lambda s: module(teacher, s, epoch=1), student)

    def ibot_step(module):
        student, teacher = [(2 * torch.randn(M, K)).requires_grad_()], 3 * torch.randn(M, K)
        return loss_and_grads(lambda s: module(teacher, s[0], masks), student)

    for make_ours, make_theirs, step in ((lambda: DINOLoss(K, backend=backend), lambda: LightlyDINOLoss(K), dino_step),
                                         (lambda: IBOTPatchLoss(K, backend=backend), lambda: LightlyIBOTPatchLoss(K),
                                          ibot_step)):
        for source, target in ((make_theirs(), make_ours()), (make_ours(), make_theirs())):
            for _ in range(2):
                step(source)
            assert center_of(source).abs().max() > 0
            target.load_state_dict(source.state_dict())
            assert target.state_dict().keys() == source.state_dict().keys()
            torch.testing.assert_close(center_of(target), center_of(source), rtol=0, atol=0)
            seed = torch.randint(1 << 30, ()).item()
            torch.manual_seed(seed)
            actual = step(target)
            torch.manual_seed(seed)
            assert_same_loss_and_grads(actual, step(source), torch.float32)
            torch.testing.assert_close(center_of(target), center_of(source), **FP32)
    assert ran(launches) == expect(backend, CE | CENTERED)


@pytest.mark.parametrize("n_local", [0, 8])
def test_dino_module_sinkhorn_matches_dinov2(launches, n_local):
    """centering="sinkhorn_knopp": dinov2's Sinkhorn-Knopp over all T*B teacher rows, no centre update;
    lightly's pairing (the module's), or dinov2's with reduction="sum"."""
    K, B = 1000, 3
    student, teacher = make_views(2 + n_local, 2, B, K, teacher_logits=True)
    teacher = [t / 6 for t in teacher]  # |logits| / temp < 88: dinov2's literal exp does not overflow
    targets = reference.dinov2_sinkhorn_knopp(torch.cat(teacher), 0.06).view(2, B, K)
    for backend in BACKENDS:
        module = DINOLoss(K, teacher_temp=0.06, centering="sinkhorn_knopp", backend=backend)
        expected = loss_and_grads(lambda s: reference.dino_loss(s, targets, student_temp=0.1, **LIGHTLY), student)
        assert_same_loss_and_grads(loss_and_grads(lambda s: module(teacher, s), student), expected, torch.float32)
        assert ran(launches) == expect(backend, CE | SINKHORN)
        assert torch.all(module.center == 0)
        # reduction="sum": dinov2's local-crops call plus twice its global-crops call (the teacher's crops
        # swapped), the sum over the pairs of different crops that ssl_meta_arch then divides by their number
        summed = DINOLoss(K, teacher_temp=0.06, centering="sinkhorn_knopp", reduction="sum", backend=backend)

        def dinov2(s):
            local = dinov2_dino_forward(s[2:], targets) if n_local else 0
            return local + 2 * dinov2_dino_forward([torch.cat(s[:2])], [torch.cat((targets[1], targets[0]))])

        assert_same_loss_and_grads(loss_and_grads(lambda s: summed(teacher, s), student),
                                   loss_and_grads(dinov2, student), torch.float32)
        assert ran(launches) == expect(backend, CE | SINKHORN)


def test_sinkhorn_modules_refuse_teacher_gradients():
    """dinov2 computes Sinkhorn-Knopp targets under no_grad: a teacher requiring grad is an error, not a
    silently detached teacher; under no_grad it is fine."""
    student, teacher = make_views(3, 2, 2, 16, teacher_logits=True)
    teacher = [t.requires_grad_() for t in teacher]
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="Sinkhorn-Knopp targets carry no gradient"):
            DINOLoss(16, centering="sinkhorn_knopp", backend=backend)(teacher, student)
        with pytest.raises(ValueError, match="Sinkhorn-Knopp targets carry no gradient"):
            IBOTPatchLoss(16, centering="sinkhorn_knopp", backend=backend)(teacher[0], student[0],
                                                                           torch.ones(2, 1, dtype=torch.bool))
        with torch.no_grad():
            assert torch.isfinite(DINOLoss(16, centering="sinkhorn_knopp", backend=backend)(teacher, student))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_module_matches_lightly(launches, backend):
    """Three steps (the centre moves), the constructor's teacher_temp and explicit ones."""
    K = 1000
    ours, theirs = IBOTPatchLoss(K, backend=backend), LightlyIBOTPatchLoss(K)
    for teacher_temp in (None, 0.06, 0.07):
        masks = torch.rand(4, 3, 3) < 0.4
        masks[0, 0, 0] = True
        M = int(masks.sum())
        teacher = 3 * torch.randn(M, K)
        student = [(2 * torch.randn(M, K)).requires_grad_()]
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: ours(teacher, s[0], masks, teacher_temp=teacher_temp), student),
            loss_and_grads(lambda s: theirs(teacher, s[0], masks, teacher_temp=teacher_temp), student),
            torch.float32,
        )
        assert ran(launches) == expect(backend, CE | CENTERED)
        assert center_of(ours).shape == center_of(theirs).shape == (1, K)
        torch.testing.assert_close(center_of(ours), center_of(theirs), **FP32)
    # lightly's Center.update is the module's centre update, here on a (B, N, K) batch
    tokens = torch.randn(2, 5, K)
    ours.center.update(tokens)
    theirs.center.update(tokens.flatten(0, 1))
    torch.testing.assert_close(center_of(ours), center_of(theirs), **FP32)


def test_ibot_module_dense_input_and_sinkhorn(launches):
    K = 500
    student, teacher_logits, masks = ibot_inputs(3, 16, K)
    teacher_logits = teacher_logits.log()  # log-probabilities: bounded logits for dinov2's literal Sinkhorn
    student.requires_grad_()
    flat_teacher = teacher_logits[masks]
    dense = IBOTPatchLoss(K, backend="triton")(teacher_logits, student, masks)
    masked = IBOTPatchLoss(K, backend="triton")(flat_teacher, student[masks], masks)
    torch.testing.assert_close(dense, masked)
    assert ran(launches) == CE_FWD | CENTERED
    targets = reference.dinov2_sinkhorn_knopp(flat_teacher, 0.5)
    expected = loss_and_grads(lambda s: dinov2_ibot_forward_masked(s[0][masks], targets, masks), [student])
    for backend in BACKENDS:
        module = IBOTPatchLoss(K, centering="sinkhorn_knopp", backend=backend)
        actual = loss_and_grads(lambda s: module(teacher_logits, s[0], masks, teacher_temp=0.5), [student])
        assert ran(launches) == expect(backend, CE | SINKHORN)
        assert_same_loss_and_grads(actual, expected, torch.float32)


# ---- the GPU's tiles and splits, in the interpreter -----------------------------------------------
#
# The interpreter runs 16x wider tiles (layout.tile) on one SM, so the tests above mostly run one K
# block per row and one split. These tests set the GPU's tile sizes (tile(n) = n) and SM counts, so
# a row spans several K blocks with a partial last one, split between several programs; a spy on
# each launch checks that the kernels ran (no eager fallback) with the tiling each case names.

H100_SMS = 132


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Give the loss kernels the GPU's tile sizes; returns a setter of the SM count (H100: 132)."""
    for module in (cross_entropy, softmax_center, sinkhorn_knopp):
        monkeypatch.setattr(module, "tile", lambda elements: elements)

    def set_sms(n_sms=H100_SMS):
        monkeypatch.setattr(layout, "num_sms", lambda device: n_sms)

    set_sms()
    return set_sms


def spy_ce(monkeypatch):
    """Launches of the cross-entropy's forward, combine and backward kernels."""
    names = ("_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_kernel")
    return [spy_launches(monkeypatch, cross_entropy, name) for name in names]


def assert_ce_tiling(launches, grid, block_k, blocks_per_split, n_calls=1):
    """Each of n_calls forward and backward passes launched the kernels on this tiling."""
    fwd, combine, bwd = launches
    for kernel in (fwd, bwd):
        assert kernel.grids() == [grid] * n_calls and kernel.arg("BLOCK_K") == [block_k] * n_calls
        assert kernel.arg("blocks_per_split") == [blocks_per_split] * n_calls
    assert combine.arg("n_splits") == [grid[1]] * n_calls


@pytest.mark.parametrize("S,T,B,K,n_sms,dtype,grid,block_k,blocks_per_split", [
    # S_PAD 16, T_PAD 2: BLOCK_K 256, 4 blocks (last 232 columns); 4 splits of one block each, as on an H100
    (10, 2, 3, 1000, H100_SMS, torch.float32, (3, 4), 256, 1),
    # the same blocks, one wave of 2 x 3 SMs: 2 splits of 2 blocks, split 1 is [512, 1000), its second
    # block partial (232)
    (10, 2, 3, 1000, 3, torch.float32, (3, 2), 256, 2),
    # 12 blocks (last 184), 2 x 10 SMs for 5 rows: 4 splits of 3 blocks, the last [2304, 3000): several
    # blocks per split, as B=64, K=65536 on an H100 (4 splits of 64 blocks), in bf16
    (10, 2, 5, 3000, 10, torch.bfloat16, (5, 4), 256, 3),
    # S_PAD 4, T_PAD 2: BLOCK_K 1024, 5 blocks; 4 splits asked, 3 made of 2 blocks, the last one partial
    # block (904)
    (4, 2, 1, 5000, 2, torch.float32, (1, 3), 1024, 2),
    # S_PAD 2 (two global crops, no local): BLOCK_K 2048, 3 blocks (last 904), one split each
    (2, 2, 2, 5000, H100_SMS, torch.float32, (2, 3), 2048, 1),
    # more teacher than student views: S_PAD 2, T_PAD 4 (3 teacher rows and a masked one)
    (2, 3, 2, 5000, 2, torch.float32, (2, 2), 2048, 2),
])
def test_gpu_tiles_dino_loss_matches_reference(gpu_tiles, monkeypatch, S, T, B, K, n_sms, dtype, grid, block_k,
                                               blocks_per_split):
    gpu_tiles(n_sms)
    launches = spy_ce(monkeypatch)
    student, teacher = make_views(S, T, B, K, dtype)
    actual = loss_and_grads(lambda s: dino_loss(s, teacher, student_temp=0.1, backend="triton"), student)
    assert_ce_tiling(launches, grid, block_k, blocks_per_split)
    assert launches[0].arg("S_PAD") == [triton.next_power_of_2(S)] and launches[0].arg("T_PAD") == [
        triton.next_power_of_2(T)]
    for kwargs in PAIRINGS.values():
        expected = loss_and_grads(lambda s, kwargs=kwargs: reference.dino_loss(s, teacher, student_temp=0.1,
                                                                                **kwargs), student)
        if kwargs:
            actual = loss_and_grads(lambda s, kwargs=kwargs: dino_loss(s, teacher, student_temp=0.1,
                                                                        backend="triton", **kwargs), student)
        assert_same_loss_and_grads(actual, expected, dtype)


@pytest.mark.parametrize("n_sms,grid,blocks_per_split", [
    # S_PAD = T_PAD = 1: BLOCK_K 4096, 3 blocks (last 808 columns); H100: 3 splits, one block each
    (H100_SMS, (7, 3), 1),
    # one split per row, looping over the 3 blocks
    (1, (7, 1), 3),
])
def test_gpu_tiles_ibot_patch_loss_matches_reference(gpu_tiles, monkeypatch, n_sms, grid, blocks_per_split):
    gpu_tiles(n_sms)
    launches = spy_ce(monkeypatch)
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, :3] = masks[1, :4] = True  # 3 + 4 masked patches, the last image has none: weights 1/3, 1/4, -
    student = [(2 * torch.randn(7, 9000)).requires_grad_()]
    teacher = torch.softmax(3 * torch.randn(7, 9000), dim=-1)
    actual = loss_and_grads(lambda s: ibot_patch_loss(s[0], teacher, masks, student_temp=0.1, backend="triton"),
                            student)
    assert_ce_tiling(launches, grid, 4096, blocks_per_split)
    assert launches[1].arg("HAS_WEIGHT") == launches[2].arg("HAS_WEIGHT") == [True]
    expected = loss_and_grads(lambda s: dinov2_ibot_forward_masked(s[0], teacher, masks), student)
    assert_same_loss_and_grads(actual, expected, torch.float32)


@pytest.mark.parametrize("n_sms,shape,grid,block_r,n_groups", [
    # 20 rows of K=5000: BLOCK_K 256 (20 slabs, the last 136 columns) x BLOCK_R 16 (2 row blocks, the
    # last 4 rows), one group; one slab a program
    (H100_SMS, (2, 10, 5000), 20, 16, 1),
    # 300 rows of K=1000: 2 groups (256 rows; 44 rows, 3 row blocks, the last 12) x 4 slabs (the last 232
    # columns) = 8 tiles on one wave of 2 x 2 SMs: each program takes a tile of each group, so a group's
    # last slab, and its fold, can be another program's; the centre's column sums are 2 group partials
    (2, (2, 150, 1000), 4, 16, 2),
])
def test_gpu_tiles_softmax_center_and_update_match_reference(gpu_tiles, monkeypatch, n_sms, shape, grid, block_r,
                                                             n_groups):
    """Each op launches the row kernel once for the log-sum-exp (with the centre's column sums, or without),
    and once more for the probabilities; the EMA takes 256 columns a program, from the group partials or, for
    update_center, from the rows themselves in row blocks of BLOCK_P 16."""
    gpu_tiles(n_sms)
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    ema = spy_launches(monkeypatch, softmax_center, "_center_ema_kernel")
    K, R = shape[-1], shape[0] * shape[1]
    logits, center = 3 * torch.randn(shape), torch.randn(1, K)
    expected = reference.softmax_center_teacher(logits, center, 0.04)
    expected_center = reference.update_center(center, logits, 0.9)
    probs, new_center = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="triton")
    torch.testing.assert_close(probs, expected, **FP32)
    torch.testing.assert_close(new_center, expected_center, **FP32)
    torch.testing.assert_close(softmax_center_teacher(logits, center, 0.04, backend="triton"), expected, **FP32)
    torch.testing.assert_close(update_center(center, logits, 0.9, backend="triton"), expected_center, **FP32)
    assert rows.grids() == [(grid,)] * 4 and rows.arg("BLOCK_R") == [block_r] * 4
    assert rows.arg("BLOCK_K") == [256] * 4
    assert rows.arg("WITH_COLSUM") == [True, False, False, False]
    assert rows.arg("WRITE_PROBS") == [False, True, False, True]
    assert all(counter.tolist() == [0] * n_groups for counter in rows.arg("COUNTER"))  # reset by each group's fold
    assert ema.grids() == [(triton.cdiv(K, 256),)] * 2 and ema.arg("BLOCK_K") == [256] * 2
    assert ema.arg("n_partial") == [n_groups, R]


def test_gpu_tiles_softmax_center_is_deterministic(gpu_tiles, monkeypatch):
    """The row log-sum-exp, the probabilities and the new centre are bit-identical between runs and whatever
    the SM count, i.e. whichever program streams a tile and finishes a group last: the column sums add row
    blocks and then group partials in a fixed order, the fold adds slab partials in slab order, no atomics
    on data. 300 rows of K=1000 (2 groups x 4 slabs, as above) on one wave of 2 x 132 (8 programs), 2 x 2
    (4) and 2 x 1 (2) SMs; fp32 and bf16 logits."""
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    for dtype in (torch.float32, torch.bfloat16):
        logits, center = (3 * torch.randn(2, 150, 1000)).to(dtype), torch.randn(1, 1000)
        runs = []
        for n_sms in (H100_SMS, H100_SMS, 2, 1):
            gpu_tiles(n_sms)
            targets, new_center = softmax_center.softmax_center_targets(list(logits), center, 0.04, 0.9, "triton")
            runs.append((targets.row_lse, new_center,
                         *softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="triton")))
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))
        # per SM count: the targets' launch, then softmax_center_and_update_teacher's two
        assert rows.grids() == [(8,)] * 6 + [(4,)] * 3 + [(2,)] * 3 and set(rows.arg("BLOCK_R")) == {16}
        rows.clear()
        torch.testing.assert_close(runs[0][0], reference.softmax_center_lse(logits, center, 0.04), **FP32)
        torch.testing.assert_close(runs[0][1], reference.update_center(center, logits, 0.9), **FP32)


@pytest.mark.parametrize("n_sms,grid,fold_in_kernel", [(H100_SMS, 20, True), (4, 8, True), (4, 8, False)])
def test_gpu_tiles_sinkhorn_matches_reference(gpu_tiles, monkeypatch, n_sms, grid, fold_in_kernel):
    """300 rows of K=5000, 3 iterations: slabs of BLOCK_K 256 columns (20, the last 136 columns), row blocks
    of BLOCK_R 16 (19, the last 12 rows); one launch per iteration (both passes) and one writing the
    probabilities. On 132 SMs one slab per program; on 4 SMs 8 programs of 2 or 3 slabs each (the grid is
    one wave of 2 programs per SM), so a program's partials and the last program's fold span slabs. With
    more row partials than _FOLD_IN_KERNEL_MAX, _fold_kernel folds them after each iteration instead, its
    programs taking 64 rows each on 4 SMs (the most rows, a power of two, that give every SM a program: 5
    programs, the last 44 rows)."""
    gpu_tiles(n_sms)
    if not fold_in_kernel:
        monkeypatch.setattr(sinkhorn_knopp, "_FOLD_IN_KERNEL_MAX", 20 * 300 - 1)
    launches = spy_launches(monkeypatch, sinkhorn_knopp, "_sinkhorn_kernel")
    folds = spy_launches(monkeypatch, sinkhorn_knopp, "_fold_kernel")
    logits = 0.5 * torch.randn(300, 5000)
    out = sinkhorn_knopp_teacher(logits, 0.05, 3, backend="triton")
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.05, 3), **FP32)
    assert launches.grids() == [(grid,)] * 4
    assert launches.arg("BLOCK_R") == [16] * 4 and launches.arg("BLOCK_K") == [256] * 4
    assert launches.arg("HAS_ROW") == [False, True, True, True]
    assert launches.arg("COL_PASS") == launches.arg("ROW_PASS") == [True, True, True, False]
    assert launches.arg("WRITE_PROBS") == [False, False, False, True]
    assert launches.arg("FOLD")[:3] == [fold_in_kernel] * 3
    assert folds.grids() == ([] if fold_in_kernel else [(5,)] * 3)
    assert launches.arg("COUNTER")[-1].item() == 0  # the last program of each launch reset it


def module_call(module, teacher, masks=None):
    """loss_and_grads' fn for a loss module: DINOLoss on the student views, or IBOTPatchLoss on one
    (M, K) student view with its masks."""
    if masks is None:
        return lambda s: module(teacher, s)
    return lambda s: module(teacher, s[0], masks)


@pytest.mark.parametrize("module,centering,K,grid,block_k,row_pass,sinkhorn_pass", [
    # 10 student views of 3 rows: BLOCK_K 256, 10 blocks (the last 196 columns) in 10 splits; the
    # centring pass BLOCK_R 8 (next_pow2(6)) x BLOCK_K 256, 10 slabs (the last 196 columns), one program each
    (DINOLoss, "softmax", 2500, (3, 10), 256, ((10,), 8, 256), None),
    # Sinkhorn-Knopp over the 6 teacher rows: 10 slabs of BLOCK_K 256 (the last 196 columns), one program
    # each, row blocks of BLOCK_R 8 (next_pow2(6))
    (DINOLoss, "sinkhorn_knopp", 2500, (3, 10), 256, None, ((10,), 8, 256)),
    # 7 masked rows: BLOCK_K 4096, 3 blocks (the last 808 columns) in 3 splits; the centring pass
    # BLOCK_R 8 x BLOCK_K 256, 36 slabs (the last 40 columns), one program each
    (IBOTPatchLoss, "softmax", 9000, (7, 3), 4096, ((36,), 8, 256), None),
])
def test_gpu_tiles_modules_match_eager(gpu_tiles, monkeypatch, module, centering, K, grid, block_k, row_pass,
                                      sinkhorn_pass):
    """Teacher logits, their centred targets recomputed inside the cross-entropy kernels; two steps,
    the second centred with the updated centre. row_pass / sinkhorn_pass: (grid, BLOCK_R, BLOCK_K) of the
    softmax centring's row (log-sum-exp) kernel and of the Sinkhorn-Knopp kernel."""
    launches = spy_ce(monkeypatch)
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    sinkhorn = spy_launches(monkeypatch, sinkhorn_knopp, "_sinkhorn_kernel")
    fused, eager = module(K, centering=centering, backend="triton"), module(K, centering=centering, backend="eager")
    masks = None
    if module is IBOTPatchLoss:
        masks = torch.zeros(3, 4, dtype=torch.bool)
        masks[0, :3] = masks[1, :4] = True
    for _ in range(2):
        if module is DINOLoss:
            student, teacher = make_views(10, 2, 3, K, teacher_logits=True)
        else:
            student, teacher = [(2 * torch.randn(7, K)).requires_grad_()], 3 * torch.randn(7, K)
        actual = loss_and_grads(module_call(fused, teacher, masks), student)
        assert_same_loss_and_grads(actual, loss_and_grads(module_call(eager, teacher, masks), student), torch.float32)
        torch.testing.assert_close(center_of(fused), center_of(eager), **FP32)
    assert_ce_tiling(launches, grid, block_k, 1, n_calls=2)
    assert launches[0].arg("TEACHER_LOGITS") == [True, True]
    assert set(zip(rows.grids(), rows.arg("BLOCK_R"), rows.arg("BLOCK_K"), strict=True)) == {row_pass} - {None}
    assert set(zip(sinkhorn.grids(), sinkhorn.arg("BLOCK_R"), sinkhorn.arg("BLOCK_K"), strict=True)) == (
        {sinkhorn_pass} - {None})


# ---- bad input, non-finite values, teacher gradients, the backend switch ----------------------------

X = torch.ones(2, 8)  # (B, K) = (2, 8) logits; the argument checks never read the values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,match", [
    pytest.param(lambda b: dino_loss([X, X], [torch.randn(2, 9)] * 2, backend=b),
                 r"teacher_out_softmaxed_centered_list views are \(B, K\)=\(2, 9\)", id="teacher-K"),
    pytest.param(lambda b: dino_loss([X, torch.randn(3, 8)], [X, X], backend=b),
                 r"student_output_list\[1\] has shape", id="student-B"),
    pytest.param(lambda b: dino_loss([X, X], [torch.randn(3, 8)] * 2, backend=b), r"\(B, K\)=\(3, 8\)", id="teacher-B"),
    pytest.param(lambda b: dino_loss([X.long()] * 2, [X, X], backend=b),
                 r"student_output_list\[0\] must be float32", id="student-int"),
    pytest.param(lambda b: dino_loss([X.double(), X], [X, X], backend=b),
                 r"student_output_list\[1\] is torch.float32 on cpu but student_output_list\[0\] is torch.float64",
                 id="student-mixed-dtypes"),
    pytest.param(lambda b: dino_loss([torch.randn(8)] * 2, [X, X], backend=b),
                 r"student_output_list\[0\] must be 2-D", id="student-1d"),
    pytest.param(lambda b: dino_loss(torch.randn(2, 0, 8), [X, X], backend=b),
                 "empty along dim 0", id="stacked-empty-B"),
    pytest.param(lambda b: dino_loss([torch.randn(2, 0)] * 2, [torch.randn(2, 0)] * 2, backend=b),
                 "empty along dim 1", id="empty-K"),
    pytest.param(lambda b: dino_loss([X], [X], ignore_diagonal=True, backend=b), "no cross-view pairs", id="one-view"),
    pytest.param(lambda b: dino_loss([X, X], [X, X], reduction="none", backend=b), "reduction", id="reduction"),
    pytest.param(lambda b: dino_loss([X, X], [X, X], student_temp=0.0, backend=b),
                 "student_temp must be > 0", id="student-temp"),
    pytest.param(lambda b: softmax_center_teacher(X, torch.zeros(9), 0.04, backend=b),
                 "center has 9 elements", id="center-size"),
    pytest.param(lambda b: softmax_center_teacher(torch.randn(2, 0), torch.zeros(0), 0.04, backend=b),
                 "empty along dim 1", id="centre-empty-K"),  # zero rows are allowed: test_teacher_ops_zero_rows
    pytest.param(lambda b: sinkhorn_knopp_teacher(torch.randn(2, 0), 0.04, backend=b), "empty along dim 1",
                 id="sinkhorn-empty-K"),
    pytest.param(lambda b: softmax_center_and_update_teacher(X, torch.zeros(8), 0.04, 1.5, backend=b),
                 "momentum", id="momentum"),
    pytest.param(lambda b: update_center(torch.zeros(8), torch.randn(8), backend=b),
                 "teacher_logits must be 2-D or 3-D", id="update-1d"),
    pytest.param(lambda b: sinkhorn_knopp_teacher(X, 0.04, 0, backend=b), "n_iterations", id="sinkhorn-iterations"),
    pytest.param(lambda b: sinkhorn_knopp_teacher(torch.randn(2, 3, 8), 0.04, backend=b),
                 "teacher_logits must be 2-D", id="sinkhorn-3d"),
    pytest.param(lambda b: sinkhorn_knopp_teacher(X.half(), -1.0, backend=b),
                 "teacher_temp must be > 0", id="sinkhorn-temp"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2), backend=b),
                 "student_masks_flat must be a bool tensor", id="ibot-mask-dtype"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2).bool(), 5,
                                           backend=b), r"n_masked_patches must be an int in \[0, 4\]",
                 id="ibot-n-masked"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2).bool(), True,
                                           backend=b), "n_masked_patches must be an int", id="ibot-n-masked-bool"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2).bool(), 3,
                                           torch.ones(4), backend=b),
                 "masks_weight has 4 entries but 3 patches are masked", id="ibot-weight-length"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.ones(2, 2).bool(), 4,
                                           backend=b), "go with masked-only", id="ibot-dense-n-masked"),
    pytest.param(lambda b: DINOLoss(9, backend=b)([X, X], [X, X]), "center has 9 elements", id="module-center-size"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X, X], [X, torch.randn(3, 8)]),
                 r"student_out\[1\] has shape", id="module-student-B"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X, X], [X, X], teacher_temp=0.0),
                 "teacher_temp must be > 0", id="module-teacher-temp"),
    pytest.param(lambda b: DINOLoss(8, center_mode="median"), "Unknown mode 'median'", id="module-center-mode"),
    pytest.param(lambda b: IBOTPatchLoss(8, center_mode="median"), "Unknown mode 'median'", id="ibot-center-mode"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X.to("meta")] * 2, [X.to("meta")] * 2),
                 "center on cpu", id="module-device"),
    pytest.param(lambda b: softmax_center_teacher(X, torch.zeros(8, device="meta"), 0.1, backend=b),
                 "center on meta", id="center-device"),
    pytest.param(lambda b: DINOLoss(8, centering="mean"), "centering must be", id="module-centering"),
    pytest.param(lambda b: IBOTPatchLoss(8, backend=b)(torch.randn(0, 8), torch.randn(0, 8), torch.zeros(0, 2).bool()),
                 "student_masks_flat is empty along dim 0", id="ibot-module-no-image"),  # no masked patch: 0
    pytest.param(lambda b: dino_loss([X, X], [X, X], backend=b + "s"), "backend must be one of", id="backend-name"),
])
def test_bad_input(launches, backend, call, match):
    with pytest.raises(ValueError, match=match):
        call(backend)
    assert ran(launches) == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_row_count_mismatch_is_a_device_assert(backend):
    """Rows that do not match the masks' count (no n_masked_patches) fail torch._assert_async: no host sync to
    check them (a device-side assert on CUDA, a RuntimeError on CPU); the module likewise."""
    masks = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="student_patch_tokens_masked has 3 rows but student_masks_flat has"):
        ibot_patch_loss(torch.randn(3, 8), torch.randn(3, 8), masks, backend=backend)
    with pytest.raises(RuntimeError, match="student_out has 5 rows but student_masks_flat has"):
        IBOTPatchLoss(8, backend=backend)(torch.randn(5, 8), torch.randn(5, 8), masks)


def test_triton_backend_refuses_float64(launches):
    student, teacher = make_views(3, 2, 2, 16, torch.float64)
    with pytest.raises(ValueError, match="backend='triton' takes float32, float16 or bfloat16 tensors, got float64"):
        dino_loss(student, teacher, backend="triton")
    loss = dino_loss(student, teacher)  # auto: the eager reference in float64
    assert loss.dtype == torch.float64 and ran(launches) == set()
    torch.testing.assert_close(loss, dino_double_loop_fp64(student, teacher, 0.1), rtol=1e-12, atol=0)
    masks = torch.ones(2, 2, dtype=torch.bool)
    s, t = student[0].repeat(2, 1), teacher[0].repeat(2, 1)
    with pytest.raises(ValueError, match="got float64"):
        ibot_patch_loss(s, t, masks, backend="triton")
    loss = ibot_patch_loss(s, t, masks, backend="eager")
    assert loss.dtype == torch.float64 and ran(launches) == set()
    torch.testing.assert_close(loss, dinov2_ibot_forward_masked(s, t, masks), rtol=1e-12, atol=0)


# NaN and inf - inf in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises(launches, backend):
    """check_finite=True (opt-in: one host sync) raises ValueError on a non-finite loss or centre; a failed
    module step leaves the centre alone."""
    student, teacher = make_views(3, 2, 2, 64)
    bad_student = [s.detach().clone() for s in student]
    bad_student[2][1, 5] = -math.inf
    bad_teacher = [t.clone() for t in teacher]
    bad_teacher[1][0, 3] = math.nan
    for s, t in ((bad_student, teacher), (student, bad_teacher)):
        with pytest.raises(ValueError, match="dino_loss is not finite"):
            dino_loss(s, t, check_finite=True, backend=backend)
    logits = torch.randn(4, 64)
    logits[2, 7] = math.inf
    module = DINOLoss(64, backend=backend, check_finite=True)
    with pytest.raises(ValueError, match="DINOLoss is not finite"):
        module([logits[:2], logits[2:]], [torch.randn(2, 64)] * 3)
    assert torch.all(module.center == 0), "a failed step must leave the centre alone"
    masks = torch.ones(2, 1, dtype=torch.bool)
    ibot = IBOTPatchLoss(64, backend=backend, check_finite=True)
    with pytest.raises(ValueError, match="IBOTPatchLoss is not finite"):
        ibot(logits[1:3], torch.randn(2, 64), masks)
    assert torch.all(center_of(ibot) == 0)
    with pytest.raises(ValueError, match="ibot_patch_loss is not finite"):
        ibot_patch_loss(bad_student[2], teacher[0], masks, check_finite=True, backend=backend)
    assert ran(launches) == expect(backend, CE_FWD | CENTERED)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_give_non_finite_losses_by_default(launches, backend):
    """The default check_finite=False: no error, no host sync; NaN in gives NaN out and -inf a +inf loss,
    as the reference (and lightly, test_modules_nan_in_nan_out_as_lightly)."""
    student, teacher = make_views(3, 2, 2, 64)
    bad_student = [s.detach().clone() for s in student]
    bad_student[2][1, 5] = -math.inf  # -inf log-probability under a positive target: +inf
    bad_teacher = [t.clone() for t in teacher]
    bad_teacher[1][0, 3] = math.nan
    for s, t, expected in ((bad_student, teacher, math.inf), (student, bad_teacher, math.nan)):
        loss = dino_loss(s, t, backend=backend)
        torch.testing.assert_close(loss, reference.dino_loss(s, t), equal_nan=True)
        torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
    masks = torch.ones(2, 1, dtype=torch.bool)
    for s, t, expected in ((bad_student[2], teacher[0], math.inf), (student[0], bad_teacher[1], math.nan)):
        torch.testing.assert_close(ibot_patch_loss(s, t, masks, backend=backend), torch.tensor(expected),
                                   equal_nan=True)
    assert ran(launches) == expect(backend, CE_FWD)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,call", [
    pytest.param(math.nan, lambda x, b, **kw: softmax_center_teacher(x, torch.zeros(64), 0.04, backend=b, **kw),
                 id="softmax-nan"),
    pytest.param(math.inf, lambda x, b, **kw: sinkhorn_knopp_teacher(x, 0.04, backend=b, **kw), id="sinkhorn-inf"),
    pytest.param(-math.inf, lambda x, b, **kw: update_center(torch.zeros(64), x, backend=b, **kw),
                 id="update-minus-inf"),
    # softmax gives -inf logits probability 0, but the centre would become -inf
    pytest.param(-math.inf, lambda x, b, **kw: softmax_center_and_update_teacher(x, torch.zeros(64), 0.04,
                                                                                 backend=b, **kw),
                 id="softmax-and-update-minus-inf"),
])
def test_non_finite_teacher_logits(backend, bad, call):
    """check_finite=True raises; by default the result is what the eager reference gives, NaN/inf included."""
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(ValueError, match="is not finite: teacher_logits"):
        call(x, backend, check_finite=True)
    out, expected = call(x, backend), call(x, "eager")
    out, expected = ((o,) if isinstance(o, torch.Tensor) else o for o in (out, expected))
    assert not all(torch.isfinite(o).all() for o in out)
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e, equal_nan=True, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functions_differentiate_a_teacher_that_requires_grad(launches, backend):
    """dino_loss / ibot_patch_loss with teacher targets requiring grad (grad enabled): the eager reference
    runs in autograd (whatever the backend) and the teacher gets dinov2's formula's gradient; under no_grad,
    or with a detached teacher, the backend's op runs."""
    student, teacher = make_views(4, 2, 3, 50, teacher_logits=True)
    logits = torch.stack(teacher).requires_grad_()
    expected_fns = {  # the teacher's softmax at temperature 0.04, then each pairing's own formula
        "dinov2": lambda x: dinov2_dino_forward(x[1:], torch.softmax(x[0] / 0.04, dim=-1)),
        "lightly": lambda x: LightlyDINOLoss(50)(list(x[0].unbind(0)), x[1:], teacher_temp=0.04),
    }
    for pairing, kwargs in PAIRINGS.items():
        inputs = [logits, *student]
        actual = loss_and_grads(
            lambda x, kwargs=kwargs: dino_loss(x[1:], torch.softmax(x[0] / 0.04, dim=-1), backend=backend, **kwargs),
            inputs)
        assert ran(launches) == set()
        expected = loss_and_grads(expected_fns[pairing], inputs)
        assert expected[1][0].abs().max() > 0
        assert_same_loss_and_grads(actual, expected, torch.float32)
        with torch.no_grad():
            loss = dino_loss(student, torch.softmax(logits / 0.04, dim=-1), backend=backend, **kwargs)
        torch.testing.assert_close(loss, actual[0], **FP32)
        assert ran(launches) == expect(backend, CE_FWD)
    masks = torch.ones(2, 3, dtype=torch.bool)
    patches = [(2 * torch.randn(6, 50)).requires_grad_(), (3 * torch.randn(6, 50)).requires_grad_()]
    actual = loss_and_grads(lambda x: ibot_patch_loss(x[0], torch.softmax(x[1], -1), masks, backend=backend), patches)
    assert ran(launches) == set()
    expected = loss_and_grads(lambda x: dinov2_ibot_forward_masked(x[0], torch.softmax(x[1], -1), masks), patches)
    assert expected[1][1].abs().max() > 0
    assert_same_loss_and_grads(actual, expected, torch.float32)


def test_backend_switch(monkeypatch, launches):
    """backend=None reads DINOTRON_BACKEND (default "auto": the eager reference for CPU tensors); an explicit
    backend argument wins over it."""
    student, teacher = make_views(3, 2, 2, 32)
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    auto = dino_loss(student, teacher)
    assert ran(launches) == set()
    torch.testing.assert_close(auto, reference.dino_loss(student, teacher), **FP32)
    monkeypatch.setenv("DINOTRON_BACKEND", "triton")
    torch.testing.assert_close(dino_loss(student, teacher), auto, **FP32)
    assert ran(launches) == CE_FWD
    DINOLoss(32)(teacher, student)
    assert ran(launches) == CE_FWD | CENTERED
    assert dino_loss(student, teacher, backend="eager").item() == auto.item() and ran(launches) == set()
    with pytest.raises(ValueError, match="got float64"):  # triton asked for float64 (here by the variable)
        dino_loss([s.double() for s in student], [t.double() for t in teacher])
    monkeypatch.setenv("DINOTRON_BACKEND", "auto")
    assert dino_loss([s.double() for s in student], [t.double() for t in teacher]).dtype == torch.float64
    assert ran(launches) == set()
    monkeypatch.setenv("DINOTRON_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        dino_loss(student, teacher)


# ---- torch.compile and torch.library (issue 13c) ------------------------------------------------------
# Each public loss op and module, tiny: traced by dynamo without a graph break (the ops are single graph
# nodes, nothing reads a device value on the host), then compiled with fullgraph=True on aot_eager (no
# C++ or Triton codegen on CPU), which must equal eager: values, student gradients and the centre buffers,
# over two steps so that the second uses the centre the first wrote.

K_COMPILE = 48


def _compile_masks():
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0] = masks[1, 1, 1] = True  # 2 + 1 masked patches, the last image none
    return masks


def compile_case(name, backend):
    """(fn, make_args, module or None): fn(*make_args()) is one step; make_args draws new inputs, the
    student's requiring grad."""
    K = K_COMPILE
    masks = _compile_masks()
    M = int(masks.sum())

    def views(teacher_logits=False):
        return make_views(4, 2, 3, K, teacher_logits=teacher_logits)

    if name == "dino_loss":
        return (lambda s, t: dino_loss(s, t, backend=backend)), lambda: views(), None
    if name == "dino_loss_lightly":  # a (S, B, K) student tensor, lightly's pairing
        return (lambda s, t: dino_loss(s, torch.stack(t), backend=backend, **LIGHTLY),
                lambda: (torch.stack(views()[0]).detach().requires_grad_(), views()[1]), None)
    if name == "ibot_patch_loss":
        def args():
            return (2 * torch.randn(M, K)).requires_grad_(), torch.softmax(torch.randn(M, K), -1), masks
        return (lambda s, t, m: ibot_patch_loss(s, t, m, backend=backend)), args, None
    if name == "ibot_patch_loss_dinov2":  # padded rows, n_masked_patches and masks_weight
        weight = dinov2_collate(masks.flatten(1))[2]

        def args():
            return (2 * torch.randn(M + 2, K)).requires_grad_(), torch.softmax(torch.randn(M + 2, K), -1), masks
        return (lambda s, t, m: ibot_patch_loss(s, t, m, M, weight, backend=backend)), args, None
    if name in ("DINOLoss", "DINOLoss_sinkhorn"):
        module = DINOLoss(K, backend=backend, centering="sinkhorn_knopp" if name.endswith("sinkhorn") else "softmax")
        return (lambda t, s: module(t, s, epoch=1)), lambda: views(teacher_logits=True)[::-1], module
    if name == "IBOTPatchLoss":
        module = IBOTPatchLoss(K, backend=backend)

        def args():
            return 3 * torch.randn(M, K), (2 * torch.randn(M, K)).requires_grad_(), masks
        return (lambda t, s, m: module(t, s, m)), args, module
    center = torch.linspace(-1.0, 1.0, K)[None]  # the same in every instance of a case

    def logits():
        return (3 * torch.randn(6, K),)
    if name == "softmax_center_teacher":
        return (lambda x: softmax_center_teacher(x, center, 0.04, backend=backend)), logits, None
    if name == "softmax_center_and_update_teacher":
        return (lambda x: softmax_center_and_update_teacher(x, center, 0.04, 0.9, backend=backend)), logits, None
    if name == "update_center":
        return (lambda x: update_center(center, x, 0.9, backend=backend)), logits, None
    if name == "sinkhorn_knopp_teacher":
        return (lambda x: sinkhorn_knopp_teacher(x / 10, 0.05, backend=backend)), logits, None
    raise AssertionError(name)


LOSSES = ["dino_loss", "dino_loss_lightly", "ibot_patch_loss", "ibot_patch_loss_dinov2", "DINOLoss",
          "DINOLoss_sinkhorn", "IBOTPatchLoss"]
TEACHER_OPS = ["softmax_center_teacher", "softmax_center_and_update_teacher", "update_center",
               "sinkhorn_knopp_teacher"]
TRITON_CASES = {"dino_loss": CE, "ibot_patch_loss": CE, "DINOLoss": CE | CENTERED}  # and the kernels they launch
COMPILE_CASES = [pytest.param(name, "eager", id=f"{name}-eager") for name in LOSSES + TEACHER_OPS] + [
    pytest.param(name, "triton", id=f"{name}-triton") for name in TRITON_CASES]


def _outputs_and_grads(fn, args, module):
    """fn's outputs (detached), the gradients of its first output w.r.t. the inputs requiring grad, and the
    module's buffers after the call."""
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [t for a in args if isinstance(a, list) for t in a if t.requires_grad]
    grads = torch.autograd.grad(outs[0], leaves) if leaves else ()
    buffers = [b.clone() for b in module.buffers()] if module is not None else []
    return [o.detach() for o in outs], list(grads), buffers


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_compiles_without_graph_breaks_and_equals_eager(launches, name, backend):
    torch._dynamo.reset()
    fn, make_args, _ = compile_case(name, backend)
    explanation = torch._dynamo.explain(fn)(*make_args())
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    ran(launches)
    torch._dynamo.reset()
    fn, _, module = compile_case(name, backend)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_fn, make_args, eager_module = compile_case(name, backend)
    for _ in range(2):  # the second step reads the centre the first one wrote
        args = make_args()
        outs, grads, buffers = _outputs_and_grads(compiled, args, module)
        assert ran(launches) == (TRITON_CASES[name] if backend == "triton" else set())
        expected = _outputs_and_grads(eager_fn, args, eager_module)
        assert ran(launches) == (TRITON_CASES[name] if backend == "triton" else set())
        for actual, wanted in zip((outs, grads, buffers), expected, strict=True):
            assert len(actual) == len(wanted)
            for a, w in zip(actual, wanted, strict=True):
                assert a.dtype == w.dtype and a.shape == w.shape
                torch.testing.assert_close(a, w, **FP32)
        if module is not None and name != "DINOLoss_sinkhorn":
            assert any(b.abs().max() > 0 for b in buffers), "the centre moved"
    torch._dynamo.reset()


def _opcheck_cases(backend):
    """{name: (op, args)} for every dinotron op: fp32 (bf16 on triton, float64 on eager), plain and lazy
    targets, weights, stacked and transposed inputs."""
    ops = torch.ops.dinotron
    S, T, B, K = 3, 2, 2, 16
    dtype = torch.bfloat16 if backend == "triton" else torch.float64
    student = [torch.randn(B, K, requires_grad=True) for _ in range(S)]
    student_other = [torch.randn(B, K, dtype=dtype, requires_grad=True) for _ in range(S)]
    probs = [torch.softmax(torch.randn(B, K), -1) for _ in range(T)]
    logits = [3 * torch.randn(B, K) for _ in range(T)]
    transposed = torch.randn(K, B).t()
    center = torch.randn(1, K)
    lse, col, _ = ops.softmax_center_targets(logits, center, 0.1, 0.9, backend)
    ce = (0.1, 1.0, 0.0, 0.5)  # student_temp, logit_scale, col_scale, scale
    _, lse_s, mass_s = ops.cross_entropy(student, False, probs, None, None, None, *ce, True, backend)
    return {
        "cross_entropy": (ops.cross_entropy, (student, False, probs, None, None, None, *ce, True, backend)),
        "cross_entropy-stacked": (ops.cross_entropy, ([torch.randn(S, B, K, requires_grad=True)], True, probs, None,
                                                      None, None, *ce, False, backend)),
        "cross_entropy-logits": (ops.cross_entropy, (student, False, logits, lse, col, None, 0.1, 10.0, -10.0, 0.5,
                                                     True, backend)),
        "cross_entropy-weight": (ops.cross_entropy, (student[:1], False, probs[:1], None, None, torch.rand(B), *ce,
                                                     False, backend)),
        "cross_entropy-dtype": (ops.cross_entropy, (student_other, False, [p.to(dtype) for p in probs], None, None,
                                                    None, *ce, True, backend)),
        "cross_entropy_backward": (ops.cross_entropy_backward, (torch.tensor(1.0), [s.detach() for s in student],
                                                                False, probs, None, None, None, lse_s, mass_s, *ce,
                                                                True, backend)),
        "softmax_center_teacher": (ops.softmax_center_teacher, (logits[0], center, 0.1, backend)),
        "softmax_center_teacher-dtype": (ops.softmax_center_teacher, (logits[0].to(dtype), center, 0.1, backend)),
        "softmax_center_and_update_teacher": (ops.softmax_center_and_update_teacher,
                                              (torch.stack(logits), center, 0.1, 0.9, backend)),
        "update_center": (ops.update_center, (center, logits[0], 0.9, backend)),
        "softmax_center_targets": (ops.softmax_center_targets, (logits, center, 0.1, 0.9, backend)),
        "sinkhorn_knopp_teacher": (ops.sinkhorn_knopp_teacher, (logits[0], 0.1, 3, backend)),
        "sinkhorn_knopp_targets": (ops.sinkhorn_knopp_targets, (logits, 0.1, 3, backend)),
        # a transposed (non-contiguous) input: the real output's strides must be the fake's
        "softmax_center_teacher-transposed": (ops.softmax_center_teacher, (transposed, center, 0.1, backend)),
        "update_center-transposed": (ops.update_center, (center, transposed, 0.9, backend)),
        "sinkhorn_knopp_teacher-transposed": (ops.sinkhorn_knopp_teacher, (transposed, 0.1, 3, backend)),
    }


OPCHECK_CASES = ["cross_entropy", "cross_entropy-stacked", "cross_entropy-logits", "cross_entropy-weight",
                 "cross_entropy-dtype", "cross_entropy_backward", "softmax_center_teacher",
                 "softmax_center_teacher-dtype", "softmax_center_and_update_teacher", "update_center",
                 "softmax_center_targets", "sinkhorn_knopp_teacher", "sinkhorn_knopp_targets",
                 "softmax_center_teacher-transposed", "update_center-transposed", "sinkhorn_knopp_teacher-transposed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(launches, backend, case):
    """torch.library.opcheck, all its tests (schema, autograd registration, fake tensors against the real
    outputs' shapes, dtypes and strides, aot_dispatch_dynamic): what torch.compile relies on. (bf16 on the
    Triton backend, float64 on the eager one, which alone takes it.)"""
    cases = _opcheck_cases(backend)
    assert sorted(cases) == sorted(OPCHECK_CASES)
    ran(launches)
    op, args = cases[case]
    torch.library.opcheck(op.default, args)
    assert (ran(launches) != set()) == (backend == "triton")


# ---- torch.distributed ------------------------------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A one-process gloo group, with dist.all_reduce recording (op, shape) of every call."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    calls, all_reduce = [], dist.all_reduce

    def recording_all_reduce(t, op=dist.ReduceOp.SUM, **kw):
        calls.append((str(op), tuple(t.shape)))
        return all_reduce(t, op, **kw)

    monkeypatch.setattr(dist, "all_reduce", recording_all_reduce)
    yield calls
    dist.destroy_process_group()


def test_distributed_collectives_match_the_reference(one_rank_group, launches):
    """With torch.distributed initialised the kernels all-reduce what the reference all-reduces (whose
    two-rank results tests/test_reference_distributed.py checks): Sinkhorn's row count once, then per
    iteration the prototype log-sum-exp K-vector (max, then sum), and the centre's column sums and row
    count (the EMA itself then runs in the reference's form); with check_finite=True also the verdict
    (a min), so that every rank raises or none does; the modules likewise."""
    calls = one_rank_group
    logits, center = 2 * torch.randn(6, 300), torch.randn(1, 300)
    max_op, sum_op, min_op = str(dist.ReduceOp.MAX), str(dist.ReduceOp.SUM), str(dist.ReduceOp.MIN)
    expected = reference.sinkhorn_knopp_teacher(logits, 0.1, 3), reference.update_center(center, logits, 0.8)
    sinkhorn_calls = [(sum_op, ())] + [(max_op, (300,)), (sum_op, (300,))] * 3
    center_calls = [(sum_op, (300,)), (sum_op, ())]
    student, teacher = make_views(4, 2, 3, 300, teacher_logits=True)
    for backend in BACKENDS:
        for check_finite in (False, True):
            verdict = [(min_op, ())] if check_finite else []
            calls.clear()
            out = sinkhorn_knopp_teacher(logits, 0.1, 3, backend=backend, check_finite=check_finite)
            assert calls == sinkhorn_calls + verdict
            calls.clear()
            _, new = softmax_center_and_update_teacher(logits, center, 0.1, 0.8, backend=backend,
                                                       check_finite=check_finite)
            assert calls == center_calls + verdict
            torch.testing.assert_close(out, expected[0], **FP32)
            torch.testing.assert_close(new, expected[1], **FP32)
        assert ran(launches) == expect(backend, {"_row_lse_kernel", "_sinkhorn_kernel"})
        calls.clear()
        module, theirs = DINOLoss(300, backend=backend), LightlyDINOLoss(300)
        loss = module(teacher, student)
        assert calls == center_calls
        torch.testing.assert_close(loss, theirs(teacher, student), **FP32)  # lightly all-reduces its batch mean
        torch.testing.assert_close(module.center, theirs.center, **FP32)
        calls.clear()
        DINOLoss(300, centering="sinkhorn_knopp", backend=backend)(teacher, student)
        assert calls == sinkhorn_calls
        # both modules: the centring pass (the EMA itself in the reference form, distributed) and Sinkhorn-Knopp
        assert ran(launches) == expect(backend, CE_FWD | {"_row_lse_kernel"} | SINKHORN)


# ---- the compiled kernels -------------------------------------------------------------------------

# Every kernel variant: with and without teacher logits, same-view exclusion and weights, bf16 and fp32,
# 32- and 64-bit view strides; the centring's log-sum-exp pass with the centre's column sums (bf16) and its
# probabilities' pass (fp32).
LOWER_SCRIPT = """
from dinotron.kernels import cross_entropy as ce, sinkhorn_knopp as sk, softmax_center as sc

sizes = dict(n_rows="i32", K="i32", n_s_views="i32", n_t_views="i32", blocks_per_split="i32",
             s_scale="fp32", logit_scale="fp32", col_scale="fp32")
for teacher_logits, exclude, dtype, stride in [(True, True, "bf16", "i32"), (False, False, "fp32", "i64")]:
    views = dict(S_PTR=f"*{dtype}", s_view_stride=stride, s_row_stride="i32", T_PTR=f"*{dtype}",
                 t_view_stride=stride, t_row_stride="i32",
                 COL="*fp32" if teacher_logits else None, ROW_LSE="*fp32" if teacher_logits else None)
    flags = dict(S_PAD=16 if exclude else 1, T_PAD=2 if exclude else 1, BLOCK_K=256 if exclude else 4096,
                 TEACHER_LOGITS=teacher_logits, EXCLUDE_SAME_VIEW=exclude)
    lower(ce._ce_fwd_kernel, dict(**views, PARTIAL="*fp32", **sizes, **flags))
    lower(ce._ce_bwd_kernel, dict(**views, LSE="*fp32", MASS="*fp32", WEIGHT=None if exclude else "*fp32",
          GRAD_LOSS="*fp32", GRAD=f"*{dtype}", grad_view_stride="i32", **sizes, scale="fp32",
          **flags, HAS_WEIGHT=not exclude))
lower(ce._ce_combine_kernel, dict(PARTIAL="*fp32", WEIGHT="*fp32", LSE="*fp32", MASS="*fp32", LOSS="*fp32", n_out="i32",
      n_rows="i32", n_splits="i32", scale="fp32", HAS_WEIGHT=True, BLOCK=1024), num_warps=4)
for with_colsum, dtype in [(True, "bf16"), (False, "fp32")]:
    lower(sc._row_lse_kernel, dict(X=f"*{dtype}", BIAS="*fp32", LSE="*fp32", PROBS=None if with_colsum else "*fp32",
          COLSUM="*fp32" if with_colsum else None, PARTIAL="*fp32", COUNTER="*i32", n_rows="i32", K="i32",
          rows_per_view="i32", view_stride="i32", row_stride="i32", scale="fp32", bias_scale="fp32", HAS_BIAS=True,
          WITH_COLSUM=with_colsum, WRITE_PROBS=not with_colsum, BLOCK_R=16, BLOCK_K=256, BLOCK_S=16, GROUP_ROWS=256))
lower(sc._center_ema_kernel, dict(PARTIAL="*fp32", CENTER="*bf16", OUT="*bf16", n_partial="i32", partial_stride="i32",
      K="i32", inv_count="fp32", momentum="fp32", BLOCK_P=16, BLOCK_K=256), num_warps=4)
# one iteration's launch (both passes), distributed's column and row launches, the probabilities' launch
for dtype, has_row, col_pass, row_pass, probs in [("bf16", True, True, True, False),
                                                  ("fp32", False, True, False, False),
                                                  ("fp32", True, False, True, False),
                                                  ("bf16", True, False, False, True)]:
    lower(sk._sinkhorn_kernel, dict(X=f"*{dtype}", ROW="*fp32", COL="*fp32", SHIFT="*fp32", PARTIAL="*fp32",
          COUNTER="*i32", PROBS="*fp32" if probs else None, n_rows="i32", K="i32", rows_per_view="i32",
          view_stride="i32", row_stride="i32", scale="fp32", HAS_ROW=has_row, COL_PASS=col_pass,
          ROW_PASS=row_pass, FOLD=dtype == "bf16", WRITE_PROBS=probs, BLOCK_R=16, BLOCK_K=256, BLOCK_S=16))
lower(sk._fold_kernel, dict(PARTIAL="*fp32", ROW="*fp32", n_slabs="i32", n_rows="i32", BLOCK_S=16, BLOCK_ROWS=64))
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 13)


# ---- on a CUDA GPU (pytest -m gpu) ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n_local", [(128, 8), (64, 8), (3, 0), (1, 2)])
def test_gpu_dino_loss_matches_reference(B, n_local, dtype):
    student, teacher = make_views(2 + n_local, 2, B, 65536, dtype, device="cuda")
    for kwargs in PAIRINGS.values():
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: dino_loss(s, teacher, **kwargs), student),
            loss_and_grads(lambda s: reference.dino_loss(s, teacher, **kwargs), student),
            dtype,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_dino_loss_forms_pairings_and_alignments(dtype):
    assert_dino_loss_forms_and_pairings_match("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_gpu_dino_module_matches_eager(centering):
    K, B = 65536, 128
    fused = DINOLoss(K, centering=centering).cuda()
    eager = DINOLoss(K, centering=centering, backend="eager").cuda()
    for _ in range(2):
        student, teacher = make_views(10, 2, B, K, torch.bfloat16, device="cuda", teacher_logits=True)
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: fused(teacher, s), student),
            loss_and_grads(lambda s: eager(teacher, s), student),
            torch.bfloat16,
        )
        torch.testing.assert_close(fused.center, eager.center, **FP32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_teacher_ops_match_reference(dtype):
    logits = (3 * torch.randn(256, 65536, device="cuda")).to(dtype)
    center = torch.randn(1, 65536, device="cuda")
    probs, new_center = softmax_center_and_update_teacher(logits, center, 0.04, 0.9)
    torch.testing.assert_close(probs, reference.softmax_center_teacher(logits, center, 0.04), **FP32)
    torch.testing.assert_close(new_center, reference.update_center(center, logits, 0.9), **FP32)
    out = sinkhorn_knopp_teacher(logits, 0.05)
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.05), **FP32)


@pytest.mark.gpu
def test_gpu_ibot_patch_loss_matches_reference():
    student, teacher, masks = ibot_inputs(64, 196, 8192, torch.bfloat16)
    s, t, masks = student[masks].cuda().requires_grad_(), teacher[masks].cuda(), masks.cuda()
    assert_same_loss_and_grads(
        loss_and_grads(lambda x: ibot_patch_loss(x[0], t, masks), [s]),
        loss_and_grads(lambda x: reference.ibot_patch_loss(x[0], t, masks), [s]),
        torch.bfloat16,
    )


@pytest.mark.gpu
def test_gpu_peak_memory_is_the_gradient_plus_rows():
    """DINOLoss fwd+bwd at B=128, K=65536, 2+8 bf16 views: no (T, B, K) targets, no (S, B, K) copies."""
    K, B = 65536, 128
    module = DINOLoss(K).cuda()
    student, teacher = make_views(10, 2, B, K, torch.bfloat16, device="cuda", teacher_logits=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(module(teacher, student), student)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradient = 10 * B * K * 2
    # + 8 MiB: the (4, splits, S, B) fp32 partials and (S, B) lse / mass are < 1 MiB; the rest is the
    # caching allocator's 2 MiB segment granularity
    assert extra < gradient + 8 * 2**20, f"{extra / 2**20:.1f} MiB for a {gradient / 2**20:.0f} MiB gradient"


@pytest.mark.gpu
def test_gpu_compiled_losses_under_cuda_graphs_equal_eager():
    """DINOLoss + IBOTPatchLoss + dino_loss, forward and backward, compiled with mode="reduce-overhead":
    inductor around the ops and the step captured as CUDA graphs (nothing in it syncs with the host or runs on
    the CPU; the centres, module buffers, are updated inside the graph). cudagraph_or_error turns any
    skipped capture into an error. Three steps (warm-up, recording, replay) on new inputs each, against the
    same modules run eagerly (both on the Triton kernels): losses, student gradients (copied out before
    the next replay overwrites them) and centres, to the bf16 tolerances of the module docstring."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    K, B, n_local, N = 4096, 16, 4, 196
    masks = torch.zeros(2 * B, N, dtype=torch.bool)
    masks[:-1, :30] = True  # the last image has no masked patch; the row count is known on the host
    M = int(masks.sum())
    masks = masks.cuda()
    compiled_modules = (DINOLoss(K).cuda(), IBOTPatchLoss(K).cuda())
    eager_modules = copy.deepcopy(compiled_modules)

    def step(modules, teacher_cls, student_cls, teacher_patches, student_patches, probs):
        dino, ibot = modules
        return (dino(teacher_cls, student_cls) + ibot(teacher_patches, student_patches, masks)
                + dino_loss(student_cls, probs, **LIGHTLY))

    compiled = torch.compile(lambda *args: step(compiled_modules, *args), mode="reduce-overhead", fullgraph=True)
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        for _ in range(3):
            student_cls, teacher_cls = make_views(2 + n_local, 2, B, K, torch.bfloat16, "cuda", teacher_logits=True)
            student_patches = (2 * torch.randn(M, K, device="cuda")).bfloat16().requires_grad_()
            teacher_patches = (3 * torch.randn(M, K, device="cuda")).bfloat16()
            probs = [torch.softmax(3 * torch.randn(B, K, device="cuda"), dim=-1).bfloat16() for _ in range(2)]
            inputs = [*student_cls, student_patches]
            torch.compiler.cudagraph_mark_step_begin()
            loss = compiled(teacher_cls, student_cls, teacher_patches, student_patches, probs)
            grads = torch.autograd.grad(loss, inputs)
            actual = loss.detach().clone(), [g.clone() for g in grads]
            expected = loss_and_grads(
                lambda x: step(eager_modules, teacher_cls, x[:-1], teacher_patches, x[-1], probs), inputs)
            assert_same_loss_and_grads(actual, expected, torch.bfloat16)
            for ours, eager in zip(compiled_modules, eager_modules, strict=True):
                torch.testing.assert_close(center_of(ours), center_of(eager), **FP32)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert center_of(compiled_modules[1]).abs().max() > 0
    torch._dynamo.reset()


# ---- zero teacher rows: a rank whose batch has no masked patch --------------------------------------
# Oracle: the definitions on an empty batch (no probabilities; the mean of no rows is undefined, so the
# centre stays; dinov2's forward_masked sums over no patch: 0). tests/test_distributed.py runs the
# same ops on two ranks, one or both without rows.

@pytest.fixture
def no_eager_fallback(monkeypatch):
    """The reference teacher ops raise if called, so a Triton-backend test cannot pass on them."""
    def fail(*args, **kwargs):
        raise AssertionError("the eager reference ran in place of the Triton backend")

    for name in ("softmax_center_teacher", "softmax_center_lse", "update_center", "sinkhorn_knopp_teacher",
                 "sinkhorn_knopp_scalings", "cross_entropy", "ibot_patch_loss"):
        monkeypatch.setattr(reference, name, fail)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=["B=0", "V=2,B=0"])
def test_teacher_ops_zero_rows(request, launches, backend, shape):
    """Empty probabilities, the centre unchanged (a copy, same shape and dtype), empty Sinkhorn
    targets; the Triton backend launches no kernel (an empty grid is an error on a GPU)."""
    if backend == "triton":
        request.getfixturevalue("no_eager_fallback")
    logits = torch.randn(shape, dtype=torch.bfloat16)
    for center in (torch.randn(1, 64), torch.randn(64, dtype=torch.bfloat16)):
        probs = softmax_center_teacher(logits, center, 0.04, backend=backend)
        assert probs.shape == shape and probs.dtype == torch.float32
        probs, updated = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend=backend)
        assert probs.shape == shape and probs.dtype == torch.float32
        for new in (updated, update_center(center, logits, 0.9, backend=backend)):
            assert torch.equal(new, center) and new.dtype == center.dtype and new.data_ptr() != center.data_ptr()
    targets = sinkhorn_knopp_teacher(logits.reshape(-1, 64), 0.04, backend=backend)
    assert targets.shape == (0, 64) and targets.dtype == torch.float32
    assert ran(launches) == set()


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_ibot_patch_loss_zero_masked_patches(request, backend):
    """0, as dinov2's forward_masked (-sum over no patch / B), with a zero gradient that reaches the head
    producing the logits: every parameter gets a gradient on every rank, masked patches or not."""
    if backend == "triton":
        request.getfixturevalue("no_eager_fallback")
    head = torch.nn.Linear(16, 64)
    masks = torch.zeros(3, 4, dtype=torch.bool)
    loss = ibot_patch_loss(head(torch.randn(0, 16)), torch.rand(0, 64), masks, backend=backend)
    dense = torch.randn(3, 4, 64, requires_grad=True)
    dense_loss = ibot_patch_loss(dense, torch.rand(3, 4, 64), masks.view(3, 2, 2), backend=backend)
    (loss + dense_loss).backward()
    assert loss.item() == 0.0 == dense_loss.item() and loss.dtype == torch.float32
    assert torch.equal(head.weight.grad, torch.zeros(64, 16)) and torch.equal(dense.grad, torch.zeros(3, 4, 64))


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_ibot_module_zero_masked_patches(backend, centering):
    """IBOTPatchLoss with no masked patch: loss 0, zero gradient, the centre unchanged (lightly's mean
    of no rows would make it NaN)."""
    module = IBOTPatchLoss(64, centering=centering, backend=backend)
    module.center.center.normal_()
    center = center_of(module).clone()
    student = torch.randn(0, 64, requires_grad=True)
    loss = module(torch.randn(0, 64), student, torch.zeros(2, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 64)
    assert torch.equal(center_of(module), center)
