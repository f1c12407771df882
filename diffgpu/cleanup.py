"""Detector clean-up: bad (hot/dead) pixels, dark and flat-field (gain) correction."""

from __future__ import annotations

import numpy as np

from .calibration import check_mask, detector_image
from .device import DeviceCache, array_module, to_host_array
from .kernels.dtypes import as_float32
from .mapping import map_frames, with_new_data

__all__ = ["find_bad_pixels", "correct_bad_pixels", "flat_field"]


def _neighbour_median(pattern, edges="repeat"):
    """Median of each pixel's 8 neighbours, of the finite ones only.

    As :func:`scipy.ndimage.median_filter` (the upper median of an even count, rank
    ``count // 2``); NaN where no neighbour is finite. ``edges="repeat"``: beyond the
    detector's edge the edge pixels are repeated (scipy's ``mode="nearest"``);
    ``edges="leave_out"``: only the neighbours on the detector count (an edge pixel has 5,
    a corner pixel 3), so an edge pixel never stands in for its own missing neighbours.
    """
    import scipy.ndimage as ndi

    if edges not in ("repeat", "leave_out"):
        raise ValueError(f"edges must be 'repeat' or 'leave_out'; got {edges!r}")
    if not np.isfinite(pattern).all():
        return _finite_neighbour_median(pattern, edges == "leave_out")
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    local = ndi.median_filter(pattern, footprint=footprint, mode="nearest")  # compiled code
    if edges == "leave_out":
        # the border pixels ranked again without the repeated edge, from strips 2 pixels deep
        # (each border pixel sees all its neighbours there)
        local[:1] = _finite_neighbour_median(pattern[:2], True)[:1]
        local[-1:] = _finite_neighbour_median(pattern[-2:], True)[-1:]
        local[:, :1] = _finite_neighbour_median(pattern[:, :2], True)[:, :1]
        local[:, -1:] = _finite_neighbour_median(pattern[:, -2:], True)[:, -1:]
    return local


