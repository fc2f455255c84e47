"""The fused head + DINO / iBOT losses (kernels/fused_head.py) against the head then the loss, run eagerly.

Oracle: the prototype layer as a plain eager matmul (F.linear of the features in fp32 with the weight
rounded to the features' dtype, as autocast rounds it; for Sinkhorn-Knopp the teacher's logits as
DINOHead's Linear gives them, in the features' dtype), then kernels/reference.py's teacher ops
(softmax_center_teacher + update_center, sinkhorn_knopp_teacher) and losses (dino_loss, ibot_patch_loss;
themselves checked against dinov2's formulas in test_reference.py / test_losses.py), differentiated by
autograd: loss, new centre, d features, d weight. Both backends run: "triton" (the kernels in the
Triton interpreter; a spy on each launch proves they ran) and "eager" (reference.fused_head_loss, which
launches nothing).
Tolerances:
- fp32, and the eager backend in any dtype (the same fp32 math in another order): FP32 = rtol 1e-4,
  atol 1e-6 (as test_losses.py: sums of ~K terms in another order); gradients atol 1e-6 x the largest
  (entries are differences of terms that large). With bf16/fp16 features both gradients are rounded
  once on the oracle's side (d weight by autograd's cast of the weight, as under autocast): rtol 1e-2.
- bf16 / fp16 features on the kernels (HALF below): scores are exact (products of the rounded inputs,
  fp32 sums), but the mixes and dW round p, c p and G to the features' dtype before their tl.dot, as
  flash attention rounds P: 2^-8 (bf16) / 2^-11 (fp16) relative per term, of both signs, so they cancel
  in part. Measured over 3 seeds x 2 centrings (K = 1000): loss within 1.9e-5 (bf16) / 8.4e-7 (fp16)
  relative, gradients within 8.0e-3 / 6.3e-4 x the largest entry (the oracle's own rounding of them
  included); tolerances about 10x / 2.5x above: loss rtol 2e-4 / 1e-5, gradients atol 2e-2 / 2e-3 x
  the largest.
Memory: a TorchDispatchMode records every tensor an op creates in forward + backward (the interpreter's
copies of kernel arguments, attached with set_, are left out) and checks the largest against T*B*K.
"""
import pytest
import torch
import torch.nn.functional as F
import triton
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dinotron.kernels import fused_head, reference
from dinotron.kernels.fused_head import (
    FusedHeadDINOLoss,
    FusedHeadIBOTLoss,
    fused_head_dino_loss,
    fused_head_ibot_loss,
)
from helpers import dinov2_collate, spy_launches
from lowering import assert_lowers

FP32 = dict(rtol=1e-4, atol=1e-6)
HALF = {torch.bfloat16: dict(loss_rtol=2e-4, grad_atol=2e-2), torch.float16: dict(loss_rtol=1e-5, grad_atol=2e-3)}
TEACHER_TEMP, STUDENT_TEMP, MOMENTUM = 0.04, 0.1, 0.9
FORWARD, BACKWARD = "_head_softmax_kernel", "_head_weight_grad_kernel"


@pytest.fixture
def launches(monkeypatch):
    """The fused-head kernels' launches (they still run), by kernel name."""
    names = (FORWARD, BACKWARD, "_center_sums_kernel")
    return {name: spy_launches(monkeypatch, fused_head, name) for name in names}


def ran(launches) -> set:
    """The kernels launched since the last call (then forgotten)."""
    names = {name for name, calls in launches.items() if calls}
    for calls in launches.values():
        calls.clear()
    return names


def expected_kernels(backend, centering):
    if backend == "eager":
        return set()
    return {FORWARD, BACKWARD} | ({"_center_sums_kernel"} if centering == "softmax" else set())


def features(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape), dim=-1).to(dtype)


def prototypes(K, D):
    """A weight-normalised Linear's weight (g = 1): unit rows, fp32 as the parameter."""
    return F.normalize(torch.randn(K, D), dim=-1)


