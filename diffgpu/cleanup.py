"""Detector clean-up: bad (hot/dead) pixels, dark and flat-field (gain) correction."""

from __future__ import annotations

import numpy as np

from .calibration import check_mask, detector_image
from .device import DeviceCache, array_module, to_host_array
from .mapping import map_frames, with_new_data

__all__ = ["find_bad_pixels", "correct_bad_pixels", "flat_field"]


def _neighbour_median(pattern):
    """Median of each pixel's 8 neighbours (edges repeated), of the finite ones only.

    As :func:`scipy.ndimage.median_filter` (the upper median of an even count, rank
    ``count // 2``); NaN where no neighbour is finite.
    """
    import scipy.ndimage as ndi

    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    finite = np.isfinite(pattern)
    if finite.all():  # the common case, in compiled code
        return ndi.median_filter(pattern, footprint=footprint, mode="nearest")
    ny, nx = pattern.shape
    padded = np.pad(np.where(finite, pattern, np.nan), 1, mode="edge")
    around = np.stack([padded[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    ranked = np.sort(around, axis=0)  # NaN last
    count = np.isfinite(ranked).sum(axis=0)
    local = np.take_along_axis(ranked, (count // 2)[None], axis=0)[0]
    return np.where(count > 0, local, np.nan)


def find_bad_pixels(signal, threshold=5.0, set_mask=False):
    """Shared implementation of :meth:`DiffractionPatterns.find_bad_pixels`.

    Hot and dead pixels are judged on the mean pattern; a pixel that is NaN or inf in any
    frame (so in the mean) is bad too, and left out of its neighbours' medians.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> from diffgpu.cleanup import find_bad_pixels
    >>> d = np.random.default_rng(0).uniform(50, 100, (2, 16, 16)).astype("float32")
    >>> d[0, 4, 5] = np.nan
    >>> d[:, 9, 9] = 5000
    >>> np.argwhere(find_bad_pixels(diffgpu.DiffractionPatterns(d))).tolist()
    [[4, 5], [9, 9]]
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive; got {threshold}")
    mean = signal.mean(axis=signal.axes_manager.navigation_axes) \
        if signal.axes_manager.navigation_dimension else signal
    data = mean.data
    if signal._lazy:
        data = data.compute()
    pattern = np.asarray(to_host_array(data), dtype=np.float64)
    # median of the 8 neighbours: follows rings and disc edges, ignores a lone pixel
    local = _neighbour_median(pattern)
    finite = np.isfinite(pattern)
    positive = pattern[finite & (pattern > 0)]
    floor = float(np.median(positive)) if positive.size else 1.0
    with np.errstate(invalid="ignore"):  # NaN medians (no finite neighbour) compare False
        hot = pattern > threshold * np.maximum(local, 0.1 * floor)
        dead = (pattern == 0) & (local > 0)
    bad = hot | dead | ~finite
    if set_mask:
        current = signal.calibration.mask
        signal.calibration.mask = bad if current is None else (current | bad)
    return bad


def correct_bad_pixels(signal, mask=None, inplace=False):
    """Shared implementation of :meth:`DiffractionPatterns.correct_bad_pixels`."""
    shape = signal.calibration.detector_shape
    if mask is None:
        mask = signal.calibration.mask
        if mask is None:
            raise ValueError("no bad-pixel mask: pass mask= or set calibration.mask "
                             "(e.g. with find_bad_pixels(set_mask=True))")
    mask = check_mask(getattr(mask, "data", mask), shape)
    valid = DeviceCache((~mask).astype(np.float32))
    bad = DeviceCache(mask)
    # what the arithmetic below gives (float16 meets the float32 weights; any byte order
    # becomes native), declared as such for a lazy result
    dtype = np.result_type(signal.data.dtype.newbyteorder("="), np.float32) \
        if signal.data.dtype.kind == "f" else np.dtype(np.float32)

    def fix(frames, valid, bad):
        xp = array_module(frames)
        v, b = valid.get(xp), bad.get(xp)
        f = frames.astype(dtype)
        # where(), not f * v: a NaN or inf bad pixel times 0 is NaN, which would spread
        good = xp.where(b, xp.zeros((), dtype), f)
        num = xp.zeros_like(good)
        den = xp.zeros_like(v)
        ny, nx = shape
        for dy in (-1, 0, 1):  # sum over the 3 x 3 neighbourhood of valid pixels
            for dx in (-1, 0, 1):
                if dx == dy == 0:
                    continue
                ys, yd = slice(max(0, dy), ny + min(0, dy)), slice(max(0, -dy), ny + min(0, -dy))
                xs, xd = slice(max(0, dx), nx + min(0, dx)), slice(max(0, -dx), nx + min(0, -dx))
                num[:, yd, xd] += good[:, ys, xs]
                den[yd, xd] += v[ys, xs]
        fill = num / xp.where(den > 0, den, 1)
        return xp.where(b, fill, f).astype(dtype, copy=False)

    result = map_frames(signal.data, fix, shape, dtype, constants=(valid, bad))
    return with_new_data(signal, result, "Bad pixels corrected", inplace)


def flat_field(signal, gain=None, dark=None, inplace=False):
    """Shared implementation of :meth:`DiffractionPatterns.flat_field`."""
    shape = signal.calibration.detector_shape
    if gain is None and dark is None:
        raise ValueError("flat_field needs a gain (flat-field) image, a dark image, or both")

    def image(value, name):
        if value is None:
            return None
        return DeviceCache(detector_image(value, shape, name))

    g, d = image(gain, "gain"), image(dark, "dark")

    def correct(frames, g, d):
        xp = array_module(frames)
        f = frames.astype(xp.float32)
        if d is not None:
            f = f - d.get(xp)
        if g is not None:
            f = f * g.get(xp)
        return f

    result = map_frames(signal.data, correct, shape, np.float32, constants=(g, d))
    return with_new_data(signal, result, "Flat-field corrected", inplace)
