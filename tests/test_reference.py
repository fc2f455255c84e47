"""The eager reference ops (kernels/reference.py) against hand-computed cases and brute-force loops.

Oracles: hand-computed values, Python/fp64 loops, dinov2's Sinkhorn-Knopp as written (exp space, in fp32
and in float64), dinov2's DINOLoss.forward and iBOTPatchLoss.forward / forward_masked (transcribed
below, with their argument names), lightly's DINOLoss pairing (the same loop without the same-index
pairs, averaged), lightly's KoLeo formula, F.scaled_dot_product_attention.
Tolerances (each threshold also says its origin beside it):
- the same fp32 math in another order or layout (batched vs looped, einsum vs sums): torch.testing's
  fp32 defaults (rtol 1.3e-6, atol 1e-5), or rtol 1e-5 (~80 fp32 ulps) where the formulas differ
  (log-space vs exp-space, fused vs two-step); measured errors are 10-1000x below.
- float64 inputs (computed in float64): rtol 1e-12 against float64 transcriptions, ~4500 float64 ulps
  for sums of up to ~1e3 terms in another order (measured < 1e-14).
- bf16 outputs: the reference computes in fp32 and rounds once, so the fp64 oracle on the same
  rounded inputs is within bf16's unit roundoff, eps / 2 = 2^-8 relative, plus the fp32 error (atol).
- marginals are sums of K fp32 terms near 1: a few ulps (measured 4e-7), atol 1e-5.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotron.kernels import reference as ref
from helpers import dinov2_collate, dinov2_dino_forward, dinov2_ibot_forward, dinov2_ibot_forward_masked

LN2 = math.log(2.0)
F64 = dict(rtol=1e-12, atol=1e-14)  # float64 against float64 transcriptions: module docstring


# ---- softmax_center_teacher / update_center -------------------------------------------------------

def test_softmax_center_teacher_hand_computed():
    logits = torch.tensor([[0.0, LN2], [LN2, 0.0]])
    probs = ref.softmax_center_teacher(logits, torch.zeros(1, 2), teacher_temp=1.0)
    torch.testing.assert_close(probs, torch.tensor([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]))
    # centring by the first row's logits makes that row uniform
    probs = ref.softmax_center_teacher(logits, torch.tensor([0.0, LN2]), teacher_temp=1.0)
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.5]))
    # temperature 0.5 doubles the logit gap: exp(2 ln 2) = 4
    probs = ref.softmax_center_teacher(logits, torch.zeros(2), teacher_temp=0.5)
    torch.testing.assert_close(probs[0], torch.tensor([1 / 5, 4 / 5]))


def test_softmax_center_teacher_bf16_input_gives_fp32():
    logits = torch.randn(4, 3, 100)
    center = torch.randn(1, 100)
    out = ref.softmax_center_teacher(logits.bfloat16(), center, 0.04)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 100)
    expected = torch.softmax((logits.bfloat16().float() - center) / 0.04, dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same fp32 ops on the same values


def test_update_center_hand_computed():
    center = torch.ones(1, 2)
    logits = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    new = ref.update_center(center, logits, momentum=0.9)
    assert new.shape == (1, 2) and new.dtype == torch.float32
    torch.testing.assert_close(new, torch.tensor([[1.0, 1.2]]))
    assert torch.equal(center, torch.ones(1, 2)), "update_center must not modify its input"
    # (views, B, K) logits average over views and batch alike
    torch.testing.assert_close(ref.update_center(center, logits.reshape(2, 1, 2), 0.9), new)


def test_teacher_ops_float64():
    """float64 logits are computed in float64: probabilities in float64; the centre keeps its own dtype."""
    logits, center = torch.randn(5, 30, dtype=torch.float64), torch.randn(1, 30, dtype=torch.float64)
    probs = ref.softmax_center_teacher(logits, center, 0.04)
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs, torch.softmax((logits - center) / 0.04, dim=-1), **F64)
    new = ref.update_center(center, logits, 0.9)
    assert new.dtype == torch.float64
    torch.testing.assert_close(new, center * 0.9 + logits.mean(dim=0, keepdim=True) * 0.1, **F64)
    new = ref.update_center(center.float(), logits, 0.9)
    assert new.dtype == torch.float32  # typed like the centre (dinov2's buffer is fp32)
    torch.testing.assert_close(new, (center * 0.9 + logits.mean(dim=0, keepdim=True) * 0.1).float())


# ---- sinkhorn_knopp_teacher ---------------------------------------------------------------------

dinov2_sinkhorn_literal = ref.dinov2_sinkhorn_knopp  # dinov2's DINOLoss.sinkhorn_knopp_teacher, transcribed




@pytest.mark.parametrize("B,K,n_it", [(8, 16, 3), (5, 100, 1), (64, 1000, 3), (3, 7, 10)])
def test_sinkhorn_matches_dinov2_literal(B, K, n_it):
    logits = torch.randn(B, K)
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.5, n_iterations=n_it)
    # log-space vs dinov2's exp-space divisions: measured 3e-6 relative here; exp space loses relative
    # precision on tiny entries (1.7e-4 measured at B=128, K=4096), hence 1e-4; atol for negligible ones
    torch.testing.assert_close(out, dinov2_sinkhorn_literal(logits, 0.5, n_it), rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals():
    B, K = 32, 16
    logits = torch.randn(B, K)
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.3, n_iterations=3)
    # the last step normalises samples: each row is a distribution
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    # with enough iterations the prototype marginal converges to B / K, to rounding (measured 6e-7)
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.3, n_iterations=500)
    torch.testing.assert_close(out.sum(dim=0), torch.full((K,), B / K), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)


@pytest.mark.parametrize("B,K,n_it", [(32, 16, 3), (32, 32, 1000), (8, 1000, 30), (1000, 8, 300)])
def test_sinkhorn_fp32_error_does_not_grow_with_iterations(B, K, n_it):
    """fp32 Sinkhorn-Knopp against dinov2's in float64 on the same values. |logits| / temp < 15, so each
    exponent carries fp32 rounding of ~1e-6 (measured 2e-6 to 5e-6 up to 1000 iterations, any B and K,
    when the scalings stay normalised): rtol 1e-5. The error must not grow with the iterations: scalings
    that shift by log(K / B) per iteration (row and col reached ~1450 at B=8, K=1000, 300 iterations) cancel
    in exp(L - col - row) only up to fp32's spacing at their magnitude (1.2e-4 at 1450)."""
    logits = torch.randn(B, K)
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.3, n_iterations=n_it)
    torch.testing.assert_close(out.double(), ref.dinov2_sinkhorn_knopp(logits.double(), 0.3, n_it), rtol=1e-5, atol=0)


