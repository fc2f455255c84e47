"""Mixed precision of the student's loss path (issue 14): no logit-gradient entry flushes to zero, and the gradient
that reaches the backbone stays close to the fp32 run's, under precision=bf16 and precision=fp16.

What runs: DinoV2.student_losses (DINO over 2 global + 8 local views, KoLeo, iBOT), its heads (DINOHead, whose
prototype layer computes in fp16 under bf16 autocast) and the loss ops, under torch.autocast on CPU with the
trainer's autocast dtype (loop._DTYPES), scaled by the scaler the trainer builds for that dtype
(loop.build_grad_scaler: 2^16 at first, halved after each step whose gradients overflow, as its steps do), the
backbone replaced by fp32 leaf features (a timm ViT's final LayerNorm returns fp32 under autocast). The loss ops
write the logits' gradient in the logits' dtype, as the Triton kernels do.

Sizes: the per-entry logit gradient is g * scale * w / student_temp * (softmax - P), about
1 / (crops x n_masked x student_temp x K) for iBOT (scale = 1 / crops, w = 1 / n_masked) and
1 / (B x pairs x student_temp x K) for DINO. dinov2's sizes put the first at ~1e-8, below fp16's smallest
subnormal (6e-8), and the second at ~1e-7, among fp16's subnormals (below 6.1e-5). Both are kept exactly: K = 65536,
B = 64 images per view (128 global crops, so iBOT's scale is dinov2's 1/128), 2 + 8 views (18 DINO pairs), the
student temperature 0.1, and masked crops at dinov2's ratios 0.1 and 0.5 (up to 25 and 128 of 16 x 16 patches). Only two
of the 128 crops carry masks and the heads are narrow (hidden 64, bottleneck 64): neither changes a per-entry
magnitude, and the CPU runs fp16 matmuls slowly. Narrow layers with the init's std of 0.02 would leave the
bottleneck output 200x shorter than at dinov2's widths (norm about 1), and the L2 normalisation's backward would
amplify the gradient as much (fp16 overflow, which the scaler answers by backing off to 2^11); the MLP's weights
are drawn with std 1 / sqrt(fan_in) instead, which keeps that norm near dinov2's.

Flushed entries: entries that are 0 where the fp32 oracle's are not. A few are exact cancellations, not underflow:
where softmax(z) nearly equals the target P, the rounding of the logits moves the difference through 0. Measured
(the fixed code, bf16 and fp16): 2.5e-6 of DINO's entries and 3e-7 of iBOT's, none larger than 7.5 % of the median
entry. So the test asserts that no typical entry (at least a quarter of the median magnitude) is 0, and that at most
1e-5 of all entries are (the bug: 95.9 % of iBOT's, 11 % of DINO's).

Oracle: the same path in fp32 (precision=fp32, the trainer's CPU run), both sides fed the same features and
the same fp32 teacher targets. Tolerances (relative Frobenius error of the gradient reaching the backbone,
cls features and masked patch features apart):
- bf16: 0.1. The error comes from the head's bf16 MLP (bf16 keeps 8 significant bits: 2^-9 relative per
  rounding, through three layers forward and back); the iBOT patch gradient is a sum over K of terms that nearly
  cancel, so its relative error is the larger. Measured 4.0e-2 (patches) and 5.3e-3 (cls) at dinov2's head widths
  (hidden 2048, bottleneck 256), 3.4e-2 and 6.8e-3 here (printed with -s); with the fp16 prototype layer
  unscaled (the bug) the patches' error was 0.29 (dinov2's widths) and 95.9 % of iBOT's entries flushed.
- fp16: 0.02 (11 significant bits, 8x finer than bf16: measured 5.0e-3 (patches) and 6.7e-4 (cls) at dinov2's
  widths, 4.4e-3 and 8.1e-4 here).
"""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinotron import kernels
from dinotron.train.loop import _DTYPES, build_grad_scaler
from dinotron.train.masking import BlockMaskGenerator, masked_patch_indices
from dinotron.train.model import DinoV2, HeadOutputs, fp16_in_graph
from helpers import tiny_config

B, N_GLOBAL, N_LOCAL, GRID, K = 64, 2, 8, 16, 65536
RATIOS = (0.1, 0.5)  # the ends of dinov2's mask_ratio_min_max
TOLERANCE = {"bf16": 0.1, "fp16": 0.02}


