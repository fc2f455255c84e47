"""The DINO / iBOT loss kernels (softmax centring, Sinkhorn-Knopp, fused cross-entropy) against the
eager reference, lightly 1.6.0's modules and dinov2's literal formulas.

Oracles: kernels/reference.py (fp32 eager, itself checked against hand-computed cases and loops in
test_reference.py); lightly's DINOLoss / IBOTPatchLoss; dinov2's Sinkhorn-Knopp transcribed
(reference.dinov2_sinkhorn_knopp); an fp64 double loop over view pairs.
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
- bf16 / fp16 inputs: both sides see the same rounded values and compute in fp32, so losses keep
  the fp32 tolerance; gradients are rounded to bf16/fp16 once on each side, so two roundings of
  (nearly) equal fp32 values differ by up to one ulp, 2^-7 = 7.8e-3 relative in bf16: rtol 1e-2,
  and the fp32 atol (1e-6 x the largest; measured 1.2e-8 beyond the rtol part).
- thresholds of single tests say their origin beside them.
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
from helpers import spy_launches
from lowering import assert_lowers

FP32 = dict(rtol=1e-4, atol=1e-6)  # rtol: module docstring; atol: ~8 fp32 ulps (1.2e-7) of O(1) values


def grad_tol(dtype, grads):
    """Element-wise gradient tolerance (module docstring): rtol 1e-4 for fp32, 1e-2 (one bf16 ulp,
    2^-7, with margin) for gradients rounded to bf16/fp16; atol 1e-6 x the largest gradient."""
    scale = max(g.float().abs().max().item() for g in grads)
    return dict(rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-6 * scale)


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
    for g, r in zip(grads, ref_grads, strict=True):
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
    # |z| = |logits - c| / temp reaches ~300, where fp32 spacing is 3e-5: each exp(z - lse) is off by
    # ~3e-5 relative, so the row sums by up to that; 5e-5 leaves margin
    torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=5e-5)


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
    # dinov2 normalises in exp space: entries near fp32's subnormal range (1e-37 here) lose relative
    # precision (measured up to 1.7e-4), the smallest flush to 0 (atol 1e-9, a negligible probability)
    torch.testing.assert_close(out, reference.dinov2_sinkhorn_knopp(logits, 0.05, n_iterations), rtol=1e-3, atol=1e-9)


def test_sinkhorn_marginals_and_extreme_logits():
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


def assert_dino_loss_forms_and_pairings_match(device="cpu", dtype=torch.float32):
    """Every input form the kernels read (stacked, chunked, unaligned, transposed views) and
    pairing (S < T, one global view) against the reference."""
    student, teacher = make_views(4, 2, 3, 1000, dtype, device)
    expected = loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.1, "sum"), student)
    # one (S, B, K) tensor (gradient as one tensor), a (T, B, K) teacher, reduction="sum"
    stacked = torch.stack(student).detach().requires_grad_()
    loss, (grad,) = loss_and_grads(
        lambda s: dino_loss(s[0], torch.stack(teacher), 0.1, "sum", backend="triton"), [stacked]
    )
    assert grad.shape == stacked.shape
    assert_same_loss_and_grads((loss, grad.unbind(0)), expected, dtype)
    # views chunked from one tensor (read in place, 16-byte aligned offsets), views one element off
    # 16-byte alignment (read in place, unaligned), and views of a transposed tensor (copied)
    joined = torch.cat(student).detach().requires_grad_()
    loss, (grad,) = loss_and_grads(
        lambda s: dino_loss(list(s[0].chunk(4)), teacher, 0.1, "sum", backend="triton"), [joined]
    )
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
        actual = loss_and_grads(lambda s: dino_loss(s, teacher, 0.1, "sum", backend="triton"), views)
        assert_same_loss_and_grads(actual, expected, dtype)
    # more teacher views than student views, and one global view (student view 0 pairs with nothing)
    for S, T in [(2, 3), (5, 1)]:
        student, teacher = make_views(S, T, 3, 100, dtype, device)
        assert_same_loss_and_grads(
            loss_and_grads(lambda s: dino_loss(s, teacher, 0.07, backend="triton"), student),
            loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.07), student),
            dtype,
        )


def test_dino_loss_forms_and_pairings():
    assert_dino_loss_forms_and_pairings_match()


def test_dino_loss_scales_with_the_upstream_gradient():
    student, teacher = make_views(3, 2, 2, 300)
    _, grads = loss_and_grads(lambda s: 3.0 * dino_loss(s, teacher, backend="triton"), student)
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
    """bf16 views (the teacher's as one (T, B, K) tensor) against lightly on the same values upcast to
    fp32: both compute in fp32 from identical inputs, so the file's bf16 tolerance holds."""
    K, B = 4096, 3
    ours, theirs = DINOLoss(K, backend="triton"), LightlyDINOLoss(K)
    student16, teacher16 = make_views(4, 2, B, K, torch.bfloat16, teacher_logits=True)
    student = [s.detach().float().requires_grad_() for s in student16]
    expected = loss_and_grads(lambda s: theirs([t.float() for t in teacher16], s), student)
    actual = loss_and_grads(lambda s: ours(torch.stack(teacher16), s), student16)
    assert_same_loss_and_grads(actual, expected, torch.bfloat16)
    torch.testing.assert_close(ours.center, theirs.center, **FP32)


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
    ours, theirs = DINOLoss(64, 0.01, 0.05, 5), LightlyDINOLoss(64, 0.01, 0.05, 5)
    assert torch.equal(ours.teacher_temp_schedule, theirs.teacher_temp_schedule)


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


def assert_ce_tiling(launches, grid, block_k, cols_per_split, n_calls=1):
    """Each of n_calls forward and backward passes launched the kernels on this tiling."""
    fwd, combine, bwd = launches
    for kernel in (fwd, bwd):
        assert kernel.grids() == [grid] * n_calls and kernel.arg("BLOCK_K") == [block_k] * n_calls
        assert kernel.arg("cols_per_split") == [cols_per_split] * n_calls
    assert combine.arg("n_splits") == [grid[1]] * n_calls


@pytest.mark.parametrize("S,T,B,K,n_sms,dtype,grid,block_k,cols_per_split", [
    # V_PAD 16: BLOCK_K 256, 4 blocks (last 232 columns); 4 splits of one block each, as on an H100
    (10, 2, 3, 1000, H100_SMS, torch.float32, (3, 4), 256, 256),
    # the same blocks, 2 splits of 2 blocks: split 1 is [512, 1000), its second block partial (232)
    (10, 2, 3, 1000, 1, torch.float32, (3, 2), 256, 512),
    # 12 blocks (last 184), 4 splits of 3 blocks, the last [2304, 3000): several blocks per split, as
    # B=64, K=65536 on an H100 (9 splits of 29 blocks), in bf16
    (10, 2, 5, 3000, 4, torch.bfloat16, (5, 4), 256, 768),
    # V_PAD 4: BLOCK_K 1024, 5 blocks; 4 splits asked, 3 made of 2 blocks, the last one partial block (904)
    (4, 2, 1, 5000, 1, torch.float32, (1, 3), 1024, 2048),
    # V_PAD 2 (two global crops, no local): BLOCK_K 2048, 3 blocks (last 904), one split each
    (2, 2, 2, 5000, H100_SMS, torch.float32, (2, 3), 2048, 2048),
])
def test_gpu_tiles_dino_loss_matches_reference(gpu_tiles, monkeypatch, S, T, B, K, n_sms, dtype, grid, block_k,
                                               cols_per_split):
    gpu_tiles(n_sms)
    launches = spy_ce(monkeypatch)
    student, teacher = make_views(S, T, B, K, dtype)
    actual = loss_and_grads(lambda s: dino_loss(s, teacher, 0.1, backend="triton"), student)
    assert_ce_tiling(launches, grid, block_k, cols_per_split)
    assert_same_loss_and_grads(actual, loss_and_grads(lambda s: reference.dino_loss(s, teacher, 0.1), student), dtype)


@pytest.mark.parametrize("n_sms,grid,cols_per_split", [
    # V_PAD 1: BLOCK_K 4096, 3 blocks (last 808 columns); H100: 3 splits, one block each
    (H100_SMS, (7, 3), 4096),
    # one split per row, looping over the 3 blocks
    (1, (7, 1), 12288),
])
def test_gpu_tiles_ibot_patch_loss_matches_reference(gpu_tiles, monkeypatch, n_sms, grid, cols_per_split):
    gpu_tiles(n_sms)
    launches = spy_ce(monkeypatch)
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, :3] = masks[1, :4] = True  # 3 + 4 masked patches, the last image has none: weights 1/3, 1/4, -
    student = [(2 * torch.randn(7, 9000)).requires_grad_()]
    teacher = torch.softmax(3 * torch.randn(7, 9000), dim=-1)
    actual = loss_and_grads(lambda s: ibot_patch_loss(s[0], teacher, masks, 0.1, backend="triton"), student)
    assert_ce_tiling(launches, grid, 4096, cols_per_split)
    assert launches[1].arg("HAS_WEIGHT") == launches[2].arg("HAS_WEIGHT") == [True]
    expected = loss_and_grads(lambda s: reference.ibot_patch_loss(s[0], teacher, masks, 0.1), student)
    assert_same_loss_and_grads(actual, expected, torch.float32)


