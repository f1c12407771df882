"""Virtual images: one scan image per virtual detector."""

from __future__ import annotations

from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["VirtualImages", "LazyVirtualImages"]


class VirtualImages(DeviceMixin, Signal2D):
    """Images of the scan, one per virtual detector (the navigation axis ``detector``).

    Made by :meth:`DiffractionPatterns.get_virtual_image`; the detectors used are
    described in ``metadata.VirtualDetectors``.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> v = diffgpu.VirtualImages(np.zeros((3, 16, 16), dtype="float32"))
    >>> v.axes_manager.navigation_shape, v.axes_manager.signal_shape
    ((3,), (16, 16))
    """

    _signal_type = "virtual_images"


class LazyVirtualImages(LazyDeviceMixin, LazySignal2D, VirtualImages):
    """Lazy (dask-backed) :class:`VirtualImages`."""

    _lazy = True