def test_sinkhorn_float64():
    logits = torch.randn(20, 50, dtype=torch.float64)
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.1, n_iterations=3)
    assert out.dtype == torch.float64
    # |logits| / temp < 50: exp(50) is far from float64's overflow; log-space vs exp-space (measured 8e-15)
    torch.testing.assert_close(out, ref.dinov2_sinkhorn_knopp(logits.double(), 0.1, 3), rtol=1e-10, atol=0)


def test_sinkhorn_uniform_and_extreme_logits():
    torch.testing.assert_close(ref.sinkhorn_knopp_teacher(torch.zeros(2, 2), 0.04), torch.full((2, 2), 0.5))
    # logits whose exp under/overflows in fp32 still give finite distributions (log-space)
    logits = torch.randn(16, 32) * 50
    out = ref.sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    assert torch.isfinite(out).all()
    assert not torch.isfinite(dinov2_sinkhorn_literal(logits, 0.04)).all()
    # |logits| / temp reaches ~5000, where half the fp32 spacing (2.4e-4) is each term's relative error:
    # a row sum is off by up to that (measured 6e-6); atol 1e-4
    torch.testing.assert_close(out.sum(dim=1), torch.ones(16), rtol=0, atol=1e-4)


# ---- dino_loss ----------------------------------------------------------------------------------



