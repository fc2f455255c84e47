"""The DALI graphs (multi-crop for training, resize + centre crop for evaluation) and their loaders.

One builder per graph, with a device switch: "gpu" decodes with nvJPEG / the hardware JPEG decoder
("mixed") and augments on the GPU with DALI's operators; "cpu" decodes and augments on CPU threads (device_id=None),
each multi-crop view made by one Numba-compiled DALI operator (crop_cpu: torchvision's integers, a fraction of the
CPU time of DALI's CPU operators; see build_multicrop_pipeline).
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dinotron.pipeline import augment as A
from dinotron.pipeline.augment import MultiCropConfig
from dinotron.pipeline.loader import MultiCropSource, ReadAhead, ShardLoader, resolve_dtype
from dinotron.pipeline.shards import MAX_IMAGE_PIXELS, ShardError, check_decodes
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


def _grey_mean(images):
    """torchvision's contrast pivot: the mean over pixels of floor(0.2989 R + 0.587 G + 0.114 B), per sample.

    The weighted mean of the per-channel means (one reduction, no grey image); floor() lowers each pixel's grey by
    its fraction, 0.5 on average, so the pivot is the weighted mean - 0.5 (off by < 0.5 level where the fractions are
    not uniform, e.g. a solid colour)."""
    from nvidia.dali import fn

    m = fn.reductions.mean(images, axes=[0, 1])
    return m[0] * 0.2989 + m[1] * 0.587 + m[2] * 0.114 - 0.5


def hsv_hue(images, hue):
    """torchvision's adjust_hue on uint8 HWC images: RGB -> HSV, hue + `hue` turns (mod 1), back to RGB, truncated to
    uint8 as torchvision's to_dtype (x * 255.999). hue: per-sample scalars (CPU nodes) in -0.5..0.5.

    HSV's inverse written without a case split: channel c = max - (max - min) * clamp(min(k, 4 - k), 0, 1) with
    k = (n_c + 6 h) mod 6, n = 5, 3, 1 for R, G, B, which is torchvision's (v, t, p, q) table sextant by sextant. Max
    and min (V and S) are kept. DALI's colour_twist / hsv rotate hue in YIQ, a linear approximation (9.7 levels mean
    gap to torchvision at |h| = 0.1). About 40 arithmetic passes over the H x W planes (DALI does not fuse them)."""
    from nvidia.dali import fn, math, types

    r, g, b = images[:, :, 0], images[:, :, 1], images[:, :, 2]
    hi = math.max(math.max(r, g), b)
    lo = math.min(math.min(r, g), b)
    span = hi - lo
    inv = 1.0 / (span + (span == 0))  # grey pixels (span 0) keep any hue: their channels all equal hi
    rc, gc, bc = (hi - r) * inv, (hi - g) * inv, (hi - b) * inv
    not_r = hi != r
    h6 = ((hi == r) * (bc - gc) + (hi == g) * not_r * (2.0 + rc - bc) + (hi != g) * not_r * (4.0 + gc - rc)
          + hue * 6.0)

    def channel(n):
        k = h6 + n
        k = k - 6.0 * math.floor(k * (1 / 6))
        return math.floor((hi - span * math.clamp(math.min(k, 4.0 - k), 0.0, 1.0)) * (255.999 / 255))

    return fn.cast(fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2, axis_name="C"), dtype=types.UINT8)


_TWIST_CONTRAST = 1 / (1 - 0.499 / 128)


def _jitter_op(images, op: int, factors, device: str):
    """One of ColorJitter's four ops (augment.JITTER_OPS order) with per-sample factors."""
    from nvidia.dali import fn

    brightness, contrast, saturation, hue = factors
    # brightness_shift -0.499 level: DALI rounds to uint8 where torchvision truncates; floor(y) = round(y - 0.499)
    # except for fractions in [0.999, 1).
    shift = -0.499 / 255
    if op == 0:
        return fn.brightness_contrast(images, brightness=brightness, brightness_shift=shift)
    if op == 1:
        center = _grey_mean(images)
        # Argument inputs live on the CPU: a GPU pipeline brings the pivot back (exec_dynamic allows it).
        return fn.brightness_contrast(images, contrast=contrast, contrast_center=center.cpu() if device == "gpu"
                                      else center, brightness_shift=shift)
    if op == 2:
        # The same shift in the colour twist: its contrast pivots on 128, so contrast 1 / (1 - 0.499 / 128) with
        # brightness (1 - 0.499 / 128) is the identity less 0.499.
        return fn.color_twist(images, saturation=saturation, contrast=_TWIST_CONTRAST, brightness=1 / _TWIST_CONTRAST)
    return hsv_hue(images, hue.gpu() if device == "gpu" else hue)