def head(f, weight):
    """The prototype layer, eagerly: fp32 products of the features and the weight rounded to their dtype."""
    return F.linear(f.float(), weight.to(f.dtype).float())


def teacher_targets(t, teacher_weight, center, centering):
    """(T, B, K) targets and the new centre (None for Sinkhorn-Knopp), from (T, B, D) teacher features."""
    if centering == "softmax":
        logits = head(t, teacher_weight)
        return (reference.softmax_center_teacher(logits, center, TEACHER_TEMP),
                reference.update_center(center, logits, MOMENTUM))
    logits = F.linear(t.flatten(0, 1), teacher_weight.to(t.dtype))  # DINOHead's Linear, in the features' dtype
    return reference.sinkhorn_knopp_teacher(logits, TEACHER_TEMP).view(*t.shape[:2], -1), None


def assert_matches(actual, expected, dtype, gradients_of):
    """(loss, new centre, grads) against the oracle's, to the module docstring's tolerances for `dtype`
    (fp32 ones when `dtype` is None: the eager backend)."""
    (loss, center, grads), (ref_loss, ref_center, ref_grads) = actual, expected
    exact = dtype in (None, torch.float32)
    torch.testing.assert_close(loss, ref_loss, **(FP32 if exact else dict(rtol=HALF[dtype]["loss_rtol"], atol=1e-6)))
    if ref_center is not None:
        assert center.shape == ref_center.shape and center.dtype == ref_center.dtype
        torch.testing.assert_close(center, ref_center, **FP32)
    else:
        assert center is None
    for g, r, x in zip(grads, ref_grads, gradients_of, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        largest = r.float().abs().max().item()
        # d features is rounded to their dtype on both sides; the oracle's d weight too, by autograd's cast of
        # the weight to the features' dtype (as under autocast): one bf16/fp16 rounding, up to 2^-7 relative
        rtol = 1e-4 if gradients_of[0].dtype == torch.float32 else 1e-2
        atol = (1e-6 if exact else HALF[dtype]["grad_atol"]) * largest
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol)


def dino_case(dtype, S=4, T=2, B=3, D=32, K=1000):
    student = features(S, B, D, dtype=dtype).requires_grad_()
    weight = prototypes(K, D).requires_grad_()
    return student, features(T, B, D, dtype=dtype), weight, prototypes(K, D), 0.1 * torch.randn(1, K)


def dino_oracle(student, teacher, weight, teacher_weight, center, centering, pairing):
    targets, new_center = teacher_targets(teacher, teacher_weight, center, centering)
    logits = head(student, weight)
    loss = reference.dino_loss(list(logits.unbind(0)), list(targets.unbind(0)), student_temp=STUDENT_TEMP, **pairing)
    return loss.detach(), new_center, torch.autograd.grad(loss, [student, weight])


def dino_fused(student, teacher, weight, teacher_weight, center, centering, pairing, backend):
    loss, new_center = fused_head_dino_loss(student, teacher, weight, teacher_weight, center, centering=centering,
                                            teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                            center_momentum=MOMENTUM, backend=backend, **pairing)
    return loss.detach(), new_center, torch.autograd.grad(loss, [student, weight])


DINOV2 = dict(ignore_diagonal=False, reduction="sum")  # dinov2's DINOLoss.forward: every pair, summed
TRAINER = dict(ignore_diagonal=True, reduction="mean")  # the trainer's (lightly's): other crops, averaged


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("centering,dtype,pairing", [
    ("softmax", torch.float32, DINOV2), ("softmax", torch.bfloat16, TRAINER),
    ("sinkhorn_knopp", torch.float32, TRAINER), ("sinkhorn_knopp", torch.bfloat16, DINOV2),
], ids=["softmax-fp32-dinov2", "softmax-bf16-trainer", "sinkhorn-fp32-trainer", "sinkhorn-bf16-dinov2"])
def test_dino_matches_head_then_loss(launches, backend, centering, dtype, pairing):
    """K = 1000 (not a power of two), 2 global + 2 local student views, 2 teacher views."""
    case = dino_case(dtype)
    actual = dino_fused(*case, centering, pairing, backend)
    assert ran(launches) == expected_kernels(backend, centering)
    expected = dino_oracle(*case, centering, pairing)
    assert_matches(actual, expected, None if backend == "eager" else dtype, [case[0], case[2]])


