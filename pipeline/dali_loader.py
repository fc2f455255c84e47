"""The DALI graphs (multi-crop for training, resize + centre crop for evaluation) and their loaders.

One builder per graph, with a device switch: "gpu" decodes with nvJPEG / the hardware JPEG decoder
("mixed") and augments on the GPU; "cpu" decodes and augments on CPU threads (device_id=None).
The encoded bytes and every random number come in through external sources (see loader.py and
augment.py), so the order, the sharding across ranks and the augmentations are the same as the
torchvision loaders' and resume exactly.

Backends are explicit: where DALI does not import, constructing MultiCropLoader or EvalLoader raises
DaliNotInstalledError, unless allow_fallback=True asks for the torchvision loader in its place (logged
once per process). Every loader records what runs in `backend` ("dali-gpu", "dali-cpu", "torchvision")
and, for a fallback, why in `fallback_reason`.
"""
from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from dinotron.pipeline import augment as A
from dinotron.pipeline.augment import MultiCropConfig
from dinotron.pipeline.loader import MultiCropSource, ShardLoader, resolve_dtype
from dinotron.pipeline.shards import ShardError, check_decodes, decoded_size
from dinotron.pipeline.torchvision_loader import TorchvisionEvalLoader, TorchvisionMultiCropLoader

log = logging.getLogger(__name__)
_fallback_logged = False  # the allow_fallback warning goes out once per process; each loader keeps fallback_reason


