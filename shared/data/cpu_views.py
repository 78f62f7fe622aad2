"""Compiled (numba) CPU kernel that finishes `MultiCrop`'s cropped views in place.

After the crop, a DINO view goes through brightness, contrast, saturation, hue, grayscale,
blur, solarize and normalisation: a dozen whole-tensor passes with torch ops, each streaming
a chunk of images through memory. Here each image goes through all of them, one plain
(vectorisable) loop per step over its planes, while it sits in the cache, with the same
float32 operations in the same order as `shared.data.augment`'s per-op functions (tested equal
to float rounding). The random draws stay in `MultiCrop`; this file only computes. Also here:
`advise_huge_pages`, for the fresh view batches the kernel writes into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import numba
import numpy as np

_HUGE = 1 << 21  # a transparent huge page on x86-64 and arm64 Linux
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _load_madvise()


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back a fresh, untouched private buffer with 2 MiB pages.

    A new 40 MB view batch is otherwise faulted in 4 KiB page by page on its first write,
    which cost about a quarter of `MultiCrop`'s time on the CPU (measured); with huge pages
    that is 512x fewer faults. Only the 2 MiB-aligned interior is advised; a no-op (False)
    off Linux, on small buffers, or where the kernel declines (THP off).
    """
    start = -(-address // _HUGE) * _HUGE
    end = (address + nbytes) // _HUGE * _HUGE
    if _madvise is None or end <= start:
        return False
    return _madvise(start, end - start, _MADV_HUGEPAGE) == 0


_ZERO, _ONE, _HALF, _255 = np.float32(0), np.float32(1), np.float32(0.5), np.float32(255)


@numba.njit(cache=True, nogil=True, inline="always")
def _unit(v):
    return min(max(v, _ZERO), _ONE)


@numba.njit(cache=True, nogil=True, inline="always")
def _reflect(i, n):
    """torch's "reflect" padding index: -1 -> 1, n -> n - 2 (the edge is not repeated)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@numba.njit(cache=True, nogil=True)
def _blur_image_(x, taps, rows, pad):
    """x [c, h, w] blurred in place by the separable kernel `taps` (2r + 1 weights), reflect
    padding: each axis sums its taps in order, as `augment._blur`'s multiply-adds do."""
    c, h, w = x.shape
    n_taps = taps.shape[0]
    r = n_taps // 2
    for ch in range(c):
        plane = x[ch]
        for row in range(h):  # along x, into rows
            src = plane[row]
            for j in range(r):
                pad[j] = src[r - j]
                pad[r + w + j] = src[w - 2 - j]
            pad[r : r + w] = src
            out = rows[row]
            t0 = taps[0]
            for j in range(w):
                out[j] = pad[j] * t0
            for t in range(1, n_taps):
                tt = taps[t]
                for j in range(w):
                    out[j] += pad[j + t] * tt
        for row in range(h):  # along y, back into the plane
            dst = plane[row]
            first = rows[_reflect(row - r, h)]
            t0 = taps[0]
            for j in range(w):
                dst[j] = first[j] * t0
            for t in range(1, n_taps):
                src = rows[_reflect(row + t - r, h)]
                tt = taps[t]
                for j in range(w):
                    dst[j] += src[j] * tt


@numba.njit(cache=True, nogil=True, fastmath=True)
def _mean(a):
    """Mean of a 1-D float32 array, summed in float64 (fastmath: in any order, vectorised)."""
    total = 0.0
    for v in a:
        total += v
    return np.float32(total / a.shape[0])


@numba.njit(cache=True, nogil=True)
def _scale_unit_(a, f):
    for p in range(a.shape[0]):
        a[p] = _unit(a[p] * f)


@numba.njit(cache=True, nogil=True)
def _divide_(a, d):
    for p in range(a.shape[0]):
        a[p] = a[p] / d


@numba.njit(cache=True, nogil=True)
def _affine_unit_(a, f, shift):
    for p in range(a.shape[0]):
        a[p] = _unit(a[p] * f + shift)


@numba.njit(cache=True, nogil=True)
def _colour_matrix_(r, g, b, m):
    """(r, g, b) <- clamp(m @ (r, g, b)) per pixel, m [3, 3]."""
    m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
    m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
    m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
    for p in range(r.shape[0]):
        v0, v1, v2 = r[p], g[p], b[p]
        r[p] = _unit(m00 * v0 + m01 * v1 + m02 * v2)
        g[p] = _unit(m10 * v0 + m11 * v1 + m12 * v2)
        b[p] = _unit(m20 * v0 + m21 * v1 + m22 * v2)


@numba.njit(cache=True, nogil=True)
def _luma_(r, g, b, w):
    w0, w1, w2 = w[0], w[1], w[2]
    for p in range(r.shape[0]):
        v = w0 * r[p] + w1 * g[p] + w2 * b[p]
        r[p], g[p], b[p] = v, v, v


@numba.njit(cache=True, nogil=True)
def _solarize_normalize_(a, solarize, m, s):
    for p in range(a.shape[0]):
        v = a[p]
        if solarize and v >= _HALF:
            v = _ONE - v
        a[p] = (v - m) / s


@numba.njit(cache=True, nogil=True)
def finish_views_(
    y, from_uint8, jitter, bright, contrast, matrices, gray, gray_w, blur, kernels, radii,
    solarize, mean, std,
):  # fmt: skip
    """Every per-pixel step after the crop, in place on y [n, 3, h, w] (float32, C order).

    from_uint8: y holds 0..255 crop values (divided by 255 first). Per image i: jitter[i]
    switches brightness (factor bright[i], none if bright is empty), contrast (contrast[i];
    the mean is that of the brightened image's luma) and the colour matrices matrices[i, :]
    (saturation, hue), each step clamped to [0, 1]; gray[i]: luma with weights gray_w; blur[i]:
    separable Gaussian with taps kernels[i] cut to radius radii[i] (kernels' centre column is
    its middle); solarize[i]; then (v - mean) / std per channel. Each step is one simple loop
    over an image's planes (vectorised by LLVM), while the image is in the cache.
    """
    n, c, h, w = y.shape
    n_pix = h * w
    big_r = kernels.shape[1] // 2
    rows = np.empty((h, w), np.float32)
    pad = np.empty(w + 2 * big_r, np.float32)
    use_bright, use_contrast = bright.shape[0] > 0, contrast.shape[0] > 0
    for i in range(n):
        x = y[i].reshape(c, n_pix)
        flat = y[i].reshape(c * n_pix)
        if from_uint8:
            _divide_(flat, _255)
        if jitter[i]:
            if use_bright:
                _scale_unit_(flat, bright[i])
            if use_contrast:
                k = contrast[i]
                luma = _mean(x[0]) * gray_w[0] + _mean(x[1]) * gray_w[1] + _mean(x[2]) * gray_w[2]
                _affine_unit_(flat, k, luma * (_ONE - k))
            for q in range(matrices.shape[1]):
                _colour_matrix_(x[0], x[1], x[2], matrices[i, q])
        if gray[i]:
            _luma_(x[0], x[1], x[2], gray_w)
        if blur[i]:
            r = radii[i]
            _blur_image_(y[i], kernels[i, big_r - r : big_r + r + 1], rows, pad)
        for ch in range(c):
            _solarize_normalize_(x[ch], solarize[i], mean[ch], std[ch])
