"""Virtual detectors: exact pixel weights for circles, annuli, rectangles and masks.

A detector is a ``(rows, columns)`` array of weights in [0, 1]: the fraction
of each pixel's area inside the detector (exact for circles and annuli, by the
same edge-by-edge disc areas as :mod:`diffgpu.geometry`, and for rectangles),
or any user mask.  HyperSpy ROIs are read in the signal's calibrated units.
"""

from __future__ import annotations

import collections
import functools
import threading

import numpy as np

from .geometry import PolarGeometry, _disc_area, _pixel_polygons

__all__ = ["disc_weights", "rectangle_weights", "detector_weights"]


# disc weights by (detector, centre, radii, scale), least recently used first, held to
# _CACHE_BYTES in all (a count of 32 made a ring series of 64 detectors compute every disc
# again at every call, 100 ms of each; by bytes it holds 512 of 256 x 256, 32 of 1024 x 1024)
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_BYTES = 256 * 2**20
_CACHE_LOCK = threading.Lock()


def _disc_weights_cached(detector_shape, center, radius, scale, inner_radius):
    key = (detector_shape, center, radius, scale, inner_radius)
    with _CACHE_LOCK:
        w = _CACHE.get(key)
        if w is not None:
            _CACHE.move_to_end(key)
            return w
    w = _disc_weights(detector_shape, center, radius, scale, inner_radius)
    w.flags.writeable = False  # shared between callers
    with _CACHE_LOCK:
        _CACHE[key] = w
        while sum(v.nbytes for v in _CACHE.values()) > _CACHE_BYTES and len(_CACHE) > 1:
            _CACHE.popitem(last=False)
    return w


def disc_weights(detector_shape, center, radius, scale=(1.0, 1.0), inner_radius=0.0):
    """Fraction of every pixel inside a disc (or an annulus), exactly.

    Parameters
    ----------
    detector_shape : tuple of int
        ``(rows, columns)``.
    center : tuple of float
        ``(x, y)`` of the disc, in pixels (convention of :mod:`diffgpu.calibration`).
    radius, inner_radius : float
        In calibrated units (``scale`` per pixel); ``inner_radius > 0`` makes an annulus.
    scale : tuple of float
        Pixel size ``(x, y)``.

    Examples
    --------
    >>> from diffgpu.detectors import disc_weights
    >>> w = disc_weights((32, 32), (15.5, 15.5), 10.0)
    >>> round(float(w.sum()), 6) == round(3.141592653589793 * 100, 6)
    True
    """
    key = (tuple(int(n) for n in detector_shape), tuple(float(c) for c in center), float(radius),
           tuple(float(v) for v in scale), float(inner_radius))
    return _disc_weights_cached(*key).copy()


@functools.lru_cache(maxsize=4)
def _pixel_reach(detector_shape, center, scale):
    """Per pixel, the least and the greatest distance of its points from ``center``
    (bounds, read-only), and the pixel's area: what every disc on this detector needs,
    made once (it was made again for each disc: 15 ms of a 256 x 256 annulus's 16)."""
    geom = PolarGeometry(detector_shape, center, scale, 1, 1, (0.0, 1.0), (-180.0, 180.0))
    poly, pixel_area = _pixel_polygons(geom)
    corner_r = np.hypot(poly[..., 0], poly[..., 1])
    rmax = corner_r.max(axis=1)
    # a pixel is cut by a circle only if the circle passes between its nearest and farthest
    # points; the nearest is no closer than (min corner distance - half its diagonal)
    half_diag = 0.5 * np.hypot(*(poly[0, 2] - poly[0, 0]))
    rmin = np.maximum(corner_r.min(axis=1) - half_diag, 0.0)
    rmin.flags.writeable = rmax.flags.writeable = False
    return geom, rmin, rmax, pixel_area


def _disc_weights(detector_shape, center, radius, scale, inner_radius):
    if not radius > inner_radius >= 0:
        raise ValueError(f"need radius > inner_radius >= 0; got radius={radius}, "
                         f"inner_radius={inner_radius}")
    geom, rmin, rmax, pixel_area = _pixel_reach(tuple(detector_shape), tuple(map(float, center)),
                                                tuple(map(float, scale)))

    def inside(r):
        """Area of every pixel inside the disc of radius r (exact only where it is cut)."""
        area = np.where(rmax <= r, pixel_area, 0.0)
        cut = np.flatnonzero((rmin < r) & (rmax > r))
        if r > 0 and cut.size:
            a, _ = _pixel_polygons(geom, cut)  # the corners of the pixels cut only
            area[cut] = _disc_area(a, np.roll(a, -1, axis=1), r).sum(axis=1)
        return area

    w = (inside(float(radius)) - inside(float(inner_radius))) / pixel_area
    w[w < 1e-9] = 0.0  # rounding residue of pixels the disc does not reach
    return np.clip(w, 0.0, 1.0).reshape(detector_shape)