class DaliNotInstalledError(ImportError):
    """A DALI loader was constructed where NVIDIA DALI does not import (and allow_fallback was not given)."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(device: str) -> str:
    """"gpu" | "cpu" | "auto" (the GPU when torch sees CUDA) -> "gpu" | "cpu"."""
    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' needs a CUDA GPU; use device='cpu' (or 'auto')")
    return device


def _pipeline(graph, batch_size: int, device: str, device_id: int | None, num_threads: int, prefetch: int):
    from nvidia.dali import pipeline_def

    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    pipe = pipeline_def(graph, enable_conditionals=True, exec_dynamic=True)(  # outputs(cuda_stream=...) needs it
        batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
        prefetch_queue_depth=prefetch)
    pipe.build()
    return pipe


def _decode(encoded, device: str, hw_decoder_load: float):
    from nvidia.dali import fn, types

    # adjust_orientation=False: pixels as stored, as PIL (the torchvision loaders) and dinov2 decode them, and
    # as the crop boxes (from the JPEG header's size) assume; DALI would otherwise apply the EXIF rotation.
    if device == "gpu":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                 hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)


def color_jitter(images, brightness, contrast, saturation, hue, device: str):
    """torchvision's adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue in this order on uint8
    HWC images; the factors are per-sample scalars (CPU nodes), hue in turns (-0.5..0.5).

    Contrast blends with the mean grey level of the (brightness-adjusted) image, as torchvision does; DALI's
    colour twist would pivot on 128. Saturation in the colour twist is the same blend with the luma as
    torchvision's; the hue rotation is DALI's (in YIQ, torchvision's is in HSV).
    """
    from nvidia.dali import fn, math, types

    images = fn.color_twist(images, brightness=brightness)
    grey_mean = fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))
    if device == "gpu":
        contrast = contrast.gpu()
    blended = math.clamp(contrast * images + (1.0 - contrast) * grey_mean, 0.0, 255.0)
    images = fn.cast(blended, dtype=types.UINT8)
    return fn.color_twist(images, saturation=saturation, hue=hue * 360.0)


def _normalize(images, mean, std, dtype: torch.dtype, **crop):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(images, mean=[255 * m for m in mean], std=[255 * s for s in std],
                                    output_layout="CHW",
                                    dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT, **crop)


def build_multicrop_pipeline(cfg: MultiCropConfig, batch_size: int, *, device: str, device_id: int | None = None,
                             num_threads: int = 4, prefetch: int = 2, dtype: torch.dtype = torch.float32,
                             hw_decoder_load: float = 0.65):
    """DALI pipeline of the multi-crop recipe, fed by external sources "encoded" (uint8 bytes per sample) and
    "params" ((n_views, N_PARAMS) float32 per sample). Outputs n_views batches of (3, S, S) normalised crops."""
    from nvidia.dali import fn, types

    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    solarize_lut = [255 - k if k >= cfg.solarize_threshold else k for k in range(256)]
    jitter = any(cfg.color_jitter) and cfg.color_jitter_p > 0 or cfg.grayscale_p > 0

    def view(images, p, v):
        size = cfg.view_size(v)
        out = fn.resize(images, roi_start=p[A.P_Y0:A.P_X0 + 1], roi_end=p[A.P_Y1:A.P_X1 + 1], size=[size, size],
                        interp_type=interp, antialias=True)
        if jitter:
            out = color_jitter(out, p[A.P_BRIGHT], p[A.P_CONTRAST], p[A.P_SAT] * (1.0 - p[A.P_GRAY]), p[A.P_HUE],
                               device)
        if cfg.blur_p(v) >= 1.0:
            out = fn.gaussian_blur(out, sigma=p[A.P_SIGMA], window_size=cfg.blur_kernel_size)
        elif cfg.blur_p(v) > 0.0:
            if p[A.P_BLUR] > 0.5:
                out = fn.gaussian_blur(out, sigma=p[A.P_SIGMA], window_size=cfg.blur_kernel_size)
            else:
                out = out
        if cfg.solarize_p(v) > 0.0:
            if p[A.P_SOLARIZE] > 0.5:
                out = fn.lookup_table(out, keys=list(range(256)), values=solarize_lut, dtype=types.UINT8)
            else:
                out = out
        return _normalize(out, cfg.mean, cfg.std, dtype, mirror=fn.cast(p[A.P_FLIP], dtype=types.INT32))

    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        params = fn.external_source(name="params", dtype=types.FLOAT, ndim=2)
        images = _decode(encoded, device, hw_decoder_load)
        return tuple(view(images, params[v], v) for v in range(cfg.n_views))

    return _pipeline(graph, batch_size, device, device_id, num_threads, prefetch)


def build_eval_pipeline(batch_size: int, *, image_size: int, mean, std, interpolation: str, device: str,
                        device_id: int | None = None, num_threads: int = 4, prefetch: int = 2,
                        dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65):
    """DALI pipeline: decode, resize the box "roi" ((4,) float32 y0, x0, y1, x1 per sample, from external source)
    to image_size x image_size, normalise. With the box of `center_crop_box` this is Resize + CenterCrop."""
    from nvidia.dali import fn, types

    interp = types.INTERP_CUBIC if interpolation == "bicubic" else types.INTERP_LINEAR

    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=1)
        images = fn.resize(_decode(encoded, device, hw_decoder_load), roi_start=roi[0:2], roi_end=roi[2:4],
                           size=[image_size, image_size], interp_type=interp, antialias=True)
        return (_normalize(images, mean, std, dtype),)

    return _pipeline(graph, batch_size, device, device_id, num_threads, prefetch)


def center_crop_box(h: int, w: int, resize_size: int, image_size: int) -> tuple[float, float, float, float]:
    """The input box (y0, x0, y1, x1) that torchvision's Resize(resize_size) + CenterCrop(image_size) keeps."""
    if h <= w:
        rh, rw = resize_size, int(resize_size * w / h)
    else:
        rh, rw = int(resize_size * h / w), resize_size
    top, left = int(round((rh - image_size) / 2.0)), int(round((rw - image_size) / 2.0))
    sy, sx = h / rh, w / rw
    return top * sy, left * sx, (top + image_size) * sy, (left + image_size) * sx


class _DaliBase(ShardLoader):
    """Streams (epoch, batch) positions through a DALI pipeline, `prefetch` batches ahead, across epoch ends.

    Subclasses give `_build()`, `_inputs(epoch, ids)` -> {external source name: list of arrays} and
    `_outputs(dali outputs, ids)` -> batch dict.
    """

    _fallback: type

    def __new__(cls, *args, allow_fallback: bool = False, **kwargs):
        if dali_available():
            return super().__new__(cls)
        fallback = cls._fallback.__name__
        if not allow_fallback:
            raise DaliNotInstalledError(
                f"{cls.__name__} needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130, or use "
                f"{fallback} (the same batches from CPU workers), or pass allow_fallback=True to get {fallback} "
                f"in place of {cls.__name__}")
        reason = f"NVIDIA DALI is not installed: {cls.__name__}(allow_fallback=True) runs as {fallback}"
        global _fallback_logged
        if not _fallback_logged:
            _fallback_logged = True
            log.warning("%s (CPU workers; pip install nvidia-dali-cuda130 for the DALI pipeline). Logged once per "
                        "process; every such loader records it in .fallback_reason", reason)
        loader = cls._fallback(*args, **kwargs)
        loader.fallback_reason = reason
        return loader

    def __init__(self, shards, batch_size, *, device, device_id, num_threads, prefetch, dtype, hw_decoder_load,
                 **kwargs):
        super().__init__(shards, batch_size, **kwargs)
        self.device = resolve_device(device)
        self.backend = f"dali-{self.device}"
        self.device_id = device_id
        if num_threads < 1 or prefetch < 1:
            raise ValueError(f"num_threads and prefetch must be >= 1, got {num_threads}, {prefetch}")
        self.num_threads, self.prefetch = num_threads, prefetch
        self.dtype = resolve_dtype(dtype)
        self.hw_decoder_load = hw_decoder_load
        self._pipe = None
        self._inflight: deque = deque()  # (epoch, batch, ids) scheduled, oldest first
        self._next = (0, 0)  # the (epoch, batch) to schedule next

    def _advance(self, epoch: int, b: int) -> tuple[int, int]:
        return (epoch, b + 1) if b + 1 < len(self) else (epoch + 1, 0)

    def _feed(self) -> None:
        epoch, b = self._next
        ids = self.batch_ids(epoch, b)
        for name, data in self._inputs(epoch, ids).items():
            self._pipe.feed_input(name, data)
        self._inflight.append((epoch, b, ids))
        self._next = self._advance(epoch, b)

    def _restart(self, epoch: int, start: int) -> None:
        """Schedule batches from (epoch, start): drain what is in flight (cheaper than a rebuild) or build."""
        runs = 1  # a fresh pipeline's first schedule_run runs `prefetch` iterations
        if self._pipe is not None:
            try:
                for _ in range(len(self._inflight)):
                    self._pipe.outputs()
                runs = self.prefetch
            except Exception:
                self._pipe = None
        self._inflight = deque()
        if self._pipe is None:
            self._pipe = self._build()
        self._next = (epoch, start)
        for _ in range(self.prefetch):
            self._feed()
        for _ in range(runs):
            self._pipe.schedule_run()

    def _batches(self, epoch: int, start: int):
        if self._pipe is None or not self._inflight or self._inflight[0][:2] != (epoch, start):
            self._restart(epoch, start)
        stream = torch.cuda.current_stream(self._pipe.device_id) if self.device == "gpu" else None
        for _ in range(start, len(self)):
            try:
                outs = self._pipe.outputs(cuda_stream=stream)
            except RuntimeError as e:
                ids = self._inflight[0][2]
                self._pipe, self._inflight = None, deque()
                raise self._decode_error(ids, e) from e
            ids = self._inflight.popleft()[2]
            batch = self._outputs(outs, ids)
            self._feed()
            self._pipe.schedule_run()
            yield batch

    def _decode_error(self, ids, error: Exception) -> Exception:
        for i in ids:
            reason = check_decodes(self.reader.image(int(i)))
            if reason:
                return ShardError(f"{self.table.where(int(i))}: undecodable image ({reason})")
        keys = ", ".join(self.table.key(int(i)) for i in ids[:8])
        return RuntimeError(f"DALI failed on a batch of samples {keys}{' ...' if len(ids) > 8 else ''}: {error}")

    def _to_torch(self, outputs, n: int, size: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate DALI outputs (each a batch of (3, size, size)) into one (sum of batches, 3, size, size)
        tensor."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dev = torch.device("cuda", self._pipe.device_id) if self.device == "gpu" else torch.device("cpu")
        native = torch.float16 if self.dtype == torch.float16 else torch.float32
        out = torch.empty(len(outputs) * n, 3, size, size, dtype=native, device=dev)
        stream = torch.cuda.current_stream(dev).cuda_stream if self.device == "gpu" else None
        for k, o in enumerate(outputs):
            feed_ndarray(o.as_tensor(), out[k * n:(k + 1) * n], cuda_stream=stream)
        return out.to(self.dtype)

    def _labels(self, ids):
        labels = self.reader.labels(ids)
        return None if labels is None else torch.from_numpy(labels)


class MultiCropLoader(_DaliBase):
    """DINOv2 multi-crop batches from WebDataset shards through DALI.

    shards: paths, brace patterns or a list of them. Each batch (B = batch_size) is
    {"global_crops": (n_global*B, 3, G, G), "local_crops": (n_local*B, 3, L, L), "labels": (B,) int64 or None},
    view-major (rows [v*B, (v+1)*B) hold view v of every image), normalised, of `dtype` (fp32 default; fp16/bf16
    on the GPU), on the GPU for device "gpu" and on the CPU for "cpu". "auto" = the GPU when torch sees CUDA.
    shard_id/num_shards default to torch.distributed's rank/world size. len() = batches per epoch on this rank.
    `backend` is "dali-gpu" or "dali-cpu". Where DALI is not installed, constructing one raises
    DaliNotInstalledError; with allow_fallback=True it returns a TorchvisionMultiCropLoader instead (backend
    "torchvision", `fallback_reason` set; a warning logged once per process).
    """

    _fallback = TorchvisionMultiCropLoader

    def __init__(self, shards, batch_size: int, *, device: str = "auto", augment: MultiCropConfig | None = None,
                 seed: int = 0, shard_id: int | None = None, num_shards: int | None = None, num_threads: int = 4,
                 drop_last: bool = True, shuffle: bool = True, dtype=torch.float32, device_id: int | None = None,
                 prefetch: int = 2, hw_decoder_load: float = 0.65, allow_fallback: bool = False):
        # allow_fallback is read by __new__ (where DALI is missing); here DALI is present and it changes nothing.
        super().__init__(shards, batch_size, device=device, device_id=device_id, num_threads=num_threads,
                         prefetch=prefetch, dtype=dtype, hw_decoder_load=hw_decoder_load, seed=seed, shard_id=shard_id,
                         num_shards=num_shards, shuffle=shuffle, drop_last=drop_last)
        self.augment = augment or MultiCropConfig()
        self._source = MultiCropSource(self.reader, self.augment, self.seed)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._source.seed != self.seed:
            self._source.seed, self._pipe = self.seed, None

    def _build(self):
        return build_multicrop_pipeline(self.augment, self.batch_size, device=self.device, device_id=self.device_id,
                                        num_threads=self.num_threads, prefetch=self.prefetch, dtype=self.dtype,
                                        hw_decoder_load=self.hw_decoder_load)

    def _inputs(self, epoch: int, ids) -> dict:
        data = self._source.encoded(ids)
        params = self._source.params(epoch, ids, self._source.sizes(ids, data))
        return {"encoded": data, "params": list(params)}

    def _outputs(self, outs, ids) -> dict:
        cfg, n = self.augment, len(ids)
        return {
            "global_crops": self._to_torch(outs[:cfg.n_global], n, cfg.global_size),
            "local_crops": self._to_torch(outs[cfg.n_global:], n, cfg.local_size),
            "labels": self._labels(ids),
        }


class EvalLoader(_DaliBase):
    """Evaluation batches: resize the shorter side to resize_size (bicubic), centre-crop image_size, normalise.

    Deterministic and unshuffled; rank r of R reads the r-th contiguous block of the samples, so every sample is
    seen exactly once across ranks (no padding; the last batch may be short). Batches are
    {"images": (B, 3, S, S) of `dtype`, "labels": (B,) int64 or None}; DALI with the device switch of
    MultiCropLoader. Where DALI is not installed: DaliNotInstalledError, or with allow_fallback=True a
    TorchvisionEvalLoader (backend "torchvision", `fallback_reason` set), as for MultiCropLoader.
    """

    _fallback = TorchvisionEvalLoader

    def __init__(self, shards, batch_size: int, *, image_size: int = 224, resize_size: int = 256, device: str = "auto",
                 shard_id: int | None = None, num_shards: int | None = None, num_threads: int = 4,
                 mean=MultiCropConfig.mean, std=MultiCropConfig.std, interpolation: str = "bicubic",
                 dtype=torch.float32, device_id: int | None = None, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 allow_fallback: bool = False):
        # allow_fallback: see MultiCropLoader.__init__.
        super().__init__(shards, batch_size, device=device, device_id=device_id, num_threads=num_threads,
                         prefetch=prefetch, dtype=dtype, hw_decoder_load=hw_decoder_load, shard_id=shard_id,
                         num_shards=num_shards, shuffle=False, drop_last=False)
        if not 0 < image_size <= resize_size:
            raise ValueError(f"need 0 < image_size <= resize_size, got {image_size}, {resize_size}")
        self.image_size, self.resize_size, self.mean, self.std = image_size, resize_size, mean, std
        self.interpolation = interpolation

    def _build(self):
        return build_eval_pipeline(self.batch_size, image_size=self.image_size, mean=self.mean, std=self.std,
                                   interpolation=self.interpolation, device=self.device, device_id=self.device_id,
                                   num_threads=self.num_threads, prefetch=self.prefetch, dtype=self.dtype,
                                   hw_decoder_load=self.hw_decoder_load)

    def _inputs(self, epoch: int, ids) -> dict:
        data = [self.reader.image(int(i)) for i in ids]
        sizes = [decoded_size(d, self.table.where(int(i))) for i, d in zip(ids, data, strict=True)]
        boxes = [np.array(center_crop_box(h, w, self.resize_size, self.image_size), np.float32) for h, w in sizes]
        return {"encoded": data, "roi": boxes}

    def _outputs(self, outs, ids) -> dict:
        return {"images": self._to_torch(outs, len(ids), self.image_size), "labels": self._labels(ids)}
