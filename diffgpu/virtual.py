"""Virtual imaging: many virtual detectors in one pass over the data."""

from __future__ import annotations

import numpy as np

from .detectors import detector_weights
from .device import DeviceCache, array_module
from .mapping import map_weighted_sums
from .results import OperationResult

__all__ = ["virtual_images"]


def _describe(detector):
    if hasattr(detector, "cx") or hasattr(detector, "left"):
        return repr(detector)
    return f"mask {np.shape(getattr(detector, 'data', detector))}"


def virtual_images(signal, detectors, normalize=False):
    """Shared implementation of :meth:`DiffractionPatterns.get_virtual_image`: a
    ``virtual_images`` :class:`~diffgpu.results.OperationResult` (generic for scans that are
    not 2D)."""
    single = not isinstance(detectors, (list, tuple))
    if single:
        detectors = [detectors]
    if len(detectors) == 0:
        raise ValueError("no virtual detector given")
    weights = np.stack([detector_weights(signal, d) for d in detectors])
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
    metadata = {
        "General": {"title": f"Virtual image of {signal.metadata.General.title}".strip()},
        "Signal": {"signal_type": "virtual_images" if len(scan_axes) == 2 else ""},
        "VirtualDetectors": {"detectors": [_describe(d) for d in detectors],
                             "normalized": bool(normalize)},
    }
    return OperationResult(result, axes, metadata, metadata["Signal"]["signal_type"],
                           lazy=signal._lazy)
