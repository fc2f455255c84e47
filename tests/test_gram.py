"""The Gram anchoring op (Triton interpreter on CPU, compiled on GPU; the eager reference through the same op)
against the eager reference and dinov3's GramLoss.

Oracles: kernels/reference.py's gram_loss (the Gram matrices materialised, fp32), and dinov3's
GramLoss.forward transcribed below (dinov3_gram_loss), whose autograd gives the oracle gradient.
The interpreter runs the GPU's tile sizes (64 x 64 similarity tiles, BLOCK_K = 64, the backward's
feature blocks), so ragged N (70, 196, 257, 1369) and ragged D (40, 300) reach the masked edges and
the feature-block split. Every comparison through the Triton backend checks that its kernels
launched (spy_launches), so the eager fallback cannot pass in its place.
Tolerances (LOSS_TOL, grad_tolerance):
- losses, every dtype: both sides compute in fp32 from the same (rounded) inputs; the kernel scales
  the raw dot products by the inverse norms where the reference normalises first, and sums tile by
  tile: a few fp32 ulps apart per similarity, measured at most 1.5e-7 relative on the loss: rtol
  1e-5, atol 1e-8 (losses of ~1e-3 for normalised features).
- fp32 gradients: each entry sums 2N terms in another order: measured at most 8.2e-7 x the largest
  entry beyond rtol 1e-5: atol 1e-5 x the largest reference entry.
- bf16 / fp16 gradients: computed in fp32 on both sides and rounded once to the dtype, so up to one
  ulp apart: rtol = the dtype's eps (2^-7, 2^-10), plus the fp32 atol and one subnormal step of
  the dtype (fp16 gradients of ~1e-6 are subnormal).
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dinotron.kernels import GramLoss, gram, gram_loss, layout
from dinotron.kernels import reference as ref
from helpers import spy_launches
from lowering import assert_lowers

LOSS_TOL = dict(rtol=1e-5, atol=1e-8)  # module docstring
OPTIONS = [  # (normalize, remove_neg, remove_only_teacher_neg): every combination dinov3 allows
    (normalize, remove_neg, teacher_neg)
    for normalize in (True, False) for remove_neg, teacher_neg in ((False, False), (True, False), (False, True))
]


def dinov3_gram_loss(output_feats, target_feats, img_level=True, apply_norm=True, remove_neg=True,
                     remove_only_teacher_neg=False):
    """dinov3's GramLoss(apply_norm, remove_neg, remove_only_teacher_neg).forward(output_feats, target_feats,
    img_level), transcribed (facebookresearch/dinov3, dinov3/loss/gram_loss.py at 6876159)."""
    output_feats, target_feats = output_feats.float(), target_feats.float()
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and len(target_feats.shape) == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and len(output_feats.shape) == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


def grad_tolerance(dtype, ref_grad):
    """Element-wise tolerance of a student gradient in `dtype` against the oracle's (module docstring)."""
    atol = 1e-5 * ref_grad.float().abs().max().item()
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=atol)
    info = torch.finfo(dtype)
    return dict(rtol=info.eps, atol=atol + info.smallest_normal * info.eps)


def patches(B, N, D, dtype=torch.float32, noise=0.5):
    """Student patches and a teacher near them (the anchoring regime: similar, not equal, Gram matrices),
    both rounded to `dtype`; random features give about half negative similarities for the clips."""
    student = torch.randn(B, N, D)
    return student.to(dtype), (student + noise * torch.randn(B, N, D)).to(dtype)


def loss_and_grad(fn, student, teacher):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher)
    loss.backward()
    return loss.detach(), s.grad


@pytest.fixture
def kernels(monkeypatch):
    """The launches of the norms, forward, backward strip and backward gradient kernels."""
    names = ("_row_norms_kernel", "_gram_fwd_kernel", "_gram_strip_kernel", "_gram_grad_kernel")
    return [spy_launches(monkeypatch, gram, name) for name in names]


def assert_triton_matches(oracle, student, teacher, kernels, **kwargs):
    """gram_loss(backend="triton") equals `oracle` (a loss function of (student, teacher)) in loss and gradient,
    and its kernels ran: norms (with normalisation) and forward once, the backward's two kernels once a chunk."""
    loss, grad = loss_and_grad(lambda s, t: gram_loss(s, t, backend="triton", **kwargs), student, teacher)
    norms, fwd, strip, grad_kernel = kernels
    assert (len(norms), len(fwd)) == (int(kwargs.get("normalize", True)), 1)
    assert len(strip) == len(grad_kernel) >= 1
    expected, expected_grad = loss_and_grad(oracle, student, teacher)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(grad.float(), expected_grad.float(), **grad_tolerance(student.dtype, expected_grad))


