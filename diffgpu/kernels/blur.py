"""Gaussian blur of stacks of frames: the beam finder's first step, on the frames' device.

On a GPU, ``cupyx.scipy.ndimage.gaussian_filter``. On the host, a numba kernel with the same
kernel and edges (``mode="constant"``, radius ``int(4 sigma + 0.5)``) in float32: SciPy's
filter (a generic 1D correlation in double precision, 0.8 ms for a 256 x 256 frame) was most
of the blur beam finder's time, which ran no faster than pyxem's.
"""

from __future__ import annotations

import numba
import numpy as np

from ..device import array_module

__all__ = ["gaussian_blur"]


def gaussian_weights(sigma, truncate=4.0):
    """The normalised 1D Gaussian of ``sigma`` pixels, radius ``int(truncate * sigma + 0.5)``.

    Examples
    --------
    >>> from diffgpu.kernels.blur import gaussian_weights
    >>> w = gaussian_weights(1.0)
    >>> len(w), round(float(w.sum()), 6)
    (9, 1.0)
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


def gaussian_blur(frames, sigma):
    """Each frame of ``frames`` ``(n, rows, columns)`` float32 blurred by a Gaussian of
    ``sigma`` pixels; pixels beyond the edges count as 0 (SciPy's ``mode="constant"``).

    Returns float32 frames on the input's device. The host result agrees with
    ``scipy.ndimage.gaussian_filter(frames, (0, sigma, sigma), mode="constant")`` to float32
    rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.blur import gaussian_blur
    >>> f = np.zeros((1, 9, 9), np.float32)
    >>> f[0, 4, 4] = 1
    >>> b = gaussian_blur(f, 1.0)
    >>> round(float(b.sum()), 5), np.unravel_index(b[0].argmax(), (9, 9))
    (1.0, (np.int64(4), np.int64(4)))
    """
    xp = array_module(frames)
    if xp is not np:
        import cupyx.scipy.ndimage as ndi

        return ndi.gaussian_filter(frames, sigma=(0, sigma, sigma), mode="constant")
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    out = np.empty_like(frames)
    w = gaussian_weights(sigma).astype(np.float32)
    _blur_host(frames, w, out, np.empty(frames.shape[1:], np.float32))
    return out


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _blur_host(frames, w, out, tmp):
    # both passes accumulate a whole row in a local buffer with the loop along the row
    # innermost (SIMD; 5,800 frames/s at 256 x 256 on one core, SciPy 1,300); the row pass
    # reads a zero-padded copy of the row (the edges: mode="constant")
    n, ny, nx = frames.shape
    m = w.size
    r = (m - 1) // 2
    pad = np.zeros(nx + 2 * r, np.float32)
    acc = np.zeros(nx, np.float32)
    for i in range(n):
        for y in range(ny):
            for x in range(nx):
                pad[x + r] = frames[i, y, x]
            acc[:] = 0
            for k in range(m):
                wk = w[k]
                for x in range(nx):
                    acc[x] += wk * pad[x + k]
            for x in range(nx):
                tmp[y, x] = acc[x]
        for y in range(ny):
            acc[:] = 0
            for k in range(max(0, r - y), min(m, ny - y + r)):
                wk = w[k]
                src = tmp[y + k - r]
                for x in range(nx):
                    acc[x] += wk * src[x]
            for x in range(nx):
                out[i, y, x] = acc[x]
