"""The eager reference ops (kernels/reference.py) against hand-computed cases and brute-force loops.

Oracles: hand-computed values, Python/fp64 loops, dinov2's literal Sinkhorn-Knopp and iBOT forward
(transcribed), lightly's KoLeo formula, F.scaled_dot_product_attention.
Tolerances (each threshold also says its origin beside it):
- the same fp32 math in another order or layout (batched vs looped, einsum vs sums): torch.testing's
  fp32 defaults (rtol 1.3e-6, atol 1e-5), or rtol 1e-5 (~80 fp32 ulps) where the formulas differ
  (log-space vs exp-space, fused vs two-step); measured errors are 10-1000x below.
- bf16 outputs: the reference computes in fp32 and rounds once, so the fp64 oracle on the same
  rounded inputs is within bf16's unit roundoff, eps / 2 = 2^-8 relative, plus the fp32 error (atol).
- marginals are sums of K fp32 terms near 1: a few ulps (measured 4e-7), atol 1e-5.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotron.kernels import reference as ref

LN2 = math.log(2.0)


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

def dino_loss_double_loop(student_views, teacher_views, student_temp):
    terms = []
    for s_idx, s in enumerate(student_views):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for t_idx, t in enumerate(teacher_views):
            if s_idx == t_idx:
                continue
            terms.append(-(t.float() * log_p).sum(dim=-1).mean())
    return torch.stack(terms)


def test_dino_loss_hand_computed():
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    student = [torch.zeros(1, 2), torch.zeros(1, 2)]
    torch.testing.assert_close(ref.dino_loss(student, teacher, student_temp=1.0), torch.tensor(LN2))
    torch.testing.assert_close(ref.dino_loss(student, teacher, 1.0, reduction="sum"), torch.tensor(2 * LN2))
    # a student that is certain of the teacher's other view: log_softmax([10, 0]/0.1) ~ [0, -100]
    student = [torch.tensor([[0.0, 10.0]]), torch.tensor([[10.0, 0.0]])]
    # the loss is ~ 100 * exp(-100) ~ 4e-42, in fp32's subnormal range: 0 to any sensible atol
    assert ref.dino_loss(student, teacher, student_temp=0.1).item() == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("n_global,n_local,B,K", [(2, 0, 3, 17), (2, 8, 4, 64), (2, 2, 1, 1000), (1, 4, 5, 10)])
def test_dino_loss_equals_double_loop(n_global, n_local, B, K):
    student = [torch.randn(B, K, requires_grad=True) for _ in range(n_global + n_local)]
    teacher = [torch.softmax(torch.randn(B, K), dim=-1) for _ in range(n_global)]
    terms = dino_loss_double_loop(student, teacher, 0.1)
    assert len(terms) == (n_global + n_local) * n_global - n_global
    loss = ref.dino_loss(student, teacher, student_temp=0.1)
    # einsum over (T, S) pairs vs a loop over them, both fp32: torch.testing's fp32 defaults
    torch.testing.assert_close(loss, terms.mean())
    torch.testing.assert_close(ref.dino_loss(student, teacher, 0.1, reduction="sum"), terms.sum())
    # stacked (V, B, K) tensors are the same as lists of views
    torch.testing.assert_close(ref.dino_loss(torch.stack(student), torch.stack(teacher), 0.1), loss)
    # with one global view, student view 0 pairs with no teacher view: its gradient is zero
    grads = torch.autograd.grad(loss, student, allow_unused=True, materialize_grads=True)
    grads_loop = torch.autograd.grad(terms.mean(), student, allow_unused=True, materialize_grads=True)
    for g, g_loop in zip(grads, grads_loop, strict=True):
        # entries ~ softmax / (B n_pairs temp) ~ 1e-6..1e-2: rtol 1e-5 (~80 ulps), atol 1e-7 for the smallest
        torch.testing.assert_close(g, g_loop, rtol=1e-5, atol=1e-7)


def test_dino_loss_bf16_inputs_accumulate_in_fp32():
    student = torch.randn(4, 8, 256).bfloat16()
    teacher = torch.softmax(torch.randn(2, 8, 256), dim=-1).bfloat16()
    loss = ref.dino_loss(student, teacher)
    assert loss.dtype == torch.float32
    # the same fp32 math on the same bf16 values, in another order: measured 2e-6 on a loss of ~5.5 (4 ulps)
    torch.testing.assert_close(loss, dino_loss_double_loop(student, teacher, 0.1).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "student,teacher,kwargs,match",
    [
        ([torch.randn(2, 8)] * 2, [torch.randn(2, 9)] * 2, {}, "teacher_probs_per_view"),
        ([torch.randn(2, 8), torch.randn(3, 8)], [torch.randn(2, 8)] * 2, {}, r"student_logits_per_view\[1\]"),
        ([torch.randn(2, 8)] * 2, [torch.randn(3, 8)] * 2, {}, "teacher_probs_per_view"),
        ([torch.randn(2, 8).long()] * 2, [torch.randn(2, 8)] * 2, {}, r"student_logits_per_view\[0\] must be float"),
        ([torch.randn(8)] * 2, [torch.randn(2, 8)] * 2, {}, r"student_logits_per_view\[0\] must be 2-D"),
        (torch.randn(2, 8), [torch.randn(2, 8)] * 2, {}, "student_logits_per_view must be 3-D"),
        ([], [torch.randn(2, 8)], {}, "student_logits_per_view must be"),
        ([torch.randn(0, 8)] * 2, [torch.randn(0, 8)] * 2, {}, "empty"),
        ([torch.randn(2, 8)], [torch.randn(2, 8)], {}, "no cross-view pairs"),
        ([torch.randn(2, 8)] * 2, [torch.randn(2, 8)] * 2, {"reduction": "none"}, "reduction"),
        ([torch.randn(2, 8)] * 2, [torch.randn(2, 8)] * 2, {"student_temp": 0.0}, "student_temp"),
    ],
)
def test_dino_loss_bad_input(student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ref.dino_loss(student, teacher, **kwargs)


# ---- ibot_patch_loss ----------------------------------------------------------------------------

def dinov2_ibot_forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat, student_temp):
    """dinov2's iBOTPatchLoss.forward (dense form), transcribed."""
    loss = torch.sum(teacher_patch_tokens * F.log_softmax(student_patch_tokens / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def test_ibot_hand_computed():
    # image 0: 1 of 2 patches masked, image 1: both masked; K=2, uniform student -> each term ln 2
    masks = torch.tensor([[True, False], [True, True]])
    student = torch.zeros(2, 2, 2)
    teacher = torch.tensor([[1.0, 0.0]]).expand(2, 2, 2)
    torch.testing.assert_close(ref.ibot_patch_loss(student, teacher, masks, student_temp=1.0), torch.tensor(LN2))
    # an image with no masked patch contributes 0 but still counts in the batch
    masks = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(ref.ibot_patch_loss(student, teacher, masks, student_temp=1.0), torch.tensor(LN2 / 2))


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
    (g_dense,) = torch.autograd.grad(dense, student)
    (g_ref,) = torch.autograd.grad(dinov2_ibot_forward(student, teacher, masks, 0.1), student)
    # gradient entries down to ~1e-7 (softmax tails / B n_masked): rtol 1e-5, atol 1e-8 (measured 9e-8
    # absolute at 1e-6 relative)
    torch.testing.assert_close(g_dense, g_ref, rtol=1e-5, atol=1e-8)


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
                 "masks must be a bool", id="mask-dtype"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(2, 4), torch.randn(2, 4), MASKS_3), "3 True entries",
                 id="rows"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(3, 4), torch.randn(3, 5), MASKS_3), "teacher_patch_probs has",
                 id="teacher-K"),
    pytest.param(lambda: ref.ibot_patch_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), MASKS_3),
                 r"\(B, N, K\) = \(2, 2, K\)", id="dense-N"),
])
def test_ibot_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


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
    pytest.param(torch.randn(1, 8), "at least 2 rows", id="one-row"),
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
