"""Lattice fits and strain maps from Bragg vectors, eagerly or lazily, CPU or GPU.

Geometry
--------
Disk positions ``p`` (detector pixels) are first corrected with the calibration:
``q = L (p - c)`` with ``c`` the centre and ``L = diag(scale) @ affine`` divided by
``sqrt(|det L|)``, so ``q`` stays in pixel-sized units while an anisotropic pixel scale or
an elliptical (affine) distortion is undone. Strain is dimensionless, so the overall scale
does not matter; its anisotropy does.

Each frame's reciprocal lattice ``G = [g1 g2]`` (columns, in ``q``) is compared with the
reference ``G0``. A real-space deformation ``F`` (``a = F a0`` for every real lattice
vector) turns reciprocal vectors by ``F^-T``, so ``F = G^-T G0^T``. Its polar decomposition
``F = V R`` gives

* ``exx, eyy, exy``: the symmetric stretch ``V - I`` in the detector (x, y) frame, ``exy``
  the tensor shear (half the engineering shear); positive ``exx`` means the lattice is
  expanded along x (its disks closer together along x);
* ``theta``: the lattice rotation in degrees, positive from +x towards +y, i.e.
  **clockwise as shown on screen** (the y axis, rows, points down).

For a rotation ``R`` alone, ``F^-T = R``: the diffraction pattern turns by the same angle.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .calibration import _positive, _whole
from .device import DeviceCache, _is_dask, array_module, is_device_array, to_host_array
from .kernels.lattice import (LATTICE_FIELDS, BasisError, _frequent_differences, _plan, find_basis,
                              fit_lattices)

__all__ = ["correction_matrix", "lattice_fit", "strain_from_lattice", "get_strain_map",
           "STRAIN_FIELDS", "BasisError"]

STRAIN_FIELDS = ("exx", "eyy", "exy", "theta")
_FIT_FRAMES = 4096  # frames fitted at a time (keeps the temporaries to tens of MB)
_REF_OUTLIER = 4.0  # a region's fit further than this x the median from the median is left out
#                    (the deviation of 4 Gaussian components: 4 x its median is ~7 sigma)
_REF_FLOOR = 1e-4   # ... and than this (relative: a strain of 1e-4) from it (noise-free data)
_REF_APART = 0.03   # no fit this close (relative) to the reference: it is a lattice no position
#                    has (two grains' mean or median), said in a warning (a turn of 1.7 degrees)


def correction_matrix(calibration):
    """``L``: pixel offsets from the centre -> corrected, pixel-sized coordinates.

    Examples
    --------
    >>> from diffgpu.strain import correction_matrix
    >>> correction_matrix({"scale": [1.0, 1.0], "affine": [[1.02, 0], [0, 1.0]]}).round(4).tolist()
    [[1.01, 0.0], [0.0, 0.9901]]
    """
    scale = np.asarray(calibration.get("scale") or [1.0, 1.0], float)
    aff = calibration.get("affine")
    m = np.diag(scale) @ (np.eye(2) if aff is None else np.asarray(aff, float).reshape(2, 2))
    det = abs(np.linalg.det(m))
    if not det > 0:
        raise ValueError(f"the calibration's scale and affine matrix are singular: {m.tolist()}")
    return m / math.sqrt(det)


def _corrected(vectors, center, lmat_t, xp):
    """``(p - c) @ L^T`` with ``center`` and ``lmat_t`` already arrays of module ``xp``."""
    return (vectors[..., :2].astype(xp.float64) - center) @ lmat_t


def _consts_to_device(cp, values):
    return tuple(cp.asarray(v) for v in values)


def _region_index(reference, nav_shape):
    """A navigation region as a tuple index or a bool mask -> flat frame numbers."""
    flat = np.arange(int(np.prod(nav_shape))).reshape(nav_shape)
    if isinstance(reference, np.ndarray) and reference.dtype == bool:
        if reference.shape != tuple(nav_shape):
            raise ValueError(f"reference mask shape {reference.shape} does not match the scan "
                             f"{tuple(nav_shape)}")
        if not reference.any():
            raise ValueError("the reference region (a mask) selects no scan position: the mask "
                             f"has no True value (scan shape {tuple(nav_shape)})")
        return flat[reference]
    idx = reference if isinstance(reference, tuple) else (reference,)
    try:
        ids = np.atleast_1d(flat[idx]).ravel()
    except (IndexError, TypeError) as err:
        raise ValueError(f"reference region {reference!r} is not a valid index of the scan "
                         f"(shape {tuple(nav_shape)}, array order: rows first)") from err
    if ids.size == 0:
        region, why = _describe_region(idx, nav_shape)
        raise ValueError(f"the reference region {region} selects no scan position{why} (scan "
                         f"shape {tuple(nav_shape)}, array order: rows first)")
    _check_inside(idx, nav_shape)
    return ids


def _axis_names(nav_shape):
    return (("rows", "columns") if len(nav_shape) == 2
            else tuple(f"axis {i}" for i in range(len(nav_shape))))


def _check_inside(idx, nav_shape):
    """A ValueError for a slice of the region that reaches past the scan (one wholly outside
    selects nothing, said by the caller): NumPy would clip it silently (``slice(0, 8)`` of
    6 rows is rows 0:6), so the reference would not be the region asked for."""
    for name, n, s in zip(_axis_names(nav_shape), nav_shape, idx):
        if not isinstance(s, slice) or (s.step is not None and s.step < 0):
            continue
        for end in (s.start, s.stop):
            if end is not None and isinstance(end, (int, np.integer)) and not -n <= end <= n:
                text = f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
                raise ValueError(
                    f"the reference region's {name} {text} reach past the scan, which has {n} "
                    f"{name} (scan shape {tuple(nav_shape)}, array order: rows first): give a "
                    f"region inside it, e.g. {name} 0:{min(n, 4)}")


def _as_region(reference, nav_shape):
    """A reference given as a mask in another form -> a NumPy bool mask; anything else as is.

    Accepted masks: a HyperSpy signal, a dask or CuPy array, or an integer array of 0 and 1,
    each of the scan's shape (an integer 2 x 2 array of other values on a 2 x 2 scan stays
    lattice vectors)."""
    if hasattr(reference, "axes_manager"):  # a HyperSpy signal of the scan's shape
        reference = reference.data
    if _is_dask(reference):
        reference = reference.compute()
    if is_device_array(reference):
        reference = to_host_array(reference)
    if (isinstance(reference, np.ndarray) and reference.dtype.kind in "iu"
            and reference.shape == tuple(nav_shape)):
        binary = np.isin(reference, (0, 1)).all()
        if binary:
            return reference.astype(bool)
        if reference.shape != (2, 2):
            raise ValueError(f"an integer reference mask must hold only 0 and 1 (1: the scan "
                             f"positions of the reference); got values "
                             f"{np.unique(reference)[:8].tolist()}")
    return reference


def _describe_region(idx, nav_shape):
    """A region index in words, and why it is empty: a slice outside the scan, or one whose
    start is not before its stop."""
    names = _axis_names(nav_shape)
    parts, reasons = [], []
    for name, n, s in zip(names, nav_shape, idx):
        if not isinstance(s, slice):
            parts.append(f"{name} {s!r}")
            continue
        text = f"{name} {'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
        parts.append(text)
        if len(range(*s.indices(n))) == 0:
            if s.start is not None and (s.start >= n if (s.step or 1) > 0 else s.start < -n):
                reasons.append(f"{text} lie outside the scan's {n} {name}")
            else:
                reasons.append(f"{text} is empty (its start is not before its stop)")
    why = (": " + "; ".join(reasons)) if reasons else ""
    return ("(" + ", ".join(parts) + ")") if parts else repr(idx), why


def _robust_mean(fits):
    """Mean of lattice fits ``(m, 4)`` (``g1x, g1y, g2x, g2y``) after rejecting outliers, and
    which were kept.

    A fit is an outlier when it differs from the component-wise median by more than
    ``_REF_OUTLIER`` x the median difference (Euclidean, relative to the mean length of the
    median's vectors; at least ``_REF_FLOOR``). The plain mean let one frame of another grain
    in a reference region of four turn the whole map by 2.5 degrees.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.strain import _robust_mean
    >>> fits = np.array([[17.0, 1.5, -4.0, 15.0]] * 3 + [[16.5, 4.4, -6.6, 14.1]])
    >>> ref, kept = _robust_mean(fits)
    >>> ref.tolist(), kept.tolist()
    ([17.0, 1.5, -4.0, 15.0], [True, True, True, False])
    """
    fits = np.asarray(fits, float)
    med = np.median(fits, axis=0)
    scale = (math.hypot(*med[0:2]) + math.hypot(*med[2:4])) / 2
    dev = np.sqrt(((fits - med) ** 2).sum(axis=1)) / scale
    keep = dev <= max(_REF_OUTLIER * float(np.median(dev)), _REF_FLOOR)
    return fits[keep].mean(axis=0), keep


def _nearest(fits, ref):
    """Distance of the lattice fit ``(m, 4)`` nearest ``ref`` (4,): the RMS over its two
    vectors, relative to the mean length of ``ref``'s (a turn by 1 degree: 0.017).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.strain import _nearest
    >>> round(_nearest(np.array([[10.1, 0, 0, 10.1], [10.3, 0, 0, 10]]), np.array([10.0, 0, 0, 10])), 4)
    0.01
    """
    scale = (math.hypot(*ref[0:2]) + math.hypot(*ref[2:4])) / 2
    return float(np.sqrt(((np.asarray(fits, float) - ref) ** 2).sum(axis=1) / 2).min() / scale)


def _warn_apart(fits, ref, what):
    """Warn when no fit is within ``_REF_APART`` of the reference made from them."""
    apart = _nearest(fits, ref)
    if apart > _REF_APART:
        # half and half, neither grain's fits are outliers of the other's: their mean (or
        # median) is no lattice, and every strain and rotation is off by half their difference
        warnings.warn(
            f"every lattice fit of the {what} is at least {100 * apart:.1f} % (relative; a turn "
            "of 1 degree is 1.7 %) from the reference made from them: it seems to hold more than "
            "one grain, and the reference is a lattice that none of its positions has. Give a "
            "reference region of one grain, reference=(slice(...), slice(...)), or "
            "reference=((g1x, g1y), (g2x, g2y))", UserWarning, stacklevel=4)


def _frames(data, flat_ids):
    """Host float64 vectors of the given frames (computes only those of a lazy array)."""
    nav_shape = data.shape[:-2]
    flat = data.reshape((-1,) + data.shape[-2:]) if not _is_dask(data) else None
    if flat is None:
        idx = np.unravel_index(np.asarray(flat_ids), nav_shape)
        sub = data.vindex[idx] if len(nav_shape) > 1 else data[np.asarray(flat_ids)]
        return np.asarray(to_host_array(sub.compute()), float)
    return np.asarray(to_host_array(flat[np.asarray(flat_ids)]), float)


def _region_blocks(data, flat_ids):
    """For a lazy ``data``: the vectors of the given frames (host float64) and ``data`` with
    the chunks holding them replaced by their computed values, so that a graph built on it
    does not compute them again (the reference region's chunks were computed twice: for the
    basis and reference lattice, then in the strain map; a quarter of a 4-chunk scan)."""
    import dask
    import dask.array as da

    nav_shape = data.shape[:-2]
    nav = len(nav_shape)
    coords = np.unravel_index(np.asarray(flat_ids), nav_shape)
    bounds = [np.cumsum(c) for c in data.chunks[:nav]]
    block_of = np.stack([np.searchsorted(b, c, side="right") for b, c in zip(bounds, coords)],
                        axis=-1)
    wanted = sorted({tuple(int(v) for v in row) for row in block_of})
    if any(len(c) > 1 for c in data.chunks[nav:]):  # whole vectors per block (as _map_last2)
        data = data.rechunk({nav: -1, nav + 1: -1})
    computed = dict(zip(wanted, dask.compute(*[data.blocks[b] for b in wanted])))
    starts = [np.concatenate([[0], b[:-1]]) for b in bounds]
    vectors = np.empty((len(flat_ids),) + data.shape[-2:])
    for i, (row, b) in enumerate(zip(zip(*coords), map(tuple, block_of))):
        local = tuple(int(r - starts[d][b[d]]) for d, r in enumerate(row))
        vectors[i] = np.asarray(to_host_array(computed[b][local]), float)

    def assemble(prefix):
        if len(prefix) == nav:
            b = tuple(prefix)
            if b in computed:
                value = computed[b]
                return da.from_array(value, chunks=value.shape, meta=data._meta)
            return data.blocks[b]
        return da.concatenate([assemble(prefix + [i])
                               for i in range(len(data.chunks[len(prefix)]))], axis=len(prefix))

    return vectors, assemble([])


def _kind(reference):
    if reference is None:
        return "all"
    if isinstance(reference, (tuple, slice, int, np.integer)) or (
            isinstance(reference, np.ndarray) and reference.dtype == bool):
        if isinstance(reference, tuple) and len(reference) == 2 and all(
                isinstance(r, (list, tuple, np.ndarray)) for r in reference):
            return "vectors"
        return "region"
    return "vectors"


def lattice_fit(data, calibration, basis=None, origin=None, reference=None, min_disks=6,
                tolerance=None, iterations=8, weighted=True, max_basis_frames=32,
                region_vectors=None, return_fitter=False, min_length=2.0):
    """Per-frame lattice fits of Bragg vectors: ``(data, basis, origin)``.

    Parameters
    ----------
    data : array ``navigation + (K, 3)``
        Bragg vectors (x, y, intensity), NaN-padded (NumPy, CuPy or dask).
    calibration : dict
        ``center``, ``scale``, ``affine`` (as stored by :func:`diffgpu.disks.find_bragg_disks`).
    basis : 2 x 2 array-like, optional
        ``(g1, g2)`` in detector pixels (rows); default found from the reference frames.
    origin : (float, float), optional
        Detector pixel of the ``(0, 0)`` disk (the direct beam); default the median of the
        reference frames' strongest disks. Each frame is indexed from one of its own disks
        outwards (:func:`~diffgpu.kernels.lattice.fit_lattices`), so beam shifts, rotations
        and strains up to about 25 % do not disturb the indexing; the fitted origin is the
        frame's lattice site nearest this one.
    reference : region or None
        Frames to find the basis in (see :func:`get_strain_map`); None: the whole scan.
    min_disks, tolerance, iterations : see :func:`~diffgpu.kernels.lattice.fit_lattices`
        (``tolerance`` in detector pixels).
    weighted : bool
        Weight the fit by disk intensity (True) or equally.
    min_length : float
        Shortest ``basis`` vector accepted (pixels): disks closer than this cannot both have
        been found (``min_spacing + 1`` of the detection).

    Returns
    -------
    fits : array ``navigation + (8,)`` float64, lazy for lazy input: ``LATTICE_FIELDS``
        in corrected coordinates (see the module docstring) relative to the centre.
    basis, origin : numpy arrays (corrected coordinates) used to index the disks. A
        ``basis`` given as a non-primitive (centred) cell of the disks' lattice is replaced by
        a primitive cell (with a warning): against a centred cell half the disks fall
        between sites, and a near-hexagonal lattice was indexed 60 degrees off.
    fitter : callable, with ``return_fitter=True``: the same fit for any vectors array
        (e.g. the reference region's, already in memory: ``region_vectors``, host vectors
        of the reference frames, saves computing them again for the basis).
    """
    min_disks, tolerance, iterations = _check_fit_parameters(min_disks, tolerance, iterations)
    _check_fields(data)
    if basis is not None:
        basis = _check_vectors(basis, "basis", min_length)
    lmat = correction_matrix(calibration)
    center = np.asarray(calibration.get("center") or [0.0, 0.0], float)
    nav_shape = data.shape[:-2]
    n_frames = int(np.prod(nav_shape))
    reference = _as_region(reference, nav_shape)
    sets = None
    # the reference frames' disks: for the basis and origin, and to check a given basis (in
    # memory only: a lazy scan with both given is not computed for it)
    if basis is None or origin is None or not _is_dask(data):
        kind = _kind(reference)
        # no region: the first frames (one chunk of a lazy array, not one frame per chunk)
        ids = (_region_index(reference, nav_shape) if kind == "region"
               else np.arange(min(n_frames, max_basis_frames)))
        pick = np.arange(len(ids))
        if len(ids) > max_basis_frames:  # evenly spread over the region
            pick = np.linspace(0, len(ids) - 1, max_basis_frames).round().astype(int)
        if region_vectors is not None and kind == "region":
            sample = np.asarray(region_vectors, float)[pick]
        else:
            sample = _frames(data, ids[pick])
        _check_intensities(sample, weighted)
        q = _corrected(sample, center, lmat.T, np)
        sets = [qi[np.all(np.isfinite(qi), axis=1)] for qi in q]
        if basis is None:
            b = find_basis(sets)
            basis_q = np.stack(b, axis=1)
        if origin is None:
            strongest = [qi[np.nanargmax(si[:, 2])] for qi, si in zip(q, sample)
                         if np.isfinite(si[:, 2]).any()]
            if not strongest:
                raise BasisError("no disks in the reference frames: lower the detection "
                                 "threshold or choose another reference region")
            origin_q = np.median(np.array(strongest), axis=0)
    if basis is not None:
        basis_q = lmat @ basis.T
        if sets is not None:
            basis_q = _primitive_cell(basis_q, sets, basis, lmat)
    if origin is not None:
        origin_q = lmat @ (np.asarray(origin, float).reshape(2) - center)
    if tolerance is not None:
        tolerance = float(tolerance) * math.sqrt(abs(np.linalg.det(lmat)))

    # the small constants: moved to a GPU once per device, not with every block; the
    # indexing's own (trial rotations, equivalent bases) stay host numbers
    consts = DeviceCache((center, np.ascontiguousarray(lmat.T), basis_q, origin_q),
                         _consts_to_device)
    plan = _plan(basis_q)

    def fit(block):
        xp = array_module(block)
        flat = block.reshape((-1,) + block.shape[-2:])
        c_dev, lt_dev, b_dev, o_dev = consts.get(xp)
        outs = []
        for i in range(0, max(flat.shape[0], 1), _FIT_FRAMES):  # bounded temporaries
            part = flat[i:i + _FIT_FRAMES]
            q = _corrected(part, c_dev, lt_dev, xp)
            w = part[..., 2] if weighted else xp.where(xp.isfinite(part[..., 2]), 1.0, xp.nan)
            outs.append(fit_lattices(q, w, b_dev, o_dev, min_disks=min_disks,
                                     tolerance=tolerance, iterations=iterations, plan=plan))
        out = outs[0] if len(outs) == 1 else xp.concatenate(outs)
        return out.reshape(block.shape[:-2] + (len(LATTICE_FIELDS),))

    fits = _map_last2(data, fit, len(LATTICE_FIELDS))
    if return_fitter:
        return fits, basis_q, origin_q, fit
    return fits, basis_q, origin_q


def _check_fields(data):
    """A ValueError for Bragg vectors without the intensity field (``(x, y)`` only)."""
    if data.ndim < 2 or data.shape[-1] < 3:
        raise ValueError(
            f"Bragg vectors need 3 fields in their last axis, (x, y, intensity); these have "
            f"shape {tuple(data.shape)}: append an intensity column (e.g. ones, with "
            "weighted=False for an unweighted fit)")


def _check_intensities(sample, weighted):
    """A ValueError when the reference frames have disks but none the fit can use: it keeps
    only disks with a finite intensity, and (``weighted``) a positive one."""
    xy = np.all(np.isfinite(sample[..., :2]), axis=-1)
    inten = sample[..., 2]
    finite = xy & np.isfinite(inten)
    usable = finite & (inten > 0) if weighted else finite
    if not xy.any() or usable.any():
        return
    if not finite.any():
        raise ValueError(
            f"the intensities (third field) of all {int(xy.sum())} disks of the reference frames "
            "are NaN: the lattice fit uses only disks with a finite intensity (NaN marks an "
            "empty slot). Give intensities, e.g. ones, with weighted=False for an unweighted fit")
    raise ValueError(
        f"the intensities (third field) of all {int(xy.sum())} disks of the reference frames "
        "are <= 0 or NaN: a weighted fit uses only disks with a positive intensity (its "
        "weight). Give positive intensities, or fit with weighted=False (every disk with a "
        "finite intensity then counts the same)")


def _primitive_cell(basis_q, sets, basis_px, lmat):
    """``basis_q`` (corrected, columns g1, g2), or a primitive cell of the same lattice where
    ``basis_q`` is a larger cell of the lattice of the disks in ``sets`` (a centred cell,
    e.g. the conventional cell of a centred-rectangular lattice), with a warning.

    Found by comparing with the basis of the disks' most frequent spacings (as
    :func:`~diffgpu.kernels.lattice.find_basis` finds it, of up to 8 frames): if
    ``basis_q = B N`` with ``N`` an integer matrix of ``|det N| >= 2`` (within 0.1), the
    primitive cell is ``basis_q N^-1`` (the given vectors' own strain kept)."""
    sets = [sets[i] for i in np.unique(np.linspace(0, len(sets) - 1, 8).round().astype(int))]
    try:  # the pooled basis of up to 8 frames: 2 ms (find_basis's competition of the
        # frames' own bases took 30 ms of every fit with a basis given)
        found = np.stack(_frequent_differences(sets, 1.0, 0.25), axis=1)
    except BasisError:
        return basis_q
    whole = _integer_cell(basis_q, found)
    det = 0 if whole is None else int(round(abs(np.linalg.det(whole))))
    if det < 2:
        return basis_q
    primitive = basis_q @ np.linalg.inv(whole)
    shown = (np.linalg.inv(lmat) @ primitive).T.round(3).tolist()
    warnings.warn(
        f"basis {basis_px.tolist()} is not a primitive cell of the disks' lattice: it holds "
        f"{det} lattice points (a centred cell), so disks fall between its sites, and a lattice "
        "close to hexagonal was indexed 60 degrees off. The primitive cell "
        f"{shown} (pixels) is used instead; strain does not depend on the cell, but the "
        "lattice fits (fit_lattice) report its vectors. Give a primitive cell to silence this",
        UserWarning, stacklevel=4)
    return primitive


def _to_basis_cell(ref_q, basis_q):
    """Reference vectors (columns) as the cell of ``basis_q``'s lattice that matches it vector
    for vector: the fits are output closest to ``basis_q``, and strain compares the two vector
    by vector (a centred or relabelled reference cell, e.g. (g1, g1 + g2), would read as a
    large strain). Unchanged unless ``basis_q^-1 ref_q`` is an integer matrix within 0.1, of
    either sign of determinant: a cell of the other hand (vectors swapped or one reversed) was
    kept as it was, and compared with right-handed fits read as strains of 30-190 %."""
    whole = _integer_cell(ref_q, basis_q)
    if whole is None or abs(round(np.linalg.det(whole))) < 1:
        return ref_q
    return ref_q @ np.linalg.inv(whole)


def _integer_cell(cell, of):
    """The integer matrix ``N`` with ``cell = of N`` (vectors as columns), or None where the
    vectors of ``cell`` are not whole combinations of those of ``of`` (within 0.1)."""
    n = np.linalg.solve(of, cell)
    whole = np.rint(n)
    return whole if np.abs(n - whole).max() <= 0.1 else None


def _min_length(metadata):
    """Shortest lattice vector (pixels) the detection could resolve: ``min_spacing + 1``
    (a peak dominates ``min_spacing`` pixels around it); 2 without the detection's metadata."""
    spacing = (metadata.get("BraggDisks") or {}).get("min_spacing")
    try:
        return float(spacing) + 1 if spacing and float(spacing) >= 1 else 2.0
    except (TypeError, ValueError):
        return 2.0


def _check_vectors(vectors, name, min_length=None):
    """``((g1x, g1y), (g2x, g2y))`` as a 2 x 2 float array, or a ValueError saying what is
    wrong: not 2 x 2 finite numbers, a vector of zero length or shorter than ``min_length``
    pixels (wrong units, or scan indices), or two parallel vectors."""
    try:
        b = np.asarray(vectors, float)
    except (TypeError, ValueError):
        b = np.full(0, np.nan)
    if b.shape != (2, 2) or not np.all(np.isfinite(b)):
        raise ValueError(f"{name} must be ((g1x, g1y), (g2x, g2y)), finite numbers in pixels; "
                         f"got {vectors!r}")
    lengths = np.hypot(b[:, 0], b[:, 1])
    for i in range(2):
        if not lengths[i] > 0:
            raise ValueError(f"{name} vector g{i + 1} {b[i].tolist()} has zero length: give two "
                             "non-zero lattice vectors in pixels")
        if min_length is not None and lengths[i] < min_length:
            raise ValueError(
                f"{name} vector g{i + 1} {b[i].tolist()} is {lengths[i]:.3g} px long, shorter "
                f"than two disks can be found apart ({min_length:g} px, from the detection's "
                "min_spacing): lattice vectors must be in detector pixels, e.g. "
                "((17.0, 1.5), (-4.0, 15.0)), not calibrated units nor scan indices. To take "
                "the reference from scan positions, pass a region: reference=(slice(row0, "
                "row1), slice(col0, col1)) or a bool mask of the scan")
    if abs(b[0, 0] * b[1, 1] - b[0, 1] * b[1, 0]) < 1e-9 * lengths[0] * lengths[1]:
        raise ValueError(f"{name} vectors {b.tolist()} are parallel (a degenerate lattice): give "
                         "two lattice vectors that are not on one line")
    return b


def _check_fit_parameters(min_disks, tolerance, iterations):
    """The lattice fit's ``min_disks``, ``tolerance`` and ``iterations``, or a ValueError."""
    if not _whole(min_disks) or min_disks < 3:
        raise ValueError(f"min_disks must be an integer of at least 3 (a lattice fit of the "
                         f"origin, g1 and g2 needs 3 disks not on one row); got {min_disks!r}")
    if not _whole(iterations) or iterations < 1:
        raise ValueError(f"iterations (fit, reject and re-index passes) must be an integer of at "
                         f"least 1; got {iterations!r}")
    if tolerance is not None:
        if _positive(tolerance) is None:
            raise ValueError(f"tolerance (largest distance of a kept disk from its lattice site, "
                             f"pixels) must be a positive number, or None for the adaptive "
                             f"default; got {tolerance!r}")
        tolerance = float(tolerance)
    return int(min_disks), tolerance, int(iterations)


def _map_last2(data, func, size):
    """``func`` over blocks of an array ``(..., a, b)`` -> ``(..., size)`` float64, lazily."""
    if not _is_dask(data):
        return func(data)
    import dask.array as da

    nav = data.ndim - 2
    if len(data.chunks[-1]) > 1 or len(data.chunks[-2]) > 1:
        data = data.rechunk({nav: -1, nav + 1: -1})
    meta = array_module(data).empty((0,) * (nav + 1), dtype=np.float64)
    return da.map_blocks(func, data, dtype=np.float64, meta=meta, drop_axis=nav + 1,
                         chunks=data.chunks[:nav] + ((size,),))


def strain_from_lattice(fits, reference):
    """Strain ``(exx, eyy, exy, theta_deg)`` of lattice fits relative to a reference basis.

    Parameters
    ----------
    fits : array ``(..., 8)`` (``LATTICE_FIELDS``) or ``(..., >= 6)`` with g1, g2 at 2:6
    reference : array ``(2, 2)``
        Reference basis, columns ``g1``, ``g2`` (same coordinates as the fits).

    Returns
    -------
    array ``(..., 4)`` float64; NaN where the fit is NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.strain import strain_from_lattice
    >>> g0 = np.array([[10.0, 0.0], [0.0, 10.0]])
    >>> fits = np.array([0, 0, 10 / 1.01, 0, 0, 10, 9, 0.1])     # expanded 1 % along x
    >>> (strain_from_lattice(fits, g0).round(6) + 0.0).tolist()
    [0.01, 0.0, 0.0, 0.0]
    """
    xp = array_module(fits)
    g = xp.stack([fits[..., 2:4], fits[..., 4:6]], axis=-1)  # (..., 2, 2), columns g1, g2
    if array_module(reference) is xp:
        g0t = reference.astype(xp.float64).T
    else:
        g0t = xp.asarray(np.asarray(reference, float).T)
    det = g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
    # G^-T = (1/det) [[g11, -g10], [-g01, g00]]
    ginvt = xp.stack([xp.stack([g[..., 1, 1], -g[..., 1, 0]], -1),
                      xp.stack([-g[..., 0, 1], g[..., 0, 0]], -1)], -2) / det[..., None, None]
    f = ginvt @ g0t
    theta = xp.arctan2(f[..., 1, 0] - f[..., 0, 1], f[..., 0, 0] + f[..., 1, 1])
    c, s = xp.cos(theta), xp.sin(theta)
    # V = F R^T, R = [[c, -s], [s, c]]
    v00 = f[..., 0, 0] * c - f[..., 0, 1] * s
    v11 = f[..., 1, 0] * s + f[..., 1, 1] * c
    v01 = f[..., 0, 0] * s + f[..., 0, 1] * c
    v10 = f[..., 1, 0] * c - f[..., 1, 1] * s
    return xp.stack([v00 - 1, v11 - 1, 0.5 * (v01 + v10), xp.rad2deg(theta)], axis=-1)


def rotate_strain(strain, angle_deg):
    """Strain expressed in axes turned by ``angle_deg`` (x' at that angle from x, towards y).

    ``exx', eyy', exy'`` are the components of the same tensor in the new axes
    (``e' = Q^T e Q``); theta is unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.strain import rotate_strain
    >>> rotate_strain(np.array([0.01, 0.0, 0.0, 0.1]), 90).round(6).tolist()
    [0.0, 0.01, -0.0, 0.1]
    """
    xp = array_module(strain)
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    exx, eyy, exy = strain[..., 0], strain[..., 1], strain[..., 2]
    nxx = c * c * exx + s * s * eyy + 2 * c * s * exy
    nyy = s * s * exx + c * c * eyy - 2 * c * s * exy
    nxy = (eyy - exx) * c * s + exy * (c * c - s * s)
    return xp.stack([nxx, nyy, nxy, strain[..., 3]], axis=-1)


def get_strain_map(data, metadata, nav_axes, reference=None, basis=None, origin=None,
                   min_disks=6, tolerance=None, iterations=8, weighted=True):
    """Shared implementation of :meth:`BraggVectors.get_strain_map` (see there).

    Returns
    -------
    data : array ``navigation + (4,)`` float64 (lazy for lazy input)
    axes : list of dict
    metadata : dict
    """
    _check_fit_parameters(min_disks, tolerance, iterations)  # before any region is computed
    _check_fields(data)
    min_length = _min_length(metadata)
    if basis is not None:
        basis = _check_vectors(basis, "basis", min_length)
    cal = dict(metadata.get("BraggDisks", {}).get("calibration") or {})
    if not cal:
        cal = {"center": [0.0, 0.0], "scale": [1.0, 1.0], "affine": None}
    nav_shape = data.shape[:-2]
    reference = _as_region(reference, nav_shape)
    kind = _kind(reference)
    ref_vectors = None
    if kind == "vectors":
        try:
            ref_vectors = np.asarray(reference, float)
        except (TypeError, ValueError):
            ref_vectors = np.full(0, np.nan)
        if ref_vectors.shape != (2, 2) or not np.all(np.isfinite(ref_vectors)):
            raise ValueError("reference must be a scan region (slices, or a bool mask of the "
                             "scan), or lattice vectors ((g1x, g1y), (g2x, g2y)) in pixels; got "
                             f"{reference!r}")
        ref_vectors = _check_vectors(ref_vectors, "reference", min_length)
        if basis is None:
            basis = ref_vectors
    region_vectors = None
    if kind == "region":  # computed once, for the basis, the reference fits and the map
        ids = _region_index(reference, nav_shape)
        if _is_dask(data):
            region_vectors, data = _region_blocks(data, ids)
        else:
            region_vectors = _frames(data, ids)
    fits, basis_q, origin_q, fitter = lattice_fit(
        data, cal, basis=basis, origin=origin, reference=reference if kind == "region" else None,
        min_disks=min_disks, tolerance=tolerance, iterations=iterations, weighted=weighted,
        region_vectors=region_vectors, return_fitter=True, min_length=min_length)
    lmat = correction_matrix(cal)
    if kind == "vectors":
        ref_q = _to_basis_cell(lmat @ ref_vectors.T, basis_q)
        where = "given vectors"
    else:
        ids = (_region_index(reference, nav_shape) if kind == "region"
               else np.arange(int(np.prod(nav_shape))))
        if region_vectors is not None:
            sub = np.asarray(fitter(region_vectors), float)
        else:  # the whole scan: a full pass over the fits
            if _is_dask(fits):
                # the fits (8 numbers a frame) kept for the map: its graph found every disk
                # again, reading the scan twice
                import dask.array as da

                fits = da.from_array(fits.compute(), chunks=fits.chunks, asarray=False)
            flat_fits = fits.reshape((-1, fits.shape[-1]))[np.asarray(ids)]
            sub = np.asarray(to_host_array(flat_fits.compute() if _is_dask(flat_fits)
                                           else flat_fits), float)
        good = np.all(np.isfinite(sub[:, 2:6]), axis=1)
        if not good.any():
            raise ValueError(
                f"the reference region ({len(ids)} positions) has no frame with a valid lattice "
                f"fit (each needs at least min_disks={min_disks} indexed disks on a lattice that "
                "fits them; fit_lattice() shows the disk counts and residuals): choose another "
                "region with reference=(slice(...), slice(...)), give the lattice's basis with "
                "basis=((g1x, g1y), (g2x, g2y)) in pixels, lower min_disks or the detection "
                "threshold, or give reference=((g1x, g1y), (g2x, g2y))")
        if kind == "all":
            ref = np.median(sub[good, 2:6], axis=0)
            where = "whole scan (median)"
            _warn_apart(sub[good, 2:6], ref, "scan (the reference: their median)")
        else:
            ref, kept = _robust_mean(sub[good, 2:6])
            n_out = int(good.sum() - kept.sum())
            where = (f"region of {int(good.sum())} fits (mean after rejecting outliers: "
                     f"{n_out} left out)")
            _warn_apart(sub[good, 2:6][kept], ref, "reference region")
            if n_out:
                warnings.warn(
                    f"{n_out} of the reference region's {int(good.sum())} lattice fits differ from "
                    "the region's median lattice by more than "
                    f"{_REF_OUTLIER:g} x the median difference (another grain, a defect or a "
                    "poor fit) and were left out of the reference; choose a region of one "
                    "grain to use them all", UserWarning, stacklevel=3)
        ref_q = np.stack([ref[0:2], ref[2:4]], axis=1)

    ref_const = DeviceCache(ref_q)

    def to_strain(block):
        return strain_from_lattice(block, ref_const.get(array_module(block)))

    if _is_dask(fits):
        import dask.array as da

        meta = array_module(fits).empty((0,) * fits.ndim, dtype=np.float64)
        strain = da.map_blocks(to_strain, fits, dtype=np.float64, meta=meta,
                               chunks=fits.chunks[:-1] + ((4,),))
    else:
        strain = to_strain(fits)
    lmat_inv = np.linalg.inv(lmat)
    md = {k: v for k, v in metadata.items() if k not in ("BraggDisks", "Signal")}
    md["General"] = dict(md.get("General", {}))
    title = md["General"].get("title", "")
    source = (title[len("Bragg disks of "):] if title.startswith("Bragg disks of ")
              else "" if title in ("Bragg disks", "Bragg disks of") else title)
    md["General"]["title"] = f"Strain of {source}" if source else "Strain"
    md["Signal"] = {"signal_type": "strain_map"}
    md["Strain"] = {
        "fields": list(STRAIN_FIELDS),
        "convention": "F = V R (real space), e = V - I in the detector (x, y) frame; exy is the "
                      "tensor shear; theta in degrees, positive from +x towards +y (clockwise "
                      "on screen)",
        "reference": where,
        "reference_g1_px": (lmat_inv @ ref_q[:, 0]).tolist(),
        "reference_g2_px": (lmat_inv @ ref_q[:, 1]).tolist(),
        "basis_g1_px": (lmat_inv @ basis_q[:, 0]).tolist(),
        "basis_g2_px": (lmat_inv @ basis_q[:, 1]).tolist(),
        "origin_px": (lmat_inv @ origin_q + np.asarray(cal.get("center") or [0, 0])).tolist(),
        "min_disks": int(min_disks), "weighted": bool(weighted),
        "calibration": cal,
        "frame_angle_deg": 0.0,
    }
    axes = list(nav_axes) + [{"name": "component", "size": 4, "navigate": False}]
    return strain, axes, md


def count_failed(strain_data):
    """Positions whose strain is NaN (too few disks, or a degenerate fit)."""
    arr = np.asarray(to_host_array(strain_data))
    return int((~np.all(np.isfinite(arr), axis=-1)).sum())


def warn_failed(n_failed, n_total, min_disks):
    """Warn once about positions without strain, saying why and what to change."""
    if n_failed:
        warnings.warn(f"{n_failed} of {n_total} positions have NaN strain: fewer than "
                      f"min_disks={min_disks} disks could be indexed there, they all lie on "
                      "one lattice row, or their fit's RMS residual exceeds a tenth of the "
                      "lattice spacing (no lattice near the reference fits them; fit_lattice "
                      "shows each position's disks and residual)", RuntimeWarning, stacklevel=3)
