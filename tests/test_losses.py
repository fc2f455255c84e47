"""The DINO / iBOT loss kernels (softmax centring, Sinkhorn-Knopp, fused cross-entropy) against the
eager reference, lightly 1.6.0's modules and dinov2's literal formulas.

On CPU the kernels run in the Triton interpreter (backend="triton"); shapes stay small, but cover
K in {1000, 4096, 65536}, B in {1, 3, 64}, 2 global + {0, 2, 8} local views, fp32 and bf16.
Tolerances:
- fp32: rtol 1e-4 (probabilities, losses, gradients; atol 1e-6 x the largest gradient). The kernels
  sum in a different order than the reference; at B x K = 262144 the reference's own fp32 einsum is
  off by ~1e-5 relative against fp64 (the kernels by ~1e-7), so 1e-4 is not a free pass.
- bf16 / fp16 inputs: both sides see the same rounded values and compute in fp32, so losses keep
  the fp32 tolerance; gradients are rounded to bf16/fp16 once on each side: rtol 1e-2, atol 1e-2 x
  the largest (bf16 has 8 bits of mantissa: one rounding is up to 4e-3 relative).
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss

from dinotron.kernels import (
    DINOLoss,
    IBOTPatchLoss,
    cross_entropy,
    dino_loss,
    ibot_patch_loss,
    reference,
    sinkhorn_knopp_teacher,
    softmax_center_and_update_teacher,
    softmax_center_teacher,
    update_center,
)
from dinotron.kernels.layout import view_table
from lowering import assert_lowers

FP32 = dict(rtol=1e-4, atol=1e-6)


def grad_tol(dtype, grads):
    scale = max(g.float().abs().max().item() for g in grads)
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-6 * scale)
    return dict(rtol=1e-2, atol=1e-2 * scale)


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


def assert_same_loss_and_grads(actual, expected, dtype):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss.float(), **FP32)
    tol = grad_tol(dtype, ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), **tol)


# ---- softmax centring and the centre update -------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((3, 1000), torch.float32), ((2, 64, 1000), torch.float32),
                                         ((2, 3, 4096), torch.bfloat16), ((1, 65536), torch.float32)])
def test_softmax_center_and_update_match_reference(shape, dtype):
    K = shape[-1]
    logits = (3 * torch.randn(shape)).to(dtype)
    center = torch.randn(1, K)
    expected = reference.softmax_center_teacher(logits, center, 0.04)
    expected_center = reference.update_center(center, logits, 0.9)
    torch.testing.assert_close(softmax_center_teacher(logits, center, 0.04, backend="triton"), expected, **FP32)
    probs, new_center = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="triton")
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert new_center.shape == center.shape and new_center.dtype == center.dtype
    torch.testing.assert_close(probs, expected, **FP32)
    torch.testing.assert_close(new_center, expected_center, **FP32)
    torch.testing.assert_close(update_center(center, logits, 0.9, backend="triton"), expected_center, **FP32)
    torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=5e-5)  # lse rounding at |z| ~ 300


def test_centre_keeps_its_shape_and_dtype_and_is_not_modified():
    logits = torch.randn(4, 100)
    for center in (torch.zeros(1, 1, 100), torch.randn(100).bfloat16()):
        before = center.clone()
        _, new = softmax_center_and_update_teacher(logits, center, 0.1, 0.8, backend="triton")
        assert new.shape == center.shape and new.dtype == center.dtype and torch.equal(center, before)
        torch.testing.assert_close(new, reference.update_center(center, logits, 0.8))


# ---- Sinkhorn-Knopp -------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K,n_iterations,dtype", [(3, 1000, 3, torch.float32), (128, 4096, 3, torch.float32),
                                                    (2, 65536, 3, torch.bfloat16), (5, 100, 1, torch.float32)])
def test_sinkhorn_matches_reference_and_dinov2(B, K, n_iterations, dtype):
    logits = (0.5 * torch.randn(B, K)).to(dtype)  # |logits| / temp < 88: dinov2's literal exp does not overflow
    out = sinkhorn_knopp_teacher(logits, 0.05, n_iterations, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (B, K)
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.05, n_iterations), **FP32)
    torch.testing.assert_close(out, reference.dinov2_sinkhorn_knopp(logits, 0.05, n_iterations), rtol=1e-3, atol=1e-9)


def test_sinkhorn_marginals_and_extreme_logits():
    B, K = 32, 16
    logits = torch.randn(B, K)
    out = sinkhorn_knopp_teacher(logits, 1.0, backend="triton")  # 3 iterations, as dinov2
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    assert (out.sum(dim=0) - B / K).abs().max() > 1e-3 * B / K  # not converged yet: rows are exact, columns not
    out = sinkhorn_knopp_teacher(logits, 1.0, n_iterations=10, backend="triton")
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((K,), B / K), rtol=1e-5, atol=0)
    # logits whose exp overflows fp32 (dinov2's literal form gives inf/nan) stay finite in log-space
    logits = 50 * torch.randn(16, 32)
    out = sinkhorn_knopp_teacher(logits, 0.04, backend="triton")
    assert torch.isfinite(out).all() and not torch.isfinite(reference.dinov2_sinkhorn_knopp(logits, 0.04)).all()
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.04), rtol=1e-3, atol=1e-4)


# ---- dino_loss ------------------------------------------------------------------------------------

def dino_double_loop_fp64(student, teacher, student_temp):
    """Mean over pairs of -mean_b sum_k t log_softmax(s / temp), in float64."""
    terms = [-(t.double() * F.log_softmax(s.double() / student_temp, dim=-1)).sum(-1).mean()
             for i, s in enumerate(student) for j, t in enumerate(teacher) if i != j]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("K,B,n_local,dtype", [
    (1000, 3, 0, torch.float32), (1000, 64, 2, torch.bfloat16), (4096, 1, 2, torch.float16),
    (4096, 3, 8, torch.float32), (65536, 1, 8, torch.float32), (65536, 3, 0, torch.bfloat16),
])
def test_dino_loss_matches_reference(K, B, n_local, dtype):
    student, teacher = make_views(2 + n_local, 2, B, K, dtype)
    actual = loss_and_grads(lambda s: dino_loss(s, teacher, 0.1, backend="triton"), student)
    assert_same_loss_and_grads(actual, loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.1), student), dtype)
    # the kernel's blockwise fp32 sums are within 1e-6 of fp64 (the reference's einsum: ~1e-5 at B x K ~ 1e5)
    assert actual[0].item() == pytest.approx(dino_double_loop_fp64(student, teacher, 0.1).item(), rel=1e-6)


def test_dino_loss_forms_and_pairings(device="cpu", dtype=torch.float32):
    student, teacher = make_views(4, 2, 3, 1000, dtype, device)
    expected = loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.1, "sum"), student)
    # one (S, B, K) tensor (gradient as one tensor), a (T, B, K) teacher, reduction="sum"
    stacked = torch.stack(student).detach().requires_grad_()
    loss, (grad,) = loss_and_grads(lambda s: dino_loss(s[0], torch.stack(teacher), 0.1, "sum", backend="triton"), [stacked])
    assert grad.shape == stacked.shape
    assert_same_loss_and_grads((loss, grad.unbind(0)), expected, dtype)
    # views chunked from one tensor (read in place, 16-byte aligned offsets), views one element off
    # 16-byte alignment (read in place, unaligned), and views of a transposed tensor (copied)
    joined = torch.cat(student).detach().requires_grad_()
    loss, (grad,) = loss_and_grads(lambda s: dino_loss(list(s[0].chunk(4)), teacher, 0.1, "sum", backend="triton"), [joined])
    assert_same_loss_and_grads((loss, grad.chunk(4)), expected, dtype)
    padded = torch.zeros(3, 1 + 4 * 1001, dtype=dtype, device=device)
    unaligned = []
    for i, s in enumerate(student):
        padded[:, 1 + 1001 * i: 1001 * (i + 1)] = s.detach()
        unaligned.append(padded[:, 1 + 1001 * i: 1001 * (i + 1)].detach().requires_grad_())
    assert view_table(unaligned).align == 1
    assert view_table(list(joined.chunk(4))).align == 16 // joined.element_size()
    transposed = [s.detach().t().contiguous().t().requires_grad_() for s in student]
    assert transposed[0].stride() == (1, 3)
    for views in (unaligned, transposed):
        assert_same_loss_and_grads(loss_and_grads(lambda s: dino_loss(s, teacher, 0.1, "sum", backend="triton"), views), expected, dtype)
    # more teacher views than student views, and one global view (student view 0 pairs with nothing)
    for S, T in [(2, 3), (5, 1)]:
        student, teacher = make_views(S, T, 3, 100, dtype, device)
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: dino_loss(s, teacher, 0.07, backend="triton"), student),
            loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.07), student),
            dtype,
        )


def test_dino_loss_scales_with_the_upstream_gradient():
    student, teacher = make_views(3, 2, 2, 300)
    _, grads = loss_and_grads(lambda s: 3.0 * dino_loss(s, teacher, backend="triton"), student)
    _, ref_grads = loss_and_grads(lambda s: 3.0 * reference.dino_loss(s, teacher), student)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **grad_tol(torch.float32, ref_grads))


# ---- ibot_patch_loss ------------------------------------------------------------------------------

def ibot_inputs(B, N, K, dtype=torch.float32):
    masks = torch.rand(B, N) < 0.4
    masks[0, 0] = True
    masks[-1] = False  # an image without masked patches counts in the batch mean
    student = (2 * torch.randn(B, N, K)).to(dtype)
    teacher = torch.softmax(3 * torch.randn(B, N, K), dim=-1).to(dtype)
    return student, teacher, masks


@pytest.mark.parametrize("B,N,K,dtype", [(3, 16, 1000, torch.float32), (4, 9, 4096, torch.bfloat16), (2, 4, 65536, torch.float32)])
def test_ibot_patch_loss_matches_reference(B, N, K, dtype):
    student, teacher, masks = ibot_inputs(B, N, K, dtype)
    s, t = student[masks].requires_grad_(), teacher[masks]
    assert_same_loss_and_grads(
        loss_and_grads(lambda x: ibot_patch_loss(x[0], t, masks, 0.1, backend="triton"), [s]),
        loss_and_grads(lambda x: reference.ibot_patch_loss(x[0], t, masks, 0.1), [s]),
        dtype,
    )


def test_ibot_patch_loss_dense_and_spatial_masks():
    student, teacher, masks = ibot_inputs(3, 16, 200)
    dense = student.requires_grad_()
    expected = loss_and_grads(lambda x: reference.ibot_patch_loss(x[0], teacher, masks), [dense])
    spatial = masks.reshape(3, 4, 4)
    actual = loss_and_grads(lambda x: ibot_patch_loss(x[0], teacher, spatial, backend="triton"), [dense])
    assert_same_loss_and_grads(actual, expected, torch.float32)
    # no masked patch in the whole batch: the loss is 0, as the reference's
    none = torch.zeros(3, 16, dtype=torch.bool)
    loss = ibot_patch_loss(torch.randn(0, 200), torch.randn(0, 200), none, backend="triton")
    assert loss.item() == 0.0 == reference.ibot_patch_loss(torch.randn(0, 200), torch.randn(0, 200), none).item()


# ---- the drop-in modules --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("K,B,n_local", [(1000, 3, 2), (4096, 1, 8), (65536, 1, 0)])
def test_dino_module_matches_lightly(backend, K, B, n_local):
    """Three steps (the centre moves; backward runs after forward updated it), with lightly's
    temperature arguments: an explicit teacher_temp, the warm-up schedule at an epoch, the default."""
    ours = DINOLoss(K, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=10, backend=backend)
    theirs = LightlyDINOLoss(K, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=10)
    for kwargs in ({"teacher_temp": 0.07}, {"epoch": 3}, {}):
        student, teacher = make_views(2 + n_local, 2, B, K, teacher_logits=True)
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: ours(teacher, s, **kwargs), student),
            loss_and_grads(lambda s: theirs(teacher, s, **kwargs), student),
            torch.float32,
        )
        assert ours.center.shape == theirs.center.shape == (1, 1, K)
        torch.testing.assert_close(ours.center, theirs.center, **FP32)


def test_dino_module_bf16_and_stacked_views():
    K, B = 4096, 3
    ours, theirs = DINOLoss(K, backend="triton"), LightlyDINOLoss(K)
    student, teacher = make_views(4, 2, B, K, teacher_logits=True)
    expected = loss_and_grads(lambda s: theirs(teacher, s), student)
    student16 = [s.detach().bfloat16().requires_grad_() for s in student]
    teacher16 = torch.stack(teacher).bfloat16()
    loss, grads = loss_and_grads(lambda s: ours(teacher16, s), student16)
    # bf16 rounding of the logits: loss within 1e-2 relative, gradients within bf16 tolerance
    torch.testing.assert_close(loss, expected[0], rtol=1e-2, atol=0)
    for g, r in zip(grads, expected[1]):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2 * max(x.abs().max().item() for x in expected[1]))
    torch.testing.assert_close(ours.center, theirs.center, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("n_local", [0, 8])
def test_dino_module_sinkhorn_matches_dinov2(n_local):
    """centering="sinkhorn_knopp": dinov2's Sinkhorn-Knopp over all T*B teacher rows, no centre update."""
    K, B = 1000, 3
    student, teacher = make_views(2 + n_local, 2, B, K, teacher_logits=True)
    teacher = [t / 6 for t in teacher]  # |logits| / temp < 88: dinov2's literal exp does not overflow
    targets = reference.dinov2_sinkhorn_knopp(torch.cat(teacher), 0.06).view(2, B, K)
    expected = loss_and_grads(lambda s: reference.dino_loss(s, targets, 0.1), student)
    for backend in ("triton", "eager"):
        module = DINOLoss(K, teacher_temp=0.06, centering="sinkhorn_knopp", backend=backend)
        assert_same_loss_and_grads(loss_and_grads(lambda s: module(teacher, s), student), expected, torch.float32)
        assert torch.all(module.center == 0)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_ibot_module_matches_lightly(backend):
    K = 1000
    ours, theirs = IBOTPatchLoss(K, backend=backend), LightlyIBOTPatchLoss(K)
    for teacher_temp in (None, 0.06):
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
        assert ours.center.shape == theirs.center.value.shape == (1, K)
        torch.testing.assert_close(ours.center, theirs.center.value, **FP32)