def rectangle_weights(detector_shape, left, top, right, bottom):
    """Fraction of every pixel inside a rectangle given in pixel coordinates (exact).

    Examples
    --------
    >>> from diffgpu.detectors import rectangle_weights
    >>> float(rectangle_weights((8, 8), 1.0, 1.0, 3.0, 2.0).sum())
    2.0
    """
    if not (right > left and bottom > top):
        raise ValueError(f"rectangle needs left < right and top < bottom; got "
                         f"({left}, {top}, {right}, {bottom})")
    ny, nx = detector_shape

    def overlap(lo, hi, n):
        c = np.arange(n, dtype=float)
        return np.clip(np.minimum(c + 0.5, hi) - np.maximum(c - 0.5, lo), 0, 1)

    return overlap(top, bottom, ny)[:, None] * overlap(left, right, nx)[None, :]


def detector_weights(signal, detector):
    """Weights ``(rows, columns)`` for one detector of ``signal``.

    ``detector`` is a HyperSpy ``CircleROI`` (annulus with ``r_inner``) or
    ``RectangularROI`` in the signal's calibrated units, or an array-like mask of the
    detector's shape (bool or float weights).
    """
    from hyperspy import roi as hs_roi

    from .calibration import uniform_signal_axes

    ax_x, ax_y = uniform_signal_axes(signal)
    shape = (ax_y.size, ax_x.size)
    if isinstance(detector, hs_roi.CircleROI):
        _check_roi_set(detector, ("cx", "cy", "r"))
        center = ((detector.cx - ax_x.offset) / ax_x.scale, (detector.cy - ax_y.offset) / ax_y.scale)
        inner = detector.r_inner if _is_number(detector.r_inner) else 0.0
        w = disc_weights(shape, center, detector.r, (ax_x.scale, ax_y.scale), inner)
    elif isinstance(detector, hs_roi.RectangularROI):
        _check_roi_set(detector, ("left", "top", "right", "bottom"))
        # calibrated edges -> pixel coordinates (pixel i is centred on i, spans i +- 0.5);
        # an axis of negative scale (values falling along it) swaps its edges
        left, right = sorted([(detector.left - ax_x.offset) / ax_x.scale,
                              (detector.right - ax_x.offset) / ax_x.scale])
        top, bottom = sorted([(detector.top - ax_y.offset) / ax_y.scale,
                              (detector.bottom - ax_y.offset) / ax_y.scale])
        w = rectangle_weights(shape, left, top, right, bottom)
    elif isinstance(detector, hs_roi.BaseROI):
        raise TypeError(f"{type(detector).__name__} is not a supported virtual detector; use "
                        "CircleROI (disc or annulus), RectangularROI or an array mask")
    else:
        from .calibration import detector_image

        try:
            w = detector_image(detector, shape, "detector mask")
        except TypeError as err:
            raise TypeError(f"{err}. A virtual detector is a HyperSpy CircleROI (disc, or "
                            "annulus with r_inner), a RectangularROI, or such a mask") from None
    if not np.any(w):
        if isinstance(detector, hs_roi.BaseROI):
            # ROIs are read in calibrated units, not pixels (an ROI placed in pixels from the
            # corner, as on an uncalibrated signal, lands off a detector centred on 0)
            span = [sorted((ax.offset - ax.scale / 2, ax.offset + ax.scale * (ax.size - 0.5)))
                    for ax in (ax_x, ax_y)]
            units = ax_x.units if isinstance(ax_x.units, str) and ax_x.units != "<undefined>" else ""
            raise ValueError(
                f"the virtual detector {detector!r} covers no pixel of the detector: ROIs are "
                f"in the signal's calibrated units{f' ({units})' if units else ''}, from "
                f"calibration.center at (0, 0); the detector spans x {span[0][0]:g} to "
                f"{span[0][1]:g} and y {span[1][0]:g} to {span[1][1]:g}")
        raise ValueError(f"the virtual detector mask of shape {np.shape(w)} (all zero) covers "
                         "no pixel of the detector")
    return w.astype(np.float32)


def _is_number(value):
    """A finite real number (HyperSpy leaves an unset ROI value as ``traits.Undefined``)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and bool(np.isfinite(value))


# why HyperSpy leaves values of an ROI unset although they were given
_UNSET_WHY = [({"r"}, "HyperSpy leaves a negative radius undefined"),
              ({"right", "bottom"}, "HyperSpy leaves right and bottom undefined unless "
                                    "right > left and bottom > top")]


def _check_roi_set(roi, names):
    """A clear error for an ROI with values unset (``Undefined``) or not finite."""
    unset = [n for n in names if not _is_number(getattr(roi, n))]
    if unset:
        why = "".join(f" ({text})" for which, text in _UNSET_WHY if set(unset) <= which)
        which = unset[0] if len(unset) == 1 else f"{', '.join(unset[:-1])} and {unset[-1]} are"
        which = f"{which} is" if len(unset) == 1 else which
        raise ValueError(f"{type(roi).__name__} {which} not set to a finite number{why}: "
                         f"{roi!r}; a virtual detector needs all of {', '.join(names)}")
