"""Bragg disk detection on a stack of diffraction patterns, eagerly or lazily, CPU or GPU.

:meth:`DiffractionPatterns.find_bragg_disks` calls :func:`find_bragg_disks`, which builds a
:class:`~diffgpu.kernels.disks.DiskFinder` from the parameters and the calibration and maps
it over the frames with :func:`~diffgpu.mapping.map_frames`. The result is a fixed-capacity,
NaN-padded array ``navigation + (max_disks, 3)`` of ``(x, y, intensity)``, strongest first:
ragged per-frame lists in a form dask and CuPy handle as a plain array (a frame with fewer
disks has NaN rows at the end). Positions are detector pixels (the pixel convention of
:mod:`diffgpu.calibration`); the calibration (centre, scale, units, affine correction) goes
into the metadata so the lattice fit and the strain map apply it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .calibration import _positive, _real, _whole, check_mask
from .device import _is_dask, to_host_array
from .kernels.disks import DiskFinder, disk_image, probe_image
from .mapping import map_frames
from .results import derived_metadata

__all__ = ["find_bragg_disks", "bragg_calibration"]


def bragg_calibration(cal):
    """The calibration a set of Bragg vectors carries: a plain dictionary.

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> from diffgpu.disks import bragg_calibration
    >>> s = diffgpu.DiffractionPatterns(np.zeros((2, 32, 32)))
    >>> s.calibration.center = None
    >>> bragg_calibration(s.calibration)["center"]
    [15.5, 15.5]
    """
    units = cal.units
    affine = getattr(cal, "affine", None)
    return {"center": list(cal.center), "scale": list(cal.scale),
            "units": units if isinstance(units, str) or units is None else list(units),
            "affine": None if affine is None else np.asarray(affine, float).tolist()}


def check_detection_parameters(threshold, relative_threshold, min_spacing, max_disks, sigma,
                               refine_iterations):
    """A ValueError naming the first parameter of the disk detection that is out of range
    (NaN ones passed every comparison before and were used as they were: ``sigma=nan``
    smoothed nothing, ``relative_threshold=nan`` kept no threshold).

    Examples
    --------
    >>> from diffgpu.disks import check_detection_parameters
    >>> check_detection_parameters(0.0, 1.5, None, 128, 1.0, 6)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: relative_threshold (weakest disk, ...) must be in [0, 1); got 1.5
    """
    t = _real(threshold)
    if t is None or not math.isfinite(t):
        raise ValueError(f"threshold (least correlation of a disk, about counts per pixel) must be "
                         f"a finite number; got {threshold!r}")
    r = _real(relative_threshold)
    if r is None or not 0 <= r < 1:
        raise ValueError(f"relative_threshold (weakest disk, as a fraction of the frame's "
                         f"strongest) must be in [0, 1); got {relative_threshold!r}")
    if min_spacing is not None:
        if _positive(min_spacing) is None:
            raise ValueError(f"min_spacing (pixels a disk must dominate around it) must be a "
                             f"positive number, or None for the disk radius; got {min_spacing!r}")
    if not _whole(max_disks) or max_disks < 1:
        raise ValueError(f"max_disks must be a positive integer (disks kept per frame); got "
                         f"{max_disks!r}")
    if sigma is not None:
        g = _real(sigma)
        if g is None or not (math.isfinite(g) and g >= 0):
            raise ValueError(f"sigma (Gaussian smoothing of the correlation, pixels) must be a "
                             f"number >= 0 (0: none); got {sigma!r}")
    if not _whole(refine_iterations) or refine_iterations < 0:
        raise ValueError(f"refine_iterations (Newton steps of the sub-pixel refinement) must be "
                         f"an integer >= 0 (0: whole pixels); got {refine_iterations!r}")


def find_bragg_disks(signal, radius=None, template=None, threshold=0.0, relative_threshold=0.01,
                     min_spacing=None, edge=None, mask=None, max_disks=128,
                     correlation_power=1.0, sigma=1.0, refine_iterations=6):
    """Shared implementation of :meth:`DiffractionPatterns.find_bragg_disks` (see there).

    Returns
    -------
    data : array ``navigation + (max_disks, 3)`` float32 (lazy for lazy input)
    axes : list of dict
    metadata : dict
    """
    cal = signal.calibration
    shape = cal.detector_shape
    if (radius is None) == (template is None):
        raise ValueError("give either radius= (disk radius in pixels) or template= (a measured "
                         "vacuum probe image), not both and not neither")
    if template is not None:
        img = template.data if hasattr(template, "axes_manager") else template  # a signal
        img = np.asarray(to_host_array(img.compute() if hasattr(img, "compute") else img))
        tmpl, r = probe_image(img)
        source = "probe"
    else:
        r = float(radius)
        if not (math.isfinite(r) and 0 < r < min(shape) / 4):
            raise ValueError(f"radius must be positive and under a quarter of the detector "
                             f"(pixels); got {radius!r}")
        tmpl = disk_image(r)
        source = "disk"
    check_detection_parameters(threshold, relative_threshold, min_spacing, max_disks, sigma,
                               refine_iterations)
    sigma = 0.0 if sigma is None else float(sigma)
    min_spacing = max(1, int(round(r if min_spacing is None else min_spacing)))
    edge = int(math.ceil(r)) + 1 if edge is None else int(edge)
    if edge < 0 or 2 * edge >= min(shape):
        raise ValueError(f"edge must be between 0 and half the detector; got {edge}")
    combined = cal.mask
    if mask is not None:
        m = check_mask(mask.data if hasattr(mask, "axes_manager") else mask, shape)
        combined = m if combined is None else (combined | m)
    finder = DiskFinder(shape, tmpl, threshold=threshold, relative_threshold=relative_threshold,
                        min_spacing=min_spacing, edge=edge, mask=combined, max_disks=max_disks,
                        correlation_power=correlation_power, refine_iterations=refine_iterations,
                        sigma=sigma)
    from .device import host_threads, is_device_array

    def run(frames, f):
        return f(frames)

    threads = 1 if is_device_array(signal.data) else host_threads()

    def run_eager(frames, f):
        if threads <= 1 or frames.shape[0] < 2 * threads:
            return f(frames)
        from concurrent.futures import ThreadPoolExecutor

        # many small pieces handed out as threads free up: an even load on a shared machine
        step = max(16, min(256, frames.shape[0] // (4 * threads)))
        starts = range(0, frames.shape[0], step)
        with ThreadPoolExecutor(threads) as pool:
            outs = list(pool.map(lambda i: f(frames[i:i + step]), starts))
        return np.concatenate(outs)

    lazy = _is_dask(signal.data)
    finder.warn_truncated = lazy  # lazy: said when computed; eager: counted below
    data = map_frames(signal.data, run, (max_disks, 3), np.float32, eager_func=run_eager,
                      constants=(finder,))
    truncated = None if lazy else int(finder.truncated)
    if truncated:
        warnings.warn(f"{truncated} of {int(np.prod(data.shape[:-2]))} frames have more disks than "
                      f"max_disks={max_disks}: only their strongest were kept (metadata "
                      "BraggDisks.truncated_frames); raise max_disks, or relative_threshold to "
                      "keep fewer", RuntimeWarning, stacklevel=3)
    nav_axes = signal.axes_manager._get_navigation_axes_dicts()
    axes = nav_axes + [
        {"name": "disk", "size": max_disks, "navigate": False},
        {"name": "field", "size": 3, "navigate": False},
    ]
    md = derived_metadata(signal, "Bragg disks", keep_all=True,
                          Signal={"signal_type": "bragg_vectors"})
    md["BraggDisks"] = {
        "fields": ["x", "y", "intensity"],
        "template": source, "radius": float(r), "threshold": float(threshold),
        "relative_threshold": float(relative_threshold), "min_spacing": min_spacing,
        "edge": edge, "max_disks": int(max_disks), "correlation_power": float(correlation_power),
        "sigma": float(sigma), "refine_iterations": int(refine_iterations),
        "detector_shape": list(shape),
        "masked_pixels": 0 if combined is None else int(np.asarray(combined).sum()),
        "calibration": bragg_calibration(cal),
    }
    if truncated is not None:  # frames that had more than max_disks disks (eager only)
        md["BraggDisks"]["truncated_frames"] = truncated
    return data, axes, md
