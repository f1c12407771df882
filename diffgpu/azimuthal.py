"""Azimuthal integration of diffraction signals (1D and 2D), on the host or a GPU.

The signal methods :meth:`DiffractionPatterns.get_azimuthal_integral1d` and
:meth:`DiffractionPatterns.get_azimuthal_integral2d` call :func:`azimuthal_integral`,
which turns the calibration into a :class:`~diffgpu.geometry.PolarGeometry`,
fetches the cached :class:`~diffgpu.kernels.integration.IntegrationEngine` for
it, and applies it eagerly or through ``map_blocks`` (lazy), on whatever kind
of blocks the signal has.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections import OrderedDict

import numpy as np

from .calibration import check_mask
from .device import host_threads, is_device_array
from .geometry import PolarGeometry, integration_matrix, mask_digest
from .kernels.integration import IntegrationEngine
from .mapping import map_frames
from .results import OperationResult, derived_metadata

__all__ = ["azimuthal_integral", "get_engine"]

_ENGINES: OrderedDict = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 16

# reciprocal-length units of the detector scale (compared case-insensitively) -> the length they
# are the inverse of, in Å. pyxem's "q_..." units measure q = 2 pi k: one of them is a k of
# 1 / (2 pi Å), the inverse of 2 pi Å.
_ANGSTROM_PER_UNIT = {u.casefold(): f for u, f in {
    "1/Å": 1.0, "1/A": 1.0, "Å^-1": 1.0, "A^-1": 1.0, "Å⁻¹": 1.0, "1/angstrom": 1.0, "k_A^-1": 1.0,
    "1/nm": 10.0, "nm^-1": 10.0, "nm⁻¹": 10.0, "k_nm^-1": 10.0,
    "q_A^-1": 2 * math.pi, "q_nm^-1": 20 * math.pi,
}.items()}
# pyxem's k units -> its name for q in the same length unit (the q axis of such a signal)
_PYXEM_Q = {"k_a^-1": "q_A^-1", "k_nm^-1": "q_nm^-1"}


def _angstrom_per(units):
    """Å per length unit of reciprocal-length ``units`` (None if they are not one)."""
    return _ANGSTROM_PER_UNIT.get(units.casefold()) if isinstance(units, str) else None


def get_engine(geom, mask=None):
    """The integration engine for a geometry and mask, built once and cached (16 most recent).

    Examples
    --------
    >>> from diffgpu.azimuthal import get_engine
    >>> from diffgpu.geometry import PolarGeometry
    >>> g = PolarGeometry((32, 32), (15.5, 15.5), (1.0, 1.0), 8, 1, (0.0, 16.0), (-180.0, 180.0))
    >>> get_engine(g) is get_engine(g)
    True
    """
    key = (geom, mask_digest(mask))
    with _ENGINES_LOCK:
        if key in _ENGINES:
            _ENGINES.move_to_end(key)
            return _ENGINES[key]
    engine = IntegrationEngine(integration_matrix(geom, mask))
    with _ENGINES_LOCK:
        _ENGINES[key] = engine
        while len(_ENGINES) > _MAX_ENGINES:
            _ENGINES.popitem(last=False)
    return engine


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _range(value, name, lower=None, span=None):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (start, stop); got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be two finite numbers (start, stop); got {value!r}")
    if not hi > lo:
        raise ValueError(f"{name} must satisfy start < stop (an empty or inverted range); got {value!r}")
    if lower is not None and lo < lower:
        raise ValueError(f"{name} must start at {lower} or above; got {value!r}")
    if span is not None and hi - lo > span * (1 + 1e-12):
        raise ValueError(f"{name} may span at most {span:g}; got {value!r}")
    return lo, hi


def _common_units(cal):
    """The detector's units and scale ``(x, y)``, both in the x axis's unit.

    A y scale in another reciprocal-length unit (1/Å and 1/nm) is converted; other
    differing units cannot be, and are refused rather than read as the x axis's unit.
    """
    units, (sx, sy) = cal.units, cal.scale
    if not isinstance(units, tuple):
        return units, (sx, sy)
    ux, uy = units
    if _angstrom_per(ux) is None or _angstrom_per(uy) is None:
        raise ValueError(f"the detector axes have different units, x {ux!r} and y {uy!r}, and "
                         "only 1/Å and 1/nm can be converted into each other: set "
                         "calibration.scale and calibration.units in one unit for both axes")
    # a reciprocal length q in 1/uy is q * (length of ux / length of uy) in 1/ux
    return ux, (sx, sy * _angstrom_per(ux) / _angstrom_per(uy))


def _flag(value, name):
    """``value`` as a bool, refusing anything but a bool or 0 / 1 (e.g. the string "False")."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r}")


