"""Weighted sums of frames: virtual detectors and centre of mass as one matrix product.

``out = frames @ weights`` with ``frames`` ``(n, pixels)`` and ``weights``
``(pixels, k)``: k virtual detectors (or the three moments of a centre of
mass) in one pass over the data.  Written once against the array module of
the frames: BLAS on the host, cuBLAS on a GPU.  Frames are converted to
float32 a block at a time, so integer detector data never overflow and the
converted block stays in cache.
"""

from __future__ import annotations

import numba
import numpy as np

from ..device import array_module

__all__ = ["weighted_sums", "BLOCK"]

BLOCK = 32  # frames converted and multiplied at a time: 32 x 256 x 256 float32 = 8 MiB


def weighted_sums(frames, weights, threshold=None):
    """``frames @ weights`` in float32, a block of frames at a time.

    Parameters
    ----------
    frames : numpy.ndarray or cupy.ndarray
        ``(n, pixels)``, any real dtype.
    weights : array of the same module
        ``(pixels, k)`` float32.
    threshold : float, optional
        Pixels below ``threshold`` times their frame's mean intensity count as zero
        (pyxem's convention).

    Returns
    -------
    array ``(n, k)`` float32, on the frames' device.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.reduce import weighted_sums
    >>> weighted_sums(np.ones((2, 4), "uint16"), np.ones((4, 1), "float32"))
    array([[4.],
           [4.]], dtype=float32)
    """
    xp = array_module(frames)
    n = frames.shape[0]
    if frames.dtype == xp.float32 and threshold is None:
        return frames @ weights  # nothing to convert: one product, as fast as BLAS goes
    if (xp is np and threshold is None and frames.dtype.kind in "ui" and frames.dtype.isnative
            and weights.shape[1] <= 16):
        # integer counts (detector files): read as they are, no float32 copy; 4x the
        # convert-then-BLAS path on one core (uint16, 256 x 256, 2 detectors)
        out = np.empty((n, weights.shape[1]), dtype=np.float32)
        _host_weighted_sums(frames, np.ascontiguousarray(weights.T), out)
        return out
    out = xp.empty((n, weights.shape[1]), dtype=xp.float32)
    for i in range(0, n, BLOCK):
        block = frames[i:i + BLOCK]
        if block.dtype != xp.float32:
            block = block.astype(xp.float32)
        if threshold is not None:
            cut = threshold * block.mean(axis=1, keepdims=True)
            block = xp.where(block >= cut, block, xp.float32(0))
        xp.matmul(block, weights, out=out[i:i + BLOCK])
    return out


@numba.njit(nogil=True, fastmath=True, cache=True)
def _host_weighted_sums(frames, weights_t, out):
    # one frame at a time: it stays in cache while each detector's weights pass over it
    n, p = frames.shape
    for i in range(n):
        f = frames[i]
        for j in range(weights_t.shape[0]):
            w = weights_t[j]
            acc = np.float32(0)
            for q in range(p):
                acc += np.float32(f[q]) * w[q]
            out[i, j] = acc


def as_weights(masks, xp=np):
    """Stack detector masks ``(k, rows, columns)`` into a ``(pixels, k)`` float32 matrix."""
    masks = np.asarray(masks, dtype=np.float32)
    return xp.asarray(np.ascontiguousarray(masks.reshape(masks.shape[0], -1).T))