def test_ibot_module_dense_input_and_sinkhorn():
    K = 500
    student, teacher_logits, masks = ibot_inputs(3, 16, K)
    teacher_logits = teacher_logits.log()  # log-probabilities: bounded logits for dinov2's literal Sinkhorn
    student.requires_grad_()
    flat_teacher = teacher_logits[masks]
    dense = IBOTPatchLoss(K, backend="triton")(teacher_logits, student, masks)
    masked = IBOTPatchLoss(K, backend="triton")(flat_teacher, student[masks], masks)
    torch.testing.assert_close(dense, masked)
    targets = reference.dinov2_sinkhorn_knopp(flat_teacher, 0.5)
    expected = loss_and_grads(lambda s: reference.ibot_patch_loss(s[0][masks], targets, masks), [student])
    for backend in ("triton", "eager"):
        module = IBOTPatchLoss(K, centering="sinkhorn_knopp", backend=backend)
        actual = loss_and_grads(lambda s: module(teacher_logits, s[0], masks, teacher_temp=0.5), [student])
        assert_same_loss_and_grads(actual, expected, torch.float32)


def test_modules_have_lightlys_state():
    assert set(DINOLoss(64).state_dict()) == {"center"}
    assert DINOLoss(64).state_dict()["center"].shape == LightlyDINOLoss(64).state_dict()["center"].shape
    assert IBOTPatchLoss(64).center.shape == (1, 64)
    assert torch.equal(DINOLoss(64, 0.01, 0.05, 5).teacher_temp_schedule, LightlyDINOLoss(64, 0.01, 0.05, 5).teacher_temp_schedule)


