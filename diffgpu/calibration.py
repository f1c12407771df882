"""Detector calibration of a :class:`~diffgpu.DiffractionPatterns` signal.

Pixel-coordinate convention (used by every geometry in diffgpu)
----------------------------------------------------------------
A detector frame is the array ``frame[row, column]``.  Pixel coordinates are
``(x, y) = (column, row)`` and **the centre of pixel (row 0, column 0) is at
(x, y) = (0.0, 0.0)**; that pixel covers ``-0.5 <= x < 0.5`` and
``-0.5 <= y < 0.5``.  The centre of a 256 x 256 detector is therefore at
(127.5, 127.5), which is also where diffsims puts the direct beam by default.

The beam centre is kept in the signal axes, not beside them: the calibrated
coordinate of pixel ``i`` along an axis is ``offset + i * scale`` (HyperSpy's
rule) and the centre is where that coordinate is zero, so
``center = -offset / scale``.  Cropping with ``isig``, rebinning and saving
therefore keep the centre right without any bookkeeping.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["Calibration", "electron_wavelength", "beam_energy_from_wavelength", "check_mask",
           "detector_image", "uniform_signal_axes"]

# CODATA 2018 constants, SI
_H = 6.62607015e-34
_M0 = 9.1093837015e-31
_E = 1.602176634e-19
_C = 299792458.0


def electron_wavelength(beam_energy_kev):
    """Relativistic electron wavelength in ångström for a beam energy in keV.

    Examples
    --------
    >>> from diffgpu.calibration import electron_wavelength
    >>> round(electron_wavelength(200.0), 5)
    0.02508
    """
    beam_energy_kev = _positive_finite(beam_energy_kev, "beam_energy", "keV")
    ev = beam_energy_kev * 1e3 * _E
    return _H / math.sqrt(2 * _M0 * ev * (1 + ev / (2 * _M0 * _C**2))) * 1e10


def beam_energy_from_wavelength(wavelength_angstrom):
    """Beam energy in keV whose relativistic electron wavelength is the given one (Å).

    Examples
    --------
    >>> from diffgpu.calibration import beam_energy_from_wavelength
    >>> round(beam_energy_from_wavelength(0.025079), 2)
    200.0
    """
    wavelength_angstrom = _positive_finite(wavelength_angstrom, "wavelength", "Å")
    p = _H / (wavelength_angstrom * 1e-10)  # momentum
    mc2 = _M0 * _C**2
    kinetic = math.sqrt((p * _C) ** 2 + mc2**2) - mc2
    return kinetic / _E / 1e3


class Calibration:
    """Calibration view of a diffraction signal: centre, scale, units, mask, beam energy.

    Get it as ``s.calibration``; every attribute reads from and writes to the
    signal itself (its signal axes and metadata), so it survives slicing,
    ``deepcopy``, saving and loading.

    Attributes
    ----------
    center : tuple of float
        Direct-beam centre ``(x, y)`` in pixels (see the module docstring for the
        convention). Setting ``None`` puts it at the middle of the detector.
    scale : tuple of float
        Pixel size ``(x, y)`` in ``units``; set one number for square pixels.
        Setting the scale keeps the centre (in pixels) where it was.
    units : str or None
        Units of the signal axes, e.g. ``"px"``, ``"1/nm"``, ``"1/Å"`` (None where
        unset; a pair ``(x, y)`` if the two axes differ). Set a string for both axes,
        a pair ``(x, y)`` (strings or None) for each, or None to unset them.
    mask : numpy.ndarray of bool or None
        Detector-shaped ``(rows, columns)``; **True marks pixels to exclude**
        (bad pixels, beam stop), as in NumPy masked arrays and pyxem. Set a bool
        array, or numbers that are all 0 or 1 (1 = excluded); None removes it.
    beam_energy : float or None
        Accelerating voltage in keV (``metadata.Acquisition_instrument.TEM.beam_energy``):
        a positive, finite number; None removes it.
    wavelength : float or None
        Relativistic electron wavelength in Å, derived from ``beam_energy``;
        setting it (positive, finite) sets ``beam_energy``; None removes both.
    affine : 2x2 numpy.ndarray or None
        Distortion correction applied to ``(x - cx, y - cy)`` before the scale (e.g. an
        elliptical pattern made circular), used by azimuthal integration (when no
        ``affine`` is passed) and by the strain map; set by
        :func:`diffgpu.ring_calibration.calibrate_from_rings` (``metadata.Diffraction.affine``).

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> s = diffgpu.DiffractionPatterns(np.zeros((2, 64, 64), dtype="uint16"))
    >>> s.calibration.center = None          # middle of the detector
    >>> s.calibration.center
    (31.5, 31.5)
    >>> s.calibration.scale = 0.02
    >>> s.calibration.units = "1/nm"
    >>> s.calibration.beam_energy = 200
    >>> round(s.calibration.wavelength, 5)
    0.02508
    """

    def __init__(self, signal):
        self._signal = signal

    # -- geometry kept in the axes ------------------------------------------------
    @property
    def _axes(self):
        return uniform_signal_axes(self._signal)

    @property
    def detector_shape(self):
        """``(rows, columns)`` of one frame."""
        ax_x, ax_y = self._axes
        return (ax_y.size, ax_x.size)

    @property
    def center(self):
        return tuple(float(-ax.offset / ax.scale) for ax in self._axes)

    @center.setter
    def center(self, value):
        if value is None:
            ny, nx = self.detector_shape
            value = ((nx - 1) / 2, (ny - 1) / 2)
        cx, cy = _pair(value, "center")
        for ax, c in zip(self._axes, (cx, cy)):
            ax.offset = -c * ax.scale

    @property
    def scale(self):
        return tuple(float(ax.scale) for ax in self._axes)

    @scale.setter
    def scale(self, value):
        sx, sy = _pair(value, "scale")
        if not (sx > 0 and sy > 0):
            raise ValueError(f"scale must be positive; got {(sx, sy)}")
        center = self.center
        for ax, s, c in zip(self._axes, (sx, sy), center):
            ax.scale = s
            ax.offset = -c * s

    @property
    def units(self):
        ux, uy = (ax.units if isinstance(ax.units, str) else None for ax in self._axes)
        return ux if ux == uy else (ux, uy)

    @units.setter
    def units(self, value):
        import traits.api as t

        if value is None or isinstance(value, str):
            pair = (value, value)
        elif (isinstance(value, (tuple, list)) and len(value) == 2
              and all(u is None or isinstance(u, str) for u in value)):
            pair = tuple(value)
        else:
            raise TypeError(f"units must be a string (both axes), None (unset) or a pair (x, y) "
                            f"of them; got {value!r}")
        for ax, u in zip(self._axes, pair):
            ax.units = t.Undefined if u is None else u  # HyperSpy's "unset"

    # -- distortion, mask and beam, kept in metadata ------------------------------
    @property
    def affine(self):
        md = self._signal.metadata
        if not md.has_item("Diffraction.affine"):
            return None
        return np.asarray(md.get_item("Diffraction.affine"), dtype=float).reshape(2, 2)

    @affine.setter
    def affine(self, value):
        md = self._signal.metadata
        if value is None:
            if md.has_item("Diffraction.affine"):
                del md.Diffraction.affine
            return
        m = np.asarray(value, dtype=float)
        if m.shape != (2, 2) or not np.all(np.isfinite(m)) or np.linalg.det(m) == 0:
            raise ValueError(f"affine must be an invertible 2x2 matrix; got {value!r}")
        md.set_item("Diffraction.affine", m.tolist())

    @property
    def mask(self):
        md = self._signal.metadata
        return md.get_item("Diffraction.mask") if md.has_item("Diffraction.mask") else None

    @mask.setter
    def mask(self, value):
        md = self._signal.metadata
        if value is None:
            if md.has_item("Diffraction.mask"):
                del md.Diffraction.mask
            return
        md.set_item("Diffraction.mask", check_mask(value, self.detector_shape))

    @property
    def beam_energy(self):
        key = "Acquisition_instrument.TEM.beam_energy"
        md = self._signal.metadata
        return float(md.get_item(key)) if md.has_item(key) else None

    @beam_energy.setter
    def beam_energy(self, value):
        key = "Acquisition_instrument.TEM.beam_energy"
        if value is None:
            if self._signal.metadata.has_item(key):
                del self._signal.metadata.Acquisition_instrument.TEM.beam_energy
            return
        value = _positive_finite(value, "beam_energy", "keV")
        self._signal.metadata.set_item(key, value)

    @property
    def wavelength(self):
        e = self.beam_energy
        return None if e is None else electron_wavelength(e)

    @wavelength.setter
    def wavelength(self, value):
        self.beam_energy = None if value is None else beam_energy_from_wavelength(value)

    def __repr__(self):
        cx, cy = self.center
        sx, sy = self.scale
        mask = self.mask
        masked = "none" if mask is None else f"{int(mask.sum())} pixels"
        energy = self.beam_energy
        beam = "unknown" if energy is None else f"{energy:g} keV ({self.wavelength:.5f} Å)"
        return (
            f"<Calibration: center=({cx:g}, {cy:g}) px, scale=({sx:g}, {sy:g}) {self.units}, "
            f"mask={masked}, beam={beam}>"
        )


def uniform_signal_axes(signal):
    """The signal's detector axes ``(x, y)`` (columns, rows), checked to be uniform.

    Raises
    ------
    ValueError
        If an axis is not uniform (an ``offset + i * scale`` axis): the centre, the pixel
        size and every detector geometry are defined by them.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> from diffgpu.calibration import uniform_signal_axes
    >>> s = diffgpu.DiffractionPatterns(np.zeros((4, 5)))
    >>> [ax.size for ax in uniform_signal_axes(s)]
    [5, 4]
    """
    axes = signal.axes_manager.signal_axes
    odd = [f"{i} ({'x' if i == 0 else 'y'})" for i, ax in enumerate(axes[:2])
           if not getattr(ax, "is_uniform", True)]
    if odd:
        raise ValueError(f"diffgpu needs uniform detector axes (offset + index * scale); signal "
                         f"axis {' and '.join(odd)} is not uniform: make it uniform first, e.g. "
                         "with signal.axes_manager.signal_axes[i].convert_to_uniform_axis()")
    return axes[0], axes[1]  # x (columns), y (rows)


def _real(value):
    """``value`` as a float if it is a real number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _positive(value):
    """``value`` as a float if it is a finite, positive real number (not a bool), else None."""
    v = _real(value)
    return v if v is not None and math.isfinite(v) and v > 0 else None