def lightly_pairs(student_views, teacher_views, student_temp):
    """lightly's DINOLoss terms as a loop: one batch-mean cross-entropy per pair of different view indices."""
    return torch.stack([
        -(t * F.log_softmax(s / student_temp, dim=-1)).sum(dim=-1).mean()
        for s_idx, s in enumerate(student_views) for t_idx, t in enumerate(teacher_views) if s_idx != t_idx
    ])


def test_dino_loss_hand_computed():
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    student = [torch.zeros(1, 2), torch.zeros(1, 2)]
    # dinov2's default: every one of the 4 pairs costs ln 2, summed
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=1.0), torch.tensor(4 * LN2))
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=1.0, reduction="mean"), torch.tensor(LN2))
    # lightly's: the 2 pairs of different views, averaged or summed
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=1.0, ignore_diagonal=True,
                                             reduction="mean"), torch.tensor(LN2))
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=1.0, ignore_diagonal=True),
                               torch.tensor(2 * LN2))
    # a student certain of the teacher's other view: log_softmax([0, 10] / 0.1) ~ [-100, 0]. The same-view
    # pairs cost 100 each; the cross-view pairs ~ 100 exp(-100) ~ 4e-42, in fp32's subnormal range: 0
    student = [torch.tensor([[0.0, 10.0]]), torch.tensor([[10.0, 0.0]])]
    assert ref.dino_loss(student, teacher, student_temp=0.1).item() == pytest.approx(200.0, rel=1e-6)
    lightly = ref.dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=True, reduction="mean")
    assert lightly.item() == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("n_global,n_local,B,K", [(2, 0, 3, 17), (2, 8, 4, 64), (2, 2, 1, 1000), (1, 4, 5, 10)])
def test_dino_loss_equals_dinov2_and_lightly_loops(n_global, n_local, B, K):
    student = [torch.randn(B, K, requires_grad=True) for _ in range(n_global + n_local)]
    teacher = [torch.softmax(torch.randn(B, K), dim=-1) for _ in range(n_global)]
    # dinov2's every pair, summed (the default), and as a (V, B, K) tensor
    loss = ref.dino_loss(student, teacher, student_temp=0.1)
    # einsum over (T, S) pairs vs a loop over them, both fp32: rtol 1e-5 (~80 ulps; sums of up to 20 terms)
    torch.testing.assert_close(loss, dinov2_dino_forward(student, teacher, 0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.dino_loss(torch.stack(student), torch.stack(teacher), student_temp=0.1), loss)
    # lightly's pairing: same-index pairs skipped, the mean over the others
    terms = lightly_pairs(student, teacher, 0.1)
    assert len(terms) == (n_global + n_local) * n_global - n_global
    lightly = ref.dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=True, reduction="mean")
    torch.testing.assert_close(lightly, terms.mean())  # fp32 defaults: the same sums, another order
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=True), terms.sum())
    # with one global view and lightly's pairing, student view 0 pairs with nothing: its gradient is zero
    grads = torch.autograd.grad(lightly, student, allow_unused=True, materialize_grads=True)
    grads_loop = torch.autograd.grad(terms.mean(), student, allow_unused=True, materialize_grads=True)
    for g, g_loop in zip(grads, grads_loop, strict=True):
        # entries ~ softmax / (B n_pairs temp) ~ 1e-6..1e-2: rtol 1e-5 (~80 ulps), atol 1e-7 for the smallest
        torch.testing.assert_close(g, g_loop, rtol=1e-5, atol=1e-7)
    if n_global == 1:
        assert torch.equal(grads[0], torch.zeros(B, K))


