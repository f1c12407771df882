"""Weighted sums of frames: virtual detectors and centre of mass as one matrix product.

``out = frames @ weights`` with ``frames`` ``(n, pixels)`` and ``weights``
``(pixels, k)``: k virtual detectors (or the three moments of a centre of
mass) in one pass over the data.  Written once against the array module of
the frames: BLAS on the host, cuBLAS on a GPU.  Frames are converted to
float32 a block at a time, so integer detector data never overflow and the
converted block stays in cache.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ..device import array_module
from .decode import _swap
from .dtypes import as_float32

__all__ = ["weighted_sums", "weighted_sums_stored", "stored_words_supported", "BLOCK", "NONFINITE"]

BLOCK = 32  # frames converted and multiplied at a time: 32 x 256 x 256 float32 = 8 MiB


NONFINITE = ("weighted", "zero")

# Up to this many weighted sums per frame, integer frames are summed where they lie (one pass
# over the frame per sum); beyond, converted to float32 and multiplied by BLAS on one thread,
# which is faster from 10-12 sums on (256 x 256 uint16: 7,067 against 12,633 frames/s at 16;
# 17,922 against 12,352 at 8).
IN_PLACE_MAX_SUMS = 8


def weighted_sums(frames, weights, threshold=None, nonfinite="weighted", masked=None):
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
    nonfinite : {"weighted", "zero"}
        What a NaN or inf pixel of a float frame does. ``"weighted"``: it makes NaN the sums
        that give it a non-zero weight and leaves the others alone (a pixel of zero weight
        never contributes, whatever it holds). ``"zero"``: it counts as 0 (as masked), also
        in the frame's mean for ``threshold``. Integer frames cannot hold either.
    masked : array of the same module, optional
        ``(pixels,)`` bool, True for pixels left out (``calibration.mask``): they count as 0
        in the frame's mean for ``threshold`` too, whatever they hold (their weights are 0
        already), so a masked hot pixel does not raise the cut.

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
    >>> frames = np.array([[1, 2, np.nan, 4]], "float32")
    >>> weighted_sums(frames, np.array([[1, 1], [1, 0], [0, 1], [1, 1]], "float32"))
    array([[ 7., nan]], dtype=float32)
    >>> weighted_sums(frames, np.ones((4, 1), "float32"), nonfinite="zero")
    array([[7.]], dtype=float32)
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}")
    xp = array_module(frames)
    n = frames.shape[0]
    floats = frames.dtype.kind == "f"
    if frames.dtype == xp.float32 and threshold is None:
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN: dealt with below, not a warning
            out = _product(frames, weights, xp)  # nothing to convert: as fast as BLAS goes
        return _redo_nonfinite(frames, weights, out, nonfinite)
    kind, size = frames.dtype.kind, frames.dtype.itemsize
    if (xp is np and threshold is None and kind in "ui" and weights.shape[1] <= IN_PLACE_MAX_SUMS
            and (frames.dtype.isnative or size in (2, 4))):
        # integer counts (detector files): read as they are, no float32 copy; 4x the
        # convert-then-BLAS path on one core (uint16, 256 x 256, 2 detectors); big-endian
        # words (Merlin's) swapped as they are read: 2.8x the convert-then-BLAS path
        swap = 0 if frames.dtype.isnative else size
        words = frames if not swap else frames.view(f"=u{size}")
        k = weights.shape[1]
        out = np.empty((n, k), dtype=np.float32)
        # the in-place kernel with no header and no flip, each frame cut in rows (summed in
        # float32, the rows in float64)
        _stored_weighted_sums(words, 0, np.ascontiguousarray(weights.T).reshape(
            k, -1, _row_length(frames.shape[1])), False, swap, kind == "i", out)
        return out
    out = xp.empty((n, weights.shape[1]), dtype=xp.float32)
    for i in range(0, n, BLOCK):
        block = frames[i:i + BLOCK]
        if block.dtype != xp.float32:
            block = as_float32(block)
        if threshold is not None:
            if floats:  # non-finite pixels count as 0 in the mean and the sums
                bad = ~xp.isfinite(block)
                block = xp.where(bad, xp.float32(0), block)
            if masked is not None:
                block = xp.where(masked[None], xp.float32(0), block)
            cut = threshold * block.mean(axis=1, keepdims=True)
            block = xp.where(block >= cut, block, xp.float32(0))
        with np.errstate(invalid="ignore"):
            out[i:i + BLOCK] = _product(block, weights, xp)
        if threshold is not None and floats and nonfinite == "weighted":
            out[i:i + BLOCK] = _poison(out[i:i + BLOCK], bad, weights, xp)
    if floats and threshold is None:
        out = _redo_nonfinite(frames, weights, out, nonfinite)
    return out


def _product(block, weights, xp):
    """``block @ weights`` in float32; one host frame given twice: for a single row NumPy
    calls BLAS's matrix-vector product, which sums with about ten times the float32 error of
    the matrix product (a thresholded centre of mass 1e-3 px off the same frame among
    others); two rows go through the matrix product (the weights are not converted)."""
    if xp is np and block.shape[0] == 1:
        return (np.concatenate([block, block]) @ weights)[:1]
    return block @ weights


@functools.lru_cache(maxsize=64)
def _row_length(pixels):
    """Pixels per row when a flat frame is summed row by row: the largest divisor of
    ``pixels`` from 1,024 to 8,192 (the whole frame where it is small or has none).

    Examples
    --------
    >>> _row_length(256 * 256), _row_length(127 * 61)
    (8192, 7747)
    """
    if pixels <= 8192:
        return pixels
    return next((d for d in range(8192, 1023, -1) if pixels % d == 0), pixels)


def _poison(sums, bad, weights, xp):
    """``sums`` made NaN where the frame's non-finite pixels (``bad``, ``(n, pixels)``) have a
    non-zero weight."""
    hits = bad.astype(xp.float32) @ (weights != 0).astype(xp.float32)
    return xp.where(hits > 0, xp.float32(np.nan), sums)


def _redo_nonfinite(frames, weights, out, nonfinite):
    """``out`` with the frames whose sums are not finite summed again as ``nonfinite`` says.

    A NaN or inf pixel spoils every sum of its frame in the product (0 * NaN is NaN), so the
    few frames with a non-finite sum are found from the sums, not by checking every pixel:
    frames without one cost one look at ``(n, k)`` numbers (and on a GPU one scalar read)."""
    xp = array_module(out)
    redo = ~xp.all(xp.isfinite(out), axis=1)
    if not bool(redo.any()):
        return out
    rows = xp.flatnonzero(redo)
    sub = frames[rows].astype(xp.float32)
    bad = ~xp.isfinite(sub)
    sums = xp.where(bad, xp.float32(0), sub) @ weights
    out[rows] = _poison(sums, bad, weights, xp) if nonfinite == "weighted" else sums
    return out


def stored_words_supported(word):
    """Whether :func:`weighted_sums_stored` reads frames stored as ``word`` (a dtype with its
    byte order): integers, in this machine's byte order or (2 and 4 bytes) the other."""
    word = np.dtype(word)
    return word.kind in "ui" and (word.isnative or word.itemsize in (1, 2, 4))