def color_jitter(images, brightness, contrast, saturation, hue, device: str, order=None):
    """torchvision's adjust_brightness, adjust_contrast, adjust_saturation and adjust_hue on uint8 HWC images.

    brightness, contrast, saturation, hue: per-sample scalars (CPU nodes), hue in turns (-0.5..0.5). order: None
    (brightness, contrast, saturation, hue in this order; a plain graph) or a per-sample (4,) node of
    augment.JITTER_OPS indices, applied in that order (ColorJitter's fn_idx); it needs a pipeline with
    enable_conditionals=True: step s runs, on each sample, only the op order[s] selects.

    Brightness and contrast are one brightness_contrast each (contrast pivots on the mean grey level, as
    torchvision's, not on 128); saturation blends with the luma in DALI's colour twist; hue turns in HSV, as
    torchvision's (hsv_hue). Each rounds to uint8 once, as torchvision's ops do.
    """
    factors = (brightness, contrast, saturation, hue)
    if order is None:
        for op in range(4):
            images = _jitter_op(images, op, factors, device)
        return images
    for step in range(4):
        op = order[step]
        if op == 0:
            images = _jitter_op(images, 0, factors, device)
        elif op == 1:
            images = _jitter_op(images, 1, factors, device)
        elif op == 2:
            images = _jitter_op(images, 2, factors, device)
        else:
            images = _jitter_op(images, 3, factors, device)
    return images


_crop_ops: dict = {}  # the compiled per-view CPU operators, by (side, interpolation, blur window, solarize threshold)


def _crop_op(cfg: MultiCropConfig, size: int):
    """DALI operator making one view of side `size` on CPU threads: crop_cpu.crop_ops (resize, colour jitter,
    grayscale, blur, solarize in one compiled pass per view; torchvision's arithmetic) on (image, view parameters).

    Made once per process and configuration: an operator object compiles its Numba callbacks (seconds) in __init__,
    and each call adds a node to the pipeline being defined. Made on a helper thread: importing DALI's Numba plugin
    keeps the traceback of a failed CUDA library probe, which holds every frame of the importing stack, and on the
    caller's thread those frames hold the loader being built (with its DALI pipeline) for the life of the process."""
    key = (size, cfg.interpolation, cfg.blur_kernel_size, cfg.solarize_threshold)
    if key not in _crop_ops:
        with ThreadPoolExecutor(1, thread_name_prefix="dinotron-compile") as pool:
            _crop_ops[key] = pool.submit(_make_crop_op, *key).result()
    return _crop_ops[key]


def _make_crop_op(size: int, interpolation: str, blur_kernel_size: int, solarize_threshold: int):
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    try:
        from dinotron.pipeline.crop_cpu import dali_functions
    except ImportError as e:
        raise ImportError(f"the DALI-CPU multi-crop graph compiles its views with Numba, which does not import ({e}): "
                          "pip install numba") from e
    run, setup = dali_functions(size, interpolation == "bicubic", blur_kernel_size, solarize_threshold)
    return NumbaFunction(run_fn=run, setup_fn=setup, in_types=[types.UINT8, types.FLOAT], ins_ndim=[3, 1],
                         out_types=[types.UINT8], outs_ndim=[3], device="cpu")


