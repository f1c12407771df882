"""Patterns in polar coordinates: the result of 2D azimuthal integration."""

from __future__ import annotations

from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["PolarPatterns", "LazyPolarPatterns"]


class PolarPatterns(DeviceMixin, Signal2D):
    """Diffraction patterns resampled to polar coordinates.

    Signal axes: azimuth is x (the fast, last array axis) and radius is y, so
    the data array is ``(..., radius, azimuth)``, the same layout as pyxem's
    polar signals.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> p = diffgpu.PolarPatterns(np.zeros((5, 100, 360), dtype="float32"))
    >>> p.axes_manager.signal_shape   # (azimuth, radius)
    (360, 100)
    """

    _signal_type = "polar_patterns"


class LazyPolarPatterns(LazyDeviceMixin, LazySignal2D, PolarPatterns):
    """Lazy (dask-backed) :class:`PolarPatterns`."""

    _lazy = True
