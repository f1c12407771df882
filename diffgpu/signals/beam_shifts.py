"""Direct-beam shifts: where the beam is in every pattern, relative to the calibrated centre."""

from __future__ import annotations

import numpy as np
from hyperspy._signals.lazy_signal1d import LazySignal1D
from hyperspy._signals.signal1d import Signal1D

from ..device import to_host_array
from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["DirectBeamShifts", "LazyDirectBeamShifts"]


class DirectBeamShifts(DeviceMixin, Signal1D):
    """Beam shift ``(x, y)`` in pixels at every scan position, from ``calibration.center``.

    The signal axis has two values, x (columns) then y (rows); the beam of
    pattern ``i`` is at ``calibration.center + shifts[i]``. Made by
    :meth:`DiffractionPatterns.get_direct_beam_position` and
    :meth:`DiffractionPatterns.center_of_mass`; used by
    :meth:`DiffractionPatterns.center_direct_beam`.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> sh = diffgpu.DirectBeamShifts(np.zeros((4, 5, 2), dtype="float32"))
    >>> sh.axes_manager.signal_shape
    (2,)
    """

    _signal_type = "direct_beam_shifts"

    def fit_plane(self, mask=None, robust=True):
        """Plane ``a + b * column + c * row`` through the shifts (a linear descan), by least
        squares robust to a few lost beams (see ``robust``).

        Parameters
        ----------
        mask : array-like of bool, optional
            Navigation-shaped; True excludes a scan position from the fit (e.g. over
            vacuum or a strongly diffracting grain).
        robust : bool
            Leave out, and fit again without, the positions whose shift lies more than 5
            standard deviations of the scatter about the plane (estimated from the median
            distance; never less than 0.1 px) from it: a few frames whose beam was not found
            (a Bragg spot taken for it, a beam lost) would otherwise tilt the whole plane.
            ``False``: an ordinary least-squares fit of every position not masked. The
            number left out is ``metadata.BeamShifts.plane_outliers``.

        Returns
        -------
        DirectBeamShifts
            The fitted shifts at every scan position (eager, on the host).

        Raises
        ------
        ValueError
            If the signal axis does not hold the two values ``(x, y)``, the scan is not 1D
            or 2D, ``mask`` does not have the scan's shape, or too few positions are valid.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> rows, cols = np.indices((4, 5))
        >>> data = np.stack([0.1 * cols + 2, -0.2 * rows], axis=-1)
        >>> sh = diffgpu.DirectBeamShifts(data)
        >>> np.allclose(sh.fit_plane().data, data)
        True
        """
        sig_shape = self.axes_manager.signal_shape
        if sig_shape != (2,):  # before a lazy signal is computed
            raise ValueError(f"fit_plane needs the signal axis to hold the shift (x, y), 2 values; "
                             f"this signal's signal shape is {sig_shape}")
        data = np.asarray(to_host_array(self.data.compute() if self._lazy else self.data),
                          dtype=float)
        nav_shape = data.shape[:-1]
        if len(nav_shape) not in (1, 2):
            raise ValueError(f"fit_plane needs a 1D or 2D scan; navigation shape is {nav_shape}")
        idx = np.indices(nav_shape).reshape(len(nav_shape), -1)
        design = np.column_stack([np.ones(idx.shape[1])] + [i for i in idx[::-1]])
        values = data.reshape(-1, 2)
        use = np.all(np.isfinite(values), axis=1)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != nav_shape:
                raise ValueError(f"mask shape {mask.shape} does not match the scan shape {nav_shape}")
            use &= ~mask.ravel()
        if use.sum() < design.shape[1]:
            raise ValueError("too few valid scan positions to fit a plane")
        coef, *_ = np.linalg.lstsq(design[use], values[use], rcond=None)
        kept = use
        for _ in range(10 if robust else 0):
            off = np.hypot(*(values - design @ coef).T)  # distance of each shift from the plane
            # the median distance of 2D Gaussian scatter is 1.1774 sigma
            cut = max(5 * np.median(off[kept]) / 1.1774, 0.1)
            now = use & (off <= cut)
            if np.array_equal(now, kept) or now.sum() < design.shape[1]:
                break
            kept = now
            coef, *_ = np.linalg.lstsq(design[kept], values[kept], rcond=None)
        fitted = (design @ coef).reshape(data.shape).astype(np.float32)
        out = DirectBeamShifts(fitted, axes=self.axes_manager._get_axes_dicts(),
                               metadata=self.metadata.as_dictionary())
        out.metadata.General.title = f"Plane fit of {self.metadata.General.title}".strip()
        out.metadata.set_item("BeamShifts.plane_outliers", int(use.sum() - kept.sum()))
        return out


class LazyDirectBeamShifts(LazyDeviceMixin, LazySignal1D, DirectBeamShifts):
    """Lazy (dask-backed) :class:`DirectBeamShifts`."""

    _lazy = True