def ibot_case(dtype, D=32, K=700, padding=2):
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, :2] = masks[1, 1:5] = True  # 2 + 4 masked patches; the last image has none
    M = int(masks.sum())
    student = features(M + padding, D, dtype=dtype).requires_grad_()
    weight = prototypes(K, D).requires_grad_()
    return student, features(M + padding, D, dtype=dtype), weight, prototypes(K, D), 0.1 * torch.randn(1, K), masks


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("centering,dtype", [("softmax", torch.bfloat16), ("sinkhorn_knopp", torch.float32)])
def test_ibot_matches_head_then_loss(launches, backend, centering, dtype):
    """dinov2's forward_masked with padded rows (n_masked_patches) and its collate's masks_weight; K = 700."""
    student, teacher, weight, teacher_weight, center, masks = ibot_case(dtype)
    _, n, masks_weight, _ = dinov2_collate(masks.flatten(1))
    loss, new_center = fused_head_ibot_loss(student, teacher, weight, teacher_weight, masks, n, masks_weight, center,
                                            teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                            center_momentum=MOMENTUM, centering=centering, backend=backend)
    actual = loss.detach(), new_center, torch.autograd.grad(loss, [student, weight])
    assert ran(launches) == expected_kernels(backend, centering)
    targets, ref_center = teacher_targets(teacher[None, :n], teacher_weight, center, centering)
    ref = reference.ibot_patch_loss(head(student[:n], weight), targets[0], masks, student_temp=STUDENT_TEMP,
                                    masks_weight=masks_weight)
    expected = ref.detach(), ref_center, torch.autograd.grad(ref, [student, weight])
    assert expected[2][0][n:].abs().max() == 0  # the padding rows get no gradient
    assert_matches(actual, expected, None if backend == "eager" else dtype, [student, weight])


@pytest.mark.parametrize("centering,dtype,D", [("softmax", torch.float32, 48), ("sinkhorn_knopp", torch.bfloat16, 64),
                                               ("softmax", torch.float16, 32)])