def test_gpu_tiles_softmax_center_and_update_match_reference(gpu_tiles, monkeypatch):
    """20 rows of K=5000: with the centre's column sums BLOCK_R 4 x BLOCK_K 1024 (5 programs, 5 blocks,
    the last 904 columns); probabilities alone BLOCK_R 1 x BLOCK_K 4096 (20 programs, 2 blocks, the
    last 904); the EMA 256 columns per program (20 programs, the last 136 columns), and from the rows
    themselves 2 row blocks of BLOCK_P 16 (the last 4 rows)."""
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    ema = spy_launches(monkeypatch, softmax_center, "_center_ema_kernel")
    logits, center = 3 * torch.randn(2, 10, 5000), torch.randn(1, 5000)
    expected = reference.softmax_center_teacher(logits, center, 0.04)
    expected_center = reference.update_center(center, logits, 0.9)
    probs, new_center = softmax_center_and_update_teacher(logits, center, 0.04, 0.9, backend="triton")
    torch.testing.assert_close(probs, expected, **FP32)
    torch.testing.assert_close(new_center, expected_center, **FP32)
    torch.testing.assert_close(softmax_center_teacher(logits, center, 0.04, backend="triton"), expected, **FP32)
    torch.testing.assert_close(update_center(center, logits, 0.9, backend="triton"), expected_center, **FP32)
    assert rows.grids() == [(5,), (20,)] and rows.arg("BLOCK_R") == [4, 1] and rows.arg("BLOCK_K") == [1024, 4096]
    assert ema.grids() == [(20,)] * 2 and ema.arg("BLOCK_K") == [256] * 2 and ema.arg("n_partial") == [1, 20]


