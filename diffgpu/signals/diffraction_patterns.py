"""Stacks of 2D diffraction patterns (4D-STEM, tilt series, ...)."""

from __future__ import annotations

from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ..calibration import Calibration
from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["DiffractionPatterns", "LazyDiffractionPatterns"]


class DiffractionPatterns(DeviceMixin, Signal2D):
    """Diffraction patterns on a detector: signal axes are detector (x, y).

    The data array is ``(..., rows, columns)``: any navigation (scan) axes,
    then the detector. Data may live on the host (NumPy) or on a GPU (CuPy, see
    :meth:`to_device`); every diffgpu operation dispatches on where it lives.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> s = diffgpu.DiffractionPatterns(np.zeros((3, 4, 64, 64), dtype="uint16"))
    >>> s.axes_manager.signal_shape, s.axes_manager.navigation_shape
    ((64, 64), (4, 3))
    >>> s.calibration.center = None
    >>> s.device
    'cpu'
    """

    _signal_type = "diffraction_patterns"

    @property
    def calibration(self):
        """Centre, pixel scale, units, mask and beam energy: see :class:`~diffgpu.calibration.Calibration`."""
        return Calibration(self)


class LazyDiffractionPatterns(LazyDeviceMixin, LazySignal2D, DiffractionPatterns):
    """Lazy (dask-backed) :class:`DiffractionPatterns`.

    Examples
    --------
    >>> import diffgpu
    >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32))
    >>> type(s).__name__
    'LazyDiffractionPatterns'
    """

    _lazy = True
