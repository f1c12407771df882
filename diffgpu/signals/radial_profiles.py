"""Radial (azimuthally integrated) profiles: the result of 1D azimuthal integration."""

from __future__ import annotations

from hyperspy._signals.lazy_signal1d import LazySignal1D
from hyperspy._signals.signal1d import Signal1D

from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["RadialProfiles", "LazyRadialProfiles"]


class RadialProfiles(DeviceMixin, Signal1D):
    """One intensity profile against radius per navigation position.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> r = diffgpu.RadialProfiles(np.zeros((5, 100), dtype="float32"))
    >>> r.axes_manager.signal_shape
    (100,)
    """

    _signal_type = "radial_profiles"


class LazyRadialProfiles(LazyDeviceMixin, LazySignal1D, RadialProfiles):
    """Lazy (dask-backed) :class:`RadialProfiles`."""

    _lazy = True
