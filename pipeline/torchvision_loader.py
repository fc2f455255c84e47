"""The torchvision.transforms.v2 loaders: the benchmark baseline, and what allow_fallback=True gives without DALI.

Same shards, order, augmentation parameters, bad-sample handling and output as the DALI loaders; reading,
decoding and augmentation run in `num_threads` DataLoader worker processes, one whole batch per task, each worker
`prefetch_factor` = 2 batches ahead; with num_threads=0, in the background feeder's `read_threads` threads
(loader.ReadAhead), `read_ahead` batches ahead.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dinotron.pipeline import augment as A
from dinotron.pipeline.augment import MultiCropConfig
from dinotron.pipeline.loader import MultiCropSource, ReadAhead, ShardLoader, resolve_dtype
from dinotron.pipeline.shards import MAX_IMAGE_PIXELS, ShardError, check_decodes

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
# Indexed by augment.JITTER_OPS: brightness, contrast, saturation, hue.
_JITTER_FN = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
_JITTER_COLUMN = (A.P_BRIGHT, A.P_CONTRAST, A.P_SAT, A.P_HUE)
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def decode(data: np.ndarray, where: str) -> torch.Tensor:
    """Encoded image (uint8 array) -> (3, H, W) uint8 RGB (PIL / libjpeg-turbo); ShardError naming `where` if it
    fails."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.array(im.convert("RGB"))
    except Exception as e:
        raise ShardError(f"{where}: undecodable image ({check_decodes(data) or e})") from e
    return torch.from_numpy(rgb).permute(2, 0, 1)


def augment_view(img: torch.Tensor, p: np.ndarray, size: int, cfg: MultiCropConfig) -> torch.Tensor:
    """One crop of a (3, H, W) uint8 image with parameters p (N_PARAMS,) -> (3, size, size) uint8."""
    y0, x0, y1, x1 = (int(v) for v in p[A.P_Y0:A.P_X1 + 1])
    out = F.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [size, size], interpolation=_INTERP[cfg.interpolation],
                         antialias=True)
    if p[A.P_FLIP]:
        out = F.horizontal_flip(out)
    for op in p[A.P_ORDER:A.P_ORDER + 4].astype(int):  # ColorJitter.forward: in the order of fn_idx
        factor = float(p[_JITTER_COLUMN[op]])
        if factor != _JITTER_IDENTITY[op]:
            out = _JITTER_FN[op](out, factor)
    if p[A.P_GRAY]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if p[A.P_BLUR]:
        sigma = float(p[A.P_SIGMA])
        out = F.gaussian_blur(out, [cfg.blur_kernel_size] * 2, [sigma, sigma])
    if p[A.P_SOLARIZE]:
        out = F.solarize(out, cfg.solarize_threshold)
    return out