def test_dino_loss_bf16_inputs_accumulate_in_fp32():
    student = torch.randn(4, 8, 256).bfloat16()
    teacher = torch.softmax(torch.randn(2, 8, 256), dim=-1).bfloat16()
    loss = ref.dino_loss(student, teacher)
    assert loss.dtype == torch.float32
    # the same fp32 math on the same bf16 values, in another order: measured 3e-5 on a loss of ~230 (2 ulps)
    expected = dinov2_dino_forward(student.float(), teacher.float(), 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_dino_loss_float64():
    student = torch.randn(3, 4, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 4, 50, dtype=torch.float64), dim=-1)
    loss = ref.dino_loss(student, teacher, student_temp=0.07)
    assert loss.dtype == torch.float64
    expected = dinov2_dino_forward(student, teacher, 0.07)
    torch.testing.assert_close(loss, expected, **F64)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(expected, student)[0], **F64)


def test_dino_loss_differentiates_the_teacher():
    """lightly back-propagates through the teacher's softmax: the reference is plain autograd on both sides."""
    student = [torch.randn(3, 20, requires_grad=True) for _ in range(4)]
    logits = torch.randn(2, 3, 20, requires_grad=True)
    teacher = torch.softmax(logits / 0.04, dim=-1)
    loss = ref.dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=True, reduction="mean")
    grads = torch.autograd.grad(loss, [logits, *student], retain_graph=True)
    expected = torch.autograd.grad(lightly_pairs(student, teacher, 0.1).mean(), [logits, *student])
    assert grads[0].abs().max() > 0
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)  # as the student gradients above


X2 = torch.randn(2, 8)