# ---- bad input, non-finite values, the backend switch ---------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_bad_input(backend):
    x = torch.randn(2, 8)
    cases = [
        (lambda: dino_loss([x, x], [torch.randn(2, 9)] * 2, backend=backend), r"teacher_probs_per_view views are \(B, K\)=\(2, 9\)"),
        (lambda: dino_loss([x, torch.randn(3, 8)], [x, x], backend=backend), r"student_logits_per_view\[1\] has shape"),
        (lambda: dino_loss([x, x], [torch.randn(3, 8)] * 2, backend=backend), r"\(B, K\)=\(3, 8\)"),
        (lambda: dino_loss([x.long()] * 2, [x, x], backend=backend), r"student_logits_per_view\[0\] must be float32"),
        (lambda: dino_loss([x.double()] * 2, [x, x], backend=backend), "must be float32, float16 or bfloat16, got torch.float64"),
        (lambda: dino_loss([torch.randn(8)] * 2, [x, x], backend=backend), r"student_logits_per_view\[0\] must be 2-D"),
        (lambda: dino_loss(torch.randn(2, 0, 8), [x, x], backend=backend), "empty along dim 0"),
        (lambda: dino_loss([torch.randn(2, 0)] * 2, [torch.randn(2, 0)] * 2, backend=backend), "empty along dim 1"),
        (lambda: dino_loss([x], [x], backend=backend), "no cross-view pairs"),
        (lambda: dino_loss([x, x], [x, x], reduction="none", backend=backend), "reduction"),
        (lambda: dino_loss([x, x], [x, x], student_temp=0.0, backend=backend), "student_temp must be > 0"),
        (lambda: softmax_center_teacher(x, torch.zeros(9), 0.04, backend=backend), "center has 9 elements"),
        (lambda: softmax_center_teacher(torch.randn(0, 8), torch.zeros(8), 0.04, backend=backend), "empty along dim 0"),
        (lambda: softmax_center_and_update_teacher(x, torch.zeros(8), 0.04, 1.5, backend=backend), "momentum"),
        (lambda: update_center(torch.zeros(8), torch.randn(8), backend=backend), "teacher_logits must be 2-D or 3-D"),
        (lambda: sinkhorn_knopp_teacher(x, 0.04, 0, backend=backend), "n_iterations"),
        (lambda: sinkhorn_knopp_teacher(torch.randn(2, 3, 8), 0.04, backend=backend), "teacher_logits must be 2-D"),
        (lambda: sinkhorn_knopp_teacher(x.half(), -1.0, backend=backend), "teacher_temp must be > 0"),
        (lambda: ibot_patch_loss(torch.randn(3, 8), torch.randn(3, 8), torch.ones(2, 2, dtype=torch.bool), backend=backend),
         "3 rows but masks has 4 True entries"),
        (lambda: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2), backend=backend), "masks must be a bool"),
        (lambda: DINOLoss(9, backend=backend)([x, x], [x, x]), "center has 9 elements"),
        (lambda: DINOLoss(8, backend=backend)([x, x], [x, torch.randn(3, 8)]), r"student_out\[1\] has shape"),
        (lambda: DINOLoss(8, backend=backend)([x, x], [x, x], teacher_temp=0.0), "teacher_temp must be > 0"),
        (lambda: DINOLoss(8, center_mode="median"), "Unknown mode 'median'"),
        (lambda: DINOLoss(8, backend=backend)([x.to("meta")] * 2, [x.to("meta")] * 2), "center on cpu"),
        (lambda: softmax_center_teacher(x, torch.zeros(8, device="meta"), 0.1, backend=backend), "center on meta"),
        (lambda: DINOLoss(8, centering="mean"), "centering must be"),
        (lambda: IBOTPatchLoss(8, backend=backend)(torch.randn(0, 8), torch.randn(0, 8), torch.zeros(2, 2, dtype=torch.bool)),
         "teacher_out .masked rows. is empty"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")  # NaN and inf - inf in the interpreter
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_non_finite_inputs_raise(backend):
    student, teacher = make_views(3, 2, 2, 64)
    bad_student = [s.detach().clone() for s in student]
    bad_student[2][1, 5] = -math.inf
    bad_teacher = [t.clone() for t in teacher]
    bad_teacher[1][0, 3] = math.nan
    with pytest.raises(ValueError, match="dino_loss is not finite"):
        dino_loss(bad_student, teacher, backend=backend)
    with pytest.raises(ValueError, match="dino_loss is not finite"):
        dino_loss(student, bad_teacher, backend=backend)
    assert torch.isnan(dino_loss(student, bad_teacher, backend=backend, check_finite=False))
    logits = torch.randn(4, 64)
    for bad, fn in [(math.nan, lambda x: softmax_center_teacher(x, torch.zeros(64), 0.04, backend=backend)),
                    (math.inf, lambda x: sinkhorn_knopp_teacher(x, 0.04, backend=backend)),
                    (-math.inf, lambda x: update_center(torch.zeros(64), x, backend=backend)),
                    # softmax gives -inf logits probability 0, but the centre would become -inf
                    (-math.inf, lambda x: softmax_center_and_update_teacher(x, torch.zeros(64), 0.04, backend=backend))]:
        x = logits.clone()
        x[2, 7] = bad
        with pytest.raises(ValueError, match="is not finite: teacher_logits"):
            fn(x)
    logits[2, 7] = math.inf
    module = DINOLoss(64, backend=backend)
    with pytest.raises(ValueError, match="DINOLoss is not finite"):
        module([logits[:2], logits[2:]], [torch.randn(2, 64)] * 3)
    assert torch.all(module.center == 0), "a failed step must leave the centre alone"
    masks = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="IBOTPatchLoss is not finite"):
        IBOTPatchLoss(64, backend=backend)(logits[1:3], torch.randn(2, 64), masks)


