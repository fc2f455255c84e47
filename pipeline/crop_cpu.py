"""One multi-crop view on CPU, compiled with Numba: the per-crop work of the DALI-CPU graph.

`crop_ops(out, image, p, ...)` turns a decoded uint8 (H, W, 3) image and one view's parameters p
(augment.N_PARAMS,) into the (S, S, 3) uint8 crop that torchvision_loader.augment_view makes before its flip:
- resized_crop: ATen's uint8 antialiased resize (bicubic a = -0.5 or bilinear, PIL's support and centring),
  weights normalised in float64 and rounded to int16 at the precision ATen picks, width pass then height pass,
  each rounded and clamped to uint8: the same integers as torchvision's;
- ColorJitter in p's order (adjust_brightness / contrast / saturation / hue as torchvision.transforms.v2 on uint8
  tensors, operation for operation in float32, each skipped at its identity factor as augment_view does);
- RandomGrayscale (rgb_to_grayscale, truncated), GaussianBlur (separable float32 with reflect padding, rounded
  half to even; torchvision convolves with the 2-D outer product, which differs by float rounding only) and
  RandomSolarize, where p says so.
The horizontal flip is left to DALI's crop_mirror_normalize (every op here commutes with it).

Why: on the 2-core CPU machine, per source image with dinov2's 10 crops, DALI's own CPU operators for this chain
(view_ops="dali") cost ~40 CPU-ms (resize 9.9, the colour jitter's ~45 arithmetic passes ~30, blur ~4.6), the whole
DALI-CPU graph 49 CPU-ms against the torchvision loader's 32; crop_ops costs 4.8 ms (its resize 1.6) where
torchvision_loader.augment_view costs 25.5 (one thread each), and the graph with it ~9 CPU-ms
(benchmarks/bench_pipeline.py; its table in benchmarks/README.md). The loops are written so that they compile to
SIMD code: the colour ops on float32 planes, both resize passes along contiguous rows (the width pass on the
transposed crop), error_model="numpy" (no zero-division branches).

Every float constant is a float32 where torchvision computes in float32 (a Python float would promote the
arithmetic to float64).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dinotron.pipeline.augment import (
    N_PARAMS,
    P_BLUR,
    P_BRIGHT,
    P_CONTRAST,
    P_GRAY,
    P_HUE,
    P_ORDER,
    P_SAT,
    P_SIGMA,
    P_SOLARIZE,
    P_X0,
    P_X1,
    P_Y0,
    P_Y1,
)

_F = np.float32
_WR, _WG, _WB = _F(0.2989), _F(0.587), _F(0.114)  # torchvision's _rgb_to_grayscale_image weights
_ZERO, _ONE, _TWO, _FOUR, _SIX = _F(0.0), _F(1.0), _F(2.0), _F(4.0), _F(6.0)
_MAX = _F(255.0)
_INV255 = _F(1.0 / 255)  # to_dtype_image uint8 -> float32: x.to(float32).mul_(1 / 255)
_TO_UINT8 = _F(255.0 + 1.0 - 1e-3)  # to_dtype_image float32 -> uint8: x.mul(255.999).to(uint8)
_SIXTH = _F(1.0 / 6.0)


# ---------------------------------------------------------------------------------------------- resize


@njit(nogil=True, cache=True)
def _filter(x, bicubic):
    """ATen's aa_filter: Keys' cubic with a = -0.5 (PIL's bicubic) or the triangle (bilinear), in float64."""
    x = abs(x)
    if bicubic:
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        return 0.0
    return 1.0 - x if x < 1.0 else 0.0


@njit(nogil=True, cache=True)
def _weights(in_size, out_size, bicubic):
    """ATen's _compute_index_ranges_int16_weights (antialias, align_corners=False) for one axis:
    (first input index per output index, int32 weights (out_size, taps) holding int16 values, precision)."""
    scale = in_size / out_size
    support = (2.0 if bicubic else 1.0) * (scale if scale >= 1.0 else 1.0)
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    first = np.zeros(out_size, np.int64)
    wf = np.zeros((out_size, taps), np.float64)
    wt_max = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), taps)
        first[i] = xmin
        total = 0.0
        for j in range(xsize):
            wf[i, j] = _filter((j + xmin - center + 0.5) * invscale, bicubic)
            total += wf[i, j]
        if total != 0.0:
            for j in range(xsize):
                wf[i, j] /= total
                wt_max = max(wt_max, wf[i, j])
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    w = np.zeros((out_size, taps), np.int32)
    for i in range(out_size):
        for j in range(taps):
            v = wf[i, j] * (1 << precision)
            w[i, j] = int(-0.5 + v) if v < 0 else int(0.5 + v)
    return first, w, precision


