"""dinotron.kernels: the DINOv2 losses and attention, as Triton kernels with eager fallbacks.

Importing this package pulls in torch (and triton where kernels exist), never DALI, timm or
webdataset, so the losses can be dropped into any training loop.
"""
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.cross_entropy import DINOLoss, IBOTPatchLoss, dino_loss, ibot_patch_loss
from dinotron.kernels.flash_attention import (
    attention,
    attention_varlen,
    make_cu_seqlens,
    packed_sequences,
    swap_timm_attention,
)
from dinotron.kernels.fused_head import (
    FusedHeadDINOLoss,
    FusedHeadIBOTLoss,
    fused_head_dino_loss,
    fused_head_ibot_loss,
)
from dinotron.kernels.gram import GramLoss, gram_loss
from dinotron.kernels.koleo import KoLeoLoss, koleo_loss
from dinotron.kernels.sinkhorn_knopp import sinkhorn_knopp_teacher
from dinotron.kernels.softmax_center import softmax_center_and_update_teacher, softmax_center_teacher, update_center

__all__ = [
    "DINOLoss",
    "FusedHeadDINOLoss",
    "FusedHeadIBOTLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "attention",
    "attention_varlen",
    "dino_loss",
    "fused_head_dino_loss",
    "fused_head_ibot_loss",
    "gram_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "make_cu_seqlens",
    "packed_sequences",
    "resolve_backend",
    "sinkhorn_knopp_teacher",
    "softmax_center_and_update_teacher",
    "softmax_center_teacher",
    "swap_timm_attention",
    "update_center",
]