def _geometry(signal, npt, npt_azim, radial_range, azimuth_range, azimuth_unit, radial_unit,
              curved_ewald, affine):
    cal = signal.calibration
    units, scale = _common_units(cal)
    if azimuth_unit not in ("deg", "rad"):
        raise ValueError(f"azimuth_unit must be 'deg' or 'rad'; got {azimuth_unit!r}")
    to_deg = 1.0 if azimuth_unit == "deg" else 180.0 / math.pi
    if azimuth_range is None:
        az = (-180.0, 180.0)
    else:
        span = 360.0 if azimuth_unit == "deg" else 2 * math.pi
        az = tuple(v * to_deg for v in _range(azimuth_range, "azimuth_range", span=span))
        if azimuth_unit == "deg" and az[1] - az[0] <= 2 * math.pi + 1e-9:
            warnings.warn(f"azimuth_range {azimuth_range} is read in degrees; pass "
                          "azimuth_unit='rad' if it is in radians", UserWarning, stacklevel=4)

    wavelength = None
    unit = radial_unit or "k"
    if unit not in ("k", "q", "2theta_deg", "2theta_rad"):
        raise ValueError("radial_unit must be None (the signal's units), 'q', '2theta_deg' or "
                         f"'2theta_rad'; got {radial_unit!r}")
    per = _angstrom_per(units)
    if unit == "q":  # 2 pi k: k must be a reciprocal length, not pixels or mrad
        if per is None:
            raise ValueError("radial_unit='q' (2 pi k) needs the detector scale in a reciprocal "
                             f"length, 1/Å or 1/nm (calibration.units); it is {units!r}")
        if units.casefold().startswith("q_"):
            raise ValueError(f"the detector scale is already in q ({units!r}): integrate with "
                             "the default radial_unit=None for a q axis")
    if curved_ewald or unit.startswith("2theta"):
        asked = f"radial_unit={unit!r}" if unit.startswith("2theta") else "curved_ewald=True"
        if per is None:
            raise ValueError(f"{asked}: angles need the detector scale in 1/Å or 1/nm "
                             f"(calibration.units); it is {units!r}")
        if cal.wavelength is None:
            raise ValueError(f"{asked}: angles need the beam energy: set "
                             "s.calibration.beam_energy (keV)")
        wavelength = cal.wavelength / per  # in the detector's length unit
    if affine is None:
        affine = cal.affine  # e.g. from a ring-standard calibration
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (2, 2) or not np.all(np.isfinite(affine)) or np.linalg.det(affine) == 0:
            raise ValueError(f"affine must be an invertible 2x2 matrix; got {affine.tolist()}")
        affine = tuple(affine.ravel().tolist())

    geom = PolarGeometry(
        detector_shape=cal.detector_shape, center=tuple(cal.center), scale=scale,
        npt=npt, npt_azim=npt_azim, radial_range=(0.0, 1.0), azimuth_range=az, affine=affine,
        radial_unit=unit, wavelength=wavelength, curved=bool(curved_ewald),
    )
    if radial_range is None:  # out to the farthest detector corner
        ny, nx = cal.detector_shape
        cx, cy = cal.center
        corners = np.array([[-0.5 - cx, -0.5 - cy], [nx - 0.5 - cx, -0.5 - cy],
                            [-0.5 - cx, ny - 0.5 - cy], [nx - 0.5 - cx, ny - 0.5 - cy]])
        m = np.diag(geom.scale) @ (np.asarray(affine).reshape(2, 2) if affine else np.eye(2))
        rho = np.hypot(*(corners @ m.T).T).max()
        rr = (0.0, float(geom.output_radius(rho)))
    else:
        rr = _range(radial_range, "radial_range", lower=0.0)
        # scattering angles past 90 degrees never reach a flat detector (their bins would all
        # take the pixels at the largest angles); inf where the unit has no such limit
        limit = float(geom.output_radius(np.inf))
        if rr[1] > limit * (1 + 1e-12):
            raise ValueError(f"radial_range {radial_range} goes past a scattering angle 2theta of "
                             f"90 degrees ({limit:.6g} in these units), which a flat detector "
                             "cannot record")
    geom = dataclasses.replace(geom, radial_range=rr)
    return geom, units