# ---- values and gradients against the reference ---------------------------------------------------

# N: one ragged tile (70), 196 (14 x 14 patches, 4 tiles), 256 and 257 (a fifth tile of one row), 1024 and
# 1369 (37 x 37, 22 tiles: the ViT-L/14 518 px grid); D: one ragged feature step (16, 24, 40) and 300 (five
# BLOCK_K steps, the backward's feature blocks with a ragged last one).
@pytest.mark.parametrize("B,N,D", [(3, 70, 40), (2, 196, 24), (2, 256, 16), (2, 257, 300), (1, 1024, 16),
                                   (1, 1369, 16)])
def test_fp32_matches_reference(B, N, D, kernels):
    assert_triton_matches(ref.gram_loss, *patches(B, N, D), kernels)


@pytest.mark.parametrize("normalize,remove_neg,remove_only_teacher_neg", OPTIONS)
def test_every_option_matches_reference(normalize, remove_neg, remove_only_teacher_neg, kernels):
    options = dict(normalize=normalize, remove_neg=remove_neg, remove_only_teacher_neg=remove_only_teacher_neg)
    student, teacher = patches(2, 70, 40)
    assert_triton_matches(lambda s, t: ref.gram_loss(s, t, **options), student, teacher, kernels, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize,remove_neg", [(True, True), (False, False)])
def test_half_precision_matches_reference(dtype, normalize, remove_neg, kernels):
    # both sides see the same rounded inputs; the reference upcasts to fp32 first
    options = dict(normalize=normalize, remove_neg=remove_neg)
    student, teacher = patches(2, 130, 300, dtype)
    assert_triton_matches(lambda s, t: ref.gram_loss(s, t, **options), student, teacher, kernels, **options)


def test_cls_dropped_slice_is_read_in_place(kernels):
    """Patch tokens as the trainer slices them, tokens[:, 1:] of a (B, 1 + 256, D) output: strided rows."""
    tokens, teacher_tokens = patches(2, 257, 40)
    tokens.requires_grad_()
    loss = gram_loss(tokens[:, 1:], teacher_tokens[:, 1:], backend="triton")
    loss.backward()
    assert kernels[1].arg("stride_sb") == [257 * 40] and set(kernels[2].arg("stride_sb")) == {257 * 40}  # no copy
    expected, expected_grad = loss_and_grad(ref.gram_loss, tokens[:, 1:].detach(), teacher_tokens[:, 1:])
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(tokens.grad[:, 1:], expected_grad, **grad_tolerance(torch.float32, expected_grad))
    assert torch.all(tokens.grad[:, 0] == 0)


def test_mixed_dtypes_and_zero_rows(kernels):
    """A bf16 student against an fp32 teacher (dinov3 casts both to float), and zero rows: F.normalize clamps
    their norm at 1e-12, so their gradient carries 1e12 (the clamp's branch of the normalisation's gradient)."""
    student, teacher = patches(2, 70, 40)
    student[0, 5] = 0.0
    teacher[1, 9] = 0.0
    assert_triton_matches(lambda s, t: ref.gram_loss(s, t, remove_neg=False), student.bfloat16(), teacher, kernels,
                          remove_neg=False)


def test_backward_in_chunks_as_on_an_h100(kernels, monkeypatch):
    """132 SMs: the backward's chunks of row blocks are capped so that their strips hold at most half as many
    elements as the patches: B = 3, N = 130 (3 row blocks, strips of 64 x 192), D = 300: 4 row blocks a chunk,
    chunks of 4, 4 and 1; the gradient kernel takes 5 feature blocks of 64 (fp32) per row block."""
    monkeypatch.setattr(layout, "num_sms", lambda device: 132)
    assert_triton_matches(ref.gram_loss, *patches(3, 130, 300), kernels)
    _, _, strip, grad_kernel = kernels
    assert strip.grids() == [(4,), (4,), (1,)] and strip.arg("work0") == [0, 4, 8]
    assert grad_kernel.grids() == [(20,), (20,), (5,)] and grad_kernel.arg("BLOCK_D") == [64] * 3


def test_grad_out_scales_the_gradient():
    student, teacher = patches(2, 70, 24)
    s = student.clone().requires_grad_()
    (gram_loss(s, teacher, backend="triton") * 3.0).backward()
    _, expected = loss_and_grad(ref.gram_loss, student, teacher)
    torch.testing.assert_close(s.grad, 3.0 * expected, **grad_tolerance(torch.float32, expected))


def test_dispatch_on_cpu_is_the_reference(monkeypatch, kernels):
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    student, teacher = patches(2, 20, 8)
    for backend in (None, "eager"):
        loss, grad = loss_and_grad(lambda s, t, b=backend: gram_loss(s, t, backend=b), student, teacher)
        expected, expected_grad = loss_and_grad(ref.gram_loss, student, teacher)
        assert loss.item() == expected.item() and torch.equal(grad, expected_grad)
    assert all(len(k) == 0 for k in kernels)
    loss = gram_loss(student.double(), teacher.double(), backend=None)
    assert loss.dtype == torch.float64  # float64: the reference, in float64


# ---- dinov3's GramLoss ----------------------------------------------------------------------------

def test_module_has_dinov3s_signature():
    params = inspect.signature(GramLoss.__init__).parameters
    assert [(p.name, p.default) for p in params.values() if p.kind != p.KEYWORD_ONLY][1:] == [
        ("apply_norm", True), ("img_level", True), ("remove_neg", True), ("remove_only_teacher_neg", False)]
    assert [p.name for p in params.values() if p.kind == p.KEYWORD_ONLY] == ["backend"]
    forward = inspect.signature(GramLoss.forward).parameters
    assert [(p.name, p.default) for p in forward.values()][1:] == [
        ("output_feats", inspect.Parameter.empty), ("target_feats", inspect.Parameter.empty), ("img_level", True)]


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("apply_norm,remove_neg,remove_only_teacher_neg", OPTIONS)
def test_equals_dinov3(backend, img_level, apply_norm, remove_neg, remove_only_teacher_neg, monkeypatch):
    options = dict(apply_norm=apply_norm, remove_neg=remove_neg, remove_only_teacher_neg=remove_only_teacher_neg)
    module = GramLoss(**options, backend=backend)
    fwd = spy_launches(monkeypatch, gram, "_gram_fwd_kernel")
    student, teacher = patches(2, 40, 24)
    loss, grad = loss_and_grad(lambda s, t: module(s, t, img_level=img_level), student, teacher)
    expected, expected_grad = loss_and_grad(lambda s, t: dinov3_gram_loss(s, t, img_level, **options),
                                            student, teacher)
    if backend == "triton":  # image level: 2 images of one 64-row tile; batch level: one image of 80 rows, 2 x 2
        assert fwd.grids() == ([(2,)] if img_level else [(4,)])
    else:
        assert fwd == []
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))