def test_gpu_tiles_sinkhorn_matches_reference(gpu_tiles, monkeypatch):
    """40 rows of K=5000, 3 iterations: the column pass BLOCK_R 32 x BLOCK_K 128 (40 programs, the
    last 8 columns; 2 row blocks, the last 8 rows), the row pass BLOCK_K 4096 (2 blocks, the last 904)."""
    cols = spy_launches(monkeypatch, sinkhorn_knopp, "_col_lse_kernel")
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    logits = 0.5 * torch.randn(40, 5000)
    out = sinkhorn_knopp_teacher(logits, 0.05, 3, backend="triton")
    torch.testing.assert_close(out, reference.sinkhorn_knopp_teacher(logits, 0.05, 3), **FP32)
    assert cols.grids() == [(40,)] * 3 and cols.arg("BLOCK_R") == [32] * 3 and cols.arg("BLOCK_K") == [128] * 3
    assert rows.grids() == [(40,)] * 3 and rows.arg("BLOCK_K") == [4096] * 3
    assert rows.arg("WRITE_PROBS") == [False, False, True]  # the last row pass writes the probabilities


def module_call(module, teacher, masks=None):
    """loss_and_grads' fn for a loss module: DINOLoss on the student views, or IBOTPatchLoss on one
    (M, K) student view with its masks."""
    if masks is None:
        return lambda s: module(teacher, s)
    return lambda s: module(teacher, s[0], masks)