@pytest.mark.parametrize(
    "student,teacher,kwargs,match",
    [
        ([X2] * 2, [torch.randn(2, 9)] * 2, {}, r"teacher_out_softmaxed_centered_list views are \(B, K\)=\(2, 9\)"),
        ([X2, torch.randn(3, 8)], [X2] * 2, {}, r"student_output_list\[1\] has shape \(3, 8\)"),
        ([X2] * 2, [torch.randn(3, 8)] * 2, {}, "teacher_out_softmaxed_centered_list views"),
        ([X2.long()] * 2, [X2] * 2, {}, r"student_output_list\[0\] must be float32, float16, bfloat16 or float64"),
        ([torch.randn(8)] * 2, [X2] * 2, {}, r"student_output_list\[0\] must be 2-D"),
        (X2, [X2] * 2, {}, "student_output_list must be 3-D"),
        ([], [X2], {}, "student_output_list must be a"),
        ([torch.randn(0, 8)] * 2, [torch.randn(0, 8)] * 2, {}, "empty along dim 0"),
        ([X2], [X2], {"ignore_diagonal": True}, "no cross-view pairs"),
        ([X2] * 2, [X2] * 2, {"reduction": "none"}, "reduction"),
        ([X2] * 2, [X2] * 2, {"student_temp": 0.0}, "student_temp"),
    ],
)
def test_dino_loss_bad_input(student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ref.dino_loss(student, teacher, **kwargs)


def test_dino_loss_one_view_each_is_one_pair():
    """dinov2's global-crops call: one (2B, K) student tensor against one teacher tensor, one pair."""
    s, t = torch.randn(6, 10), torch.softmax(torch.randn(6, 10), dim=-1)
    torch.testing.assert_close(ref.dino_loss([s], [t]), dinov2_dino_forward([s], [t], 0.1))


# ---- ibot_patch_loss ----------------------------------------------------------------------------





def test_ibot_hand_computed():
    # image 0: 1 of 2 patches masked, image 1: both masked; K=2, uniform student -> each term ln 2
    masks = torch.tensor([[True, False], [True, True]])
    student = torch.zeros(2, 2, 2)
    teacher = torch.tensor([[1.0, 0.0]]).expand(2, 2, 2)
    torch.testing.assert_close(ref.ibot_patch_loss(student, teacher, masks, student_temp=1.0), torch.tensor(LN2))
    # an image with no masked patch contributes 0 but still counts in the batch
    masks = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(ref.ibot_patch_loss(student, teacher, masks, student_temp=1.0), torch.tensor(LN2 / 2))
    # masks_weight replaces the 1 / count weights: 3 masked rows of weights 3, 0.5, 0.5 -> 4 ln 2 / 2 images
    rows, teacher_rows = torch.zeros(3, 2), torch.tensor([[1.0, 0.0]]).expand(3, 2)
    loss = ref.ibot_patch_loss(rows, teacher_rows, torch.tensor([[True, False], [True, True]]),
                               masks_weight=torch.tensor([3.0, 0.5, 0.5]), student_temp=1.0)
    torch.testing.assert_close(loss, torch.tensor(2 * LN2))


@pytest.mark.parametrize("B,N,K", [(1, 4, 8), (3, 16, 100), (4, 50, 33)])
def test_ibot_dense_masked_and_dinov2_agree(B, N, K):
    masks = torch.rand(B, N) < 0.4
    masks[0, 0] = True
    student = torch.randn(B, N, K, requires_grad=True)
    teacher = torch.softmax(torch.randn(B, N, K), dim=-1)
    dense = ref.ibot_patch_loss(student, teacher, masks, student_temp=0.1)
    # fp32, another order of the same sums: rtol 1e-5 (~80 ulps; measured 1.3e-7)
    torch.testing.assert_close(dense, dinov2_ibot_forward(student, teacher, masks, 0.1), rtol=1e-5, atol=1e-6)
    masked = ref.ibot_patch_loss(student[masks], teacher[masks], masks, student_temp=0.1)
    torch.testing.assert_close(masked, dense)
    torch.testing.assert_close(masked, dinov2_ibot_forward_masked(student[masks], teacher[masks], masks), rtol=1e-5,
                               atol=1e-6)
    (g_dense,) = torch.autograd.grad(dense, student)
    (g_ref,) = torch.autograd.grad(dinov2_ibot_forward(student, teacher, masks, 0.1), student)
    # gradient entries down to ~1e-7 (softmax tails / B n_masked): rtol 1e-5, atol 1e-8 (measured 9e-8
    # absolute at 1e-6 relative)
    torch.testing.assert_close(g_dense, g_ref, rtol=1e-5, atol=1e-8)




@pytest.mark.parametrize("float64", [False, True])
def test_ibot_forward_masked_with_padding_and_weights(float64):
    """dinov2's call: padded rows (upperbound) of which the first n_masked_patches count, masks_weight from
    the collate, or other weights; float64 input computes in float64."""
    dtype = torch.float64 if float64 else torch.float32
    tol = F64 if float64 else dict(rtol=1e-5, atol=1e-6)  # fp32: another order of the same sums (docstring)
    masks = torch.rand(3, 12) < 0.4
    masks[0, :2] = True
    masks[2] = False
    _, n, weight, _ = dinov2_collate(masks, dtype)
    upperbound = n + 5
    student = torch.randn(upperbound, 40, dtype=dtype, requires_grad=True)
    teacher = torch.softmax(torch.randn(upperbound, 40, dtype=dtype), dim=-1)
    loss = ref.ibot_patch_loss(student, teacher, masks, n, weight, student_temp=0.1)
    assert loss.dtype == dtype
    expected = dinov2_ibot_forward_masked(student, teacher, masks, n, weight)
    torch.testing.assert_close(loss, expected, **tol)
    grad, grad_expected = (torch.autograd.grad(x, student)[0] for x in (loss, expected))
    torch.testing.assert_close(grad, grad_expected, **tol)
    assert torch.equal(grad[n:], torch.zeros(5, 40, dtype=dtype))  # padding rows take no part
    # the default weights are the collate's; other weights replace them
    torch.testing.assert_close(ref.ibot_patch_loss(student, teacher, masks, n), loss, **tol)
    other = torch.rand(n, dtype=dtype)
    torch.testing.assert_close(ref.ibot_patch_loss(student[:n], teacher[:n], masks, masks_weight=other),
                               dinov2_ibot_forward_masked(student[:n], teacher[:n], masks, n, other), **tol)


def test_ibot_spatial_masks():
    masks = torch.rand(2, 4, 4) < 0.5
    masks[:, 0, 0] = True
    student, teacher = torch.randn(2, 16, 10), torch.softmax(torch.randn(2, 16, 10), dim=-1)
    torch.testing.assert_close(
        ref.ibot_patch_loss(student, teacher, masks), ref.ibot_patch_loss(student, teacher, masks.flatten(1))
    )


MASKS_3 = torch.tensor([[True, False], [True, True]])  # 3 masked patches of 2 images


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(3, 4), torch.randn(3, 4), MASKS_3.long()),
                 "student_masks_flat must be a bool tensor", id="mask-dtype"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(3, 4), torch.randn(3, 5), MASKS_3),
                 r"student_patch_tokens_masked has shape \(3, 4\) but teacher_patch_tokens_masked has \(3, 5\)",
                 id="teacher-K"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), MASKS_3),
                 r"\(B, N, K\) = \(2, 2, K\)", id="dense-N"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(3, 4), torch.randn(3, 4), MASKS_3, 4),
                 r"n_masked_patches must be an int in \[0, 3\]", id="n-masked-too-many"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(3, 4), torch.randn(3, 4), MASKS_3, masks_weight=torch.ones(2)),
                 "masks_weight has 2 entries but 3 patches are masked", id="weight-length"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(2, 2, 4), torch.randn(2, 2, 4), MASKS_3, 3),
                 "n_masked_patches and masks_weight go with masked-only", id="dense-n-masked"),
])
def test_ibot_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ibot_row_count_is_asserted_on_the_device():
    """Without n_masked_patches the rows must be the masked count: torch._assert_async (no host sync),
    a RuntimeError on CPU."""
    with pytest.raises(RuntimeError, match="student_patch_tokens_masked has 2 rows but student_masks_flat has"):
        ref.ibot_patch_loss(torch.randn(2, 4), torch.randn(2, 4), MASKS_3)


