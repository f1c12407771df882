"""Finding the direct beam in every pattern, and centring it: lazy, on host or GPU."""

from __future__ import annotations

import numpy as np

from .calibration import check_mask, detector_image
from .detectors import detector_weights, disc_weights
from .device import DeviceCache, _is_dask, array_module, to_host_array
from .kernels.blur import gaussian_blur
from .kernels.shift import shift_frames
from .mapping import map_frames, map_weighted_sums, over_host_threads, with_new_data
from .results import OperationResult, derived_metadata

__all__ = ["center_of_mass", "direct_beam_position", "shift_diffraction", "center_direct_beam"]


def _shifts_result(signal, data, title, method):
    """The shifts with their axes and metadata (a ``direct_beam_shifts`` result)."""
    axes = signal.axes_manager._get_navigation_axes_dicts() + [
        {"name": "shift", "size": 2, "scale": 1.0, "offset": 0.0, "units": "px", "navigate": False}
    ]
    md = derived_metadata(signal, title, Signal={"signal_type": "direct_beam_shifts"},
                          BeamShifts={"method": method, "center": list(signal.calibration.center),
                                      "components": ["x", "y"]})
    return OperationResult(data, axes, md, "direct_beam_shifts", lazy=signal._lazy)


def _com_weights(shape, region):
    """(pixels, 3) weights: region, region * x, region * y (pixel coordinates)."""
    ny, nx = shape
    y, x = np.indices(shape, dtype=np.float64)
    w = np.stack([region, region * x, region * y]).reshape(3, ny * nx).T
    return np.ascontiguousarray(w, dtype=np.float32)


def _com_from_sums(sums, xp, center):
    """Centres of mass from the three moments, as shifts from ``center`` (plain numbers, so
    nothing is moved to a GPU for them)."""
    total = sums[:, 0]
    safe = xp.where(total > 0, total, xp.float32(1))
    com = xp.stack([sums[:, 1] / safe - xp.float32(center[0]),
                    sums[:, 2] / safe - xp.float32(center[1])], axis=1)
    return xp.where((total > 0)[:, None], com, xp.float32(np.nan))


def _region(signal, mask):
    """Pixel weights in which to take the centre of mass."""
    from hyperspy import roi as hs_roi

    shape = signal.calibration.detector_shape
    if mask is None:
        region = np.ones(shape, dtype=np.float32)
    elif isinstance(mask, hs_roi.BaseROI):  # calibrated units, as for the virtual detectors
        region = detector_weights(signal, mask)
    elif np.ndim(mask) == 1 and len(mask) == 3:  # (x, y, r) disc in pixels
        x, y, r = (float(v) for v in mask)
        region = disc_weights(shape, (x, y), r)
    else:
        region = detector_image(mask, shape, "mask")
    bad = signal.calibration.mask
    if bad is not None:
        region = region * ~bad
    if not region.any():
        raise ValueError("the centre-of-mass region covers no (unmasked) pixel")
    return region


def center_of_mass(signal, mask=None, threshold=None):
    """Shared implementation of :meth:`DiffractionPatterns.center_of_mass`."""
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative multiple of each frame's mean "
                         f"intensity; got {threshold}")
    shape = signal.calibration.detector_shape
    weights = DeviceCache(_com_weights(shape, _region(signal, mask)))
    cx, cy = signal.calibration.center

    bad = signal.calibration.mask
    # masked pixels count as 0 in the frame's mean that the threshold scales too (a masked hot
    # pixel would otherwise raise the cut above the beam)
    masked = bad if threshold is not None and bad is not None and bad.any() else None
    # NaN and inf pixels count as 0, as in integration (and masked ones never count)
    data = map_weighted_sums(signal.data, weights, 3, out_shape=(2,), threshold=threshold,
                             nonfinite="zero", masked=masked,
                             finish=lambda sums, xp: _com_from_sums(sums, xp, (cx, cy)))
    return _shifts_result(signal, data, "Centre of mass", "center_of_mass")


