"""Stacks of 2D diffraction patterns (4D-STEM, tilt series, ...)."""

from __future__ import annotations

import numpy as np
from hyperspy._signals.lazy_signal2d import LazySignal2D
from hyperspy._signals.signal2d import Signal2D

from ..calibration import Calibration
from ._device import DeviceMixin, LazyDeviceMixin
from ._wrap import as_signal

__all__ = ["DiffractionPatterns", "LazyDiffractionPatterns"]


def _checked_output(out, frames, output_shape, dtype, function, declared=True):
    """The result of a user's ``map_frames`` function for ``frames``, checked: an array of the
    frames' kind (NumPy or CuPy) and shape ``(n, *output_shape)``, in ``dtype``. A wrong one
    would otherwise surface later, far from its cause (dask joining blocks of another shape,
    a graph declared on the GPU holding NumPy blocks)."""
    from ..device import array_module, device_of

    name = getattr(function, "__name__", "function")
    xp = array_module(frames)
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"map_frames: {name} returned {type(out).__name__}, not an array")
    if array_module(out) is not xp:
        raise TypeError(f"map_frames: {name} returned a {type(out).__module__}."
                        f"{type(out).__name__} for frames on the {device_of(frames).upper()}; return an "
                        "array of the frames' own kind (diffgpu.device.array_module(frames) "
                        "gives numpy or cupy)")
    expected = (frames.shape[0],) + tuple(output_shape)
    if tuple(out.shape) != expected:
        raise ValueError(f"map_frames: {name} returned shape {tuple(out.shape)} for "
                         f"{frames.shape[0]} frames; expected {expected} (set output_shape= "
                         "to the shape of one frame's result)")
    if out.dtype == dtype:
        return out
    # a declared dtype is the caller's choice; the default (the signal's own) takes only what
    # it holds exactly (a uint16 signal's frame sums are uint64: cast, they would wrap)
    if not declared and not np.can_cast(out.dtype, dtype, casting="safe"):
        raise TypeError(f"map_frames: {name} returned {out.dtype}, which the default dtype "
                        f"{dtype} (the signal's) cannot hold without loss; pass dtype= (e.g. "
                        f"dtype={str(out.dtype)!r})")
    if out.dtype.kind == "c" and dtype.kind != "c":
        raise TypeError(f"map_frames: {name} returned {out.dtype}; the declared dtype {dtype} "
                        "would drop the imaginary part (declare a complex dtype, or return "
                        "the real part or the magnitude)")
    return out.astype(dtype)


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adopt_pyxem_mask()

    def _adopt_pyxem_mask(self):
        """Move pyxem's detector mask (``metadata.General.mask``, True = excluded, which pyxem's
        own integration applies) to ``calibration.mask`` where none is set: a pyxem signal
        made ours (``set_signal_type``, :func:`~diffgpu.as_diffraction_patterns`, a file)
        would otherwise lose it silently. Moved, not copied, so that a mask removed later
        does not come back from the old place."""
        from ..calibration import check_mask

        md = self.metadata
        theirs = md.get_item("General.mask")
        if theirs is None or md.has_item("Diffraction.mask") or \
                self.axes_manager.signal_dimension != 2:
            return
        try:
            mask = check_mask(getattr(theirs, "data", theirs), self.axes_manager.signal_shape[::-1])
        except (TypeError, ValueError):
            return  # not a detector mask: left as it is
        md.set_item("Diffraction.mask", mask)
        del md.General.mask

    @property
    def calibration(self):
        """Centre, pixel scale, units, mask and beam energy: see :class:`~diffgpu.calibration.Calibration`."""
        return Calibration(self)

    # -- the detector mask follows HyperSpy's changes of the detector ---------------------------
    # (the centre and scale live in the axes, which HyperSpy updates; the mask is metadata,
    # which it copies unchanged, and a stale mask breaks every operation on the new detector)
    def _mask_axes(self):
        """``(mask, x axis, y axis)`` where a detector mask is set, else None."""
        if not self.metadata.has_item("Diffraction.mask") or \
                self.axes_manager.signal_dimension != 2:
            return None
        ax_x, ax_y = self.axes_manager.signal_axes
        mask = np.asarray(self.metadata.Diffraction.mask)
        if mask.shape != (ax_y.size, ax_x.size):  # not this detector's: nothing to follow
            return None
        return mask, ax_x, ax_y

    @staticmethod
    def _set_mask(target, mask):
        """Store ``mask`` in ``target``'s metadata if it fits its detector, else remove it."""
        md = target.metadata
        sig = target.axes_manager.signal_shape[::-1]
        if mask is not None and mask.ndim == 2 and len(sig) == 2 and mask.shape == tuple(sig):
            md.set_item("Diffraction.mask", mask)
        elif md.has_item("Diffraction.mask"):
            del md.Diffraction.mask  # no detector image any more (a line or a pixel of it)

    def _slicer(self, slices, isNavigation=None, out=None):
        """HyperSpy's slicing, with ``calibration.mask`` cut like the detector (``isig``)."""
        found = None if isNavigation else self._mask_axes()
        array_slices = self._get_array_slices(slices, isNavigation) if found else None
        result = super()._slicer(slices, isNavigation, out)
        if found:
            mask, ax_x, ax_y = found
            sy, sx = array_slices[ax_y.index_in_array], array_slices[ax_x.index_in_array]
            kept = isinstance(sy, slice) and isinstance(sx, slice)
            self._set_mask(out if out is not None else result, mask[sy, sx] if kept else None)
        return result

    def crop(self, axis, start=None, end=None, convert_units=False):
        """Crop as HyperSpy does, in place; a detector axis crops ``calibration.mask`` too."""
        found = self._mask_axes()
        ax = self.axes_manager[axis]
        window = None
        if found and (ax is found[1] or ax is found[2]):
            window = (ax is found[2], slice(ax._get_index(start), ax._get_index(end)))
        super().crop(axis, start=start, end=end, convert_units=convert_units)
        if window:
            rows, cut = window
            mask = found[0]
            self._set_mask(self, mask[cut] if rows else mask[:, cut])

    def swap_axes(self, axis1, axis2, optimize=False):
        """Swap two axes as HyperSpy does; swapping the detector's x and y transposes
        ``calibration.mask``, and swapping a detector axis with a scan axis removes it."""
        found = self._mask_axes()
        result = super().swap_axes(axis1, axis2, optimize=optimize)
        if found:
            mask, ax_x, ax_y = found
            swapped = {id(self.axes_manager[axis1]), id(self.axes_manager[axis2])}
            detector = {id(ax_x), id(ax_y)}
            if swapped == detector and len(swapped) == 2:
                mask = mask.T
            elif swapped & detector and len(swapped) == 2:
                mask = None
            self._set_mask(result, mask)
        return result

    def transpose(self, signal_axes=None, navigation_axes=None, optimize=False):
        """Transpose as HyperSpy does (``s.T`` too); ``calibration.mask`` stays with the detector:
        transposed where its x and y become the signal's y and x, removed where they are no
        longer the signal axes.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.ones((8, 8, 8, 8), dtype="float32"))
        >>> s.calibration.mask = np.eye(8, dtype=bool)
        >>> s.T.metadata.has_item("Diffraction.mask")   # the scan is the signal now
        False
        """
        found = self._mask_axes()
        if not found:
            return super().transpose(signal_axes, navigation_axes, optimize)
        mask, ax_x, ax_y = found
        # HyperSpy permutes copies of the axes: unique names tell where the detector's went
        names = (ax_x.name, ax_y.name)
        marks = ("__diffgpu_detector_x__", "__diffgpu_detector_y__")
        ax_x.name, ax_y.name = marks
        try:
            result = super().transpose(signal_axes, navigation_axes, optimize)
        finally:
            ax_x.name, ax_y.name = names
        moved = [next(ax for ax in result.axes_manager._axes if ax.name == m) for m in marks]
        for ax, name in zip(moved, names):
            ax.name = name
        sig = list(result.axes_manager.signal_axes)
        if sig == moved:
            kept = mask
        elif sig == moved[::-1]:
            kept = mask.T
        else:
            kept = None
        self._set_mask(result, kept)
        return result

    def to_pyxem(self):
        """These patterns as pyxem 0.21 reads them (signal type ``electron_diffraction``:
        pyxem's ``ElectronDiffraction2D`` where pyxem is installed).

        The data, axes and metadata are kept (the centre and scale live in the axes, as
        pyxem's calibration reads them); the detector units are spelled as pyxem does
        (``k_A^-1``, ``k_nm^-1``), and ``calibration.mask`` is also put where pyxem's
        calibration looks for it (``metadata.General.mask``): with ``set_signal_type`` alone,
        pyxem would integrate without the mask. Lazy stays lazy. pyxem works on the host:
        move a GPU signal's data first (:meth:`to_host`).

        Returns
        -------
        hyperspy.signal.BaseSignal
            A new signal; HyperSpy's ``Signal2D`` where pyxem is not installed (saved, it reads
            back as pyxem's in pyxem).

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.zeros((2, 8, 8), dtype="float32"))
        >>> s.calibration.scale, s.calibration.units = 0.02, "1/Å"
        >>> s.calibration.mask = np.eye(8, dtype=bool)
        >>> p = s.to_pyxem()
        >>> p.metadata.Signal.signal_type, p.axes_manager.signal_axes[0].units
        ('electron_diffraction', 'k_A^-1')
        >>> int(p.metadata.General.mask.sum())
        8
        """
        from .polar_patterns import _PYXEM_RADIAL_UNITS, set_pyxem_type

        out = self._deepcopy_with_new_data(self.data, copy_variance=False)
        for ax in out.axes_manager.signal_axes:
            ax.units = _PYXEM_RADIAL_UNITS.get(ax.units, ax.units) if ax.units in ("1/Å", "1/nm") \
                else ax.units
        mask = self.calibration.mask
        if mask is not None:
            out.metadata.set_item("General.mask", np.asarray(mask, bool).copy())
        return set_pyxem_type(out, "electron_diffraction")

    def rebin(self, new_shape=None, scale=None, crop=True, dtype=None, out=None):
        """Rebin as HyperSpy does (its parameters); ``calibration.mask`` is rebinned too, a new
        pixel being masked where any part of a masked one falls in it.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.ones((2, 8, 8), dtype="float32"))
        >>> s.calibration.mask = np.eye(8, dtype=bool)
        >>> s.rebin(scale=(1, 4, 4)).calibration.mask
        array([[ True, False],
               [False,  True]])
        """
        from hyperspy.misc import array_tools

        found = self._mask_axes()
        factors = self._validate_rebin_args_and_get_factors(new_shape=new_shape, scale=scale) \
            if found else None
        result = super().rebin(new_shape=new_shape, scale=scale, crop=crop, dtype=dtype, out=out)
        if found:
            mask, ax_x, ax_y = found
            fy, fx = factors[ax_y.index_in_array], factors[ax_x.index_in_array]
            if fy != 1 or fx != 1:
                # a binned pixel that holds any part of a bad one is bad
                mask = array_tools.rebin(mask.astype(np.float32), scale=(fy, fx), crop=crop) > 0
            self._set_mask(out if out is not None else result, mask)
        return result

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
            Number of azimuthal bins, 1 or more (``None`` is refused: radial profiles come
            from :meth:`get_azimuthal_integral1d`).
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
            that constant in every covered bin; bins covering no pixel give NaN). True or
            False (or 0 or 1) only.
        inplace : bool
            Replace this signal by the result (returns None).
        radial_unit : {None, "q", "2theta_deg", "2theta_rad"}
            None: the signal's own units (pixels, 1/Å, 1/nm, ...). "q" = 2 pi k, for a
            detector in 1/Å or 1/nm (pyxem's q units are read as q already). 2theta needs
            the scale in 1/Å or 1/nm and ``calibration.beam_energy``; a radial range past
            90 degrees is refused.
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

        if npt_azim is None:  # the operation's "no azimuth": radial profiles, not a polar image
            raise ValueError("npt_azim must be a number of azimuthal bins (1 or more); for "
                             "radial profiles use get_azimuthal_integral1d")
        result = azimuthal_integral(self, npt, npt_azim, radial_range=radial_range,
                                    azimuth_range=azimuth_range, mask=mask, mean=mean,
                                    radial_unit=radial_unit, azimuth_unit=azimuth_unit,
                                    curved_ewald=curved_ewald, affine=affine, dtype=dtype)
        return as_signal(result, replace=self if inplace else None)

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

        result = azimuthal_integral(self, npt, None, radial_range=radial_range,
                                    azimuth_range=azimuth_range, mask=mask, mean=mean,
                                    radial_unit=radial_unit, azimuth_unit=azimuth_unit,
                                    curved_ewald=curved_ewald, affine=affine, dtype=dtype)
        return as_signal(result, replace=self if inplace else None)

    # -- generic operations ----------------------------------------------------------
    def map_frames(self, function, output_shape=None, dtype=None, signal_type=None, **kwargs):
        """Apply a vectorised function to stacks of frames, on whatever device they are.

        Unlike HyperSpy's ``map``, ``function`` receives many frames at once, as an
        array ``(n, rows, columns)`` of the signal's own kind (NumPy, or CuPy after
        :meth:`to_device`), and must return ``(n, *output_shape)``. The output shape and
        dtype are declared, not found by running the function on the host, so a
        GPU-only function works in a lazy graph. Use ``array_module(frames)`` inside it
        to write it once for both.

        Parameters
        ----------
        function : callable
            ``function(frames, **kwargs) -> array``. ``frames`` come in the machine's byte
            order whatever the file's (big-endian Merlin data are swapped a block at a time),
            so numba functions take them too.
        output_shape : tuple of int, optional
            Result per frame; default the detector shape (an image-to-image operation).
        dtype : dtype, optional
            Result dtype; default the signal's, which then must hold the function's results
            exactly (a ``TypeError`` names the dtype to declare otherwise: the frame sums of
            a uint16 signal are uint64, and cast to uint16 they would wrap).
        signal_type : str, optional
            Signal type of the result (default: ``"diffraction_patterns"`` when the
            output has the detector's shape, else HyperSpy's generic signal). Move a
            generic device-resident result with ``diffgpu.to_host(result)``.

        Returns
        -------
        signal, lazy if this one is.

        Raises
        ------
        TypeError
            When ``function`` returns something other than an array of the frames' own
            kind (a NumPy array for frames on a GPU, a list, ...), as each block is computed.
        ValueError
            When its result for ``n`` frames is not of shape ``(n, *output_shape)``. A
            result in another dtype than a declared ``dtype`` is converted to it (but not
            complex to real: ``TypeError``).

        Examples
        --------
        >>> import diffgpu
        >>> from diffgpu.device import array_module
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32))
        >>> def log_scale(frames):
        ...     xp = array_module(frames)          # numpy or cupy
        ...     return xp.log1p(frames.astype(xp.float32))
        >>> s.map_frames(log_scale, dtype="float32")
        <LazyDiffractionPatterns, title: Synthetic 4D-STEM, dimensions: (4, 4|32, 32)>
        >>> maxima = s.map_frames(lambda f: f.max(axis=(1, 2)), output_shape=())
        >>> maxima.data.shape
        (4, 4)
        """
        from ..kernels.dtypes import native_byte_order
        from ..mapping import map_frames

        detector = tuple(self.data.shape[-2:])
        if output_shape is None:
            output_shape = detector
        elif isinstance(output_shape, (int, np.integer)) and not isinstance(output_shape, bool):
            output_shape = (int(output_shape),)
        else:
            output_shape = tuple(int(n) for n in output_shape)
        if any(n < 0 for n in output_shape):
            raise ValueError(f"output_shape must not be negative; got {output_shape}")
        declared = dtype is not None
        dtype = np.dtype(dtype) if declared else self.data.dtype.newbyteorder("=")
        if dtype.kind not in "biufc":
            raise TypeError(f"dtype must be a number or bool type; got {dtype}")

        def run(frames):
            # frames in native byte order (a copy per block only for big-endian files such as
            # Merlin's), so numba and CuPy functions take them
            out = function(native_byte_order(frames), **kwargs)
            return _checked_output(out, frames, output_shape, dtype, function, declared)

        result = map_frames(self.data, run, output_shape, dtype)
        if output_shape == detector and signal_type in (None, "diffraction_patterns"):
            return self._deepcopy_with_new_data(result)
        from ..results import OperationResult

        axes = self.axes_manager._get_navigation_axes_dicts() + [
            {"size": n, "navigate": False} for n in output_shape]
        out = as_signal(OperationResult(result, axes, {"General": {
            "title": self.metadata.General.title}}, "", lazy=self._lazy))
        if signal_type:
            out.set_signal_type(signal_type)
        return out

    # -- virtual imaging ------------------------------------------------------------
    def get_virtual_image(self, rois, normalize=False):
        """Virtual images for one or many detectors, all in one pass over the data.

        Parameters
        ----------
        rois : ROI, array or list of them
            HyperSpy ``CircleROI`` (a disc, or an annulus with ``r_inner``) or
            ``RectangularROI``, in the signal's calibrated units, or detector-shaped
            masks (bool, or float weights; a nested list of rows of numbers is one mask).
            Pixels are weighted by the exact fraction of their area inside a circle,
            annulus or rectangle. ``calibration.mask`` pixels are always left out (weight 0).
            An ROI with values HyperSpy left undefined, a circle whose ``r`` is not a finite
            positive number, an annulus whose ``r_inner`` is not below ``r``, or a detector
            that covers no (unmasked) pixel, raises ``ValueError``. (HyperSpy itself keeps
            ``r_inner`` below ``r`` by ignoring a value that breaks it: ``CircleROI(r=5,
            r_inner=10)`` is a disc of radius 5 before diffgpu sees it.)
        normalize : bool
            Divide by each detector's area (mean per pixel) instead of summing (pyxem's
            ``normalize`` divides each image by its maximum instead).

        Returns
        -------
        VirtualImages or LazyVirtualImages
            Navigation axis ``detector`` (one image per ROI) and the scan as the signal;
            for a single ROI (not in a list), just its image. A scan with one navigation
            axis (a line scan or a stack of frames) gives :class:`VirtualProfiles` or
            :class:`LazyVirtualProfiles` (one profile along the scan per ROI); a single frame
            or a scan of three axes or more, HyperSpy's generic signal of those dimensions,
            with the same axes. Lazy in gives lazy out,
            device in gives device out. A NaN or inf pixel that a detector weighs (inside
            it and not in ``calibration.mask``) makes that detector's value NaN for that
            frame; pixels a detector does not weigh never affect it.

        Examples
        --------
        >>> import diffgpu, hyperspy.api as hs
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(8, 8), sig_shape=(64, 64))
        >>> bf = hs.roi.CircleROI(cx=0, cy=0, r=3)            # calibrated units: px from the centre
        >>> adf = hs.roi.CircleROI(cx=0, cy=0, r=30, r_inner=12)
        >>> images = s.get_virtual_image([bf, adf])
        >>> images
        <LazyVirtualImages, title: Virtual image of Synthetic 4D-STEM, dimensions: (2|8, 8)>
        >>> images.compute()
        """
        from ..virtual import virtual_images

        return as_signal(virtual_images(self, rois, normalize=normalize))

    def get_integrated_intensity(self, roi):
        """The virtual image of one detector (an ROI or a mask): see :meth:`get_virtual_image`.

        Examples
        --------
        >>> import diffgpu, hyperspy.api as hs
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32), lazy=False)
        >>> s.get_integrated_intensity(hs.roi.RectangularROI(-4, -4, 4, 4)).data.shape
        (4, 4)
        """
        return self.get_virtual_image(roi)

    # -- beam position and centring --------------------------------------------------
    def center_of_mass(self, mask=None, threshold=None):
        """Centre of mass of every pattern, as a shift from ``calibration.center``.

        One matrix product gives the three moments of all frames in a block (BLAS
        or cuBLAS), so it runs at memory speed.

        Parameters
        ----------
        mask : (x, y, r), HyperSpy ROI or array-like, optional
            Where to take the centre of mass: a disc (pixels), a ``CircleROI`` (an annulus
            with ``r_inner``) or ``RectangularROI`` in calibrated units about
            ``calibration.center``, or detector-shaped weights. ``calibration.mask`` pixels
            are always left out, whatever they hold.
        threshold : float, optional
            Ignore pixels below ``threshold`` times each frame's mean intensity (as in
            pyxem), e.g. to suppress diffuse scattering.

        Returns
        -------
        DirectBeamShifts or LazyDirectBeamShifts
            ``(x, y)`` shifts in pixels; NaN where a frame has no intensity in the region.
            NaN and inf pixels count as 0 (left out, as in azimuthal integration), so one
            bad pixel does not lose its frame.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(64, 64), lazy=False)
        >>> cx, cy = s.calibration.center
        >>> shifts = s.center_of_mass(mask=(cx, cy, 8))
        >>> shifts.data.shape
        (4, 4, 2)
        """
        from ..beam import center_of_mass

        return as_signal(center_of_mass(self, mask=mask, threshold=threshold))

    def get_direct_beam_position(self, method="center_of_mass", mask=None, threshold=None,
                                 sigma=None, radius=None, window=None):
        """Sub-pixel position of the direct beam in every pattern, as shifts from the centre.

        Parameters
        ----------
        method : {"center_of_mass", "blur", "cross_correlate"}
            ``"center_of_mass"``: the centre of mass in ``mask`` (see
            :meth:`center_of_mass`). ``"blur"``: the maximum of the pattern blurred with a
            Gaussian of ``sigma`` pixels, refined by the centre of mass within ``window``
            pixels of it (a beam wider than ``window``, whose blurred maximum is a plateau,
            is centred by its half-maximum extent and a centre of mass over the whole
            disc). ``"cross_correlate"``: the peak of the cross-correlation with a disc of
            ``radius`` pixels (the beam's size, at most half the smaller detector side),
            refined within ``window``.
            The last two ignore the rest of the pattern, so rings and Bragg spots away from
            the beam do not bias them. All three count NaN, inf and ``calibration.mask``
            pixels as 0.
        mask, threshold : see :meth:`center_of_mass`
            ``"center_of_mass"`` only: with another method they raise ``TypeError`` (leave
            pixels out with ``calibration.mask`` instead).
        sigma : float, optional
            Blur in pixels (``"blur"``; default 2). An option given to a method that does not
            take it (``sigma`` or ``radius`` with ``"center_of_mass"``, ...) raises
            ``TypeError``.
        radius : float
            Beam disc radius in pixels (``"cross_correlate"``, required).
        window : float, optional
            Refinement radius in pixels; default ``4 * sigma`` (blur) or ``radius``.

        Returns
        -------
        DirectBeamShifts or LazyDirectBeamShifts
            ``(x, y)`` in pixels from ``calibration.center``; lazy in, lazy out. NaN for a
            frame with no positive intensity (nothing to find).

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(64, 64))
        >>> shifts = s.get_direct_beam_position(method="cross_correlate", radius=2.0)
        >>> shifts.compute()
        """
        from ..beam import direct_beam_position

        return as_signal(direct_beam_position(self, method=method, mask=mask, threshold=threshold,
                                              sigma=sigma, radius=radius, window=window))

    def shift_diffraction(self, shift_x, shift_y=None, inplace=False):
        """Move every pattern by its own sub-pixel shift (bilinear, intensity-preserving).

        Parameters
        ----------
        shift_x : float, array or DirectBeamShifts
            x shifts in pixels (scalar or scan-shaped); or, with ``shift_y=None``, a
            :class:`DirectBeamShifts` / array of shape ``scan + (2,)`` holding (x, y).
        shift_y : float or array, optional
            y shifts in pixels.
        inplace : bool
            Replace this signal's data.

        Returns
        -------
        DiffractionPatterns (lazy if this is), float32; content at (x, y) moves to
        (x + dx, y + dy). The total intensity changes only by what leaves the detector.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(32, 32), lazy=False)
        >>> moved = s.shift_diffraction(0.5, -1.25)
        >>> moved.data.dtype
        dtype('float32')
        """
        from ..beam import shift_diffraction

        return shift_diffraction(self, shift_x, shift_y, inplace=inplace)

    def center_direct_beam(self, shifts=None, method="center_of_mass", inplace=False, **kwargs):
        """Shift every pattern so that its direct beam sits on ``calibration.center``.

        Parameters
        ----------
        shifts : DirectBeamShifts or array, optional
            Where the beam is (e.g. from :meth:`get_direct_beam_position`, perhaps
            smoothed with :meth:`DirectBeamShifts.fit_plane`); found with ``method`` and
            ``**kwargs`` (see :meth:`get_direct_beam_position`) if not given. A pyxem
            ``BeamShift`` (the detector's middle less the beam) is converted to diffgpu's
            convention (the beam less ``calibration.center``).
        inplace : bool
            Replace this signal's data.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(64, 64))
        >>> shifts = s.get_direct_beam_position(method="blur", sigma=2, window=6)
        >>> centred = s.center_direct_beam(shifts=shifts.fit_plane())
        """
        from ..beam import center_direct_beam

        return center_direct_beam(self, shifts=shifts, method=method, inplace=inplace, **kwargs)

    # -- Bragg disks and strain -------------------------------------------------------
    def find_bragg_disks(self, radius=None, template=None, threshold=0.0,
                         relative_threshold=0.01, min_spacing=None, edge=None, mask=None,
                         max_disks=128, correlation_power=1.0, sigma=1.0, refine_iterations=6):
        """Bragg disks of every pattern by template cross-correlation -> :class:`BraggVectors`.

        Each frame is cross-correlated with a probe template (FFTs on the frames' device),
        local maxima above the thresholds become disks, and each is refined below the
        pixel on the correlation (cubic-spline interpolation, Newton steps; see
        :mod:`diffgpu.kernels.disks` for the measured bias). Lazy in, lazy out; CuPy blocks
        are processed on the GPU.

        Parameters
        ----------
        radius : float, optional
            Disk radius in pixels: the template is an anti-aliased disk.
        template : array or Signal2D, optional
            A measured vacuum probe image instead of ``radius`` (any size; it is centred).
        threshold : float
            Minimum correlation (about the mean counts per pixel in a disk).
        relative_threshold : float
            Minimum as a fraction of each frame's strongest disk, but of at most 10 times
            its second strongest (a bright direct beam does not hide the disks) and at
            least a hundredth of the strongest.
        min_spacing : float, optional
            A disk must be the maximum within this many pixels (square window); default
            the radius.
        edge : int, optional
            Ignore disks centred within this many pixels of the border; default radius + 1.
        mask : array, optional
            Detector-shaped, True = no disk there; combined with ``calibration.mask``.
        max_disks : int
            Capacity per pattern (the strongest are kept).
        correlation_power : float
            1 cross-correlation, 0 phase correlation, between: hybrid (as py4DSTEM's
            ``corrPower``).
        sigma : float
            Gaussian smoothing (pixels) of the correlation; 1 keeps the sub-pixel bias at
            a few thousandths of a pixel on sharp disks.
        refine_iterations : int
            Newton steps of the sub-pixel refinement (0: whole pixels).

        Returns
        -------
        BraggVectors or LazyBraggVectors
            ``(..., max_disks, 3)`` of (x, y, intensity), NaN-padded.

        Examples
        --------
        >>> from diffgpu.synthetic_nbed import synthetic_nbed
        >>> s = synthetic_nbed(nav_shape=(2, 2), sig_shape=(96, 96))
        >>> vectors = s.find_bragg_disks(radius=4.0)
        >>> vectors
        <BraggVectors, title: Bragg disks of Synthetic NBED, dimensions: (2, 2|3, 128)>
        >>> int(vectors.n_disks()[0, 0]) > 10
        True
        """
        from ..disks import find_bragg_disks
        from .bragg_vectors import BraggVectors, LazyBraggVectors

        data, axes, md = find_bragg_disks(
            self, radius=radius, template=template, threshold=threshold,
            relative_threshold=relative_threshold, min_spacing=min_spacing, edge=edge,
            mask=mask, max_disks=max_disks, correlation_power=correlation_power, sigma=sigma,
            refine_iterations=refine_iterations)
        cls = LazyBraggVectors if self._lazy else BraggVectors
        return cls(data, axes=axes, metadata=md,
                   original_metadata=self.original_metadata.as_dictionary())

    def calibrate_from_rings(self, d_spacings=None, phase=None, units="1/Å", **kwargs):
        """Centre, scale and elliptical distortion from a ring standard, stored in
        :attr:`calibration` (``center``, ``scale``, ``units``, ``affine``).

        These patterns (their mean, for a scan) must show the rings of a polycrystalline
        standard with known ``d_spacings`` (Å) or an orix ``phase``; see
        :func:`diffgpu.ring_calibration.calibrate_from_rings` for the method and the other
        keywords. Azimuthal integration and strain maps then use the result.

        Returns
        -------
        RingCalibration

        Examples
        --------
        >>> import diffgpu
        >>> from diffgpu.synthetic_nbed import ring_pattern
        >>> img = ring_pattern((192, 192), center=(97.0, 95.0), scale=0.016)
        >>> s = diffgpu.DiffractionPatterns(img)
        >>> result = s.calibrate_from_rings(d_spacings=[2.3546, 2.0391, 1.4419, 1.2296, 1.1773])
        >>> round(s.calibration.scale[0], 4), s.calibration.units
        (0.016, '1/Å')
        """
        from ..ring_calibration import calibrate_from_rings

        data = self.data
        if self.axes_manager.navigation_dimension:
            data = data.reshape((-1,) + data.shape[-2:]).mean(axis=0)
        result = calibrate_from_rings(data, d_spacings=d_spacings, phase=phase,
                                      mask=self.calibration.mask, **kwargs)
        result.apply(self, units=units)
        return result

    # -- detector clean-up ------------------------------------------------------------
    def find_bad_pixels(self, threshold=5.0, set_mask=False):
        """Hot and dead pixels, from the mean pattern (one pass over the data).

        A pixel is hot when its mean is more than ``threshold`` times the median of its
        neighbours on the detector (8 inside it, 5 on an edge, 3 in a corner; a median
        follows rings and the beam's edge but not a lone pixel), and
        dead when it is zero in every pattern while its neighbours are not. A pixel that is
        NaN or inf in any pattern is bad too, and its neighbours are judged on their finite
        neighbours only. Pixels already in ``calibration.mask`` (a quad detector's gap) are
        left out of the medians and not reported again.

        Returns
        -------
        numpy.ndarray of bool
            Detector-shaped, True = bad. With ``set_mask=True`` it is also added to
            ``calibration.mask``, so integration and centre of mass leave those pixels out.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32), lazy=False)
        >>> s.data[..., 5, 7] = 60000
        >>> bool(s.find_bad_pixels()[5, 7])
        True
        """
        from ..cleanup import find_bad_pixels

        return find_bad_pixels(self, threshold=threshold, set_mask=set_mask)

    def correct_bad_pixels(self, mask=None, inplace=False):
        """Replace bad pixels by the mean of their good 3 x 3 neighbours (lazily).

        The middle of a cluster (no good neighbour) takes the mean of the pixels filled
        around it, layer by layer; a detector that is all bad stays 0. Only the bad pixels
        and their neighbours are read. ``mask`` defaults to ``calibration.mask``. float32
        and float64 data keep their dtype (in this machine's byte order); integer and
        float16 data become float32. A lazy result declares the dtype it computes. The
        pixels filled leave ``calibration.mask`` of the result (they hold estimates now,
        which later steps use); masked pixels that could not be filled, or that were not in
        ``mask``, stay in it.

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.ones((2, 8, 8), dtype="float32"))
        >>> s.data[:, 3, 3] = 1000
        >>> bad = np.zeros((8, 8), bool); bad[3, 3] = True
        >>> float(s.correct_bad_pixels(mask=bad).data[0, 3, 3])
        1.0
        """
        from ..cleanup import correct_bad_pixels

        return correct_bad_pixels(self, mask=mask, inplace=inplace)

    def flat_field(self, gain=None, dark=None, inplace=False):
        """Dark and gain correction, ``(frame - dark) * gain``, as float32 (lazily).

        Examples
        --------
        >>> import numpy as np, diffgpu
        >>> s = diffgpu.DiffractionPatterns(np.full((2, 4, 4), 10, dtype="uint16"))
        >>> float(s.flat_field(gain=np.full((4, 4), 0.5), dark=np.full((4, 4), 2)).data[0, 0, 0])
        4.0
        """
        from ..cleanup import flat_field

        return flat_field(self, gain=gain, dark=dark, inplace=inplace)


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

    def _get_dask_chunks(self, axis=None, dtype=None):
        # in-memory patterns made lazy (as_lazy) get diffgpu's chunks of whole frames, sized to
        # keep every core busy (diffgpu.chunking.frame_chunks), not dask's ~128 MiB blocks:
        # 1,024 patterns of 192 x 192 float32 were two chunks, one per thread at best
        ndim = self.data.ndim
        frames_last = sorted(ax.index_in_array for ax in self.axes_manager.signal_axes) == \
            [ndim - 2, ndim - 1]
        if axis is not None or not frames_last:
            return super()._get_dask_chunks(axis=axis, dtype=dtype)
        from ..chunking import frame_chunks

        shape = self.data.shape
        frame_bytes = shape[-2] * shape[-1] * np.dtype(dtype or self.data.dtype).itemsize
        return frame_chunks(shape[:-2], frame_bytes) + ((shape[-2],), (shape[-1],))
