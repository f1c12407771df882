"""Virtual images: one scan image per virtual detector (one profile for a one-axis scan)."""

from __future__ import annotations

from hyperspy._signals.lazy_signal1d import LazySignal1D
from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal1d import Signal1D
from hyperspy._signals.signal2d import Signal2D

from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["VirtualImages", "LazyVirtualImages", "VirtualProfiles", "LazyVirtualProfiles"]


class _DetectorSlicing:
    """Keeps ``metadata.VirtualDetectors.detectors`` (one description per image) in step with
    the ``detector`` axis when it is sliced (HyperSpy copies metadata unchanged)."""

    def _slicer(self, slices, isNavigation=None, out=None):
        result = super()._slicer(slices, isNavigation, out)
        described = self.metadata.get_item("VirtualDetectors.detectors")
        axis = next((ax for ax in self.axes_manager._axes if ax.name == "detector"), None)
        if described is None or axis is None or len(described) != axis.size:
            return result
        cut = self._get_array_slices(slices, isNavigation)[axis.index_in_array]
        described = list(described)
        kept = described[cut] if isinstance(cut, slice) else [described[cut]]
        target = out if out is not None else result
        target.metadata.set_item("VirtualDetectors.detectors", kept)
        return result


class VirtualImages(_DetectorSlicing, DeviceMixin, Signal2D):
    """Images of the scan, one per virtual detector (the navigation axis ``detector``).

    Made by :meth:`DiffractionPatterns.get_virtual_image` for a scan of two navigation axes
    (:class:`VirtualProfiles` for one); the detectors used are described in
    ``metadata.VirtualDetectors``.

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


class VirtualProfiles(_DetectorSlicing, DeviceMixin, Signal1D):
    """The virtual images of a scan with one navigation axis (a line scan, or a stack of
    frames): one profile along the scan per virtual detector (the navigation axis
    ``detector``).

    Made by :meth:`DiffractionPatterns.get_virtual_image`; signal type ``virtual_images``
    like :class:`VirtualImages`, with the detectors used described in
    ``metadata.VirtualDetectors``.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> s = diffgpu.DiffractionPatterns(np.ones((7, 16, 16), dtype="float32"))
    >>> v = s.get_virtual_image([np.ones((16, 16)), np.eye(16)])
    >>> type(v).__name__, v.axes_manager.navigation_shape, v.axes_manager.signal_shape
    ('VirtualProfiles', (2,), (7,))
    >>> v.data[:, 0]
    array([256.,  16.], dtype=float32)
    """

    _signal_type = "virtual_images"


class LazyVirtualProfiles(LazyDeviceMixin, LazySignal1D, VirtualProfiles):
    """Lazy (dask-backed) :class:`VirtualProfiles`."""

    _lazy = True