class _Features(nn.Module):
    """The student's forward with the backbone's output given: fp32 leaf features (cls of every crop, the masked
    patches) through the student's heads. Keeps the logits, whose gradients the test reads."""

    def __init__(self, student: nn.Module, cls: torch.Tensor, patches: torch.Tensor):
        super().__init__()
        self.student, self.cls, self.patches = student, cls, patches

    def forward(self, global_crops, masks, mask_indices, local_crops=None, *, pack=False, fused=False):
        assert not fused, "the logits' gradients are read: the unfused heads"
        cls_logits, patch_logits, _, _ = self.student.heads(self.cls, self.patches)
        for logits in (cls_logits, patch_logits):
            logits.retain_grad()
        self.logits = (cls_logits, patch_logits)
        return HeadOutputs(self.cls[: global_crops.shape[0]], None, cls_logits, patch_logits)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    cfg = tiny_config(f"dino.head={{n_prototypes: {K}, hidden_dim: 64, bottleneck_dim: 64, nlayers: 3}}",
                      f"data.augment.n_local={N_LOCAL}", "model.fused_head=false")
    model = DinoV2(cfg)
    with torch.no_grad():  # narrow layers at dinov2's output scale (see the module docstring)
        for layer in model.student.dino_head.mlp:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
    masks = torch.zeros(N_GLOBAL * B, GRID * GRID, dtype=torch.bool)
    generator = BlockMaskGenerator((GRID, GRID), max_num_patches=0.5 * GRID * GRID)
    for row, ratio in zip((0, B + 1), RATIOS, strict=True):  # one crop of each global view
        masks[row] = generator(int(ratio * GRID * GRID), random.Random(row)).flatten()
    mask_indices = masked_patch_indices(masks)
    dim = model.student.backbone.vit.embed_dim
    cls = F.layer_norm(torch.randn((N_GLOBAL + N_LOCAL) * B, dim), (dim,))
    patches = F.layer_norm(torch.randn(len(mask_indices), dim), (dim,))
    with torch.no_grad():  # the teacher at init: the student's heads on slightly different features
        teacher = model.student.heads(cls[: N_GLOBAL * B] + 0.1 * torch.randn_like(cls[: N_GLOBAL * B]),
                                      patches + 0.1 * torch.randn_like(patches))[:2]
        center = torch.zeros(1, K)
        targets = {name: kernels.softmax_center_and_update_teacher(logits, center, 0.04, 0.9)[0]
                   for name, logits in zip(("cls_probs", "patch_probs"), teacher, strict=True)}
    case = dict(model=model, masks=masks, mask_indices=mask_indices, cls=cls, patches=patches, targets=targets)
    case["fp32"] = _student_gradients(case, "fp32")
    return case


def _student_gradients(case: dict, precision: str) -> dict:
    """The student's gradients as the trainer computes them under `precision` (its autocast dtype and loss
    scaler), unscaled: {"cls", "patches"} (what reaches the backbone), {"dino_logits", "ibot_logits"} (fp32)."""
    model, dtype = case["model"], _DTYPES[precision]
    scaler = build_grad_scaler(dtype, "none", "cpu")
    for _ in range(16):  # the scaler's steps: an inf / NaN gradient skips the step and backs the scale off
        features = _Features(model.student, case["cls"].clone().requires_grad_(),
                             case["patches"].clone().requires_grad_())
        model.wrap_student(features)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.student_losses(torch.empty(N_GLOBAL * B, 0), torch.empty(N_LOCAL * B, 0), case["masks"],
                                       case["mask_indices"], case["targets"])
            scaler.scale(out["loss"]).backward()
        grads = [features.cls.grad, features.patches.grad, *(p.grad for p in model.student.parameters())]
        if all(g.isfinite().all() for g in grads if g is not None):
            break
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    scale = scaler.get_scale()
    cls_logits, patch_logits = features.logits
    return {"cls": features.cls.grad / scale, "patches": features.patches.grad / scale,
            "dino_logits": cls_logits.grad.float() / scale, "ibot_logits": patch_logits.grad.float() / scale,
            "logits_dtype": cls_logits.dtype, "scale": scale}


def test_sizes_keep_dinov2s_underflow_regime(case):
    """The fp32 logit gradients sit where dinov2's do: iBOT's median entry below fp16's smallest subnormal,
    DINO's among fp16's subnormals (so an unscaled fp16 gradient flushes or loses bits, as at full size)."""
    tiny = torch.finfo(torch.float16).smallest_normal
    ibot, dino = (case["fp32"][k].abs() for k in ("ibot_logits", "dino_logits"))
    assert ibot.median() < 2.0**-24 and dino.median() < tiny, (ibot.median(), dino.median())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_student_gradients_survive_precision(case, precision):
    ref = case["fp32"]
    got = _student_gradients(case, precision)
    assert fp16_in_graph(_DTYPES[precision]) == (got["logits_dtype"] == torch.float16)
    for name in ("dino_logits", "ibot_logits"):
        zero, magnitude = got[name] == 0, ref[name].abs()
        typical = magnitude >= magnitude[magnitude > 0].median() / 4
        flushed, share = (zero & typical).sum().item(), (zero & (magnitude > 0)).float().mean().item()
        context = f"{precision}: {name} gradient (logits in {got['logits_dtype']}, loss scale {got['scale']})"
        assert flushed == 0, f"{context}: {flushed} typical entries flushed to zero"
        assert share < 1e-5, f"{context}: {share:.2%} of the entries are zero where fp32's are not"
    for name in ("cls", "patches"):
        error = ((got[name] - ref[name]).norm() / ref[name].norm()).item()
        print(f"{precision} {name}: relative error of the backbone gradient {error:.2e}, loss scale {got['scale']}")
        assert error < TOLERANCE[precision], f"{precision}: backbone gradient ({name}) off by {error:.1%}"


def test_trainer_scales_wherever_fp16_runs():
    """The scaler is on for both mixed precisions (bf16's prototype layer is fp16), off for fp32; FSDP2's is
    the sharded one."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    for precision, enabled in (("bf16", True), ("fp16", True), ("fp32", False)):
        assert build_grad_scaler(_DTYPES[precision], "none", "cpu").is_enabled() == enabled
    assert isinstance(build_grad_scaler(torch.bfloat16, "fsdp2", "cpu"), ShardedGradScaler)