@njit(nogil=True, cache=True)
def _resample_rows(src, first, w, precision, out):
    """out[i] = clamp((2^(precision-1) + sum_j w[i, j] * src[first[i] + j]) >> precision, 0, 255) on 2-D uint8 arrays:
    ATen's uint8 separable pass along axis 0; the inner loop runs over contiguous rows (vectorised)."""
    n_in, m = src.shape
    acc = np.empty(m, np.int32)
    half = np.int32(1 << (precision - 1))
    for i in range(out.shape[0]):
        acc[:] = half
        for j in range(w.shape[1]):
            k = first[i] + j
            if k >= n_in:
                break
            wj = w[i, j]
            if wj != 0:
                row = src[k]
                for t in range(m):
                    acc[t] += wj * np.int32(row[t])
        row_out = out[i]
        for t in range(m):
            row_out[t] = np.uint8(min(max(acc[t] >> precision, 0), 255))


@njit(nogil=True, cache=True)
def _resized_crop(image, y0, x0, y1, x1, out, bicubic):
    """F.resized_crop(image, y0, x0, y1 - y0, x1 - x0, out's size, BICUBIC or BILINEAR, antialias=True) on uint8 HWC.

    The width pass runs on the transposed crop (so that both passes resample along axis 0, contiguously)."""
    crop = image[y0:y1, x0:x1]  # a box beyond the image is clipped (the sizes below are the crop's, never read past)
    ch, cw, size_h, size_w = crop.shape[0], crop.shape[1], out.shape[0], out.shape[1]
    if cw != size_w:
        t = np.empty((cw, ch, 3), np.uint8)
        for y in range(ch):
            for x in range(cw):
                for c in range(3):
                    t[x, y, c] = crop[y, x, c]
        first, w, precision = _weights(cw, size_w, bicubic)
        tw = np.empty((size_w, ch, 3), np.uint8)
        _resample_rows(t.reshape(cw, ch * 3), first, w, precision, tw.reshape(size_w, ch * 3))
        wide = np.empty((ch, size_w, 3), np.uint8)
        for x in range(size_w):
            for y in range(ch):
                for c in range(3):
                    wide[y, x, c] = tw[x, y, c]
    else:
        wide = np.ascontiguousarray(crop)
    if ch != size_h:
        first, w, precision = _weights(ch, size_h, bicubic)
        _resample_rows(wide.reshape(ch, size_w * 3), first, w, precision, out.reshape(size_h, size_w * 3))
    else:
        out[:] = wide


# ---------------------------------------------------------------------------------------------- colour
# The colour ops, blur and solarize work on three float32 planes (R, G, B) holding the uint8 values, so that every
# loop runs over contiguous memory and compiles to SIMD code (error_model="numpy": no zero-division branches).
# Each op truncates (or rounds) to an integer as torchvision's uint8 results do, so the planes always hold integers.


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (float32), as torch's CPU kernels compute add(x, y, alpha) = fma(y, alpha, x)."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(nogil=True, cache=True, error_model="numpy")
def _grey(r, g, b):
    """r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)."""
    return _fma(b, _WB, _fma(g, _WG, r * _WR))


@njit(nogil=True, cache=True, error_model="numpy")
def _blend(x, factor, alpha, other):
    """_blend: x.mul(factor).add_(other, alpha=1 - factor), clamped to 0..255 and truncated (as .to(uint8))."""
    return np.floor(min(max(_fma(other, alpha, x * factor), _ZERO), _MAX))


@njit(nogil=True, cache=True, error_model="numpy")
def _brightness(planes, factor):
    flat = planes.reshape(-1)
    for i in range(flat.size):
        flat[i] = np.floor(min(flat[i] * factor, _MAX))


@njit(nogil=True, cache=True, error_model="numpy")
def _contrast(planes, factor, alpha):
    r, g, b = planes[0], planes[1], planes[2]
    total = 0  # the floored greys are integers: an exact integer sum
    for i in range(r.size):
        total += np.int64(np.floor(_grey(r[i], g[i], b[i])))
    mean = _F(total) / _F(r.size)  # torch.mean: an exact float32 sum (< 2^24) over the count
    flat = planes.reshape(-1)
    for i in range(flat.size):
        flat[i] = _blend(flat[i], factor, alpha, mean)