def _mask(signal, mask):
    cal = signal.calibration
    combined = cal.mask
    if mask is not None:
        if hasattr(mask, "data") and hasattr(mask, "axes_manager"):  # a HyperSpy signal
            mask = mask.data
        mask = check_mask(mask, cal.detector_shape)
        combined = mask if combined is None else (combined | mask)
    return combined


def _out_axes(signal, geom, units, azimuth_unit):
    r0, r1 = geom.radial_range
    dr = (r1 - r0) / geom.npt
    q_units = _PYXEM_Q.get(units.casefold(), units) if isinstance(units, str) else units
    names = {"k": ("radius", units), "q": ("q", q_units),
             "2theta_deg": ("two_theta", "deg"), "2theta_rad": ("two_theta", "rad")}
    name, r_units = names[geom.radial_unit]
    radial = {"name": name, "size": geom.npt, "scale": dr, "offset": r0 + dr / 2, "navigate": False}
    if r_units is not None:
        radial["units"] = r_units
    a0, a1 = geom.azimuth_range
    to_unit = 1.0 if azimuth_unit == "deg" else math.pi / 180.0
    da = (a1 - a0) / geom.npt_azim
    azimuth = {"name": "azimuth", "units": azimuth_unit, "size": geom.npt_azim,
               "scale": da * to_unit, "offset": (a0 + da / 2) * to_unit, "navigate": False}
    return signal.axes_manager._get_navigation_axes_dicts(), radial, azimuth


def azimuthal_integral(signal, npt, npt_azim=None, radial_range=None, azimuth_range=None,
                       mask=None, mean=False, radial_unit=None, azimuth_unit="deg",
                       curved_ewald=False, affine=None, dtype="float32"):
    """Shared implementation of the 1D (``npt_azim=None``) and 2D integrals; see the methods.

    Returns an :class:`~diffgpu.results.OperationResult` (``radial_profiles`` or
    ``polar_patterns``) that the signal method makes into a signal.
    """
    if signal.axes_manager.signal_dimension != 2:
        raise ValueError("azimuthal integration needs 2D diffraction patterns; this signal has "
                         f"{signal.axes_manager.signal_dimension} signal dimension(s)")
    one_d = npt_azim is None
    npt = _positive_int(npt, "npt")
    npt_azim = 1 if one_d else _positive_int(npt_azim, "npt_azim")
    mean, curved_ewald = _flag(mean, "mean"), _flag(curved_ewald, "curved_ewald")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    geom, units = _geometry(signal, npt, npt_azim, radial_range, azimuth_range, azimuth_unit,
                            radial_unit, curved_ewald, affine)
    combined_mask = _mask(signal, mask)
    engine = get_engine(geom, combined_mask)

    data = signal.data
    out_sig = (npt,) if one_d else (npt, npt_azim)
    n_pix = data.shape[-2] * data.shape[-1]

    def integrate(frames, eng, threads=1):
        out = eng.apply(frames.reshape((-1, n_pix)), mean=mean, dtype=dtype, threads=threads)
        return out.reshape((-1,) + out_sig)

    def integrate_into(frames, eng, out):
        eng.apply(frames.reshape((-1, n_pix)), mean=mean, dtype=dtype, out=out.reshape(
            (out.shape[0], -1)))

    threads = 1 if is_device_array(data) else host_threads()
    result = map_frames(data, integrate, out_sig, dtype, constants=(engine,),
                        eager_func=lambda frames, eng: integrate(frames, eng, threads),
                        into=integrate_into)

    nav_axes, radial, azimuth = _out_axes(signal, geom, units, azimuth_unit)
    if one_d:
        axes, stype = nav_axes + [radial], "radial_profiles"
    else:
        axes, stype = nav_axes + [radial, azimuth], "polar_patterns"
    metadata = derived_metadata(signal, "Azimuthal integral", keep_all=True,
                                Signal={"signal_type": stype})
    metadata["Integration"] = {
        "center": list(signal.calibration.center), "scale": list(geom.scale), "npt": npt,
        "npt_azim": npt_azim, "radial_range": list(geom.radial_range),
        "azimuth_range_deg": list(geom.azimuth_range), "radial_unit": geom.radial_unit,
        "mean": bool(mean), "curved_ewald": bool(curved_ewald),
        "affine": None if geom.affine is None else list(geom.affine),  # given or calibration.affine
        "masked_pixels": 0 if combined_mask is None else int(combined_mask.sum()),
    }
    return OperationResult(result, axes, metadata, stype, lazy=signal._lazy,
                           original_metadata=signal.original_metadata.as_dictionary())