def test_gpu_tiles_match_head_then_loss(monkeypatch, launches, centering, dtype, D):
    """The GPU's tile sizes and 132 SMs in the interpreter: several row blocks, K tiles (the last one partial)
    and K splits per row block, D not a power of two (48) and fp16."""
    monkeypatch.setattr(fused_head, "tile", lambda elements: elements)
    monkeypatch.setattr(fused_head, "num_sms", lambda device: 132)
    S, T, B, K = 10, 2, 7, 3000 if dtype.itemsize == 2 else 1500
    case = dino_case(dtype, S=S, T=T, B=B, D=D, K=K)
    actual = dino_fused(*case, centering, TRAINER, "triton")
    block_m, block_k = fused_head._FWD_BLOCKS[dtype.itemsize]
    grids = launches[FORWARD].grids()
    row_blocks = [-(-rows // max(16, min(block_m, triton.next_power_of_2(rows)))) for rows in (T * B, S * B)]
    assert [g[0] for g in grids] == row_blocks and all(g[1] > 1 for g in grids)  # split over K
    n_blocks = -(-K // block_k)  # the bound on the partials: a split spans whole K tiles, 2 * D columns at least
    assert all(n_blocks // n * block_k >= 2 * D for n in launches[FORWARD].arg("n_splits"))
    assert launches[BACKWARD].grids() == [(-(-K // fused_head._BWD_BLOCKS[dtype.itemsize][1]),)]
    ran(launches)
    expected = dino_oracle(*case, centering, TRAINER)
    assert_matches(actual, expected, dtype, [case[0], case[2]])


class AllocationRecorder(TorchDispatchMode):
    """Every tensor storage created while active: (op, shape, elements) once per storage. dinotron's ops are
    entered (their Python implementations run under the recorder), so their temporaries count; views and
    in-place results of an input do not, nor the Triton interpreter's copies of kernel arguments (attached
    with set_)."""

    def __init__(self):
        super().__init__()
        self.created, self._seen = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:  # a dinotron op: record what its implementation allocates
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.set_.source_Storage, torch.ops.aten.set_.source_Storage_storage_offset):
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
            if ptr is not None and ptr not in inputs and ptr not in self._seen:
                self._seen.add(ptr)
                self.created.append((str(func), tuple(t.shape), t.numel()))
        return out


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_no_rows_by_prototypes_tensor(launches, centering):
    """Forward + backward create nothing of T*B x K elements (the fewest rows: the teacher's) or more under
    softmax centring; under Sinkhorn-Knopp, the teacher's own (T*B, K) logits alone. The oracle makes
    S*B x K logits and their gradient, so the recorder sees them (the check can fail)."""
    S, T, B, D, K = 4, 2, 12, 16, 2000
    case = dino_case(torch.bfloat16, S=S, T=T, B=B, D=D, K=K)
    limit = T * B * K
    with AllocationRecorder() as fused:
        dino_fused(*case, centering, TRAINER, "triton")
    assert ran(launches) == expected_kernels("triton", centering)
    big = [c for c in fused.created if c[2] >= limit]
    if centering == "softmax":
        assert big == []
    else:
        assert [shape for _, shape, _ in big] == [(T * B, K)], big
    with AllocationRecorder() as unfused:
        dino_oracle(*case, centering, TRAINER)
    assert max(n for *_, n in unfused.created) >= S * B * K


def test_modules_update_their_centre_and_match_the_functions(launches):
    """Two steps of FusedHeadDINOLoss / FusedHeadIBOTLoss: each reads the centre the step before wrote."""
    dino, ibot = FusedHeadDINOLoss(500, ignore_diagonal=True, reduction="mean", backend="triton"), \
        FusedHeadIBOTLoss(500, backend="triton")
    center_dino, center_ibot = torch.zeros(1, 500), torch.zeros(1, 500)
    for _ in range(2):
        student, teacher, weight, teacher_weight, _ = dino_case(torch.float32, K=500)
        loss = dino(student, teacher, weight, teacher_weight)
        expected, center_dino = fused_head_dino_loss(student, teacher, weight, teacher_weight, center_dino,
                                                     backend="eager", **TRAINER)
        torch.testing.assert_close(loss, expected, **FP32)
        torch.testing.assert_close(dino.center, center_dino, **FP32)
        student, teacher, weight, teacher_weight, _, masks = ibot_case(torch.float32, K=500, padding=0)
        loss = ibot(student, teacher, weight, teacher_weight, masks)
        expected, center_ibot = fused_head_ibot_loss(student, teacher, weight, teacher_weight, masks,
                                                     center=center_ibot, backend="eager")
        torch.testing.assert_close(loss, expected, **FP32)
        torch.testing.assert_close(ibot.center, center_ibot, **FP32)
    assert dino.center.abs().max() > 0 and ran(launches) == {FORWARD, "_center_sums_kernel"}


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_ibot_without_masked_patches(launches, backend, centering):
    """No masked patch: loss 0, zero gradients (reaching the features and the weight), the centre unchanged;
    the kernels launch no empty grid (only those over K: the centre's sums and the weight gradient)."""
    student, teacher = features(0, 32).requires_grad_(), features(0, 32)
    weight, center = prototypes(100, 32).requires_grad_(), torch.randn(1, 100)
    loss, new_center = fused_head_ibot_loss(student, teacher, weight, prototypes(100, 32),
                                            torch.zeros(2, 4, dtype=torch.bool), center=center, centering=centering,
                                            backend=backend)
    d_student, d_weight = torch.autograd.grad(loss, [student, weight])
    assert loss.item() == 0.0 and d_student.shape == (0, 32) and torch.equal(d_weight, torch.zeros(100, 32))
    assert torch.equal(new_center, center) if centering == "softmax" else new_center is None
    over_k = {"_center_sums_kernel", BACKWARD} if centering == "softmax" else {BACKWARD}
    assert ran(launches) == (over_k if backend == "triton" else set())


@pytest.mark.parametrize("call,match", [
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w[:, :16], w, c), "student_weight and teacher_weight"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t.double(), w, w, c), "share one dtype"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w, w, None), "needs center"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w, w, c[:, :5]), "center has 5 elements"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w, w.requires_grad_(), c), "get no gradient"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t[:, :2], w, w, c), "rows per view"),
    (lambda s, t, w, c: fused_head_dino_loss(s[:, :, :8], t, w, w, c), "8 features per row"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w, w, c, centering="mean"), "centering must be"),
    (lambda s, t, w, c: fused_head_dino_loss(s[:1], t[:1], w, w, c, ignore_diagonal=True), "no cross-view pairs"),
    (lambda s, t, w, c: fused_head_dino_loss(s, t, w, w, c, center_momentum=2.0), "center_momentum"),
    (lambda s, t, w, c: fused_head_ibot_loss(s, t, w, w, torch.ones(2, 3, dtype=torch.bool), center=c),
     "must be 2-D"),
])
def test_bad_input(call, match):
    student, teacher, weight, _, center = dino_case(torch.float32, K=64)
    with pytest.raises(ValueError, match=match):
        call(student.detach(), teacher, weight.detach(), center)


