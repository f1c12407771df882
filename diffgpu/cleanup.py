"""Detector clean-up: bad (hot/dead) pixels, dark and flat-field (gain) correction."""

from __future__ import annotations

import numpy as np

from .calibration import check_mask, detector_image
from .device import DeviceCache, array_module, to_host_array
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
    # median of the 8 neighbours: follows rings and disc edges, ignores a lone pixel; only
    # those on the detector (a repeated edge pixel would vote for itself: hot pixels on the
    # edge, often in a cluster, were missed)
    local = _neighbour_median(pattern, edges="leave_out")
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


def _fill_layers(mask):
    """The bad pixels in the order they can be filled: first those with a good neighbour,
    then those next to the first, and so on (the middle of a cluster of 3 x 3 or more
    has no good neighbour). Returns ``[(layer, valid), ...]``: the pixels filled in each
    pass and, as float32, the pixels they are filled from. Pixels no pass reaches (a
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
        layers.append((layer, valid.astype(np.float32)))
        valid = valid | layer
        remaining &= ~layer
    return layers


def _neighbour_mean(f, v, xp):
    """The mean of each pixel's valid neighbours (``v`` 1, others 0) in frames ``f``
    ``(n, rows, columns)``, whose pixels that are not valid hold 0; 0 where none is valid."""
    ny, nx = v.shape
    num = xp.zeros_like(f)
    den = xp.zeros_like(v)
    for dy in (-1, 0, 1):  # sum over the 3 x 3 neighbourhood of valid pixels
        for dx in (-1, 0, 1):
            if dx == dy == 0:
                continue
            ys, yd = slice(max(0, dy), ny + min(0, dy)), slice(max(0, -dy), ny + min(0, -dy))
            xs, xd = slice(max(0, dx), nx + min(0, dx)), slice(max(0, -dx), nx + min(0, -dx))
            num[:, yd, xd] += f[:, ys, xs]
            den[yd, xd] += v[ys, xs]
    return num / xp.where(den > 0, den, 1)


def correct_bad_pixels(signal, mask=None, inplace=False):
    """Shared implementation of :meth:`DiffractionPatterns.correct_bad_pixels`."""
    shape = signal.calibration.detector_shape
    if mask is None:
        mask = signal.calibration.mask
        if mask is None:
            raise ValueError("no bad-pixel mask: pass mask= or set calibration.mask "
                             "(e.g. with find_bad_pixels(set_mask=True))")
    mask = check_mask(getattr(mask, "data", mask), shape)
    # the first pass fills every bad pixel from its good neighbours (those with none get 0);
    # one more pass per layer of a cluster refills its middle from the pixels filled before,
    # on the layer's bounding box only (a large masked region would cost a whole frame a pass)
    passes = [(slice(None), slice(None), DeviceCache(mask),
               DeviceCache((~mask).astype(np.float32)))]
    for layer, valid in _fill_layers(mask)[1:]:
        rows, cols = np.flatnonzero(layer.any(axis=1)), np.flatnonzero(layer.any(axis=0))
        box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
        passes.append(box + (DeviceCache(np.ascontiguousarray(layer[box])),
                             DeviceCache(np.ascontiguousarray(valid[box]))))
    # what the arithmetic below gives (float16 meets the float32 weights; any byte order
    # becomes native), declared as such for a lazy result
    dtype = np.result_type(signal.data.dtype.newbyteorder("="), np.float32) \
        if signal.data.dtype.kind == "f" else np.dtype(np.float32)

    def fix(frames, *caches):
        xp = array_module(frames)
        f = frames.astype(dtype)
        for i, (ys, xs) in enumerate(boxes):
            b, v = caches[2 * i].get(xp), caches[2 * i + 1].get(xp)
            if i == 0:  # where(), not f * v: a NaN or inf bad pixel times 0 is NaN (it would spread)
                f = xp.where(b, xp.zeros((), dtype), f)
            part = f[:, ys, xs]
            fill = _neighbour_mean(part, v, xp)  # bad pixels not filled yet hold 0
            f[:, ys, xs] = xp.where(b, fill, part)
        return f.astype(dtype, copy=False)

    boxes = [p[:2] for p in passes]  # the arrays go as constants (moved to a GPU once)
    result = map_frames(signal.data, fix, shape, dtype,
                        constants=tuple(c for p in passes for c in p[2:]))
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
