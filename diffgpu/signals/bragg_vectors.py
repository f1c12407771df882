"""Bragg vectors: the disks found in every pattern (positions and intensities)."""

from __future__ import annotations

import numpy as np
from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ..device import to_host_array
from ._device import DeviceMixin, LazyDeviceMixin

__all__ = ["BraggVectors", "LazyBraggVectors"]


class BraggVectors(DeviceMixin, Signal2D):
    """Bragg disks of every pattern: data ``(..., max_disks, 3)`` of ``(x, y, intensity)``.

    A fixed-capacity, NaN-padded layout: each scan position holds up to ``max_disks``
    disks, strongest first, and the unused rows are NaN. Positions are detector pixels
    (the centre of pixel (row 0, column 0) is (0, 0)); the intensity is the correlation
    with the probe template (normalised to sum one), i.e. about the mean counts per pixel
    in the disk. The detection parameters and the calibration of the patterns (centre,
    scale, units, affine correction) are in ``metadata.BraggDisks``.

    Made by :meth:`DiffractionPatterns.find_bragg_disks`; turned into strain by
    :meth:`get_strain_map`.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> v = diffgpu.BraggVectors(np.full((2, 3, 8, 3), np.nan, dtype="float32"))
    >>> v.axes_manager.signal_shape      # (fields, disks)
    (3, 8)
    >>> v.n_disks().tolist()
    [[0, 0, 0], [0, 0, 0]]
    """

    _signal_type = "bragg_vectors"

    def _host(self):
        data = self.data.compute() if self._lazy else self.data
        return np.asarray(to_host_array(data))

    def n_disks(self):
        """Disks found at every scan position (NumPy array of the navigation shape)."""
        d = self._host()
        return np.isfinite(d[..., 0]).sum(axis=-1)

    def get_vector_map(self, bins=None, weighted=True):
        """A Bragg vector map: a 2D histogram of all disk positions (py4DSTEM's BVM).

        Parameters
        ----------
        bins : int, optional
            Bins per detector pixel (default 2).
        weighted : bool
            Sum the intensities (True) or count the disks.

        Returns
        -------
        hyperspy Signal2D in detector pixels.

        Raises
        ------
        ValueError
            Where no disk was found anywhere and ``metadata.BraggDisks.detector_shape`` is
            not set (nothing gives the map's size).

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> v = diffgpu.BraggVectors(np.array([[[10.2, 5.7, 2.0], [np.nan] * 3]], "float32"))
        >>> v.metadata.set_item("BraggDisks.detector_shape", [16, 16])
        >>> float(v.get_vector_map().data.sum())
        2.0
        """
        from hyperspy.signals import Signal2D as HSSignal2D

        bins = 2 if bins is None else int(bins)
        d = self._host().reshape(-1, 3)
        d = d[np.all(np.isfinite(d), axis=1)]
        ny, nx = self.metadata.get_item("BraggDisks.detector_shape", [0, 0])
        if not ny:
            if not len(d):  # nothing to size the map from
                raise ValueError("these vectors hold no disks and no detector shape: set "
                                 "metadata.BraggDisks.detector_shape to [rows, columns] to get "
                                 "an empty map")
            ny, nx = int(np.ceil(d[:, 1].max())) + 1, int(np.ceil(d[:, 0].max())) + 1
        hist, _, _ = np.histogram2d(d[:, 1], d[:, 0], bins=(ny * bins, nx * bins),
                                    range=((-0.5, ny - 0.5), (-0.5, nx - 0.5)),
                                    weights=d[:, 2] if weighted else None)
        out = HSSignal2D(hist)
        for ax in out.axes_manager.signal_axes:
            ax.scale, ax.offset, ax.units = 1.0 / bins, -0.5 + 0.5 / bins, "px"
        out.metadata.General.title = f"Bragg vector map of {self.metadata.General.title}"
        return out

    def fit_lattice(self, basis=None, origin=None, reference=None, min_disks=6, tolerance=None,
                    iterations=8, weighted=True):
        """Per-position lattice fit: origin, g1, g2, disks used and RMS residual.

        Parameters: see :meth:`get_strain_map`.

        Returns
        -------
        hyperspy Signal1D ``(..., 8)`` (lazy if these vectors are): the fields
        ``origin_x, origin_y, g1_x, g1_y, g2_x, g2_y, n_disks, rms_residual`` in corrected
        coordinates (see :mod:`diffgpu.strain`) relative to the calibrated centre.

        Examples
        --------
        >>> from diffgpu.synthetic_nbed import synthetic_nbed
        >>> s = synthetic_nbed(nav_shape=(2, 2), sig_shape=(96, 96))
        >>> fits = s.find_bragg_disks(radius=4.0).fit_lattice()
        >>> fits.data.shape
        (2, 2, 8)
        """
        from hyperspy.signals import Signal1D

        from ..strain import _min_length, lattice_fit

        cal = self.metadata.get_item("BraggDisks.calibration") if self.metadata.has_item(
            "BraggDisks.calibration") else {}
        cal = cal.as_dictionary() if hasattr(cal, "as_dictionary") else dict(cal)
        fits, _, _ = lattice_fit(self.data, cal, basis=basis, origin=origin, reference=reference,
                                 min_disks=min_disks, tolerance=tolerance, iterations=iterations,
                                 weighted=weighted,
                                 min_length=_min_length(self.metadata.as_dictionary()))
        axes = self.axes_manager._get_navigation_axes_dicts() + [
            {"name": "field", "size": 8, "navigate": False}]
        out = Signal1D(fits, axes=axes)
        if self._lazy and not out._lazy:
            out = out.as_lazy()
        out.metadata.General.title = f"Lattice fit of {self.metadata.General.title}"
        from ..kernels.lattice import LATTICE_FIELDS

        out.metadata.set_item("Lattice.fields", list(LATTICE_FIELDS))
        return out

    def get_strain_map(self, reference=None, basis=None, origin=None, min_disks=6,
                       tolerance=None, iterations=8, weighted=True):
        """Strain and rotation at every scan position -> :class:`StrainMap`.

        Each pattern's disks are indexed on a lattice basis and fitted (origin, g1, g2) by
        intensity-weighted least squares with outlier rejection, with the calibration's
        centre, scale and affine correction applied; the strain is that of each fit
        relative to the reference lattice, by polar decomposition (see :mod:`diffgpu.strain`
        for the conventions: positive ``exx`` = lattice expanded along x; theta positive
        from +x towards +y, clockwise on screen). Lazy in, lazy out: for lazy vectors and a
        reference region, the chunks holding the region are computed now (for the basis and
        the reference lattice) and the strain map's graph uses those computed chunks, so
        no disk is found twice.

        Parameters
        ----------
        reference : region, lattice vectors or None
            The unstrained reference: a region of the scan (a tuple of slices in array
            order, rows first, e.g. ``(slice(0, 6), slice(0, 6))``, inside the scan; or a
            mask of the scan: bool or 0/1 integer NumPy, dask or HyperSpy data) whose mean
            fitted lattice is the reference, after leaving out fits that differ from the
            region's median fit by more than 4 x the median difference (another grain; a
            warning says how many); or the reference vectors ``((g1x, g1y), (g2x, g2y))``
            in detector pixels (a primitive cell; at least ``min_spacing + 1`` px long);
            None: the median of all fits.
        basis : ``((g1x, g1y), (g2x, g2y))``, optional
            Lattice vectors (pixels) used to index the disks; default found from the
            reference region's disks (two short, non-collinear, frequent spacings). A
            non-primitive (centred) cell is replaced by a primitive one, with a warning.
        origin : (x, y), optional
            Detector pixel of the direct beam (the (0, 0) disk); default the median of the
            reference frames' strongest disks. Each pattern's own shift (descan) is found
            and absorbed, whatever its size.
        min_disks : int
            Positions with fewer indexed disks get NaN strain (counted and reported).
        tolerance : float, optional
            Largest distance (pixels) of a kept disk from its lattice site; default
            adaptive and robust (4.8 x the median distance of the frame's fitted disks).
        iterations : int
            Most fit, reject and re-index passes (fewer once the disks kept no longer
            change).
        weighted : bool
            Weight disks by intensity (no disk more than twice the frame's median).

        Returns
        -------
        StrainMap or LazyStrainMap
            Data ``(..., 4)``: exx, eyy, exy, theta (degrees).

        Raises
        ------
        ValueError
            The reference region has no valid fit, or no basis can be found
            (:class:`~diffgpu.kernels.lattice.BasisError`), a region reaches past the scan,
            vectors are too short to be detector pixels, or the vectors lack usable
            intensities: the message says what to set.

        Examples
        --------
        >>> from diffgpu.synthetic_nbed import synthetic_nbed
        >>> s = synthetic_nbed(nav_shape=(4, 4), sig_shape=(96, 96))
        >>> vectors = s.find_bragg_disks(radius=4.0)
        >>> strain = vectors.get_strain_map(reference=(slice(0, 1), slice(0, 1)))
        >>> strain
        <StrainMap, title: Strain of Synthetic NBED, dimensions: (4, 4|4)>
        """
        from ..strain import count_failed, get_strain_map, warn_failed
        from .strain_map import LazyStrainMap, StrainMap

        data, axes, md = get_strain_map(
            self.data, self.metadata.as_dictionary(), self.axes_manager._get_navigation_axes_dicts(),
            reference=reference, basis=basis, origin=origin, min_disks=min_disks,
            tolerance=tolerance, iterations=iterations, weighted=weighted)
        cls = LazyStrainMap if self._lazy else StrainMap
        out = cls(data, axes=axes, metadata=md)
        if not self._lazy:
            n_failed = count_failed(data)
            out.metadata.set_item("Strain.n_failed", n_failed)
            warn_failed(n_failed, int(np.prod(data.shape[:-1])), min_disks)
        return out


class LazyBraggVectors(LazyDeviceMixin, LazySignal2D, BraggVectors):
    """Lazy (dask-backed) :class:`BraggVectors`."""

    _lazy = True
