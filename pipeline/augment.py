"""The DINOv2 multi-crop recipe as data: its config and the per-sample random parameters.

Both loaders (DALI and torchvision) draw every random number here, from a counter-based hash of
(seed, epoch, sample id, slot): the augmentation of a sample depends on nothing else (not on the
batch size, the rank count, the worker count or where a run resumed), so exact resume is free and
the two loaders apply the same crops, flips, jitter factors and order, blurs and solarizations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class MultiCropConfig:
    """DINOv2's DataAugmentationDINO, every number configurable (defaults = dinov2's).

    View order is fixed: global crops 0..n_global-1, then local crops. Colour jitter applies brightness,
    contrast, saturation and hue in a random order per crop, as torchvision's ColorJitter (columns P_ORDER).
    Blur probabilities are the stated recipe's; dinov2's GaussianBlur hands 1 - p to RandomApply, so its
    models were trained with global_blur_p=(0.0, 0.9).
    """

    n_global: int = 2  # global crops per image
    global_size: int = 224  # output side of a global crop (px)
    global_scale: tuple[float, float] = (0.32, 1.0)  # RandomResizedCrop area fraction range, global crops
    n_local: int = 8  # local crops per image (0 disables them)
    local_size: int = 96  # output side of a local crop (px)
    local_scale: tuple[float, float] = (0.05, 0.32)  # RandomResizedCrop area fraction range, local crops
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (w / h)
    interpolation: str = "bicubic"  # resize filter of the crops: "bicubic" (dinov2) or "bilinear"
    flip_p: float = 0.5  # horizontal flip probability, every crop
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8  # probability of applying the colour jitter, every crop
    grayscale_p: float = 0.2  # RandomGrayscale probability, every crop
    global_blur_p: tuple[float, ...] = (1.0, 0.1)  # Gaussian blur probability per global crop (last repeats)
    local_blur_p: float = 0.5  # Gaussian blur probability, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range (px), sampled uniformly
    blur_kernel_size: int = 9  # blur window (odd, px), as dinov2's GaussianBlur(kernel_size=9)
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)  # solarize probability per global crop (last repeats)
    solarize_threshold: int = 128  # pixels >= threshold (0..255) are inverted
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation mean (RGB, 0..1 scale)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalisation std (RGB, 0..1 scale)

    def __post_init__(self):
        def prob(name, value):
            values = value if isinstance(value, (tuple, list)) else (value,)
            if not values or any(not 0.0 <= float(v) <= 1.0 for v in values):
                raise ValueError(f"MultiCropConfig.{name} must be probabilities in [0, 1], got {value!r}")

        def scale_range(name, lo, hi, top=1.0):
            if not 0.0 < lo <= hi <= top:
                raise ValueError(f"MultiCropConfig.{name} must satisfy 0 < low <= high <= {top}, got ({lo}, {hi})")

        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"MultiCropConfig needs n_global >= 1 and n_local >= 0, got {self.n_global}, "
                             f"{self.n_local}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MultiCropConfig.{name} must be >= 1, got {getattr(self, name)}")
        scale_range("global_scale", *self.global_scale)
        scale_range("local_scale", *self.local_scale)
        scale_range("ratio", *self.ratio, top=math.inf)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"MultiCropConfig.interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "global_blur_p", "local_blur_p", "global_solarize_p"):
            prob(name, getattr(self, name))
        b, c, s, h = self.color_jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError(f"MultiCropConfig.color_jitter must be (>=0, >=0, >=0, 0..0.5), got {self.color_jitter}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"MultiCropConfig.blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"MultiCropConfig.blur_kernel_size must be odd and >= 1, got {self.blur_kernel_size}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"MultiCropConfig.solarize_threshold must be in 0..256, got {self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"MultiCropConfig.mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    def view_size(self, v: int) -> int:
        return self.global_size if v < self.n_global else self.local_size

    def blur_p(self, v: int) -> float:
        if v >= self.n_global:
            return self.local_blur_p
        return self.global_blur_p[min(v, len(self.global_blur_p) - 1)]

    def solarize_p(self, v: int) -> float:
        if v >= self.n_global:
            return 0.0
        return self.global_solarize_p[min(v, len(self.global_solarize_p) - 1)]


# Columns of the per-view parameter vector (float32) shared by the two loaders.
P_Y0, P_X0, P_Y1, P_X1 = 0, 1, 2, 3  # crop box in input pixels, end exclusive
P_FLIP = 4  # 1.0: mirror horizontally
P_BRIGHT, P_CONTRAST, P_SAT, P_HUE = 5, 6, 7, 8  # jitter factors (1, 1, 1, 0 = identity); hue in turns
P_GRAY = 9  # 1.0: grayscale (after jitter)
P_BLUR = 10  # 1.0: Gaussian blur
P_SIGMA = 11  # blur sigma (px)
P_SOLARIZE = 12  # 1.0: solarize
P_ORDER = 13  # 4 columns: the jitter ops (JITTER_OPS indices) in the order they apply, a random permutation
N_PARAMS = 17
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's fn_idx numbering

_TRIALS = 10  # RandomResizedCrop attempts before its centre-crop fallback (as torchvision)
_SLOTS_PER_VIEW = 4 * _TRIALS + 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 counters."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _sample_keys(seed: int, epoch: int, sample_ids) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & (2**64 - 1)], np.uint64) * _GOLDEN + np.uint64(epoch & (2**64 - 1)))
        return _mix64(key ^ (np.asarray(sample_ids, np.uint64) * _GOLDEN))


def _unit(keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) of (key, slot) pairs (broadcast), float64 with 53 random bits."""
    with np.errstate(over="ignore"):
        bits = _mix64(keys + (slots.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _random_resized_crops(keys, h, w, scale_lo, scale_hi, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for every (sample, view), vectorised: (N, V, 4) y0, x0, y1, x1.

    keys: (N,) sample keys; h, w: (N,) image sizes; scale_lo/hi: (V,). Trial t of view v draws slots
    v * _SLOTS_PER_VIEW + 4t .. 4t+3; only pairs still without a crop draw the next trial.
    """
    n, v = len(h), len(scale_lo)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # Fallback: the whole image, clamped to the ratio range, centred.
    in_ratio = w / h
    fw = np.where(in_ratio > ratio[1], np.rint(h * ratio[1]).astype(np.int64), w)
    fh = np.where(in_ratio < ratio[0], np.rint(w / ratio[0]).astype(np.int64), h)
    box = np.empty((n, v, 4), np.int64)
    box[..., 0] = ((h - fh) // 2)[:, None]
    box[..., 1] = ((w - fw) // 2)[:, None]
    box[..., 2] = box[..., 0] + fh[:, None]
    box[..., 3] = box[..., 1] + fw[:, None]
    pn, pv = np.divmod(np.arange(n * v), v)  # pending (sample, view) pairs
    for t in range(_TRIALS):
        if not len(pn):
            break
        u = _unit(keys[pn][:, None], (pv * _SLOTS_PER_VIEW + 4 * t)[:, None] + np.arange(4)[None, :])
        hh, ww = h[pn], w[pn]
        target = hh * ww * (scale_lo[pv] + (scale_hi[pv] - scale_lo[pv]) * u[:, 0])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        cw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        ch = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        ok = (cw > 0) & (ch > 0) & (cw <= ww) & (ch <= hh)
        y0 = np.floor(u[:, 2] * (hh - ch + 1)).astype(np.int64)
        x0 = np.floor(u[:, 3] * (ww - cw + 1)).astype(np.int64)
        box[pn[ok], pv[ok]] = np.stack([y0, x0, y0 + ch, x0 + cw], axis=1)[ok]
        pn, pv = pn[~ok], pv[~ok]
    return box


def sample_params(cfg: MultiCropConfig, seed: int, epoch: int, sample_ids, heights, widths) -> np.ndarray:
    """Random parameters of every view: (N, n_views, N_PARAMS) float32 (columns P_*).

    heights/widths: the decoded image sizes (px) of the N samples.
    """
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    keys = _sample_keys(seed, epoch, sample_ids)
    views = np.arange(cfg.n_views)
    is_global = views < cfg.n_global
    scale_lo = np.where(is_global, cfg.global_scale[0], cfg.local_scale[0])
    scale_hi = np.where(is_global, cfg.global_scale[1], cfg.local_scale[1])
    out = np.zeros((len(h), cfg.n_views, N_PARAMS), np.float32)
    out[..., P_Y0:P_X1 + 1] = _random_resized_crops(keys, h, w, scale_lo, scale_hi, cfg.ratio)
    slots = (views * _SLOTS_PER_VIEW + 4 * _TRIALS)[None, :, None] + np.arange(14)[None, None, :]
    r = _unit(keys[:, None, None], slots)
    jb, jc, js, jh = cfg.color_jitter
    jitter = r[..., 1] < cfg.color_jitter_p

    def factor(strength, u):  # ColorJitter's uniform factor in [max(0, 1 - s), 1 + s]
        lo = max(0.0, 1 - strength)
        return np.where(jitter, lo + (1 + strength - lo) * u, 1.0)

    out[..., P_FLIP] = r[..., 0] < cfg.flip_p
    out[..., P_BRIGHT] = factor(jb, r[..., 2])
    out[..., P_CONTRAST] = factor(jc, r[..., 3])
    out[..., P_SAT] = factor(js, r[..., 4])
    out[..., P_HUE] = np.where(jitter, -jh + 2 * jh * r[..., 5], 0.0)
    out[..., P_GRAY] = r[..., 6] < cfg.grayscale_p
    out[..., P_BLUR] = r[..., 7] < np.array([cfg.blur_p(v) for v in views])
    out[..., P_SIGMA] = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * r[..., 8]
    out[..., P_SOLARIZE] = r[..., 9] < np.array([cfg.solarize_p(v) for v in views])
    # ColorJitter.get_params' fn_idx = torch.randperm(4): the ranks of 4 uniforms are a uniform permutation.
    out[..., P_ORDER:P_ORDER + 4] = np.argsort(r[..., 10:14], axis=-1, kind="stable")
    return out
