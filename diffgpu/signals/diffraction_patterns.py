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

    def get_azimuthal_integral2d(self, npt, npt_azim=360, radial_range=None, azimuth_range=None,
                                 mask=None, mean=False, inplace=False, radial_unit=None,
                                 azimuth_unit="deg", curved_ewald=False, affine=None,
                                 dtype="float32"):
        """Polar transform with exact area-weighted pixel splitting -> :class:`PolarPatterns`.

        Every pixel's intensity is shared among the (radius, azimuth) bins its
        area covers, in proportion to the exact overlap area, so the total
        intensity is conserved. The geometry (centre, scale, units, mask,
        wavelength) comes from :attr:`calibration`; its sparse matrix is built
        once and cached, then applied to many frames per call: a numba kernel
        on the host, cuSPARSE when the data are on a GPU (:meth:`to_device`).
        Lazy in gives lazy out, device in gives device out.

        Parameters
        ----------
        npt : int
            Number of radial bins.
        npt_azim : int
            Number of azimuthal bins.
        radial_range : (float, float), optional
            Radial range in output units; default from 0 to the farthest detector corner.
        azimuth_range : (float, float), optional
            Azimuthal range, default the full circle (-180, 180) degrees. Azimuth is
            ``atan2(y - cy, x - cx)``: 0 along +x (columns), +90 deg along +y (rows,
            i.e. downwards in an image), as pyFAI's chi.
        mask : array-like or Signal2D, optional
            Detector-shaped, True = excluded; combined with ``calibration.mask``.
            Non-finite pixels (NaN, inf) are always treated as masked, per frame.
        mean : bool
            False (default, as pyxem): each bin holds the *sum* of the intensity
            falling in it. True: the mean per unit pixel area (a constant image gives
            that constant in every covered bin; bins covering no pixel give NaN).
        inplace : bool
            Replace this signal by the result (returns None).
        radial_unit : {None, "q", "2theta_deg", "2theta_rad"}
            None: the signal's own units (pixels, 1/Å, 1/nm, ...). "q" = 2 pi k.
            2theta needs the scale in 1/Å or 1/nm and ``calibration.beam_energy``.
        azimuth_unit : {"deg", "rad"}
            Unit of ``azimuth_range`` and of the output azimuth axis.
        curved_ewald : bool
            Map the flat detector onto the Ewald sphere: a flat radius ``k_f`` is
            ``k = 2 sin(atan(lambda k_f) / 2) / lambda`` (needs the beam energy).
        affine : 2x2 array-like, optional
            Distortion correction applied to ``(x - cx, y - cy)`` before scaling
            (e.g. to make an elliptical pattern circular).
        dtype : {"float32", "float64"}
            Output type. Integer detector data never overflow.

        Returns
        -------
        PolarPatterns or LazyPolarPatterns
            Data ``(..., npt, npt_azim)``; axis values are bin centres. The parameters
            are recorded in ``metadata.Integration``.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(64, 64))
        >>> polar = s.get_azimuthal_integral2d(npt=30, npt_azim=90)
        >>> polar
        <LazyPolarPatterns, title: Azimuthal integral of Synthetic 4D-STEM, dimensions: (4, 4|90, 30)>
        >>> polar.axes_manager.signal_axes[0].units, polar.axes_manager.signal_axes[1].units
        ('deg', 'px')
        >>> polar.compute()
        """
        from ..azimuthal import azimuthal_integral

        return azimuthal_integral(self, npt, npt_azim, radial_range=radial_range,
                                  azimuth_range=azimuth_range, mask=mask, mean=mean,
                                  inplace=inplace, radial_unit=radial_unit,
                                  azimuth_unit=azimuth_unit, curved_ewald=curved_ewald,
                                  affine=affine, dtype=dtype)

    def get_azimuthal_integral1d(self, npt, radial_range=None, azimuth_range=None, mask=None,
                                 mean=False, inplace=False, radial_unit=None, azimuth_unit="deg",
                                 curved_ewald=False, affine=None, dtype="float32"):
        """Radial profile with exact area-weighted pixel splitting -> :class:`RadialProfiles`.

        The same engine and parameters as :meth:`get_azimuthal_integral2d` with
        a single azimuthal bin over ``azimuth_range``: the result equals the 2D
        integral summed over azimuth.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(64, 64), lazy=False)
        >>> profile = s.get_azimuthal_integral1d(npt=40, mean=True)
        >>> profile
        <RadialProfiles, title: Azimuthal integral of Synthetic 4D-STEM, dimensions: (4, 4|40)>
        >>> ring = s.metadata.Synthetic.ring_radii[0]
        >>> peak = profile.mean(axis=(0, 1)).isig[ring - 3.0:ring + 3.0].data.argmax()
        """
        from ..azimuthal import azimuthal_integral

        return azimuthal_integral(self, npt, None, radial_range=radial_range,
                                  azimuth_range=azimuth_range, mask=mask, mean=mean,
                                  inplace=inplace, radial_unit=radial_unit,
                                  azimuth_unit=azimuth_unit, curved_ewald=curved_ewald,
                                  affine=affine, dtype=dtype)


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