def _normalize(images, mean, std, dtype: torch.dtype, **crop):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(images, mean=[255 * m for m in mean], std=[255 * s for s in std],
                                    output_layout="CHW",
                                    dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT, **crop)


def build_multicrop_pipeline(cfg: MultiCropConfig, batch_size: int, *, device: str, device_id: int | None = None,
                             num_threads: int = 4, prefetch: int = 2, dtype: torch.dtype = torch.float32,
                             hw_decoder_load: float = 0.65, view_ops: str | None = None):
    """DALI pipeline of the multi-crop recipe, fed by external sources "encoded" (uint8 bytes per sample) and
    "params" ((n_views, N_PARAMS) float32 per sample). Outputs n_views batches of (3, S, S) normalised crops.

    view_ops: how each view is made from the decoded image. "compiled" (the default on CPU): one Numba-compiled
    operator per view (crop_cpu.crop_ops: torchvision's integers; the graph takes 8.7 CPU-ms per image of 10 crops
    where DALI's CPU operators for the same chain take 55-58 on bench_pipeline's 2-core machine).
    "dali" (the default on GPU, where the compiled operator does not run): DALI's resize, arithmetic, colour,
    blur and lookup-table operators; on CPU it runs the GPU graph's operators on CPU threads (tests)."""
    from nvidia.dali import fn, types

    view_ops = view_ops or ("compiled" if device == "cpu" else "dali")
    if view_ops not in ("compiled", "dali") or (view_ops == "compiled" and device != "cpu"):
        raise ValueError(f"view_ops must be 'dali', or 'compiled' on device 'cpu'; got {view_ops!r} on {device!r}")

    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    solarize_lut = [255 - k if k >= cfg.solarize_threshold else k for k in range(256)]
    jitter = any(cfg.color_jitter) and cfg.color_jitter_p > 0
    grayscale = cfg.grayscale_p > 0
    # Made here, outside graph(): DALI's AutoGraph would rewrite callbacks defined in graph().
    compiled = {v: _crop_op(cfg, cfg.view_size(v)) for v in range(cfg.n_views)} if view_ops == "compiled" else None

    def dali_view(images, p, v):
        size = cfg.view_size(v)
        out = fn.resize(images, roi_start=p[A.P_Y0:A.P_X0 + 1], roi_end=p[A.P_Y1:A.P_X1 + 1], size=[size, size],
                        interp_type=interp, antialias=True)
        if jitter:
            factors = p[A.P_BRIGHT], p[A.P_CONTRAST], p[A.P_SAT], p[A.P_HUE]
            # The 1 - color_jitter_p crops drawn without jitter skip it (identity factors).
            if (factors[0] != 1.0) | (factors[1] != 1.0) | (factors[2] != 1.0) | (factors[3] != 0.0):
                out = color_jitter(out, *factors, device, order=p[A.P_ORDER:A.P_ORDER + 4])
            else:
                out = out
        if grayscale:
            if p[A.P_GRAY] > 0.5:  # RandomGrayscale, after the jitter
                grey = fn.color_space_conversion(out, image_type=types.RGB, output_type=types.GRAY)
                out = fn.cat(grey, grey, grey, axis=2)
            else:
                out = out
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
        return out

    def view(images, p, v):
        out = fn.reshape(compiled[v](images, p), layout="HWC") if compiled else dali_view(images, p, v)
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

    The external sources' inputs (sample reads, index parsing, header checks, crop parameters) are prepared by the
    background feeder (loader.ReadAhead: `read_threads` threads, `read_ahead` batches beyond DALI's `prefetch`),
    not on the training thread. DALI's decoder cannot skip a sample: bad ones are replaced before feeding (see
    loader.BatchReader); where DALI still fails on a batch, its samples that PIL cannot decode are remembered as bad
    and the batch is fed again (on_error="skip"), or ShardError names the first (on_error="raise").

    Subclasses give `_build()`, `_inputs(epoch, ids)` -> ({external source name: list of arrays}, samples used,
    bad samples met) and `_outputs(dali outputs, samples used)` -> batch dict.
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
        self._inflight: deque = deque()  # (epoch, batch, samples used, bad samples met) scheduled, oldest first
        self._feeder: ReadAhead | None = None  # prepares the inputs of the batches after the scheduled ones

    def _advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, b = position
        return (epoch, b + 1) if b + 1 < len(self) else (epoch + 1, 0)

    def _prepare(self, position: tuple[int, int]):
        """On a feeder thread: the inputs of batch b of `epoch`, the samples they hold and the bad ones met."""
        epoch, b = position
        return self._inputs(epoch, self.batch_ids(epoch, b))

    def _feed(self) -> None:
        (epoch, b), (inputs, used, bad) = next(self._feeder)  # re-raises what the feeder thread raised
        for name, data in inputs.items():
            self._pipe.feed_input(name, data)
        self._inflight.append((epoch, b, used, bad))

    def close(self, wait: bool = True) -> None:
        if getattr(self, "_feeder", None) is not None:  # also from __del__ of a loader whose __init__ failed
            self._feeder.close(wait)
            self._feeder = None

    def __del__(self):
        self.close(wait=False)

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
        self.close()
        self._feeder = ReadAhead(self._prepare, (epoch, start), self._advance, depth=self.prefetch + self.read_ahead,
                                 threads=self.read_threads)
        for _ in range(self.prefetch):
            self._feed()
        for _ in range(runs):
            self._pipe.schedule_run()

    def _batches(self, epoch: int, start: int):
        if self._pipe is None or not self._inflight or self._inflight[0][:2] != (epoch, start):
            self._restart(epoch, start)
        stream = torch.cuda.current_stream(self._pipe.device_id) if self.device == "gpu" else None
        b = start
        while b < len(self):
            try:
                outs = self._pipe.outputs(cuda_stream=stream)
            except RuntimeError as e:
                self._recover(e)  # raises, or marks the samples DALI failed on and feeds the batch again
                continue
            _, _, used, bad = self._inflight.popleft()
            batch = self._outputs(outs, used)
            self._feed()
            self._pipe.schedule_run()
            self._account(epoch, bad)
            b += 1
            yield batch

    def _recover(self, error: Exception) -> None:
        """DALI failed on the oldest scheduled batch: find its samples PIL cannot decode; none -> RuntimeError (a DALI
        problem, not the data's); on_error="raise" -> ShardError naming the first; else remember them as bad and
        restart at that batch, which re-reads it with them replaced."""
        epoch, b, used, _ = self._inflight[0]
        self._pipe, self._inflight = None, deque()
        self.close()
        found = {}
        for i in (int(i) for i in used):
            reason = check_decodes(self.reader.image(i))
            if reason:
                found[i] = f"undecodable image ({reason})"
        if not found:
            keys = ", ".join(self.table.key(int(i)) for i in used[:8])
            raise RuntimeError(f"DALI failed on a batch of samples {keys}{' ...' if len(used) > 8 else ''}: "
                               f"{error}") from error
        if self.on_error == "raise":
            i, reason = next(iter(found.items()))
            raise ShardError(f"{self.table.where(i)}: {reason}") from error
        self.batch_reader.known_bad.update(found)
        self._restart(epoch, b)

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
    `backend` is "dali-gpu" or "dali-cpu"; `view_ops` says how the views are made: "compiled" (CPU: the same integers
    as the torchvision loader) or "dali" (GPU). Where DALI is not installed, constructing one raises
    DaliNotInstalledError; with allow_fallback=True it returns a TorchvisionMultiCropLoader instead (backend
    "torchvision", `fallback_reason` set; a warning logged once per process).
    """

    _fallback = TorchvisionMultiCropLoader

    def __init__(self, shards, batch_size: int, *, device: str = "auto", augment: MultiCropConfig | None = None,
                 seed: int = 0, shard_id: int | None = None, num_shards: int | None = None, num_threads: int = 4,
                 drop_last: bool = True, shuffle: bool = True, dtype=torch.float32, device_id: int | None = None,
                 prefetch: int = 2, hw_decoder_load: float = 0.65, allow_fallback: bool = False,
                 on_error: str = "skip", max_bad_fraction: float = 0.01, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 read_order: str = "random", shuffle_buffer: int = 10_000, read_ahead: int = 2, read_threads: int = 2):
        # allow_fallback is read by __new__ (where DALI is missing); here DALI is present and it changes nothing.
        super().__init__(shards, batch_size, device=device, device_id=device_id, num_threads=num_threads,
                         prefetch=prefetch, dtype=dtype, hw_decoder_load=hw_decoder_load, seed=seed, shard_id=shard_id,
                         num_shards=num_shards, shuffle=shuffle, drop_last=drop_last, on_error=on_error,
                         max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels, read_order=read_order,
                         shuffle_buffer=shuffle_buffer, read_ahead=read_ahead, read_threads=read_threads)
        self.augment = augment or MultiCropConfig()
        self._source = MultiCropSource(self.batch_reader, self.augment, self.seed)
        # How each view is made (build_multicrop_pipeline's view_ops); may be changed before the first batch.
        self.view_ops = "compiled" if self.device == "cpu" else "dali"

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self._source.seed != self.seed:
            self._source.seed, self._pipe = self.seed, None

    def _build(self):
        return build_multicrop_pipeline(self.augment, self.batch_size, device=self.device, device_id=self.device_id,
                                        num_threads=self.num_threads, prefetch=self.prefetch, dtype=self.dtype,
                                        hw_decoder_load=self.hw_decoder_load, view_ops=self.view_ops)

    def _inputs(self, epoch: int, ids):
        used, data, sizes, _, bad = self.batch_reader.read(epoch, ids)
        params = self._source.params(epoch, ids, sizes)  # a replaced slot keeps its crops, on its new image's size
        return {"encoded": data, "params": list(params)}, used, bad

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
                 allow_fallback: bool = False, on_error: str = "raise", max_bad_fraction: float = 0.01,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, read_ahead: int = 2, read_threads: int = 2):
        # allow_fallback: see MultiCropLoader.__init__.
        super().__init__(shards, batch_size, device=device, device_id=device_id, num_threads=num_threads,
                         prefetch=prefetch, dtype=dtype, hw_decoder_load=hw_decoder_load, shard_id=shard_id,
                         num_shards=num_shards, shuffle=False, drop_last=False, on_error=on_error,
                         max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels, read_ahead=read_ahead,
                         read_threads=read_threads)
        if not 0 < image_size <= resize_size:
            raise ValueError(f"need 0 < image_size <= resize_size, got {image_size}, {resize_size}")
        self.image_size, self.resize_size, self.mean, self.std = image_size, resize_size, mean, std
        self.interpolation = interpolation

    def _build(self):
        return build_eval_pipeline(self.batch_size, image_size=self.image_size, mean=self.mean, std=self.std,
                                   interpolation=self.interpolation, device=self.device, device_id=self.device_id,
                                   num_threads=self.num_threads, prefetch=self.prefetch, dtype=self.dtype,
                                   hw_decoder_load=self.hw_decoder_load)

    def _inputs(self, epoch: int, ids):
        used, data, sizes, _, bad = self.batch_reader.read(epoch, ids)
        boxes = [np.array(center_crop_box(h, w, self.resize_size, self.image_size), np.float32) for h, w in sizes]
        return {"encoded": data, "roi": boxes}, used, bad

    def _outputs(self, outs, ids) -> dict:
        return {"images": self._to_torch(outs, len(ids), self.image_size), "labels": self._labels(ids)}