def _finite_neighbour_median(pattern, leave_out):
    """:func:`_neighbour_median` by sorting the 8 shifted copies (NaN last): any pattern.
    ``leave_out``: pad with NaN (no neighbour beyond the edge), else repeat the edge."""
    ny, nx = pattern.shape
    finite = np.isfinite(pattern)
    values = np.where(finite, pattern, np.nan)
    padded = np.pad(values, 1, constant_values=np.nan) if leave_out else np.pad(values, 1, mode="edge")
    around = np.stack([padded[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    ranked = np.sort(around, axis=0)  # NaN last
    count = np.isfinite(ranked).sum(axis=0)
    local = np.take_along_axis(ranked, (count // 2)[None], axis=0)[0]
    return np.where(count > 0, local, np.nan)


def find_bad_pixels(signal, threshold=5.0, set_mask=False):
    """Shared implementation of :meth:`DiffractionPatterns.find_bad_pixels`.

    Hot and dead pixels are judged on the mean pattern (summed in float64); a pixel that is
    NaN or inf in any frame (so in the mean) is bad too, and left out of its neighbours'
    medians. Pixels of ``calibration.mask`` (a quad detector's gap, bad pixels found before)
    are left out of the medians as well, and not reported again.

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
    # the mean frame summed in float64 whatever the data's dtype: in float16 (the dtype a
    # lazy mean keeps) the sums over a few frames of a bright beam overflow to inf, and the
    # whole beam was flagged bad
    data = signal.data
    scan = tuple(range(data.ndim - 2))
    data = data.mean(axis=scan, dtype=np.float64) if scan else data.astype(np.float64)
    if signal._lazy:
        data = data.compute()
    pattern = np.asarray(to_host_array(data), dtype=np.float64)
    known = signal.calibration.mask
    known = None if known is None else check_mask(known, pattern.shape)
    if known is not None and not known.any():
        known = None
    # median of the 8 neighbours: follows rings and disc edges, ignores a lone pixel; only
    # those on the detector (a repeated edge pixel would vote for itself: hot pixels on the
    # edge, often in a cluster, were missed), and not those of calibration.mask (the zeros of
    # a quad detector's gap made the median of the pixels at its corners 0: flagged hot)
    local = _neighbour_median(pattern if known is None else np.where(known, np.nan, pattern),
                              edges="leave_out")
    finite = np.isfinite(pattern)
    positive = pattern[finite & (pattern > 0) & (True if known is None else ~known)]
    floor = float(np.median(positive)) if positive.size else 1.0
    with np.errstate(invalid="ignore"):  # NaN medians (no finite neighbour) compare False
        hot = pattern > threshold * np.maximum(local, 0.1 * floor)
        dead = (pattern == 0) & (local > 0)
    bad = hot | dead | ~finite
    if known is not None:  # left out everywhere already: not reported again
        bad &= ~known
    if set_mask:
        current = signal.calibration.mask
        signal.calibration.mask = bad if current is None else (current | bad)
    return bad


def _fill_layers(mask):
    """The bad pixels in the order they can be filled: first those with a good neighbour,
    then those next to the first, and so on (the middle of a cluster of 3 x 3 or more
    has no good neighbour). Returns ``[(layer, valid), ...]``: the pixels filled in each
    pass and the pixels they are filled from. Pixels no pass reaches (a
    detector that is all bad) are left out; they become 0."""
    ny, nx = mask.shape
    valid = ~mask
    remaining = mask.copy()
    layers = []
    while remaining.any():
        padded = np.pad(valid, 1)
        near = np.zeros_like(mask)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    near |= padded[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
        layer = remaining & near
        if not layer.any():
            break
        layers.append((layer, valid))
        valid = valid | layer
        remaining &= ~layer
    return layers


def _fill_plan(mask):
    """What :func:`correct_bad_pixels` gathers, layer by layer (:func:`_fill_layers`): for each
    layer one ``(m, 10)`` integer array, per pixel its flat index, its 8 neighbours' and how
    many of those are valid (good, or filled in an earlier layer). A neighbour off the
    detector is the pixel itself; it, and every neighbour not valid yet (a bad pixel),
    holds 0 while the layer is filled. Only the bad pixels are touched per frame: a mean of
    the neighbours over the whole frame cost 8 passes over every pixel (806 frames/s at
    256 x 256 for a line of bad pixels)."""
    ny, nx = mask.shape
    plan = []
    for layer, valid in _fill_layers(mask):
        rows, cols = np.nonzero(layer)
        own = rows * nx + cols
        nb_r = rows[:, None] + np.array([-1, -1, -1, 0, 0, 1, 1, 1])[None, :]
        nb_c = cols[:, None] + np.array([-1, 0, 1, -1, 1, -1, 0, 1])[None, :]
        inside = (nb_r >= 0) & (nb_r < ny) & (nb_c >= 0) & (nb_c < nx)
        nb = np.where(inside, nb_r * nx + nb_c, own[:, None])
        count = (inside & valid.ravel()[nb]).sum(axis=1)
        plan.append(np.ascontiguousarray(np.column_stack([own, nb, count]), dtype=np.int64))
    return plan


def correct_bad_pixels(signal, mask=None, inplace=False):
    """Shared implementation of :meth:`DiffractionPatterns.correct_bad_pixels`."""
    shape = signal.calibration.detector_shape
    if mask is None:
        mask = signal.calibration.mask
        if mask is None:
            raise ValueError("no bad-pixel mask: pass mask= or set calibration.mask "
                             "(e.g. with find_bad_pixels(set_mask=True))")
    mask = check_mask(getattr(mask, "data", mask), shape)
    # each bad pixel is the mean of its valid neighbours: those with a good one first, then
    # (the middle of a cluster) those next to the pixels filled before; none valid: 0
    bad = DeviceCache(np.flatnonzero(mask))
    plans = _fill_plan(mask)
    layers = [DeviceCache(layer) for layer in plans]
    # what the arithmetic below gives (float16 meets the float32 weights; any byte order
    # becomes native), declared as such for a lazy result
    dtype = np.result_type(signal.data.dtype.newbyteorder("="), np.float32) \
        if signal.data.dtype.kind == "f" else np.dtype(np.float32)
    n_pix = shape[0] * shape[1]

    def fix(frames, bad, *layers):
        xp = array_module(frames)
        f = (as_float32(frames) if dtype == np.float32 else frames.astype(dtype)).reshape(-1, n_pix)
        # bad pixels hold 0 until filled (a NaN or inf there would spread through the means)
        f[:, bad.get(xp)] = 0
        for layer in layers:
            plan = layer.get(xp)
            count = xp.maximum(plan[:, 9], 1).astype(dtype)
            f[:, plan[:, 0]] = f[:, plan[:, 1:9]].sum(axis=2, dtype=dtype) / count
        return f.reshape(-1, *shape)

    result = map_frames(signal.data, fix, shape, dtype, constants=(bad, *layers))
    current = signal.calibration.mask
    out = with_new_data(signal, result, "Bad pixels corrected", inplace)
    if current is not None:
        # the pixels filled hold estimates now: left in calibration.mask, every later
        # operation would still leave them out (a quad detector's gap under the beam biased
        # the centre of mass by ~0.4 px after it was filled); those no pass reached stay
        filled = np.zeros(n_pix, bool)
        for plan in plans:
            filled[plan[:, 0]] = True
        left = check_mask(current, shape) & ~filled.reshape(shape)
        (signal if inplace else out).calibration.mask = left if left.any() else None
    return out


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