# ---- koleo_loss ---------------------------------------------------------------------------------

def koleo_brute_force(x, eps=1e-8):
    """O(B^2) python loop: nearest neighbour by inner product, self excluded, first index on ties."""
    xn = [row / max(row.norm().item(), eps) for row in x.float()]
    total = 0.0
    for i, xi in enumerate(xn):
        best_j, best_dot = None, -math.inf
        for j, xj in enumerate(xn):
            if j != i and torch.dot(xi, xj).item() > best_dot:
                best_j, best_dot = j, torch.dot(xi, xj).item()
        d = (xi - xn[best_j] + eps).norm().item()
        total += -math.log(d + eps)
    return total / len(xn)


@pytest.mark.parametrize("B,D", [(2, 3), (3, 64), (17, 384), (40, 10)])
def test_koleo_equals_brute_force(B, D):
    x = torch.randn(B, D, dtype=torch.float64).float()
    # the same fp32 normalise / dot / norm, batched vs one row at a time: rel 1e-6 (measured 4e-8)
    assert ref.koleo_loss(x).item() == pytest.approx(koleo_brute_force(x), rel=1e-6)


def test_koleo_hand_computed_and_duplicates():
    # orthonormal rows: every nearest neighbour is at distance sqrt(2)
    x = torch.eye(3) * torch.tensor([[2.0], [0.5], [7.0]])
    assert ref.koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)  # fp32: measured 8e-8
    # a duplicated row has distance ||eps * 1|| = eps * sqrt(D), as nn.PairwiseDistance computes it
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    d = 1e-8 * math.sqrt(2)
    expected = (-math.log(d + 1e-8) * 2 - math.log(math.sqrt(2))) / 3
    assert ref.koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)  # fp32: measured 9e-9


def test_koleo_matches_lightly_formula():
    x = torch.randn(32, 16)
    xn = F.normalize(x, p=2, dim=-1, eps=1e-8)
    sim = xn @ xn.t()
    sim.fill_diagonal_(-2)
    dist = torch.nn.PairwiseDistance(p=2, eps=1e-8)(xn, xn[sim.argmax(dim=1)])
    torch.testing.assert_close(ref.koleo_loss(x), -(dist + 1e-8).log().mean())