def weighted_sums_stored(words, weights_t, skip, flip_rows=False, swapped=False):
    """``weighted_sums`` of integer frames as a file stores them, without decoding them first.

    Parameters
    ----------
    words : numpy.ndarray
        ``(n, record words)``: each frame's stored record read as native integers (a map of
        the file); the frame's pixels follow ``skip`` words of header, row by row.
    weights_t : numpy.ndarray
        ``(k, rows, columns)`` float32, C-contiguous: the k weight images of the decoded
        frame (row 0 at the top), i.e. ``weights.T.reshape(k, rows, columns)`` of the
        ``(pixels, k)`` matrix :func:`weighted_sums` takes (made once by the caller: a
        transposed copy per call cost as much as the sums of 64 frames).
    skip : int
        Header words before each frame's pixels.
    flip_rows : bool
        The file stores the last row first (the weights are read bottom-up instead of
        flipping the frame).
    swapped : bool
        The words are in the other byte order (swapped as they are read; 2- and 4-byte
        integers).

    Returns
    -------
    numpy.ndarray ``(n, k)`` float32, equal to ``weighted_sums`` of the decoded frames.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.reduce import weighted_sums_stored
    >>> record = np.array([[9, 1, 2, 3, 4]], dtype=">u2").view("u2")  # 1 header word, 2 x 2
    >>> top_left = np.array([[[1, 0], [0, 0]]], dtype="float32")
    >>> weighted_sums_stored(record, top_left, 1, flip_rows=True, swapped=True)  # stored 3rd
    array([[3.]], dtype=float32)
    """
    k, rows, cols = weights_t.shape
    if words.shape[1] < skip + rows * cols:
        raise ValueError(f"records of {words.shape[1]} words cannot hold {skip} header words "
                         f"and a {rows} x {cols} frame")
    if not stored_words_supported(words.dtype.newbyteorder("S") if swapped else words.dtype):
        raise TypeError(f"frames stored as {'swapped ' if swapped else ''}{words.dtype} words: "
                        "only integers are read in place (decode them first)")
    if weights_t.dtype != np.float32 or not weights_t.flags.c_contiguous:
        raise TypeError("weights_t must be C-contiguous float32 (k, rows, columns)")
    size = words.dtype.itemsize
    signed = swapped and size > 1 and words.dtype.kind == "i"
    if signed:  # swap the bits as unsigned words, then read them back as signed
        words = words.view(f"u{size}")
    out = np.empty((words.shape[0], k), dtype=np.float32)
    _stored_weighted_sums(words, int(skip), weights_t, bool(flip_rows),
                          size if swapped and size > 1 else 0, signed, out)
    return out


@numba.njit(nogil=True, fastmath=True, cache=True)
def _stored_weighted_sums(words, skip, weights, flip, swap, signed, out):
    # one frame at a time, row by row: each stored row is read (and its bytes swapped) as
    # the weights' matching row (bottom-up when the file stores rows so) passes over it;
    # the frame stays in cache while each detector's weights pass over it
    # each stored row summed in float32 (vectorised), the rows in float64: a float32 sum over
    # a whole 512 x 512 frame lost 4e-4 px of a centre of mass against the float64 result
    k, h, w = weights.shape
    for i in range(words.shape[0]):
        for j in range(k):
            acc = 0.0
            for r in range(h):
                s = words[i, skip + r * w: skip + (r + 1) * w]
                wr = weights[j, h - 1 - r] if flip else weights[j, r]
                row = np.float32(0)
                if swap == 0:
                    for c in range(w):
                        row += np.float32(s[c]) * wr[c]
                elif not signed:
                    for c in range(w):
                        row += np.float32(_swap(np.uint32(s[c]), swap)) * wr[c]
                else:
                    half = 1 << (8 * swap - 1)
                    for c in range(w):
                        v = np.int64(_swap(np.uint32(s[c]), swap))
                        row += np.float32(v - 2 * half if v >= half else v) * wr[c]
                acc += row
            out[i, j] = acc


def as_weights(masks, xp=np):
    """Stack detector masks ``(k, rows, columns)`` into a ``(pixels, k)`` float32 matrix."""
    masks = np.asarray(masks, dtype=np.float32)
    return xp.asarray(np.ascontiguousarray(masks.reshape(masks.shape[0], -1).T))