def test_teacher_gradients_are_refused():
    student, teacher = make_views(3, 2, 2, 16)
    teacher = [t.requires_grad_() for t in teacher]
    with pytest.raises(ValueError, match="teacher_probs_per_view requires grad"):
        dino_loss(student, teacher, backend="triton")
    reference.dino_loss(student, teacher)  # the eager reference differentiates the targets
    with torch.no_grad():
        dino_loss(student, teacher, backend="triton")
    for backend in ("triton", "eager"):
        with pytest.raises(ValueError, match="teacher_out requires grad"):
            DINOLoss(16, backend=backend)(teacher, student)


def test_backend_switch(monkeypatch):
    calls = []
    original = cross_entropy.DinoCrossEntropy.apply
    monkeypatch.setattr(cross_entropy.DinoCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a))
    student, teacher = make_views(3, 2, 2, 32)
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    auto = dino_loss(student, teacher)  # CPU tensors: auto is the eager reference
    assert calls == [] and auto.item() == reference.dino_loss(student, teacher).item()
    monkeypatch.setenv("DINOTRON_BACKEND", "triton")
    torch.testing.assert_close(dino_loss(student, teacher), auto, **FP32)
    DINOLoss(32)(teacher, student)
    assert calls == [1, 1]
    assert dino_loss(student, teacher, backend="eager").item() == auto.item() and len(calls) == 2
    monkeypatch.setenv("DINOTRON_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        dino_loss(student, teacher)


# ---- torch.distributed ------------------------------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A one-process gloo group, with dist.all_reduce recording (op, shape) of every call."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    calls, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=dist.ReduceOp.SUM, **kw: calls.append((str(op), tuple(t.shape))) or all_reduce(t, op, **kw))
    yield calls
    dist.destroy_process_group()


def test_distributed_collectives_match_the_reference(one_rank_group):
    """With torch.distributed initialised the kernels all-reduce what the reference all-reduces (whose
    two-rank results tests/test_reference_distributed.py checks): per Sinkhorn iteration the prototype
    log-sum-exp K-vector (max, then sum), and the centre's column sums and row count."""
    calls = one_rank_group
    logits, center = 2 * torch.randn(6, 300), torch.randn(1, 300)
    max_op, sum_op = str(dist.ReduceOp.MAX), str(dist.ReduceOp.SUM)
    expected = reference.sinkhorn_knopp_teacher(logits, 0.1, 3), reference.update_center(center, logits, 0.8)
    for backend in ("triton", "eager"):
        calls.clear()
        out = sinkhorn_knopp_teacher(logits, 0.1, 3, backend=backend)
        # the reference also all-reduces the row count B_total, which the kernels' row normalisation does without
        assert [c for c in calls if c[1] == (300,)] == [(max_op, (300,)), (sum_op, (300,))] * 3
        calls.clear()
        _, new = softmax_center_and_update_teacher(logits, center, 0.1, 0.8, backend=backend)
        assert calls == [(sum_op, (300,)), (sum_op, ())]
        torch.testing.assert_close(out, expected[0], **FP32)
        torch.testing.assert_close(new, expected[1], **FP32)


# ---- the compiled kernels -------------------------------------------------------------------------

# Every kernel variant: with and without teacher logits and same-view exclusion, bf16 and fp32.
LOWER_SCRIPT = """
from dinotron.kernels import cross_entropy as ce, sinkhorn_knopp as sk, softmax_center as sc

sizes = dict(n_rows="i32", K="i32", n_s_views="i32", n_t_views="i32", cols_per_split="i32",
             s_scale="fp32", logit_scale="fp32", col_scale="fp32")
for teacher_logits, exclude, dtype in [(True, True, "bf16"), (False, False, "fp32")]:
    targets = dict(COL="*fp32" if teacher_logits else None, ROW_LSE="*fp32" if teacher_logits else None)
    flags = dict(V_PAD=16 if exclude else 1, BLOCK_K=256 if exclude else 4096, TEACHER_LOGITS=teacher_logits,
                 EXCLUDE_SAME_VIEW=exclude, S_ALIGN=8 if dtype == "bf16" else 4, T_ALIGN=8 if dtype == "bf16" else 4)
    lower(ce._ce_fwd_kernel, dict(S_PTR=f"*{dtype}", S_OFFSETS="*i64", s_row_stride="i32", T_PTR=f"*{dtype}",
          T_OFFSETS="*i64", t_row_stride="i32", **targets, PARTIAL="*fp32", **sizes, **flags))
    lower(ce._ce_bwd_kernel, dict(S_PTR=f"*{dtype}", S_OFFSETS="*i64", s_row_stride="i32", T_PTR=f"*{dtype}",
          T_OFFSETS="*i64", t_row_stride="i32", **targets, LSE="*fp32", MASS="*fp32",
          WEIGHT=None if exclude else "*fp32", GRAD_LOSS="*fp32", GRAD=f"*{dtype}", grad_view_stride="i32",
          **sizes, scale="fp32", **{**flags, "HAS_WEIGHT": not exclude}))
lower(ce._ce_combine_kernel, dict(PARTIAL="*fp32", WEIGHT="*fp32", LSE="*fp32", MASS="*fp32", LOSS="*fp32", n_out="i32",
      n_rows="i32", n_splits="i32", scale="fp32", HAS_WEIGHT=True, BLOCK=1024), num_warps=4)
for with_colsum, dtype in [(True, "bf16")]:
    lower(sc._row_lse_kernel, dict(X=f"*{dtype}", X_OFFSETS="*i64", BIAS="*fp32", LSE="*fp32", PROBS="*fp32",
          COLSUM="*fp32" if with_colsum else None, n_rows="i32", K="i32", rows_per_view="i32", row_stride="i32",
          scale="fp32", bias_scale="fp32", BLOCK_R=4 if with_colsum else 1, BLOCK_K=1024 if with_colsum else 4096,
          ALIGN=8, HAS_BIAS=True, WITH_COLSUM=with_colsum, WRITE_PROBS=True))
lower(sc._center_ema_kernel, dict(PARTIAL="*fp32", CENTER="*bf16", OUT="*bf16", n_partial="i32", partial_stride="i32",
      K="i32", inv_count="fp32", momentum="fp32", BLOCK_P=16, BLOCK_K=256), num_warps=4)
lower(sk._col_lse_kernel, dict(X="*bf16", X_OFFSETS="*i64", ROW_LSE="*fp32", OUT="*fp32", n_rows="i32", K="i32",
      rows_per_view="i32", row_stride="i32", scale="fp32", HAS_ROW_LSE=True, BLOCK_R=32, BLOCK_K=128, ALIGN=8))
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 8)


# ---- on a CUDA GPU (pytest -m gpu) ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n_local", [(128, 8), (64, 8), (3, 0), (1, 2)])
def test_gpu_dino_loss_matches_reference(B, n_local, dtype):
    student, teacher = make_views(2 + n_local, 2, B, 65536, dtype, device="cuda")
    assert_same_loss_and_grads(
        loss_and_grads(lambda s: dino_loss(s, teacher, 0.1), student),
        loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.1), student),
        dtype,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_dino_loss_forms_pairings_and_alignments(dtype):
    test_dino_loss_forms_and_pairings("cuda", dtype)


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
    assert extra < gradient + 8 * 2**20, f"{extra / 2**20:.1f} MiB for a {gradient / 2**20:.0f} MiB gradient"