def test_remove_only_teacher_neg_leaves_the_student_unclipped():
    """dinov3 tests target_sim < 0 after clipping target_sim in place: no student entry is zeroed. The
    reading where it would be (both negative -> 0) gives another loss here (a must-differ check)."""
    student, teacher = patches(2, 40, 24, noise=2.0)
    loss = gram_loss(student, teacher, remove_neg=False, remove_only_teacher_neg=True, backend="triton")
    s_sim = F.normalize(student, dim=-1) @ F.normalize(student, dim=-1).mT
    t_sim = F.normalize(teacher, dim=-1) @ F.normalize(teacher, dim=-1).mT
    torch.testing.assert_close(loss, F.mse_loss(s_sim, t_sim.clamp_min(0)), **LOSS_TOL)
    both_negative = (s_sim < 0) & (t_sim < 0)
    assert both_negative.any()
    other_reading = F.mse_loss(torch.where(both_negative, 0.0, s_sim), t_sim.clamp_min(0))
    assert not math.isclose(loss.item(), other_reading.item(), rel_tol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("student,teacher,kwargs,match", [
    pytest.param(torch.randn(2, 8, 4), torch.randn(2, 9, 4), {}, "teacher_patches has", id="shapes"),
    pytest.param(torch.randn(16, 4), torch.randn(16, 4), {}, "student_patches must be 3-D", id="2-d-image-level"),
    pytest.param(torch.randn(2, 0, 4), torch.randn(2, 0, 4), {}, "empty along dim 1", id="no-patches"),
    pytest.param(torch.randn(2, 8, 0), torch.randn(2, 8, 0), {}, "empty along dim 2", id="no-features"),
    pytest.param(torch.ones(2, 8, 4, dtype=torch.int32), torch.randn(2, 8, 4), {}, "must be float", id="int"),
    pytest.param(torch.randn(2, 8, 4), torch.randn(2, 8, 4),
                 {"remove_neg": True, "remove_only_teacher_neg": True}, "exclusive", id="both-clips"),
    pytest.param(torch.randn(2, 8, 4), torch.randn(2, 8, 4, requires_grad=True), {}, "detach", id="teacher-grad"),
])
def test_bad_input(backend, student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gram_loss(student, teacher, backend=backend, **kwargs)


def test_module_refuses_both_clips_and_takes_flat_batch_level_rows():
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    student, teacher = patches(2, 20, 8)
    module = GramLoss(backend="triton")
    flat = module(student.flatten(0, 1), teacher.flatten(0, 1), img_level=False)  # dinov3's (B * N, dim)
    torch.testing.assert_close(flat, module(student, teacher, img_level=False), **LOSS_TOL)
    torch.testing.assert_close(flat, dinov3_gram_loss(student, teacher, img_level=False), **LOSS_TOL)


# ---- memory: nothing of B x N x N ------------------------------------------------------------------

class _LargestAllocation(TorchDispatchMode):
    """The most elements of any floating-point tensor an op returned while active (the interpreter moves each
    kernel argument's storage as uint8 bytes: those copies are the arguments themselves)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_triton_path_allocates_nothing_of_b_n_n():
    """The launchers run under the mode (inside the custom op it would see the op's outputs only): the largest
    tensor is the (B, N, D) gradient, below B N N; the reference's Gram matrices reach it (the check can fail)."""
    B, N, D = 2, 130, 96  # one strip of 64 x 192 is below B N D / 2
    student, teacher = patches(B, N, D)
    with _LargestAllocation() as triton_path:
        loss, norms = gram._triton_forward(student, teacher, True, True, False)
        grad = gram._triton_backward(torch.ones(()), student, teacher, norms, True, True, False)
        gram_loss(student.clone().requires_grad_(), teacher, backend="triton").backward()
    assert triton_path.largest == B * N * D < B * N * N  # the scratch strips are capped at half of B * N * D
    expected, expected_grad = loss_and_grad(ref.gram_loss, student, teacher)
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))
    with _LargestAllocation() as reference_path:
        loss_and_grad(ref.gram_loss, student, teacher)
    assert reference_path.largest >= B * N * N


# ---- one torch.library op: torch.compile and opcheck ----------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_dynamo_sees_one_op_without_graph_breaks(backend, fresh_dynamo):
    student, teacher = patches(2, 20, 8)
    for fn in (lambda s, t: gram_loss(s, t, backend=backend), GramLoss(backend=backend)):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(student, teacher)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        targets = [node.target for node in explained.graphs[0].graph.nodes if node.op == "call_function"]
        assert targets.count(torch.ops.dinotron.gram.default) == 1


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_compiled_fullgraph_matches_eager(backend, fresh_dynamo, kernels):
    student, teacher = patches(2, 70, 24)
    expected, expected_grad = loss_and_grad(ref.gram_loss, student, teacher)
    compiled = torch.compile(lambda s, t: gram_loss(s, t, backend=backend), backend="aot_eager", fullgraph=True)
    loss, grad = loss_and_grad(compiled, student, teacher)
    # 2 images x 2 row blocks, one a chunk (a strip, 64 x 128, exceeds half the patches)
    assert [len(k) for k in kernels] == ([1, 1, 4, 4] if backend == "triton" else [0, 0, 0, 0])
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(backend, normalize):
    """torch.library.opcheck of the ops (schema, fake impl, autograd registration, AOT dispatch)."""
    student, teacher = patches(2, 20, 8)
    flags = (normalize, True, False)
    torch.library.opcheck(torch.ops.dinotron.gram.default, (student.requires_grad_(), teacher, *flags, backend))
    if backend == "triton":
        _, norms = torch.ops.dinotron.gram(student, teacher, *flags, backend)
        torch.library.opcheck(torch.ops.dinotron.gram_backward.default,
                              (torch.tensor(1.0), student.detach(), teacher, norms, *flags))


# ---- compiled kernels ------------------------------------------------------------------------------

# The norms kernel; for bf16 (exact products, split G), fp32 (tf32 forward, tf32x3 backward) and fp16 (tf32x3 G)
# with their tile tables, the forward, the backward's strip kernel (mixed clips, with and without
# normalisation) and its gradient kernel.
LOWER_SCRIPT = """
import torch
from dinotron.kernels import gram

strides = dict(stride_sb="i32", stride_sn="i32", stride_tb="i32", stride_tn="i32")
lower(gram._row_norms_kernel, dict(S="*bf16", T="*fp32", NORMS="*fp32", n_rows="i32", N="i32", D="i32", **strides,
      BLOCK_R=gram._NORMS["BLOCK_R"], BLOCK_K=gram._NORMS["BLOCK_K"]), num_warps=gram._NORMS["num_warps"])
tf32, tf32x3 = tl.constexpr("tf32"), tl.constexpr("tf32x3")
for dtype, torch_dtype, gram_precision, g_precision, split, normalize, clips in [
    ("bf16", torch.bfloat16, None, None, True, True, (True, True)),
    ("fp32", torch.float32, tf32, tf32x3, False, True, (False, True)),
    ("fp16", torch.float16, None, tf32x3, False, False, (False, False)),
]:
    norms = dict(NORMS_S="*fp32", NORMS_T="*fp32") if normalize else dict(NORMS_S=None, NORMS_T=None)
    clip = dict(NORMALIZE=normalize, CLIP_STUDENT=clips[0], CLIP_TEACHER=clips[1])
    dots = dict(S_PRECISION=gram_precision, T_PRECISION=gram_precision, UPCAST=False)
    fwd, strip = gram._FWD[dtype == "fp32"], gram._STRIP[dtype == "fp32"]
    grad = gram._GRAD[torch_dtype]
    lower(gram._gram_fwd_kernel, dict(S=f"*{dtype}", T=f"*{dtype}", **norms, PARTIAL="*fp32", N="i32", D="i32",
          tiles="i32", **strides, eps="fp32", BLOCK=fwd["BLOCK"], BLOCK_K=fwd["BLOCK_K"], **clip, **dots),
          num_warps=fwd["num_warps"])
    lower(gram._gram_strip_kernel, dict(S=f"*{dtype}", T=f"*{dtype}", **norms, SCRATCH="*fp32",
          ROW_DOT="*fp32" if normalize else None, N="i32", D="i32", tiles="i32", work0="i32", n_pad="i32", **strides,
          eps="fp32", BLOCK_M=strip["BLOCK_M"], BLOCK_N=strip["BLOCK_N"], BLOCK_K=strip["BLOCK_K"], **clip, **dots),
          num_warps=strip["num_warps"])
    lower(gram._gram_grad_kernel, dict(S=f"*{dtype}", NORMS_S=norms["NORMS_S"], ROW_DOT=norms["NORMS_S"],
          SCRATCH="*fp32", GRAD_LOSS="*fp32", DS=f"*{dtype}", N="i32", D="i32", tiles="i32", work0="i32",
          n_pad="i32", d_blocks="i32", stride_sb="i32", stride_sn="i32", eps="fp32", scale="fp32",
          BLOCK_M=strip["BLOCK_M"], BLOCK_N=strip["BLOCK_N"], BLOCK_D=grad["BLOCK_D"], NORMALIZE=normalize,
          G_PRECISION=g_precision, SPLIT_G=split, UPCAST=False), num_warps=grad["num_warps"])
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 10)


# ---- on a CUDA GPU (pytest -m gpu) -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,N,D,dtype", [(4, 1369, 1024, torch.bfloat16), (16, 256, 384, torch.bfloat16),
                                         (4, 257, 384, torch.float32), (2, 196, 768, torch.float16)])
def test_gpu_matches_reference(B, N, D, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 dots in tf32x3, as the reference
    student, teacher = (t.cuda() for t in patches(B, N, D, dtype))
    loss, grad = loss_and_grad(lambda s, t: gram_loss(s, t, remove_neg=False), student, teacher)
    expected, expected_grad = loss_and_grad(lambda s, t: ref.gram_loss(s, t, remove_neg=False), student, teacher)
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(grad.float(), expected_grad.float(), **grad_tolerance(dtype, expected_grad))


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_patches():
    B, N, D = 32, 1369, 1024
    student, teacher = (t.cuda() for t in patches(B, N, D, torch.bfloat16))
    student.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gram_loss(student, teacher).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # the bf16 gradient (90 MB) and small buffers; one fp32 B x N x N matrix would be 240 MB
    assert extra < 1.5 * B * N * D * 2, f"{extra / 2**20:.1f} MiB"