@pytest.mark.parametrize("module,centering,K,grid,block_k,row_pass,col_pass", [
    # 10 student views of 3 rows: BLOCK_K 256, 10 blocks (the last 196 columns) in 10 splits; the
    # centring pass BLOCK_R 4 x BLOCK_K 1024 (2 programs; 3 blocks, the last 452)
    (DINOLoss, "softmax", 2500, (3, 10), 256, ((2,), 4, 1024), None),
    # Sinkhorn's column pass BLOCK_R 8 x BLOCK_K 512 (5 programs, the last 452 columns), its row pass
    # one partial block of 4096
    (DINOLoss, "sinkhorn_knopp", 2500, (3, 10), 256, ((6,), 1, 4096), ((5,), 8, 512)),
    # 7 masked rows: BLOCK_K 4096, 3 blocks (the last 808 columns) in 3 splits; the centring pass
    # BLOCK_R 4 x BLOCK_K 1024 (2 programs, the second with 3 rows; 9 blocks, the last 808)
    (IBOTPatchLoss, "softmax", 9000, (7, 3), 4096, ((2,), 4, 1024), None),
])
def test_gpu_tiles_modules_match_eager(gpu_tiles, monkeypatch, module, centering, K, grid, block_k, row_pass, col_pass):
    """Teacher logits, their centred targets recomputed inside the cross-entropy kernels; two steps,
    the second centred with the updated centre. row_pass / col_pass: (grid, BLOCK_R, BLOCK_K) of the
    teacher's row (log-sum-exp) and column (Sinkhorn) kernels."""
    launches = spy_ce(monkeypatch)
    rows = spy_launches(monkeypatch, softmax_center, "_row_lse_kernel")
    cols = spy_launches(monkeypatch, sinkhorn_knopp, "_col_lse_kernel")
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
        torch.testing.assert_close(fused.center, eager.center, **FP32)
    assert_ce_tiling(launches, grid, block_k, block_k, n_calls=2)
    assert launches[0].arg("TEACHER_LOGITS") == [True, True]
    assert set(zip(rows.grids(), rows.arg("BLOCK_R"), rows.arg("BLOCK_K"), strict=True)) == {row_pass}
    assert set(zip(cols.grids(), cols.arg("BLOCK_R"), cols.arg("BLOCK_K"), strict=True)) == ({col_pass} - {None})


# ---- bad input, non-finite values, the backend switch ---------------------------------------------