def test_triton_refuses_wide_bottlenecks():
    s, t, w = features(2, 2, 272), features(2, 2, 272), prototypes(64, 272)
    with pytest.raises(ValueError, match="D <= 256"):
        fused_head_dino_loss(s, t, w, w, torch.zeros(64), backend="triton")


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_opcheck(backend, centering):
    """torch.library.opcheck (schema, fake tensors against the real outputs, autograd registration,
    aot_dispatch_dynamic): what torch.compile relies on."""
    student, teacher, weight, teacher_weight, center = dino_case(torch.float32, S=3, T=2, B=2, D=16, K=40)
    center = center if centering == "softmax" else None
    args = (student, teacher, weight, teacher_weight, center, torch.rand(2), STUDENT_TEMP, TEACHER_TEMP, MOMENTUM, 3,
            0.5, True, backend)
    torch.library.opcheck(torch.ops.dinotron.fused_head_loss.default, args)


def test_compiles_without_graph_breaks():
    student, teacher, weight, teacher_weight, center = dino_case(torch.float32, K=64)

    def step(s, w):
        return fused_head_dino_loss(s, teacher, w, teacher_weight, center, backend="triton", **TRAINER)[0]

    explanation = torch._dynamo.explain(step)(student, weight)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# Every kernel variant at D = 256: bf16 / fp16 / fp32 (tf32 and exact) features, scores from the features