@njit(nogil=True, cache=True, error_model="numpy")
def _saturation(planes, factor, alpha):
    r, g, b = planes[0], planes[1], planes[2]
    for i in range(r.size):
        grey = np.floor(_grey(r[i], g[i], b[i]))
        r[i] = _blend(r[i], factor, alpha, grey)
        g[i] = _blend(g[i], factor, alpha, grey)
        b[i] = _blend(b[i], factor, alpha, grey)


@njit(nogil=True, cache=True, error_model="numpy")
def _hue(planes, hue):
    """adjust_hue_image: _rgb_to_hsv, h = (h + hue) remainder 1, _hsv_to_rgb, scaled back to uint8 values."""
    red, green, blue = planes[0], planes[1], planes[2]
    for k in range(red.size):
        r, g, b = red[k] * _INV255, green[k] * _INV255, blue[k] * _INV255
        maxc = max(max(r, g), b)
        minc = min(min(r, g), b)
        span = maxc - minc
        eqc = maxc == minc
        s = span / (_ONE if eqc else maxc)
        div = _ONE if eqc else span
        rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
        hr = (bc - gc) if maxc == r else _ZERO
        hg = ((rc + _TWO) - bc) if (maxc == g and maxc != r) else _ZERO
        hb = ((gc + _FOUR) - rc) if (maxc != r and maxc != g) else _ZERO
        h = ((hr + hg) + hb) * _SIXTH + _ONE  # in [5/6, 11/6]
        h = h - _ONE if h >= _ONE else h  # fmod(h, 1); h - 1 is exact for h in [1, 2]
        h = h + hue  # remainder(h, 1) of h in (-0.5, 1.5): fmod (exact as above), then + 1 below 0
        h = h - _ONE if h >= _ONE else (h + _ONE if h < _ZERO else h)
        h6 = h * _SIX
        i6 = np.floor(h6)
        f = h6 - i6
        i = np.int32(i6)
        i = np.int32(0) if i == 6 else i  # h6 can round up to 6: remainder(i, 6)
        sxf = s * f
        one_minus_s = _ONE - s
        q = min(max((_ONE - sxf) * maxc, _ZERO), _ONE)
        t = min(max((sxf + one_minus_s) * maxc, _ZERO), _ONE)
        p = min(max(one_minus_s * maxc, _ZERO), _ONE)
        v = maxc
        # _hsv_to_rgb's table: sextant i takes (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
        red[k] = np.floor((v if (i == 0 or i == 5) else (q if i == 1 else (t if i == 4 else p))) * _TO_UINT8)
        green[k] = np.floor((t if i == 0 else (v if (i == 1 or i == 2) else (q if i == 3 else p))) * _TO_UINT8)
        blue[k] = np.floor((p if i < 2 else (t if i == 2 else (q if i == 5 else v))) * _TO_UINT8)


@njit(nogil=True, cache=True, error_model="numpy")
def _grayscale(planes):
    r, g, b = planes[0], planes[1], planes[2]
    for i in range(r.size):
        grey = np.floor(_grey(r[i], g[i], b[i]))
        r[i] = grey
        g[i] = grey
        b[i] = grey


@njit(nogil=True, cache=True, error_model="numpy")
def color_jitter(planes, p):
    """ColorJitter.transform with p's factors in p's order, in place on (3, H * W) float32 planes."""
    for step in range(4):
        op = int(p[P_ORDER + step])
        if op == 0 and p[P_BRIGHT] != _ONE:
            _brightness(planes, p[P_BRIGHT])
        elif op == 1 and p[P_CONTRAST] != _ONE:
            _contrast(planes, p[P_CONTRAST], _F(1.0 - np.float64(p[P_CONTRAST])))
        elif op == 2 and p[P_SAT] != _ONE:
            _saturation(planes, p[P_SAT], _F(1.0 - np.float64(p[P_SAT])))
        elif op == 3 and p[P_HUE] != _ZERO:
            _hue(planes, p[P_HUE])


# ---------------------------------------------------------------------------------------------- blur, solarize


