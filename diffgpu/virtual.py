"""Virtual imaging: many virtual detectors in one pass over the data."""

from __future__ import annotations

import numbers

import numpy as np

from .calibration import check_mask
from .detectors import detector_weights
from .device import DeviceCache, array_module
from .mapping import map_weighted_sums
from .results import OperationResult, derived_metadata

__all__ = ["virtual_images"]


def _describe(detector):
    if hasattr(detector, "cx") or hasattr(detector, "left"):
        return repr(detector)
    return f"mask {np.shape(getattr(detector, 'data', detector))}"


def _check_radii(detector):
    """A ``CircleROI``'s radii, where they are numbers: ``r`` finite and positive, ``r_inner``
    finite, 0 or more and smaller than ``r``. (Unset values are named by
    :func:`~diffgpu.detectors.detector_weights`; HyperSpy itself leaves a negative ``r``
    unset.)"""
    from hyperspy import roi as hs_roi

    if not isinstance(detector, hs_roi.CircleROI):
        return
    r, inner = detector.r, detector.r_inner
    if isinstance(r, numbers.Real) and not (np.isfinite(r) and r > 0):
        raise ValueError(f"CircleROI r must be a finite positive number; got {r:g}: {detector!r}")
    if not isinstance(inner, numbers.Real):
        return
    if not np.isfinite(inner):
        raise ValueError(f"CircleROI r_inner must be a finite number (0 for a disc); got "
                         f"{inner:g}: {detector!r}")
    if inner < 0:
        raise ValueError(f"CircleROI r_inner must be 0 or more (0 for a disc); got {inner:g}: "
                         f"{detector!r}")
    if isinstance(r, numbers.Real) and inner >= r:
        raise ValueError(f"CircleROI r_inner ({inner:g}) must be smaller than r ({r:g}): an "
                         f"annulus is r_inner < distance <= r; {detector!r}")


def _is_one_mask(detectors):
    """Whether a list or tuple is one mask written as nested lists (rows of numbers or bools),
    not a list of detectors: a list of ROIs or of 2D masks does not make a 2D number array."""
    if len(detectors) == 0 or any(hasattr(d, "axes_manager") or hasattr(d, "shape")
                                  or not isinstance(d, (list, tuple)) for d in detectors):
        return False
    try:
        arr = np.asarray(detectors)
    except (ValueError, TypeError):  # ragged
        return False
    return arr.ndim == 2 and arr.dtype.kind in "biuf"


def virtual_images(signal, detectors, normalize=False):
    """Shared implementation of :meth:`DiffractionPatterns.get_virtual_image`: a
    ``virtual_images`` :class:`~diffgpu.results.OperationResult` for scans of one or two
    navigation axes (images, or profiles along a line scan or stack of frames), generic for
    a single frame or a scan of three axes or more."""
    single = not isinstance(detectors, (list, tuple)) or _is_one_mask(detectors)
    if single:
        detectors = [detectors]
    if len(detectors) == 0:
        raise ValueError("no virtual detector given")
    for d in detectors:
        _check_radii(d)
    weights = np.stack([detector_weights(signal, d) for d in detectors])
    bad = signal.calibration.mask
    if bad is not None:
        # a bool NumPy array whatever metadata holds (a dask or CuPy mask set there directly
        # could not be multiplied into the host weights in place)
        bad = check_mask(bad, weights.shape[1:])
        # masked pixels (bad pixels, a quad detector's gap) weigh nothing: whatever they hold,
        # NaN included, is left out (map_weighted_sums never lets a zero weight contribute)
        weights *= ~bad
        empty = [i for i, w in enumerate(weights) if not w.any()]
        if empty:
            raise ValueError(f"the virtual detector {_describe(detectors[empty[0]])} covers only "
                             "pixels of calibration.mask")
    if normalize:  # mean per unit pixel area instead of the sum
        weights /= weights.sum(axis=(1, 2), keepdims=True)
    k = len(detectors)
    matrix = DeviceCache(np.ascontiguousarray(weights.reshape(k, -1).T))
    result = map_weighted_sums(signal.data, matrix, k)  # (..., k)
    xp = array_module(result)
    if signal._lazy:
        import dask.array as da

        result = da.moveaxis(result, -1, 0)
    else:
        result = xp.ascontiguousarray(xp.moveaxis(result, -1, 0))

    scan_axes = signal.axes_manager._get_navigation_axes_dicts()
    for ax in scan_axes:
        ax["navigate"] = False
    axes = [{"name": "detector", "size": k, "navigate": True}] + scan_axes
    if single:
        result, axes = result[0], axes[1:]
    metadata = derived_metadata(
        signal, "Virtual image",
        Signal={"signal_type": "virtual_images" if len(scan_axes) in (1, 2) else "",
                "quantity": signal.metadata.get_item("Signal.quantity", "")},
        VirtualDetectors={"detectors": [_describe(d) for d in detectors],
                          "normalized": bool(normalize)})
    return OperationResult(result, axes, metadata, metadata["Signal"]["signal_type"],
                           lazy=signal._lazy)
