"""Rotary-embedding ViTs (timm's Eva: the DINOv3 and EVA-02 architectures) with the dinotron attention.

Oracles: timm's own Eva forward (EvaAttention: apply_rot_embed_cat on the patch tokens' q and k, then torch's
scaled_dot_product_attention), on the same weights and inputs; for packed crops, the same backbone run on each
crop batch separately; for the training step, the same DinoV2 weights run unpacked with timm's attention.
Tiny shapes: width 32 and 2 heads (D=16) in fp32 on the eager backend; width 128 and 2 heads (D=64, the kernel's
smallest head dim) under fp16 autocast for the Triton kernels (the interpreter on CPU).
Tolerances:
- eager, fp32: the swapped forward runs timm's ops in timm's order (the same rotation, the same SDPA): torch.testing's
  fp32 defaults (rtol 1.3e-6, atol 1e-5); measured bit-exact. Packed, the eager reference attention sums in another
  order than SDPA: outputs at the 1e-5 of tests/test_train_units.py's packed test (measured 1.1e-6); parameter
  gradients (sums over tokens, see below) at rtol 1e-5 and atol 1e-5 x max |gradient| (measured 3.5e-7 x it, as
  large as fp32's own rounding against an fp64 run).
- Triton, fp16 autocast: the output and the input gradient at tests/test_attention.py's fp16 TOL (atol 4e-3,
  rtol 1e-2; measured 7e-4 and 2e-3). A parameter gradient sums per-token products over B x N tokens, each rounded to
  fp16 relative to the largest of them, so its error scales with the tensor's largest entry (up to 75 here, with
  the perturbed LayerScale): rtol 1e-2 and atol 1e-2 x max |gradient| (ten fp16 ulps of the largest entry; measured
  at most 1e-3 x it, while timm's own fp16 run differs from its fp32 run by up to 2.3e-3 x it). The rotation runs
  in fp32 on both sides and is rounded to fp16 once, as timm's. Packed against separate Triton forwards: the same
  fp16 math per sequence, outputs at test_attention's packed atol 2e-3, rtol 1e-2 (measured equal), parameter
  gradients at the 1e-2 rule above (measured 8.8e-4 x the largest entry: other tiles, another fp32 summation order
  in the backward kernels, then fp16).
- the DINOv2 step, packed + Triton-op eager reference in fp32 against timm's attention unpacked: test_train_units'
  packed-step bounds (loss rtol 1e-5, gradients rtol 1e-4, atol 1e-5).
"""
import copy

import pytest
import timm
import torch

from dinotron.kernels import flash_attention, swap_timm_attention
from dinotron.kernels.flash_attention import is_swapped, pack_rope
from dinotron.train.export import export_backbone
from dinotron.train.model import Backbone, DinoV2, SequenceDropPath
from helpers import spy_launches, tiny_config

FP16 = dict(atol=4e-3, rtol=1e-2)  # tests/test_attention.py's TOL[torch.float16], see the module docstring

# (arch, timm kwargs): DINOv3's (rotate-half rope, 4 registers, no qkv bias) and its q/v-bias variant; EVA-02's
# (interleaved rope "cat", absolute position embedding too, SwiGLU) with separate q/k/v projections and q/k norms.
ARCHS = {
    "dinov3": ("vit_small_patch16_dinov3", {}),
    "dinov3-qkvb": ("vit_small_patch16_dinov3_qkvb", {}),
    "eva02": ("eva02_tiny_patch14_224", {"patch_size": 16, "img_size": 32, "qkv_fused": False, "qk_norm": True,
                                         "use_fc_norm": False}),
}


def tiny_eva(name: str, width: int) -> torch.nn.Module:
    """The arch at width `width`, 2 blocks of 2 heads, 32 px; every parameter moved off its init (zero biases,
    LayerScale) so that each one shows in the outputs."""
    arch, kwargs = ARCHS[name]
    torch.manual_seed(0)
    vit = timm.create_model(arch, **{"embed_dim": width, "depth": 2, "num_heads": 2, "img_size": 32,
                                     "num_classes": 0, "dynamic_img_size": True, "init_values": 0.1, **kwargs})
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert vit.rope is not None
    return vit


@pytest.fixture
def launches(monkeypatch):
    """The launches of the forward and of the backward kernel, to tell which backend ran."""
    return {name: spy_launches(monkeypatch, flash_attention, name) for name in ("_attn_fwd", "_attn_bwd")}