X = torch.ones(2, 8)  # (B, K) = (2, 8) logits; the argument checks never read the values


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("call,match", [
    pytest.param(lambda b: dino_loss([X, X], [torch.randn(2, 9)] * 2, backend=b),
                 r"teacher_probs_per_view views are \(B, K\)=\(2, 9\)", id="teacher-K"),
    pytest.param(lambda b: dino_loss([X, torch.randn(3, 8)], [X, X], backend=b),
                 r"student_logits_per_view\[1\] has shape", id="student-B"),
    pytest.param(lambda b: dino_loss([X, X], [torch.randn(3, 8)] * 2, backend=b), r"\(B, K\)=\(3, 8\)", id="teacher-B"),
    pytest.param(lambda b: dino_loss([X.long()] * 2, [X, X], backend=b),
                 r"student_logits_per_view\[0\] must be float32", id="student-int"),
    pytest.param(lambda b: dino_loss([X.double()] * 2, [X, X], backend=b),
                 "must be float32, float16 or bfloat16, got torch.float64", id="student-fp64"),
    pytest.param(lambda b: dino_loss([torch.randn(8)] * 2, [X, X], backend=b),
                 r"student_logits_per_view\[0\] must be 2-D", id="student-1d"),
    pytest.param(lambda b: dino_loss(torch.randn(2, 0, 8), [X, X], backend=b),
                 "empty along dim 0", id="stacked-empty-B"),
    pytest.param(lambda b: dino_loss([torch.randn(2, 0)] * 2, [torch.randn(2, 0)] * 2, backend=b),
                 "empty along dim 1", id="empty-K"),
    pytest.param(lambda b: dino_loss([X], [X], backend=b), "no cross-view pairs", id="one-view"),
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
    pytest.param(lambda b: ibot_patch_loss(torch.randn(3, 8), torch.randn(3, 8), torch.ones(2, 2).bool(), backend=b),
                 "3 rows but masks has 4 True entries", id="ibot-mask-count"),
    pytest.param(lambda b: ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 2), backend=b),
                 "masks must be a bool", id="ibot-mask-dtype"),
    pytest.param(lambda b: DINOLoss(9, backend=b)([X, X], [X, X]), "center has 9 elements", id="module-center-size"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X, X], [X, torch.randn(3, 8)]),
                 r"student_out\[1\] has shape", id="module-student-B"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X, X], [X, X], teacher_temp=0.0),
                 "teacher_temp must be > 0", id="module-teacher-temp"),
    pytest.param(lambda b: DINOLoss(8, center_mode="median"), "Unknown mode 'median'", id="module-center-mode"),
    pytest.param(lambda b: DINOLoss(8, backend=b)([X.to("meta")] * 2, [X.to("meta")] * 2),
                 "center on cpu", id="module-device"),
    pytest.param(lambda b: softmax_center_teacher(X, torch.zeros(8, device="meta"), 0.1, backend=b),
                 "center on meta", id="center-device"),
    pytest.param(lambda b: DINOLoss(8, centering="mean"), "centering must be", id="module-centering"),
    pytest.param(lambda b: IBOTPatchLoss(8, backend=b)(torch.randn(0, 8), torch.randn(0, 8), torch.zeros(0, 2).bool()),
                 "masks is empty along dim 0", id="ibot-module-no-image"),  # no masked patch: a loss of 0
])
def test_bad_input(backend, call, match):
    with pytest.raises(ValueError, match=match):
        call(backend)


# NaN and inf - inf in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
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
    logits[2, 7] = math.inf
    module = DINOLoss(64, backend=backend)
    with pytest.raises(ValueError, match="DINOLoss is not finite"):
        module([logits[:2], logits[2:]], [torch.randn(2, 64)] * 3)
    assert torch.all(module.center == 0), "a failed step must leave the centre alone"
    masks = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="IBOTPatchLoss is not finite"):
        IBOTPatchLoss(64, backend=backend)(logits[1:3], torch.randn(2, 64), masks)