@njit(nogil=True, cache=True)
def _reflect(i, n):
    """torch's "reflect" padding index (the edge is not repeated); torch needs n > padding, here any n >= 1 works."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


@njit(nogil=True, cache=True, error_model="numpy")
def _gaussian_blur(planes, h, w, sigma, kernel_size):
    """gaussian_blur_image(img, [k, k], [sigma, sigma]) on (3, h * w) planes: the float32 kernel
    softmax(-(x / sigma)^2), x = linspace(-lim, lim, k), lim = (k - 1) / (2 sqrt 2); reflect padding; rounded half
    to even. Separable (height pass, then width pass)."""
    half = kernel_size // 2
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    kern = np.empty(kernel_size, np.float32)
    for k in range(kernel_size):
        x = -lim + 2.0 * lim * k / (kernel_size - 1) if kernel_size > 1 else 0.0
        kern[k] = _F(math.exp(-(x / sigma) ** 2))
    kern /= kern.sum()
    col = np.empty((h, w), np.float32)
    acc = np.empty(w, np.float32)
    lo, hi = min(half, w), max(w - half, min(half, w))  # width pass: columns [lo, hi) read no padding
    for c in range(3):
        img = planes[c].reshape(h, w)
        for y in range(h):
            row = col[y]
            row[:] = _ZERO
            for k in range(kernel_size):
                src, wk = img[_reflect(y + k - half, h)], kern[k]
                for x in range(w):
                    row[x] += wk * src[x]
        for y in range(h):
            row = col[y]
            acc[:] = _ZERO
            for k in range(kernel_size):
                wk, off = kern[k], k - half
                for x in range(lo, hi):
                    acc[x] += wk * row[x + off]
            for x in range(w):
                if x < lo or x >= hi:  # the columns that read reflected padding
                    acc[x] = _ZERO
                    for k in range(kernel_size):
                        acc[x] += kern[k] * row[_reflect(x + k - half, w)]
            dst = img[y]
            for x in range(w):
                dst[x] = np.rint(acc[x])


@njit(nogil=True, cache=True, error_model="numpy")
def crop_ops(out, image, p, bicubic, blur_kernel_size, solarize_threshold):
    """augment_view of one view, up to its flip: from image (H, W, 3) into out (S, S, 3), uint8."""
    _resized_crop(image, int(p[P_Y0]), int(p[P_X0]), int(p[P_Y1]), int(p[P_X1]), out, bicubic)
    h, w = out.shape[0], out.shape[1]
    flat = out.reshape(h * w, 3)
    planes = np.empty((3, h * w), np.float32)
    for i in range(h * w):
        planes[0, i], planes[1, i], planes[2, i] = flat[i, 0], flat[i, 1], flat[i, 2]
    color_jitter(planes, p)
    if p[P_GRAY] > _F(0.5):
        _grayscale(planes)
    if p[P_BLUR] > _F(0.5):
        _gaussian_blur(planes, h, w, np.float64(p[P_SIGMA]), blur_kernel_size)
    threshold = _F(solarize_threshold) if p[P_SOLARIZE] > _F(0.5) else _F(256.0)  # >= 256: nothing to invert
    for i in range(h * w):
        for c in range(3):
            v = planes[c, i]
            flat[i, c] = np.uint8(_MAX - v if v >= threshold else v)


@intrinsic
def _pointer(typingctx, address):
    """An integer address (an array's .ctypes.data) as a void pointer, in compiled code."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.uintp), codegen


@cfunc(types.void(types.uintp, types.int64, types.uintp, types.int64, types.int64, types.uintp, types.int64,
                  types.int64, types.int64), nopython=True, cache=True, error_model="numpy")
def _crop_view(out, size, image, h, w, params, bicubic, blur_kernel_size, solarize_threshold):
    """crop_ops behind a C function pointer: a DALI callback calls it by address, so compiling the callback does not
    compile (or link and re-generate) crop_ops again; its machine code comes from Numba's on-disk cache."""
    crop_ops(carray(_pointer(out), (size, size, 3), np.uint8), carray(_pointer(image), (h, w, 3), np.uint8),
             carray(_pointer(params), (N_PARAMS,), np.float32), bicubic != 0, blur_kernel_size, solarize_threshold)


def dali_functions(size: int, bicubic: bool, blur_kernel_size: int, solarize_threshold: int):
    """(run_fn, setup_fn) of a DALI numba_function making views of side `size` (DALI compiles both)."""
    bicubic = int(bicubic)

    def run(out, image, params):
        _crop_view(out.ctypes.data, size, image.ctypes.data, image.shape[0], image.shape[1], params.ctypes.data,
                   bicubic, blur_kernel_size, solarize_threshold)

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = size
            outs[0][i][1] = size
            outs[0][i][2] = 3

    return run, setup