def _windowed_com(frames, px, py, radius, xp, iterations=3):
    """Centre of mass of each frame within a disc of ``radius`` around (px, py).

    Works on a small patch around each estimate (gathered for all frames at
    once), and re-centres the window a few times: a window that is not centred
    on a symmetric peak pulls the centre of mass towards its own centre.
    """
    n, ny, nx = frames.shape
    size = min(2 * int(np.ceil(radius)) + 3, ny, nx)
    span = xp.arange(size)
    rows = xp.arange(n)[:, None, None]
    for _ in range(iterations):
        top = xp.clip(xp.rint(py).astype(xp.int64) - size // 2, 0, ny - size)
        left = xp.clip(xp.rint(px).astype(xp.int64) - size // 2, 0, nx - size)
        y = (top[:, None] + span[None, :]).astype(xp.float32)  # (n, size)
        x = (left[:, None] + span[None, :]).astype(xp.float32)
        patch = frames[rows, y.astype(xp.int64)[:, :, None], x.astype(xp.int64)[:, None, :]]
        inside = ((x[:, None, :] - px[:, None, None]) ** 2
                  + (y[:, :, None] - py[:, None, None]) ** 2) <= radius**2
        w = xp.where(inside, patch, xp.float32(0))
        total = w.sum(axis=(1, 2))
        safe = xp.where(total > 0, total, xp.float32(1))
        px = xp.where(total > 0, (w * x[:, None, :]).sum(axis=(1, 2)) / safe, px)
        py = xp.where(total > 0, (w * y[:, :, None]).sum(axis=(1, 2)) / safe, py)
    return px, py


def _usable(frames, valid, xp):
    """The frames as float32 with NaN, inf and masked pixels (``valid`` False) set to 0, so
    they pull the beam nowhere (a NaN would spoil a whole blurred or correlated frame)."""
    f = frames.astype(xp.float32)
    keep = xp.isfinite(f) if frames.dtype.kind == "f" else None
    if valid is not None:
        keep = valid[None] if keep is None else keep & valid[None]
    return f if keep is None else xp.where(keep, f, xp.float32(0))


def _half_maximum_run(line, at, level, xp):
    """The stretch of each ``line`` (n, m) at or above ``level`` (n,) that holds index ``at``
    (n,), with its ends interpolated linearly between pixels (at the detector's edge: the
    last pixel's outer edge). Returns its middle, half length, and the index nearest the
    middle that is inside it (``at`` for the next line across)."""
    n, m = line.shape
    idx = xp.arange(m)[None]
    below = line < level[:, None]
    lo = xp.where(below & (idx < at[:, None]), idx, -1).max(axis=1)
    hi = xp.where(below & (idx > at[:, None]), idx, m).min(axis=1)
    rows = xp.arange(n)
    a, b = line[rows, xp.clip(lo, 0, m - 1)], line[rows, xp.clip(lo + 1, 0, m - 1)]
    c, d = line[rows, xp.clip(hi - 1, 0, m - 1)], line[rows, xp.clip(hi, 0, m - 1)]
    left = xp.where(lo >= 0, lo + (level - a) / xp.where(b > a, b - a, xp.float32(1)),
                    xp.float32(-0.5))
    right = xp.where(hi < m, hi - 1 + (c - level) / xp.where(c > d, c - d, xp.float32(1)),
                     xp.float32(m - 0.5))
    left, right = left.astype(xp.float32), right.astype(xp.float32)
    middle = (left + right) / 2
    inside = xp.clip(xp.rint(middle).astype(xp.int64), lo + 1, hi - 1)
    return middle, (right - left) / 2, inside


def _disc_com(f, px, py, radius, xp):
    """Centre of mass of each whole frame within a disc of its own ``radius`` around
    (px, py); where it holds no intensity, (px, py)."""
    n, ny, nx = f.shape
    x, y = xp.arange(nx, dtype=xp.float32), xp.arange(ny, dtype=xp.float32)
    inside = (((y[None] - py[:, None]) ** 2)[:, :, None] + ((x[None] - px[:, None]) ** 2)[:, None, :]
              <= (radius ** 2)[:, None, None])
    w = xp.where(inside, f, xp.float32(0))
    total = w.sum(axis=(1, 2))
    safe = xp.where(total > 0, total, xp.float32(1))
    return (xp.where(total > 0, (w.sum(axis=1) * x).sum(axis=1) / safe, px),
            xp.where(total > 0, (w.sum(axis=2) * y).sum(axis=1) / safe, py))


def _blur_position(f, sigma, window):
    """(x, y) of the beam in the frames ``f`` (float32, already :func:`_usable`).

    A beam whose half-maximum extent does not fit in ``window`` around the blurred maximum
    (a bright-field disc: blurred, it is a plateau whose maximum may be anywhere on it, and
    a window inside it has no edge to pull it to the middle) is found instead from the
    middle of its half-maximum extent along a row and a column through it, refined by the
    centre of mass in a disc that holds all of it. Each frame is judged on its own, with
    the same result on either device: a GPU computes both ways for every frame (choosing
    there would read a value back), the host only the one it needs.
    """
    xp = array_module(f)
    blurred = gaussian_blur(f, sigma)
    n, ny, nx = f.shape
    flat = blurred.reshape(n, -1)
    peak = flat.argmax(axis=1)
    iy, ix = peak // nx, peak % nx
    py, px = iy.astype(xp.float32), ix.astype(xp.float32)
    small = _windowed_com(f, px, py, window, xp)

    level = xp.float32(0.5) * flat.max(axis=1)
    rows = xp.arange(n)
    for _ in range(2):  # row, column, row, column: the second pair runs through the middle
        cx, half_x, ix = _half_maximum_run(blurred[rows, iy, :], ix, level, xp)
        cy, half_y, iy = _half_maximum_run(blurred[rows, :, ix], iy, level, xp)
    extent = xp.maximum(half_x, half_y)
    large = extent + xp.hypot(cx - px, cy - py) + 1 > window
    radius = extent + xp.float32(2 * sigma + 1)
    if xp is np:  # the host picks those frames for free (a device would have to read back)
        wide = cx.copy(), cy.copy()
        pick = np.flatnonzero(large)
        if pick.size:
            wide[0][pick], wide[1][pick] = _disc_com(f[pick], cx[pick], cy[pick], radius[pick], xp)
    else:
        wide = _disc_com(f, cx, cy, radius, xp)
    return tuple(xp.where(large, w, s) for w, s in zip(wide, small))


def _disc_template(shape, radius):
    """A disc at the origin, wrapped around the corners: the cross-correlation's template."""
    ny, nx = shape
    return sum(disc_weights(shape, corner, radius)
               for corner in ((0.0, 0.0), (nx, 0.0), (0.0, ny), (nx, ny)))


def _xcorr_position(f, template, window):
    """``f``: the frames, float32, already :func:`_usable`; ``template``:
    :func:`_disc_template`, on the frames' device."""
    xp = array_module(f)
    n, ny, nx = f.shape
    corr = xp.fft.irfft2(xp.fft.rfft2(f) * xp.conj(xp.fft.rfft2(template))[None], s=(ny, nx))
    peak = corr.reshape(n, -1).argmax(axis=1)
    py, px = (peak // nx).astype(xp.float32), (peak % nx).astype(xp.float32)
    # refine on the top half of the correlation peak (disc * disc: a smooth, symmetric cone);
    # the rest of the pattern only adds a broad background that would bias the centre of mass
    top = corr.reshape(n, -1).max(axis=1)[:, None, None]
    c = xp.maximum(corr - 0.5 * top, 0)
    return _windowed_com(c, px, py, window, xp)


# the options each method takes besides its own (any other given is a mistake, not ignored)
_OPTIONS = {"center_of_mass": ("mask", "threshold"), "blur": ("sigma", "window"),
            "cross_correlate": ("radius", "window")}


def _size(value, name, what):
    """A size in pixels as a finite positive float, or a ValueError naming the option (a
    window of 0 would leave every beam on whole pixels; inf has no patch to take)."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of pixels ({what}); got {value!r}") from None
    if not (np.isfinite(size) and size > 0):
        raise ValueError(f"{name} must be positive and finite (pixels: {what}); got {value!r}")
    return size


def direct_beam_position(signal, method="center_of_mass", mask=None, threshold=None, sigma=None,
                         radius=None, window=None):
    """Shared implementation of :meth:`DiffractionPatterns.get_direct_beam_position`."""
    methods = tuple(_OPTIONS)
    if method not in methods:
        raise ValueError(f"method must be one of {methods}; got {method!r}")
    given = {"sigma": sigma, "radius": radius, "window": window}
    stray = [k for k, v in given.items() if v is not None and k not in _OPTIONS[method]]
    if stray:
        raise TypeError(f"{', '.join(k + '=' for k in stray)} {'does' if len(stray) == 1 else 'do'}"
                        f" not apply to method={method!r} (it takes "
                        f"{', '.join(k + '=' for k in _OPTIONS[method])})")
    if sigma is None:
        sigma = 2.0
    if method == "center_of_mass":
        return center_of_mass(signal, mask=mask, threshold=threshold)
    if mask is not None or threshold is not None:
        given = " and ".join(f"{n}=" for n, v in (("mask", mask), ("threshold", threshold))
                             if v is not None)
        raise TypeError(f"the options {given} are for method='center_of_mass' only, not "
                        f"{method!r} (which looks only near the beam; to leave pixels out, "
                        "set calibration.mask)")
    cx, cy = signal.calibration.center
    bad = signal.calibration.mask
    if bad is not None and bad.all():
        raise ValueError("calibration.mask covers every pixel: there is no beam to find")
    # masked pixels count as 0 (None: nothing masked, no constant to move to a GPU)
    valid = None if bad is None or not bad.any() else DeviceCache(~bad)
    if method == "blur":
        sigma = _size(sigma, "sigma", "the Gaussian blur")
        window = 4 * sigma if window is None else _size(window, "window", "the refinement radius")

        def position(f, xp):
            return _blur_position(f, sigma, window)
    else:
        if radius is None:
            raise ValueError("method='cross_correlate' needs radius= (the direct beam's disc "
                             "radius in pixels)")
        radius = _size(radius, "radius", "the direct beam's disc radius")
        ny, nx = signal.calibration.detector_shape
        if 2 * radius > min(ny, nx):  # the template's wrapped copies would overlap
            raise ValueError(f"radius={radius} px is too large for the {ny} x {nx} px detector: "
                             f"the disc's diameter must fit on it (radius at most {min(ny, nx) / 2:g})")
        window = radius if window is None else _size(window, "window", "the refinement radius")

        template = DeviceCache(_disc_template(signal.calibration.detector_shape, radius))

        def position(f, xp, template=template):
            return _xcorr_position(f, template.get(xp), window)

    def find(frames, *valid):
        xp = array_module(frames)
        f = _usable(frames, valid[0].get(xp) if valid else None, xp)
        px, py = position(f, xp)
        shifts = xp.stack([px - cx, py - cy], axis=1).astype(xp.float32)
        # a frame with no positive intensity has no beam: NaN, as from center_of_mass (not
        # the corner pixel an arg-max of zeros lands on)
        found = f.reshape(f.shape[0], -1).max(axis=1) > 0
        return xp.where(found[:, None], shifts, xp.float32(np.nan))

    data = map_frames(signal.data, find, (2,), np.float32, eager_func=over_host_threads(find),
                      constants=() if valid is None else (valid,))
    return _shifts_result(signal, data, "Direct beam position", method)


def _array_of(x):
    """The data of a signal or an operation's result, or ``x`` itself (a CuPy array's
    ``.data`` is a memory pointer)."""
    return x.data if hasattr(x, "axes_manager") or isinstance(x, OperationResult) else x


def _shift_array(signal, shifts):
    """Shifts as a host/device/dask array ``nav_shape + (2,)`` matching the signal."""
    nav_shape = tuple(signal.data.shape[:-2])
    data = _array_of(shifts)
    if not hasattr(data, "shape"):
        data = np.asarray(data, dtype=np.float32)
    if tuple(data.shape) != nav_shape + (2,):
        raise ValueError(f"shifts must have the shape {nav_shape + (2,)} (scan shape, then x and "
                         f"y); got {tuple(data.shape)}")
    return data


def _scan_shaped(value, nav_shape, name):
    """One shift component broadcast to the scan shape (float32; a dask array stays lazy, so
    lazy beam shifts are not computed here), or a ValueError naming both shapes."""
    value = _array_of(value)
    if _is_dask(value):
        import dask.array as da

        value, broadcast = to_host_array(value).astype(np.float32), da.broadcast_to
    else:
        value, broadcast = np.asarray(to_host_array(value), np.float32), np.broadcast_to
    try:
        return broadcast(value, nav_shape)
    except ValueError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not fit the scan shape "
                         f"{nav_shape}: give one number or an array of the scan shape (or one "
                         "that broadcasts to it)") from None


def shift_diffraction(signal, shift_x, shift_y=None, inplace=False):
    """Shared implementation of :meth:`DiffractionPatterns.shift_diffraction`."""
    nav_shape = tuple(signal.data.shape[:-2])
    if shift_y is None:
        shifts = _shift_array(signal, shift_x)
    else:
        sx, sy = (_scan_shaped(value, nav_shape, name)
                  for value, name in ((shift_x, "shift_x"), (shift_y, "shift_y")))
        if _is_dask(sx) or _is_dask(sy):
            import dask.array as da

            shifts = da.stack([da.asarray(sx), da.asarray(sy)], axis=-1)
        else:
            shifts = np.stack([sx, sy], axis=-1)
    if not signal._lazy:
        shifts = to_host_array(shifts)
    shape = tuple(signal.data.shape[-2:])
    bad = signal.calibration.mask
    if bad is None or not np.any(bad):
        result = map_frames(signal.data, shift_frames, shape, np.float32, per_frame=(shifts,))
    else:
        # masked pixels (hot, dead, a gap) count as 0, as everywhere else: shifted as they
        # are, a masked hot pixel moved out from under calibration.mask (which stays where it
        # is) into pixels every later operation uses
        keep = DeviceCache(~check_mask(bad, shape))

        def shift_kept(frames, shifts, keep):
            return shift_frames(frames, shifts, keep=keep.get(array_module(frames)))

        result = map_frames(signal.data, shift_kept, shape, np.float32, per_frame=(shifts,),
                            constants=(keep,))
    return with_new_data(signal, result, "Shifted", inplace)


def _is_pyxem_beam_shift(shifts):
    """Whether ``shifts`` is a pyxem ``BeamShift`` signal (signal type ``beam_shift``, also
    when read from a file without pyxem installed)."""
    md = getattr(shifts, "metadata", None)
    return hasattr(md, "get_item") and md.get_item("Signal.signal_type") == "beam_shift"


def _beam_from_pyxem(signal, data):
    """pyxem's beam shifts ``data`` as diffgpu's: pyxem gives the detector's middle
    ``(columns / 2, rows / 2)`` minus the beam (the shift that centres it), diffgpu the beam
    minus ``calibration.center``."""
    ny, nx = signal.calibration.detector_shape
    cx, cy = signal.calibration.center
    # plain numbers against each component: the same for NumPy, CuPy and dask blocks
    parts = [(nx / 2 - cx) - data[..., 0], (ny / 2 - cy) - data[..., 1]]
    if _is_dask(data):
        import dask.array as da

        return da.stack(parts, axis=-1)
    return array_module(data).stack(parts, axis=-1)


def center_direct_beam(signal, shifts=None, method="center_of_mass", inplace=False, **kwargs):
    """Shared implementation of :meth:`DiffractionPatterns.center_direct_beam`."""
    if shifts is None:
        shifts = direct_beam_position(signal, method=method, **kwargs)
    elif kwargs:
        raise TypeError(f"keyword arguments {sorted(kwargs)} only apply when the shifts are "
                        "found here (shifts=None)")
    data = _shift_array(signal, shifts)
    if _is_pyxem_beam_shift(shifts):
        # pyxem's shifts run the other way and from another origin: taken as they are, every
        # beam would move away from the centre by as much again
        data = _beam_from_pyxem(signal, data)
    return shift_diffraction(signal, -data, inplace=inplace)