# NaN and inf - inf in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("bad,call", [
    pytest.param(math.nan, lambda x, b: softmax_center_teacher(x, torch.zeros(64), 0.04, backend=b), id="softmax-nan"),
    pytest.param(math.inf, lambda x, b: sinkhorn_knopp_teacher(x, 0.04, backend=b), id="sinkhorn-inf"),
    pytest.param(-math.inf, lambda x, b: update_center(torch.zeros(64), x, backend=b), id="update-minus-inf"),
    # softmax gives -inf logits probability 0, but the centre would become -inf
    pytest.param(-math.inf, lambda x, b: softmax_center_and_update_teacher(x, torch.zeros(64), 0.04, backend=b),
                 id="softmax-and-update-minus-inf"),
])
def test_non_finite_teacher_logits_raise(backend, bad, call):
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(ValueError, match="is not finite: teacher_logits"):
        call(x, backend)


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
    def recording_all_reduce(t, op=dist.ReduceOp.SUM, **kw):
        calls.append((str(op), tuple(t.shape)))
        return all_reduce(t, op, **kw)

    monkeypatch.setattr(dist, "all_reduce", recording_all_reduce)
    yield calls
    dist.destroy_process_group()


def test_distributed_collectives_match_the_reference(one_rank_group):
    """With torch.distributed initialised the kernels all-reduce what the reference all-reduces (whose
    two-rank results tests/test_reference_distributed.py checks): per Sinkhorn iteration the prototype
    log-sum-exp K-vector (max, then sum), and the centre's column sums and row count; then the
    finite check's verdict (a min), so that every rank raises or none does."""
    calls = one_rank_group
    logits, center = 2 * torch.randn(6, 300), torch.randn(1, 300)
    max_op, sum_op, min_op = str(dist.ReduceOp.MAX), str(dist.ReduceOp.SUM), str(dist.ReduceOp.MIN)
    expected = reference.sinkhorn_knopp_teacher(logits, 0.1, 3), reference.update_center(center, logits, 0.8)
    for backend in ("triton", "eager"):
        calls.clear()
        out = sinkhorn_knopp_teacher(logits, 0.1, 3, backend=backend)
        # the reference also all-reduces the row count B_total, which the kernels' row normalisation does without
        assert [c for c in calls if c[1] == (300,)] == [(max_op, (300,)), (sum_op, (300,))] * 3
        assert calls[-1] == (min_op, ())
        calls.clear()
        _, new = softmax_center_and_update_teacher(logits, center, 0.1, 0.8, backend=backend)
        assert calls == [(sum_op, (300,)), (sum_op, ()), (min_op, ())]
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


# ---- zero teacher rows: a rank whose batch has no masked patch --------------------------------------
# Oracle: the definitions on an empty batch (no probabilities; the mean of no rows is undefined, so the
# centre stays; dinov2's forward_masked sums over no patch: 0). tests/test_distributed.py runs the
# same ops on two ranks, one or both without rows.

@pytest.fixture
def no_eager_fallback(monkeypatch):
    """The reference teacher ops raise if called, so a Triton-backend test cannot pass on them."""
    def fail(*args, **kwargs):
        raise AssertionError("the eager reference ran in place of the Triton backend")

    for name in ("softmax_center_teacher", "update_center", "sinkhorn_knopp_teacher", "ibot_patch_loss"):
        monkeypatch.setattr(reference, name, fail)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=["B=0", "V=2,B=0"])
def test_teacher_ops_zero_rows(request, monkeypatch, backend, shape):
    """Empty probabilities, the centre unchanged (a copy, same shape and dtype), empty Sinkhorn
    targets; the Triton backend launches no kernel (an empty grid is an error on a GPU)."""
    if backend == "triton":
        request.getfixturevalue("no_eager_fallback")
    launches = [spy_launches(monkeypatch, softmax_center, "_row_lse_kernel"),
                spy_launches(monkeypatch, softmax_center, "_center_ema_kernel"),
                spy_launches(monkeypatch, sinkhorn_knopp, "_col_lse_kernel")]
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
    assert not any(launches)


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
    module.center.normal_()
    center = module.center.clone()
    student = torch.randn(0, 64, requires_grad=True)
    loss = module(torch.randn(0, 64), student, torch.zeros(2, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 64)
    assert torch.equal(module.center, center)