# or from Sinkhorn-Knopp's logits, the GPU tile sizes of _FWD_BLOCKS / _BWD_BLOCKS.
LOWER_SCRIPT = """
from dinotron.kernels import fused_head as fh

for dtype, precision, from_logits in [("bf16", None, False), ("bf16", None, True), ("fp16", None, False),
                                      ("fp32", tl.constexpr("tf32"), False), ("fp32", tl.constexpr("ieee"), True)]:
    size = 4 if dtype == "fp32" else 2
    m, k = fh._FWD_BLOCKS[size]
    lower(fh._head_softmax_kernel, dict(X=f"*{dtype}", KEYS=f"*{dtype}", VALUES=f"*{dtype}",
          LOGITS=f"*{dtype}" if from_logits else None, COL="*fp32", PART_M="*fp32", PART_L="*fp32", PART_MIX="*fp32",
          n_rows="i32", K="i32", D="i32", x_stride="i32", logits_stride="i32", n_splits="i32",
          logit_scale="fp32", col_scale="fp32", BLOCK_M=m, BLOCK_K=k, BLOCK_D=256, FROM_LOGITS=from_logits,
          HAS_COL=True, PRECISION=precision, UPCAST=False), num_stages=2)
    m, k = fh._BWD_BLOCKS[size]
    lower(fh._head_weight_grad_kernel, dict(XS=f"*{dtype}", WS=f"*{dtype}", S_LSE="*fp32", S_COEF="*fp32",
          XT=f"*{dtype}", WT=f"*{dtype}", T_LOGITS=f"*{dtype}" if from_logits else None, T_COL="*fp32", T_LSE="*fp32",
          G=f"*{dtype}", DW="*fp32", n_s_rows="i32", n_t_rows="i32", K="i32", D="i32", xs_stride="i32",
          xt_stride="i32", t_logits_stride="i32", s_scale="fp32", t_logit_scale="fp32", t_col_scale="fp32",
          BLOCK_M=m, BLOCK_K=k, BLOCK_D=256, T_FROM_LOGITS=from_logits, PRECISION=precision, UPCAST=False),
          num_stages=2)
lower(fh._center_sums_kernel, dict(W="*bf16", FSUM="*fp32", OUT="*fp32", K="i32", D="i32", w_stride="i32",
      BLOCK_K=64, BLOCK_D=256), num_warps=4)
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 11)


# ---- on a CUDA GPU (pytest -m gpu) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_gpu_dino_shape_matches_eager(centering):
    """B = 128, 2 + 8 views, K = 65536, D = 256, bf16: the kernels against the eager backend."""
    torch.manual_seed(0)
    student = F.normalize(torch.randn(10, 128, 256, device="cuda"), dim=-1).bfloat16().requires_grad_()
    teacher = F.normalize(torch.randn(2, 128, 256, device="cuda"), dim=-1).bfloat16()
    weight = F.normalize(torch.randn(65536, 256, device="cuda"), dim=-1).requires_grad_()
    teacher_weight = F.normalize(torch.randn(65536, 256, device="cuda"), dim=-1)
    center = torch.zeros(1, 65536, device="cuda")
    case = (student, teacher, weight, teacher_weight, center)
    assert_matches(dino_fused(*case, centering, TRAINER, "triton"), dino_fused(*case, centering, TRAINER, "eager"),
                   torch.bfloat16, [student, weight])


@pytest.mark.gpu
def test_gpu_peak_memory_has_no_rows_by_prototypes():
    """iBOT at 8192 rows, K = 65536, bf16: the fused step's peak is far below one (rows, K) bf16 tensor."""
    rows, K, D = 8192, 65536, 256
    student = F.normalize(torch.randn(rows, D, device="cuda"), dim=-1).bfloat16().requires_grad_()
    teacher = F.normalize(torch.randn(rows, D, device="cuda"), dim=-1).bfloat16()
    weight = F.normalize(torch.randn(K, D, device="cuda"), dim=-1).requires_grad_()
    masks = torch.zeros(64, 196, dtype=torch.bool, device="cuda")
    masks.view(-1)[:rows] = True
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    center = torch.zeros(K, device="cuda")
    loss, _ = fused_head_ibot_loss(student, teacher, weight, weight.detach(), masks, center=center)
    torch.autograd.grad(loss, [student, weight])
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < rows * K * 2 / 4, f"{extra / 2**20:.0f} MiB"