@pytest.mark.parametrize("x,match", [
    pytest.param(torch.randn(0, 8), "x is empty along dim 0", id="no-row"),  # one row is lightly's 17.7275
    pytest.param(torch.randn(2, 3, 8), "x must be 2-D", id="3-d"),
    pytest.param(torch.ones(4, 8, dtype=torch.int32), "x must be float", id="int"),
])
def test_koleo_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        ref.koleo_loss(x)


# ---- attention ----------------------------------------------------------------------------------

def test_attention_hand_computed():
    # q = 0: uniform weights, the output is the mean of v over keys
    q = torch.zeros(1, 1, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.arange(12.0).reshape(1, 1, 3, 4)
    torch.testing.assert_close(ref.attention(q, k, v), v.mean(dim=2, keepdim=True).expand(1, 1, 3, 4))


@pytest.mark.parametrize("B,H,N,D", [(2, 3, 5, 8), (1, 2, 50, 64)])
def test_attention_matches_per_head_loop(B, H, N, D):
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    out = ref.attention(q, k, v, scale=0.3)
    for b in range(B):
        for h in range(H):
            w = torch.softmax(q[b, h] @ k[b, h].t() * 0.3, dim=-1)
            torch.testing.assert_close(out[b, h], w @ v[b, h])  # batched vs per head: fp32 defaults
    torch.testing.assert_close(ref.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # fp32 defaults
    # bf16 inputs: fp32 math and one rounding of the output to bf16 (unit roundoff eps / 2 = 2^-8), against
    # fp64 on the same rounded inputs; atol 1e-5 covers the fp32 error (~1e-7 on outputs of O(1))
    q, k, v = (t.bfloat16() for t in (q, k, v))
    out = ref.attention(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = torch.softmax(q.double() @ k.double().transpose(-2, -1) * D**-0.5, dim=-1) @ v.double()
    torch.testing.assert_close(out.double(), exact, rtol=torch.finfo(torch.bfloat16).eps / 2, atol=1e-5)


@pytest.mark.parametrize("shapes,v_dtype,match", [
    pytest.param([(2, 5, 8)] * 3, torch.float32, "q must be 4-D", id="3-d"),
    pytest.param([(1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)], torch.float32, "share one", id="lengths"),
    pytest.param([(1, 2, 5, 8)] * 3, torch.long, "v must be float", id="v-int"),
])
def test_attention_bad_input(shapes, v_dtype, match):
    q, k, v = (torch.ones(shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        ref.attention(q, k, v.to(v_dtype))


# ---- shared argument checks ---------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: ref.softmax_center_teacher(torch.randn(2, 4), torch.zeros(3), 0.04), "center has 3 elements",
                 id="center-size"),
    pytest.param(lambda: ref.softmax_center_teacher(torch.randn(2, 4), torch.zeros(4), 0.0), "teacher_temp must be > 0",
                 id="temp"),
    pytest.param(lambda: ref.sinkhorn_knopp_teacher(torch.randn(4), 0.04), "teacher_logits must be 2-D",
                 id="sinkhorn-1d"),
    pytest.param(lambda: ref.sinkhorn_knopp_teacher(torch.randn(2, 4), 0.04, n_iterations=0), "n_iterations",
                 id="sinkhorn-iterations"),
    pytest.param(lambda: ref.update_center(torch.zeros(0), torch.randn(2, 0), 0.9), "teacher_logits is empty",
                 id="no-prototypes"),  # zero rows are allowed: test_teacher_ops_zero_rows in test_losses.py
    pytest.param(lambda: ref.softmax_center_teacher(torch.randn(2, 0), torch.zeros(0), 0.04), "teacher_logits is empty",
                 id="softmax-no-prototypes"),
    pytest.param(lambda: ref.update_center(torch.zeros(4), torch.randn(2, 4), 1.5), "momentum", id="momentum"),
])
def test_teacher_ops_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