def _whole(value):
    """Whether ``value`` is an integer (not a bool)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def _positive_finite(value, name, unit):
    """``value`` as a float, checked to be a real number, positive and finite."""
    if _real(value) is None:
        raise TypeError(f"{name} must be a number ({unit}); got {value!r} "
                        f"({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite ({unit}); got {value!r}")
    return float(value)


def _pair(value, name):
    try:
        arr = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):  # e.g. a string: say what is expected
        arr = np.array([])
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be one finite number or a pair (x, y); got {value!r}")
    return float(arr[0]), float(arr[1])


def check_mask(mask, detector_shape):
    """Validate a detector mask and return it as a boolean NumPy array.

    Parameters
    ----------
    mask : array-like
        ``(rows, columns)`` array: bool (True marks excluded pixels), or integers or
        floats that are all 0 or 1 (1 marks excluded pixels).
    detector_shape : tuple of int
        ``(rows, columns)`` of one frame.

    Raises
    ------
    ValueError
        If the shape differs from the detector's, or the values are not bool or all 0 or 1
        (e.g. 0.5 or NaN: as bool they would silently exclude every such pixel).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.calibration import check_mask
    >>> check_mask(np.zeros((4, 5)), (4, 5)).dtype
    dtype('bool')
    """
    from .device import to_host_array

    mask = np.asarray(to_host_array(mask))
    if mask.shape != tuple(detector_shape):
        raise ValueError(
            f"mask shape {mask.shape} does not match the detector shape {tuple(detector_shape)} "
            "(rows, columns)"
        )
    if mask.dtype == bool:
        return mask
    # (the command line's --mask goes through here too)
    ok = mask.dtype.kind in "iuf"
    bad = mask[~np.isin(mask, (0, 1))].ravel()[:1] if ok else None
    if not ok or bad.size:
        what = f"{mask.dtype} values other than 0 and 1 (e.g. {bad[0].item()!r})" if ok else \
            f"{mask.dtype} values"
        raise ValueError("a mask must be bool (True = excluded) or numbers that are all 0 or 1 "
                         f"(1 = excluded); got {what}")
    return mask.astype(bool)


def _brief(value):
    """``value`` named in an error message: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def detector_image(value, detector_shape, name):
    """A detector-shaped float32 host array from an array or signal, checked for shape and NaN.

    Used for weights, gain and dark images and centre-of-mass regions.

    Raises
    ------
    ValueError
        If the shape differs from the detector's or a value is NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.calibration import detector_image
    >>> detector_image(np.ones((4, 5)), (4, 5), "gain").dtype
    dtype('float32')
    """
    from .device import to_host_array

    try:
        arr = np.asarray(to_host_array(getattr(value, "data", value)), dtype=np.float32)
    except (TypeError, ValueError) as err:  # ragged lists, strings, objects
        raise TypeError(f"{name} must be an array of numbers of the detector's shape "
                        f"{tuple(detector_shape)} (rows, columns); got {_brief(value)}") from err
    if arr.shape != tuple(detector_shape):
        raise ValueError(f"{name} shape {arr.shape} does not match the detector shape "
                         f"{tuple(detector_shape)} (rows, columns)")
    if not np.all(np.isfinite(arr)):
        bad = ~np.isfinite(arr)
        where = np.argwhere(bad)[0]
        hint = (" (a gain made as mean(flat) / flat is inf where the flat field is 0: give "
                "those pixels a gain of 0 and add them to calibration.mask)" if name == "gain"
                else "")
        raise ValueError(f"{name} contains NaN or inf at {int(bad.sum())} pixels, the first at "
                         f"(row, column) {tuple(int(i) for i in where)}{hint}")
    return arr