def forward_and_grads(model, x):
    """forward_features and the gradients of a fixed projection of it w.r.t. the input and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = model.forward_features(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    return [out, *torch.autograd.grad((out.float() * weight).sum(), [x, *params])]


def assert_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), **tol)


def assert_grads_close(actual, expected, rtol):
    """Parameter gradients: each within rtol of its value or rtol x the tensor's largest entry (module docstring)."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_swapped_eva_matches_timm_at_two_crop_sizes(name, backend, launches):
    triton = backend == "triton"
    timm_model = tiny_eva(name, 128 if triton else 32)
    swapped = swap_timm_attention(copy.deepcopy(timm_model), backend=backend)
    assert all(is_swapped(block.attn) for block in swapped.blocks)
    assert type(swapped.blocks[0].attn).__name__ == "EvaAttention"
    for size in (32, 48):  # 2 x 2 and 3 x 3 patch grids: each its own rope
        x = torch.randn(2, 3, size, size)
        with torch.autocast("cpu", dtype=torch.float16, enabled=triton):
            expected, actual = forward_and_grads(timm_model, x), forward_and_grads(swapped, x)
        if triton:
            assert_close(actual[:2], expected[:2], **FP16)
            assert_grads_close(actual[2:], expected[2:], FP16["rtol"])
        else:
            assert_close(actual, expected)
    assert bool(launches["_attn_fwd"]) == triton and bool(launches["_attn_bwd"]) == triton


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_packed_crops_of_two_sizes_equal_separate_forwards(backend, launches):
    """Global crops (48 px, masked patches) and local crops (32 px) in one varlen pass: each sequence turns by its
    own grid's rope, the prefix tokens not at all."""
    triton = backend == "triton"
    backbone = Backbone(swap_timm_attention(tiny_eva("dinov3", 128 if triton else 32), backend=backend))
    g, local = torch.randn(2, 3, 48, 48), torch.randn(3, 3, 32, 32)
    masks = torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) < 0.4
    params = list(backbone.parameters())

    def outputs_and_grads(run):
        with torch.autocast("cpu", dtype=torch.float16, enabled=triton):
            outs = run()
        flat = [t for o in outs for t in o]  # cls and patches of each crop batch
        weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(flat)]
        loss = sum((t.float() * w).sum() for t, w in zip(flat, weights, strict=True))
        return flat, torch.autograd.grad(loss, params)

    expected = outputs_and_grads(lambda: (backbone(g, masks), backbone(local)))
    assert bool(launches["_attn_fwd"]) == triton
    actual = outputs_and_grads(lambda: backbone.forward_packed([(g, masks), (local, None)]))
    assert_close(actual[0], expected[0], **(dict(atol=2e-3, rtol=1e-2) if triton else dict(atol=1e-5, rtol=1e-5)))
    assert_grads_close(actual[1], expected[1], 1e-2 if triton else 1e-5)


def test_pack_rope_rows_and_shape_errors():
    rope_a, rope_b = torch.randn(4, 8), torch.randn(9, 8)
    packed = pack_rope([rope_a, rope_b], [(2, 6), (1, 11)], num_prefix_tokens=2)
    identity = torch.tensor([[0.0] * 4 + [1.0] * 4] * 2)  # [sin | cos] of a rotation by 0
    torch.testing.assert_close(packed, torch.cat([identity, rope_a, identity, rope_a, identity, rope_b]))
    with pytest.raises(ValueError, match=r"pack_rope: a rope of shape \(4, 8\) for sequences of 7 tokens"):
        pack_rope([rope_a], [(1, 7)], num_prefix_tokens=2)
    attn = swap_timm_attention(tiny_eva("dinov3", 32)).blocks[0].attn
    with pytest.raises(ValueError, match=r"rope of shape \(3, 32\): expected \(4, 2 \* head_dim\)"):
        attn(torch.randn(1, 9, 32), rope=torch.randn(3, 32))  # 5 prefix tokens + 4 patches


DINOV3_TINY = ["model.arch=vit_small_patch16_dinov3", "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2, "
               "patch_size: 8}", "model.num_registers=2"]


def test_dinov2_trains_a_dinov3_vit_packed():
    """model.arch=vit_small_patch16_dinov3 through DinoV2 with the dinotron attention and packed crops: the step's
    losses and gradients equal those of the same weights run unpacked with timm's attention."""
    arch = [*DINOV3_TINY, "model.drop_path_rate=0.0"]
    model = DinoV2(tiny_config(*arch, "model.attention=dinotron", "model.pack_crops=true"))
    vit = model.student.backbone.vit
    assert vit.num_prefix_tokens == 3 and vit.rope is not None, "model.num_registers sets an Eva's num_reg_tokens"
    assert all(is_swapped(b.attn) for b in vit.blocks) and isinstance(vit.blocks[0].drop_path1, SequenceDropPath)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unpacked = DinoV2(tiny_config(*arch))
    unpacked.load_state_dict(model.state_dict())
    g, local = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    masks = torch.rand(4, 16) < 0.3

    def step(dinov2):  # the loss and the gradient of every student parameter (autograd.grad: each must get one)
        loss = dinov2(g, local, masks, 0.04)["loss"]
        return [loss, *torch.autograd.grad(loss, list(dinov2.student.parameters()))]

    packed, expected = step(model), step(unpacked)
    torch.testing.assert_close(packed[0], expected[0], rtol=1e-5, atol=1e-6)
    assert_close(packed[1:], expected[1:], rtol=1e-4, atol=1e-5)
    # and with stochastic depth, one draw per packed sequence, the step trains
    model = DinoV2(tiny_config(*arch[:-1], "model.attention=dinotron", "model.pack_crops=true"))
    assert all(t.isfinite().all() for t in step(model))


def test_eva_layerscale_off_is_refused():
    with pytest.raises(ValueError, match="model.layerscale=null: 'vit_small_patch16_dinov3' is a timm Eva"):
        DinoV2(tiny_config(*DINOV3_TINY, "model.layerscale=null"))


def test_dinov3_export_loads_in_timm_and_as_pretrained(tmp_path):
    """`dinotron export` of an Eva run: plain timm rebuilds it (registers, LayerScale, final norm as trained) and
    model.pretrained starts from it; both give the teacher's features exactly (the same fp32 ops)."""
    cfg = tiny_config(*DINOV3_TINY)
    model = DinoV2(cfg).eval()
    out = export_backbone(model, cfg, tmp_path / "export")
    images = torch.randn(2, 3, 48, 48)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    restarted = DinoV2(tiny_config(*DINOV3_TINY, f"model.pretrained={out}")).eval()
    with torch.no_grad():
        expected = model.teacher.backbone(images).cls
        torch.testing.assert_close(loaded.forward_features(images)[:, 0], expected, rtol=0, atol=0)
        torch.testing.assert_close(restarted.teacher.backbone(images).cls, expected, rtol=0, atol=0)