def normalize(views: list[torch.Tensor], mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (3, S, S) views -> one (len, 3, S, S) normalised tensor of `dtype`."""
    x = torch.stack(views).to(torch.float32).div_(255.0)
    return F.normalize(x, list(mean), list(std)).to(dtype)


class _MultiCropBatches:
    """Map-style dataset whose items are whole batches: (epoch, sample ids) -> batch dict."""

    def __init__(self, source: MultiCropSource, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def __getitem__(self, item):
        epoch, ids = item
        src, cfg = self.source, self.source.augment
        used, _, _, images, bad = src.batch_reader.read(epoch, ids, decode=decode)
        params = src.params(epoch, ids, [img.shape[1:] for img in images])
        views = [[augment_view(img, params[j, v], cfg.view_size(v), cfg) for j, img in enumerate(images)]
                 for v in range(cfg.n_views)]
        labels = src.reader.labels(used)
        g = cfg.n_global
        return bad, {
            "global_crops": normalize([x for v in views[:g] for x in v], cfg.mean, cfg.std, self.dtype),
            "local_crops": normalize([x for v in views[g:] for x in v], cfg.mean, cfg.std, self.dtype) if cfg.n_local
            else torch.empty(0, 3, cfg.local_size, cfg.local_size, dtype=self.dtype),
            "labels": None if labels is None else torch.from_numpy(labels),
        }


class _EvalBatches:
    def __init__(self, loader: TorchvisionEvalLoader):
        self.reader, self.batch_reader = loader.reader, loader.batch_reader
        self.image_size, self.resize_size = loader.image_size, loader.resize_size
        self.mean, self.std, self.dtype = loader.mean, loader.std, loader.dtype
        self.interp = _INTERP[loader.interpolation]

    def __getitem__(self, item):
        epoch, ids = item
        views = []
        used, _, _, images, bad = self.batch_reader.read(epoch, ids, decode=decode)
        for img in images:
            img = F.resize(img, [self.resize_size], interpolation=self.interp, antialias=True)
            views.append(F.center_crop(img, [self.image_size, self.image_size]))
        labels = self.reader.labels(used)
        return bad, {"images": normalize(views, self.mean, self.std, self.dtype),
                "labels": None if labels is None else torch.from_numpy(labels)}


class _TorchvisionBase(ShardLoader):
    """Iterates a DataLoader over whole-batch items of this rank's epoch order."""

    backend = "torchvision"

    def __init__(self, shards, batch_size, *, num_threads: int, **kwargs):
        super().__init__(shards, batch_size, **kwargs)
        if num_threads < 0:
            raise ValueError(f"num_threads (DataLoader workers) must be >= 0, got {num_threads}")
        self.num_threads = num_threads

    def _batches(self, epoch: int, start: int):
        items = [(epoch, self.batch_ids(epoch, b)) for b in range(start, len(self))]
        workers = min(self.num_threads, len(items))
        if workers:
            feeder = None
            # generator: the workers' base seed comes from it, not from the global RNG, whose stream (drop path,
            # masks) would otherwise depend on where an epoch was resumed (the crops need no torch RNG)
            batches = DataLoader(self._dataset, batch_size=None, sampler=items, num_workers=workers,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                 multiprocessing_context="fork", generator=torch.Generator())
        else:  # the background feeder's threads, in this process
            feeder = ReadAhead(lambda k: self._dataset[items[k]], 0 if items else None,
                               lambda k: k + 1 if k + 1 < len(items) else None, depth=self.read_ahead,
                               threads=self.read_threads)
            batches = (out for _, out in feeder)
        try:
            for bad, batch in batches:
                self._account(epoch, bad)
                yield batch
        finally:
            if feeder is not None:  # the consumer stopped early or failed: cancel, wait for running reads
                feeder.close()


class TorchvisionMultiCropLoader(_TorchvisionBase):
    """DINOv2 multi-crop batches with torchvision.transforms.v2 on CPU workers.

    Same arguments and output as MultiCropLoader (num_threads = DataLoader workers, 0: the background feeder's
    read_threads; device, device_id, prefetch and hw_decoder_load are DALI's and ignored here: batches stay on the
    CPU):
    {"global_crops": (n_global*B, 3, G, G), "local_crops": (n_local*B, 3, L, L), "labels": (B,) int64 or None},
    view-major, CPU tensors of `dtype` (fp32 by default). `backend` is "torchvision".
    """

    def __init__(self, shards, batch_size: int, *, device: str = "auto", augment: MultiCropConfig | None = None,
                 seed: int = 0, shard_id: int | None = None, num_shards: int | None = None, num_threads: int = 4,
                 drop_last: bool = True, shuffle: bool = True, dtype=torch.float32, device_id: int | None = None,
                 prefetch: int = 2, hw_decoder_load: float = 0.65, on_error: str = "skip",
                 max_bad_fraction: float = 0.01, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 read_order: str = "random", shuffle_buffer: int = 10_000, read_ahead: int = 2, read_threads: int = 2):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
        super().__init__(shards, batch_size, num_threads=num_threads, seed=seed, shard_id=shard_id,
                         num_shards=num_shards, shuffle=shuffle, drop_last=drop_last, on_error=on_error,
                         max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels, read_order=read_order,
                         shuffle_buffer=shuffle_buffer, read_ahead=read_ahead, read_threads=read_threads)
        self.augment = augment or MultiCropConfig()
        self.dtype = resolve_dtype(dtype)
        self._dataset = _MultiCropBatches(MultiCropSource(self.batch_reader, self.augment, self.seed), self.dtype)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._dataset.source.seed = self.seed


class TorchvisionEvalLoader(_TorchvisionBase):
    """Resize (shorter side) + centre crop + normalise, torchvision on CPU workers; see EvalLoader."""

    def __init__(self, shards, batch_size: int, *, image_size: int = 224, resize_size: int = 256, device: str = "auto",
                 shard_id: int | None = None, num_shards: int | None = None, num_threads: int = 4,
                 mean=MultiCropConfig.mean, std=MultiCropConfig.std, interpolation: str = "bicubic",
                 dtype=torch.float32, device_id: int | None = None, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 on_error: str = "raise", max_bad_fraction: float = 0.01, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 read_ahead: int = 2, read_threads: int = 2):
        super().__init__(shards, batch_size, num_threads=num_threads, shard_id=shard_id, num_shards=num_shards,
                         shuffle=False, drop_last=False, on_error=on_error, max_bad_fraction=max_bad_fraction,
                         max_image_pixels=max_image_pixels, read_ahead=read_ahead, read_threads=read_threads)
        if not 0 < image_size <= resize_size:
            raise ValueError(f"need 0 < image_size <= resize_size, got {image_size}, {resize_size}")
        self.image_size, self.resize_size, self.mean, self.std = image_size, resize_size, mean, std
        self.interpolation, self.dtype = interpolation, resolve_dtype(dtype)
        self._dataset = _EvalBatches(self)
