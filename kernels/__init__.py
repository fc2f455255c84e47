"""dinotron.kernels: the DINOv2 losses and attention, as Triton kernels with eager fallbacks.

Importing this package pulls in torch (and triton where kernels exist), never DALI, timm or
webdataset, so the losses can be dropped into any training loop.
"""
from dinotron.kernels.backend import resolve_backend
from dinotron.kernels.koleo import KoLeoLoss, koleo_loss
from dinotron.kernels.reference import (
    attention,
    dino_loss,
    ibot_patch_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    update_center,
)

__all__ = [
    "KoLeoLoss",
    "attention",
    "dino_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "resolve_backend",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
    "update_center",
]
