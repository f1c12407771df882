"""Patterns in polar coordinates: the result of 2D azimuthal integration."""

from __future__ import annotations

from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ._device import DeviceMixin, LazyDeviceMixin
from ._wrap import as_signal

__all__ = ["PolarPatterns", "LazyPolarPatterns"]


# diffgpu's radial units -> pyxem's spelling of them (its polar signals' radial axis)
_PYXEM_RADIAL_UNITS = {"1/Å": "k_A^-1", "1/nm": "k_nm^-1", "deg": "2th_deg", "rad": "2th_rad"}


def set_pyxem_type(signal, signal_type):
    """Give ``signal`` one of pyxem's signal types (pyxem's class where pyxem is installed);
    returns it."""
    import logging

    # HyperSpy warns that the signal type is not understood where pyxem is not installed:
    # the signal type is meant for pyxem, which reads it from the saved file
    logger = logging.getLogger("hyperspy.io")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        signal.set_signal_type(signal_type)
    finally:
        logger.setLevel(level)
    return signal


class PolarPatterns(DeviceMixin, Signal2D):
    """Diffraction patterns resampled to polar coordinates.

    Signal axes: azimuth is x (the fast, last array axis) and radius is y, so
    the data array is ``(..., radius, azimuth)``, the same layout as pyxem's
    polar signals. The azimuth runs the other way from pyxem's, and the axes hold bin
    centres (pyxem's: the bins' lower edges): :meth:`to_pyxem` converts.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> p = diffgpu.PolarPatterns(np.zeros((5, 100, 360), dtype="float32"))
    >>> p.axes_manager.signal_shape   # (azimuth, radius)
    (360, 100)
    """

    _signal_type = "polar_patterns"

    def get_orientation(self, library, n_best=1, frac_keep=1.0, normalize_templates=True,
                        gamma=0.3, template_sigma=None, max_frequency=None, ring_means=False):
        """Orientation mapping: match every polar pattern against a template library.

        All in-plane rotations of every template, direct and mirrored, are scored at
        once: an FFT along azimuth turns the correlation into one matrix product per
        azimuthal frequency (BLAS on the host, cuBLAS on a GPU), for many patterns and
        templates per call. The library is rendered onto this signal's polar grid once,
        and on a GPU moved to each device once.

        The radial axis may hold k (1/Å or 1/nm) or, from ``radial_unit="q"``, q = 2 pi k
        (converted). The azimuth (degrees or radians) must cover the full circle from any
        start, e.g. ``azimuth_range=(0, 360)``: the in-plane angles recorded are corrected
        for it. Polar patterns of pyxem's are refused (their azimuth runs the other way):
        integrate with diffgpu.

        Parameters
        ----------
        library : TemplateLibrary or diffsims Simulation2D
            Templates; see :class:`~diffgpu.TemplateLibrary` (``from_phase`` simulates one
            from an orix phase). Single- or multi-phase.
        n_best : int
            Matches kept per pattern, best first.
        frac_keep : float
            Fraction of the library correlated fully for each pattern (1 = all, exact).
            Below 1, every template is first scored on the 16 lowest azimuthal
            frequencies and only each pattern's best ``frac_keep`` are correlated fully.
            On the host the exact search leaves out what cannot win and is as fast (25,651
            Si templates: 234 patterns/s exact, 239 at 0.03; benchmarks/RESULTS.md).
        normalize_templates : bool
            Give every template unit norm, so templates with many spots do not win by
            their spot count.
        gamma : float
            Patterns and template intensities are scaled as ``intensity ** gamma``. 0.3
            (default) tempers strong low-order spots so that weak outer spots count, which
            is what tells nearby orientations apart: on simulated Si it indexed 92% of
            random orientations within 2 degrees, against 90% at 0.5 and about 70% at 1
            (kinematic intensities). Smaller values approach binary spot maps, which helps
            when dynamical scattering makes intensities unreliable. In (0, 4].
        template_sigma : float, optional
            Width (1/Å) of the template spots, positive; default one radial bin.
        max_frequency : int, optional
            Azimuthal frequencies kept, from 2 to ``n_azim // 2 + 1`` (``n_azim`` azimuthal
            bins; default 64, or all where fewer): spots are one or two degrees wide, so
            higher frequencies carry little; 48 is about twice as fast and indexed 89%
            instead of 92% in the test above.
        ring_means : bool
            Whether each radius's mean over the azimuth counts in the correlation (the zero
            azimuthal frequency). By default (``False``) the patterns are matched less their
            rings' means, so that a diffuse background (flat, or a halo) does not favour the
            templates with spots where it is high. On simulated Si (1-degree library, 256
            random and 128 near-zone patterns, 32-256 radial bins, as they are or ``** 0.5``)
            with a flat background of 2 counts per pixel: 47% -> 75% matched within 2 degrees
            on average over the 12 settings (``** 0.5``, random: 0-22% -> 83-89%); without a
            background the same within +-2% (2026-12-07, ``docs/orientation_mapping.rst``).
            ``True`` was the default before 2026-12-07.

        Returns
        -------
        OrientationMatches or LazyOrientationMatches
            Lazy in gives lazy out; device in gives device out.

        Raises
        ------
        ValueError
            Radial axis not in 1/Å or 1/nm (k or q), decreasing, or not reaching the
            library's reciprocal radius; azimuth not in degrees or radians, decreasing, or
            not covering the full circle; polar patterns of pyxem's; n_best larger than
            the library; a parameter out of its range.

        Examples
        --------
        >>> import diffgpu
        >>> lib = diffgpu.TemplateLibrary.from_phase(diffgpu.TemplateLibrary.silicon(),
        ...                                          resolution=5.0, reciprocal_radius=1.0)
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(128, 128))
        >>> s.calibration.scale = 0.01
        >>> s.calibration.units = "1/Å"
        >>> polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28))
        >>> matches = polar.get_orientation(lib, n_best=3)
        >>> matches.axes_manager.signal_shape, matches.axes_manager.navigation_shape  # (fields, n_best)
        ((5, 3), (2, 2))
        """
        from ..orientation import get_orientation

        return as_signal(get_orientation(self, library, n_best=n_best, frac_keep=frac_keep,
                                         normalize_templates=normalize_templates, gamma=gamma,
                                         template_sigma=template_sigma,
                                         max_frequency=max_frequency, ring_means=ring_means))

    def to_pyxem(self):
        """These polar patterns as pyxem 0.21's ``get_azimuthal_integral2d`` gives them (signal
        type ``polar_diffraction``: pyxem's ``PolarDiffraction2D`` where pyxem is installed).

        diffgpu's azimuth is ``atan2(y - cy, x - cx)`` on the detector (row ``y`` down);
        pyxem's runs the other way. Taken as they are, with ``set_signal_type``, every pattern
        would be mirrored for pyxem (its orientation mapping would find the mirror
        orientations). Here the azimuth is reversed and the axes are given pyxem's
        conventions: azimuth ``-phi`` in radians (``Rad``), both axes by their bins' lower
        edges, radial units spelled as pyxem does (``k_A^-1``, ``k_nm^-1``). The bins
        themselves are unchanged. Lazy stays lazy; the metadata are kept. The data stay where
        they are: pyxem works on the host, so move a GPU signal's first (:meth:`to_host`, or
        :func:`diffgpu.to_host` on the result).

        Returns
        -------
        hyperspy.signal.BaseSignal
            A new signal of signal type ``polar_diffraction``; HyperSpy's ``Signal2D`` where
            pyxem is not installed (saved, it reads back as pyxem's in pyxem).

        Raises
        ------
        ValueError
            If the azimuth axis is not in degrees or radians, or not increasing.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.zeros((2, 32, 32), dtype="float32"))
        >>> s.calibration.center = None
        >>> s.calibration.scale = 0.02
        >>> s.calibration.units = "1/Å"
        >>> p = s.get_azimuthal_integral2d(npt=8, npt_azim=36)
        >>> q = p.to_pyxem()
        >>> q.metadata.Signal.signal_type, q.axes_manager.signal_axes[0].units
        ('polar_diffraction', 'Rad')
        >>> np.allclose(q.data, p.data[..., ::-1])
        True
        """
        import math

        azimuth, radius = self.axes_manager.signal_axes
        to_rad = {"deg": math.pi / 180.0, "rad": 1.0}.get(azimuth.units)
        if to_rad is None or not azimuth.scale > 0:
            raise ValueError(f"the azimuth axis must increase in degrees ('deg') or radians ('rad'); "
                             f"got units {azimuth.units!r}, scale {azimuth.scale}")
        width = azimuth.scale * to_rad
        upper = (azimuth.offset + (azimuth.size - 0.5) * azimuth.scale) * to_rad  # last bin's edge
        # bin j of the reversed data is diffgpu's bin n-1-j: pyxem's angle -phi over
        # [-upper + j * width, -upper + (j + 1) * width]
        out = self._deepcopy_with_new_data(self.data[..., ::-1], copy_variance=False)
        az, rad = out.axes_manager.signal_axes
        az.name, az.units, az.scale, az.offset = "Radians", "Rad", width, -upper
        rad.name = "Radius"
        rad.offset = radius.offset - radius.scale / 2
        rad.units = _PYXEM_RADIAL_UNITS.get(radius.units, radius.units)
        return set_pyxem_type(out, "polar_diffraction")


class LazyPolarPatterns(LazyDeviceMixin, LazySignal2D, PolarPatterns):
    """Lazy (dask-backed) :class:`PolarPatterns`."""

    _lazy = True
