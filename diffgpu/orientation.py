"""Orientation mapping by template matching of polar patterns (glue between signal and kernel)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .calibration import _positive, _real, _whole
from .device import DeviceCache, array_module, host_threads, one_blas_thread, to_host_array
from .kernels.matching import (GROUP_MIN_TEMPLATES, match_patterns, pack_into, packed_norms,
                               packed_shape, prepare_templates, radial_projection, template_groups,
                               template_major)
from .mapping import map_frames
from .results import OperationResult, derived_metadata
from .templates import TemplateLibrary, library_for

__all__ = ["get_orientation", "refine_orientations", "match_quaternions"]

# radial units (spaces removed, case ignored) -> 1/Å per unit
_PER_ANGSTROM = {u.casefold(): f for u, f in {
    "1/Å": 1.0, "1/A": 1.0, "Å^-1": 1.0, "A^-1": 1.0, "Å⁻¹": 1.0, "1/angstrom": 1.0,
    "1/nm": 0.1, "nm^-1": 0.1, "nm⁻¹": 0.1}.items()}
# pyxem's spellings (a polar signal of pyxem's, or diffgpu's integral of a pyxem-calibrated
# signal): 1/Å per unit, and whether the unit measures q = 2 pi k
_PYXEM_RADIAL = {"k_a^-1": (1.0, False), "k_nm^-1": (0.1, False),
                 "q_a^-1": (1.0, True), "q_nm^-1": (0.1, True)}
_DEGREES = {"deg", "degree", "degrees", "°", "º"}
_RADIANS = {"rad", "rads", "radian", "radians"}
FIELDS = ("template", "phase", "correlation", "in_plane_rotation", "mirror")


def _templates_to_device(cp, host):
    packed, n_t = host
    return cp.asarray(packed), n_t


def _host_search(host):
    """``[None, norms, projection, groups]``: what the host's search needs besides the packed
    spectra (the template-major copy, None here, is made where it is needed). Libraries of
    at least ``GROUP_MIN_TEMPLATES`` templates are also grouped (:func:`template_groups`),
    and then the norms are kept only as the groups hold them."""
    norms, projection = packed_norms(*host), radial_projection(*host)
    groups = None
    if projection is not None and host[1] >= GROUP_MIN_TEMPLATES:
        groups = template_groups(projection, norms)
        norms = None
    return [None, norms, projection, groups]


def _render_packed(library, radii, n_azim, sigma, gamma, normalize, K, slice_bytes=2**24):
    """The library's templates drawn on the polar grid, Fourier transformed along azimuth and
    packed (:func:`~diffgpu.kernels.matching.pack_into`): slices of ~16 MB at a time (the whole
    polar stack is 0.1-0.4 GB for 1,081 templates, GBs for large libraries, and fresh memory
    is slow to touch on first use), on all host threads (drawing is compiled without the
    GIL, SciPy's FFT and the copies release it; every slice fills its own templates, so the
    values do not depend on the threads)."""
    from concurrent.futures import ThreadPoolExecutor

    n_t = len(library)
    packed = np.zeros(packed_shape(n_t, K, radii.size), np.float32)
    step = max(16, slice_bytes // (4 * radii.size * n_azim))
    library._flat_spots(gamma)  # the spots' weights, made once before the threads share them

    def slice_(t0):
        part = library.render_polar(radii, n_azim, sigma, gamma, normalize,
                                    templates=slice(t0, t0 + step))
        pack_into(packed, t0, *prepare_templates(part, K, workers=1))

    starts = range(0, n_t, step)
    if len(starts) == 1 or host_threads() == 1:
        for t0 in starts:
            slice_(t0)
    else:
        with ThreadPoolExecutor(host_threads()) as pool:
            list(pool.map(slice_, starts))
    return packed


def _host_spectra(templates, major=False):
    """``(packed, n_t, major, norms, projection, groups)`` for the host's two-stage search.
    The norms, the radial projection, the groups and, where the search needs it (no exact
    projection, or ``major`` for the prefilter), the template-major copy are made where they
    are used, once per process, so a GPU worker never holds them and a cluster does not ship
    them."""
    packed, n_t = templates.host
    extra = templates.derived("host search", _host_search)
    if extra[0] is None and (major or extra[2] is None or not extra[2].exact):
        extra[0] = template_major(packed, n_t)  # two threads may both make it: no harm
    return templates.host + tuple(extra)


class PolarCalibration(NamedTuple):
    """How a polar signal's axes compare with templates (:func:`_polar_calibration`).

    ``to_angstrom`` and ``to_degrees`` turn the radial and azimuthal axes' values into k
    (1/Å) and degrees; ``offset`` (degrees) is how far the data's azimuthal bins are turned
    from the templates' (centred at ``(j + 0.5) 360 / n - 180``): a pattern whose spots lie
    at ``theta + gamma`` matches at ``gamma - offset``.
    """

    azimuth: object
    radius: object
    to_angstrom: float
    to_degrees: float
    offset: float


def _unit_name(units):
    """An axis's units, spaces removed and case ignored; None where unset."""
    return units.replace(" ", "").casefold() if isinstance(units, str) and units.strip() else None


def _integrated_by_diffgpu(polar):
    """Whether diffgpu's integration made ``polar`` (its azimuth then runs as templates')."""
    return polar.metadata.get_item("Integration.azimuth_range_deg") is not None


def _radial_is_q(polar, rad):
    """Whether the radial axis holds q = 2 pi k (diffgpu's ``radial_unit="q"``: axis "q")
    rather than k (axis "radius"), from ``metadata.Integration.radial_unit`` and the axis's
    name; a ValueError where they disagree or the axis holds scattering angles."""
    meta = polar.metadata.get_item("Integration.radial_unit")
    name = rad.name.strip().casefold() if isinstance(rad.name, str) else None
    if (isinstance(meta, str) and meta.startswith("2theta")) or name == "two_theta":
        raise ValueError("the radial axis holds scattering angles (radial_unit='2theta_...'): "
                         "integrate with the default radial_unit (k, in 1/Å or 1/nm) to compare "
                         "with templates")
    by_meta = None if meta not in ("k", "q") else meta == "q"
    by_name = {"q": True, "radius": False, "k": False}.get(name)
    if by_meta is not None and by_name is not None and by_meta != by_name:
        raise ValueError(f"the radial axis is named {rad.name!r} but metadata.Integration."
                         f"radial_unit is {meta!r}, so it is unclear whether it holds k or "
                         "q = 2 pi k: name the axis 'radius' (k) or 'q' and set the metadata to "
                         "match")
    return by_meta if by_meta is not None else bool(by_name)


def _polar_calibration(polar):
    """The polar axes and how they compare with templates (:class:`PolarCalibration`), or a
    ValueError when they cannot be compared: radius not in 1/Å or 1/nm (k, or q = 2 pi k,
    which is converted), azimuth not the full circle in degrees or radians, a non-positive
    scale, or a polar signal of pyxem's (its azimuth runs the other way)."""
    az, rad = polar.axes_manager.signal_axes
    units, az_units = _unit_name(rad.units), _unit_name(az.units)
    if not _integrated_by_diffgpu(polar) and (
            units in _PYXEM_RADIAL or (az.units == "Rad" and az.name == "Radians")
            or polar.metadata.get_item("Signal.signal_type") == "polar_diffraction"):
        raise ValueError("these polar patterns look like pyxem's (radial axis in "
                         f"{rad.units!r}, azimuth in {az.units!r}), whose azimuth runs the other "
                         "way from diffgpu's, which would mirror every orientation: integrate "
                         "the diffraction patterns with diffgpu instead, "
                         "diffgpu.as_diffraction_patterns(signal).get_azimuthal_integral2d(...)")
    q = _radial_is_q(polar, rad)
    if units in _PYXEM_RADIAL:  # diffgpu's integral of patterns calibrated in pyxem's units
        to_a, detector_q = _PYXEM_RADIAL[units]
        if q and detector_q:
            raise ValueError(f"the radial axis is q (radial_unit='q') of patterns calibrated in "
                             f"q ({rad.units!r}): integrate with the default radial_unit")
        q = q or detector_q
    elif units in _PER_ANGSTROM:
        to_a = _PER_ANGSTROM[units]
    else:
        raise ValueError(f"the radial axis must be in 1/Å or 1/nm to compare with templates; it is "
                         f"{rad.units if isinstance(rad.units, str) else None!r}: calibrate the "
                         "scale before integrating")
    if q:
        to_a /= 2 * math.pi
    if az_units in _DEGREES:
        to_deg = 1.0
    elif az_units in _RADIANS:
        to_deg = 180 / math.pi
    else:
        raise ValueError(f"the azimuth axis's units must be degrees ('deg') or radians ('rad'); "
                         f"they are {az.units if isinstance(az.units, str) else None!r}: set "
                         "them on the polar signal's azimuth axis")
    for ax, what in ((rad, "radial"), (az, "azimuthal")):
        if not ax.scale > 0:
            raise ValueError(f"the {what} axis must increase (a positive scale); its scale is "
                             f"{ax.scale:g}: reverse the data along it and make the scale positive")
    span = az.scale * az.size * to_deg
    if abs(span - 360) > 1e-6:
        raise ValueError(f"template matching needs the full azimuthal circle; the data span {span:g}"
                         " degrees")
    # (an offset only turns the correlation: matching corrects the angle it finds by it)
    offset = ((az.offset - az.scale / 2) * to_deg + 360) % 360 - 180
    if abs(offset) < 1e-9:  # (radians: rounding) leave the default axis's angles as found
        offset = 0.0
    return PolarCalibration(az, rad, to_a, to_deg, float(offset))


def _in_host_blocks(run, n, block=64):
    """``run(start, stop)`` for blocks of ``block`` frames in a thread per core, concatenated:
    the kernels release the GIL, and NumPy's own reductions are single-threaded."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(host_threads()) as pool:
        parts = list(pool.map(lambda i: run(i, min(i + block, n)), range(0, n, block)))
    return array_module(parts[0]).concatenate(parts)


def _as_library(library):
    """A :class:`TemplateLibrary`, or the one of a diffsims ``Simulation2D`` (made once per
    simulation: :func:`~diffgpu.templates.library_for`)."""
    if isinstance(library, TemplateLibrary):
        return library
    if hasattr(library, "rotations") and hasattr(library, "coordinates"):
        return library_for(library)
    raise TypeError(f"library must be a TemplateLibrary or a diffsims Simulation2D; got "
                    f"{type(library).__name__}")


def _check_gamma(gamma):
    g = _real(gamma)
    if g is None or not 0 < g <= 4:
        raise ValueError(f"gamma (the intensity scaling, patterns ** gamma) must be in (0, 4]; "
                         f"got {gamma!r}")


def get_orientation(polar, library, n_best=1, frac_keep=1.0, normalize_templates=True, gamma=0.3,
                    template_sigma=None, max_frequency=None, ring_means=False):
    """Shared implementation of :meth:`PolarPatterns.get_orientation`: an
    ``orientation_matches`` :class:`~diffgpu.results.OperationResult`."""
    library = _as_library(library)
    _check_gamma(gamma)
    n_t = len(library)
    if not _whole(n_best) or n_best < 1:
        raise ValueError(f"n_best must be a positive integer; got {n_best!r}")
    if n_best > n_t:
        raise ValueError(f"n_best={n_best} is larger than the library ({n_t} templates)")
    if not 0 < frac_keep <= 1:
        raise ValueError(f"frac_keep must be in (0, 1]; got {frac_keep}")
    cal = _polar_calibration(polar)
    az, rad, to_a, offset = cal.azimuth, cal.radius, cal.to_angstrom, cal.offset
    radii = rad.axis * to_a
    r_top = (rad.high_value + rad.scale / 2) * to_a
    if r_top < library.reciprocal_radius * (1 - 1e-6):
        raise ValueError(f"the polar data reach {r_top:.3g} 1/Å but the templates reach "
                         f"{library.reciprocal_radius:.3g} 1/Å: integrate to a larger radial_range "
                         "or simulate the library with a smaller reciprocal_radius")
    n_azim = az.size
    if template_sigma is not None and _positive(template_sigma) is None:
        raise ValueError(f"template_sigma (the spots' width, 1/Å) must be a positive number; got "
                         f"{template_sigma!r} (None: one radial bin)")
    sigma = template_sigma if template_sigma is not None else 1.0 * rad.scale * to_a
    # frequencies 0 .. K - 1 of the FFT along the azimuth: at least 0 and 1 (the angle's
    # inverse FFT needs 2 (K - 1) points), at most what n_azim bins hold
    k_max = n_azim // 2 + 1
    if k_max < 2:
        raise ValueError(f"template matching needs at least 2 azimuthal bins; the data have {n_azim}")
    if max_frequency is None:
        K = min(k_max, 64)
    elif not _whole(max_frequency) or not 2 <= max_frequency <= k_max:
        raise ValueError(f"max_frequency must be an integer from 2 to {k_max} (n_azim // 2 + 1 "
                         f"for {n_azim} azimuthal bins); got {max_frequency!r}")
    else:
        K = int(max_frequency)
    key = (tuple(np.round(radii, 9)), n_azim, float(sigma), float(gamma), bool(normalize_templates), K)
    cache = library._render_cache
    if key not in cache:
        cache.clear()  # one rendering per library at a time: they can be large
        cache[key] = DeviceCache((_render_packed(library, radii, n_azim, sigma, gamma,
                                                 normalize_templates, K), n_t), _templates_to_device)
    constants = [cache[key], DeviceCache(library.phase_index.astype(np.float32))]
    keep = None if frac_keep >= 1 else max(n_best, int(math.ceil(frac_keep * n_t)))
    if keep is not None and keep < n_t and polar.device == "gpu":
        # on a GPU the prefilter reads the template-major copy there
        if key + ("major",) not in cache:
            cache[key + ("major",)] = DeviceCache(template_major(*cache[key].host))
        constants.append(cache[key + ("major",)])

    def match(frames, tmpl, phases, major=None):
        xp = array_module(frames)
        if xp is np:
            spectra = _host_spectra(tmpl, major=keep is not None)
        else:
            spectra = tmpl.get(xp) + ((major.get(xp),) if major is not None else ())
        res = match_patterns(frames, spectra, n_best=n_best, gamma=gamma, keep=keep,
                             ring_means=ring_means)
        if offset:
            # the angle is found on the data's bins, which start `offset` degrees after the
            # templates': the spots, at +-theta + angle there (direct or mirrored), lie at
            # +-theta + angle + offset on the templates' azimuth
            res[..., 2] = (res[..., 2] + offset + 180) % 360 - 180
        ph = phases.get(xp)[res[..., 0].astype(xp.int64)]
        return xp.concatenate([res[..., :1], ph[..., None], res[..., 1:]], axis=-1)

    def match_eager(frames, *consts):
        """In memory on the host: blocks of patterns on all cores, one BLAS thread each."""
        if array_module(frames) is not np:
            return match(frames, *consts)
        with one_blas_thread():
            # the search layout first, its small products on one BLAS thread too: OpenBLAS's
            # own threads spin idle on a busy host (first calls with 1,081 templates at 128
            # radial bins took 4-6 s of CPU on the shared 2-core VM, 1 s with one thread)
            _host_spectra(consts[0], major=keep is not None)
            if frames.shape[0] > 64:
                return _in_host_blocks(lambda a, b: match(frames[a:b], *consts), frames.shape[0])
        return match(frames, *consts)

    data = map_frames(polar.data, match, (n_best, len(FIELDS)), np.float32,
                      constants=tuple(constants), eager_func=match_eager)
    axes = polar.axes_manager._get_navigation_axes_dicts() + [
        {"name": "rank", "size": n_best, "navigate": False},
        {"name": "field", "size": len(FIELDS), "navigate": False}]
    metadata = derived_metadata(polar, "Orientations", **{
        "Signal": {"signal_type": "orientation_matches"},
        "Matching": {"fields": list(FIELDS), "n_best": n_best, "frac_keep": frac_keep,
                     "gamma": gamma, "template_sigma": float(sigma), "max_frequency": K,
                     "normalize_templates": bool(normalize_templates),
                     "ring_means": bool(ring_means)},
        "Library": {"rotations": library.rotations.data.reshape(-1, 4).astype(np.float64),
                    "phase_index": library.phase_index,
                    "phase_names": [p.name for p in library.phases],
                    "space_groups": [p.space_group.number if p.space_group else -1
                                     for p in library.phases],
                    "point_groups": [p.point_group.name for p in library.phases],
                    "reciprocal_radius": library.reciprocal_radius},
    })
    return OperationResult(data, axes, metadata, "orientation_matches", lazy=polar._lazy)


def _quaternion_product(a, b):
    """Hamilton products ``a b`` of quaternions ``(..., 4)`` (``w, x, y, z``), broadcast."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw],
                    axis=-1)


_PROPER = {}


def _proper_rotations(point_group):
    """The quaternions of ``point_group``'s proper rotations, kept per group (orix takes 5 ms
    to find the subgroup)."""
    data = np.asarray(point_group.data, dtype=np.float64)
    key = (point_group.name, data.tobytes(), tuple(np.asarray(point_group.improper).ravel()))
    if key not in _PROPER:
        _PROPER[key] = np.asarray(point_group.proper_subgroup.data, dtype=np.float64)
    return _PROPER[key]


def misorientation_angles(a, b, point_group):
    """Degrees between orientations ``a`` and ``b`` (quaternions ``(..., 4)``) up to the
    crystal symmetry ``point_group`` (an orix ``Symmetry``): as orix's
    ``Orientation.angle_with``, computed directly.

    ``b``'s symmetry-equivalent forms are ``S b`` for the proper rotations ``S`` of the
    point group; the angle between two unit quaternions is ``2 acos |<a, b>|``, so the
    smallest over ``S`` comes from the largest ``|<a, S b>|`` (one-sided: turning both by
    the group only conjugates the same set). orix builds misorientation objects on the way,
    which cost 1-3 ms a call in every refinement, more than the arithmetic.

    Examples
    --------
    >>> from orix.quaternion import Rotation
    >>> from orix.quaternion.symmetry import Oh
    >>> q = Rotation.from_axes_angles([0, 0, 1], np.deg2rad([0, 30, 95])).data
    >>> np.round(misorientation_angles(q[:1], q, Oh), 6).tolist()   # 95 degrees = 5 (cubic)
    [0.0, 30.0, 5.0]
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ops = _proper_rotations(point_group)  # (k, 4)
    turned = _quaternion_product(ops, b[..., None, :])  # (..., k, 4)
    dot = np.abs(np.einsum("...i,...ki->...k", a, turned)).max(axis=-1)
    return np.degrees(2 * np.arccos(np.clip(dot, 0.0, 1.0)))


def distinct_candidates(rotations, phase_index, phases, min_misorientation=5.0):
    """Which matches are another orientation than the best one: ``(N, n_best)`` booleans.

    A match is distinct when its orientation is more than ``min_misorientation`` degrees
    from the best's (up to the crystal symmetry of the best's phase) or of another phase; the
    best itself is not.

    Parameters
    ----------
    rotations : array ``(N, n_best, 4)``
        Quaternions of the matches (best first).
    phase_index : array ``(N, n_best)``
        Their phases (indices into ``phases``).
    phases : list of orix ``Phase``
    min_misorientation : float
        Degrees.

    Examples
    --------
    >>> from orix.crystal_map import Phase
    >>> from orix.quaternion import Rotation
    >>> q = Rotation.from_axes_angles([0, 0, 1], np.deg2rad([0, 2, 45, 90])).data[None]
    >>> distinct_candidates(q, np.zeros((1, 4)), [Phase(point_group="m-3m")]).tolist()
    [[False, False, True, False]]
    """
    rot = np.asarray(rotations, dtype=np.float64)
    ph = np.asarray(phase_index).astype(np.int64)
    n_best = rot.shape[1]
    far = np.zeros(ph.shape, bool)
    if n_best < 2:
        return far
    for p, phase in enumerate(phases):
        own = ph[:, 0] == p
        if not own.any():
            continue
        angle = misorientation_angles(rot[own, :1], rot[own, 1:], phase.point_group)
        far[own, 1:] = (angle > min_misorientation) | (ph[own, 1:] != p)
    return far


def _twin_alternative(p, best, phase, models, phase_list, gamma, radial, azimuthal, step,
                      min_step, exponent, sigma, min_similarity=0.95, min_misorientation=5.0,
                      exact_similarity=0.999):
    """For each pattern's best refined matrix: the other orientation (not symmetry-equivalent,
    more than ``min_misorientation`` degrees away) whose spots it maps onto its own and whose
    noiseless pattern is most alike (at least ``min_similarity``), refined on the pattern.

    Returns ``(n, 7)``: its quaternion, refined score, contrast score and similarity to the
    best (of the noiseless patterns as recorded: intensities ``** exponent``); NaN where
    there is none. Twins already ``exact_similarity`` alike are kept as found (refined
    score NaN). Matching lists one in-plane angle per template, so such a
    twin (exactly down <111>, a cubic crystal turned 60 degrees about the beam) is never among
    the ``n_best``: get_reliability weighs it besides them.
    """
    from .kernels.refine import (contrast_scores, matrix_quaternions, model_similarity,
                                 pattern_images, refine_rotations)

    n = best.shape[0]
    out = np.full((n, 7), np.nan)
    for ph, model in models.items():
        rows = np.flatnonzero(phase == ph)
        if not rows.size:
            continue
        images, count = pattern_images(best[rows], model, gamma, sigma)
        i, j = np.nonzero(np.arange(images.shape[1]) < count[:, None])
        if not i.size:
            continue
        # most images are the crystal's own symmetries: compare patterns for the others only
        # (crystal-to-laboratory matrices are the rotations' transposes)
        pair = matrix_quaternions(np.swapaxes(np.stack([best[rows][i], images[i, j]], axis=1),
                                              -1, -2))
        other = distinct_candidates(pair, np.full(pair.shape[:2], ph), phase_list,
                                    min_misorientation)[:, 1]
        i, j = i[other], j[other]
        if not i.size:
            continue
        sim = model_similarity(best[rows][i], images[i, j], model, exponent, sigma)
        keep = sim >= min_similarity
        if not keep.any():
            continue
        top = np.full(rows.size, -1)
        value = np.full(rows.size, -np.inf)
        for q in np.flatnonzero(keep):  # the most alike per pattern
            if sim[q] > value[i[q]]:
                value[i[q]], top[i[q]] = sim[q], q
        has = np.flatnonzero(top >= 0)
        sel = rows[has]
        found = images[i[top[has]], j[top[has]]].copy()
        score = np.full(sel.size, np.nan)
        # an image that already predicts the best one's pattern (exactly down a zone axis)
        # is the twin as it is: refining it (half of the near-zone patterns) changes nothing
        loose = value[has] < exact_similarity
        if loose.any():  # (device patterns: refined there, the matrices and scores back)
            got = refine_rotations(p, found[loose], model, gamma, radial, azimuthal, step,
                                   min_step, rows=sel[loose])
            found[loose], score[loose] = (to_host_array(a) for a in got)
        out[sel, :4] = matrix_quaternions(found.transpose(0, 2, 1))
        out[sel, 4] = score
        out[sel, 5] = to_host_array(contrast_scores(p, found[:, None], model, gamma, radial,
                                                    azimuthal, rows=sel))[:, 0]
        out[sel, 6] = np.where(loose, model_similarity(best[sel], found, model, exponent, sigma),
                               value[has])
    return out


# orientations with no relation to a pattern's (drawn once, fixed): where refinement finds no
# other orientation among the candidates, the best-scoring of them is the alternative that
# get_reliability weighs the best against (see _probe_alternative). Their spread is the
# significance's unit: from 16 it was too noisy to tell noise from crystals (over 32 frames
# without a crystal up to 5.3 deviations, 48 crystal patterns down to 3.3); from 128, at
# most 4.5 and at least 5.9 (their spots and symmetric forms found once: no slower)
PROBES = 128
# the significance below which refinement sees no crystal (get_reliability's default threshold)
MIN_SIGNIFICANCE = 5.0


def _probe_rotations():
    rng = np.random.default_rng(20261207)
    q = rng.standard_normal((PROBES, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


_PROBE_FORMS = {}


def _probe_forms(point_group):
    """The probes' forms ``S q`` under the proper rotations ``S`` of ``point_group``,
    ``(4, k * PROBES)`` (rotation-major), kept per group: misorientations to 128 probes,
    taken per pattern as in :func:`misorientation_angles`, were a third of a refinement.
    (C-contiguous as the right operand: a transposed view made the product 100x slower.)"""
    ops = _proper_rotations(point_group)
    key = (ops.tobytes(), PROBES)
    if key not in _PROBE_FORMS:
        forms = _quaternion_product(ops[:, None, :], _probe_rotations()[None]).reshape(-1, 4)
        _PROBE_FORMS[key] = np.ascontiguousarray(forms.T)
    return _PROBE_FORMS[key]


def _probe_alternative(p, best, phase, models, phase_list, gamma, radial, azimuthal, exponent,
                       sigma, min_misorientation=5.0):
    """How the best orientation of each pattern compares with :data:`PROBES` fixed
    orientations unrelated to it. Returns ``(alt, significance)``:

    * ``alt`` ``(n, 7)``, as :func:`_twin_alternative` returns an alternative: the
      best-scoring of them (quaternion, refined score NaN, contrast score, similarity to the
      best);
    * ``significance`` ``(n,)``: how many standard deviations of their contrast scores the
      best's lies above their mean (NaN where they all score alike, e.g. a blank frame).

    Over 96 simulated Si patterns (500-20,000 spot counts, 2-degree library) the best stood
    at least 5.9 deviations above them; over 64 vacuum frames (the direct beam on a flat
    background), amorphous rings and shot noise at most 4.5 (medians 10.0-10.6 and 2.4-3.1;
    against the 16 orientations used before 2026-12-07 evening, 5.5-16 deviations and 1-3, but on
    more frames the two overlapped: 3.3 and 5.3). Without
    them, frames without the crystal's spots got reliability 1 after refinement whenever
    their ``n_best`` matches were neighbours of each other, as they usually are.
    """
    from .kernels.refine import (contrast_scores, matrix_quaternions, model_similarity,
                                 quaternion_matrices, shared_contrast_scores)

    n = best.shape[0]
    alt = np.full((n, 7), np.nan)
    significance = np.full(n, np.nan)
    probes = _probe_rotations()
    mats = quaternion_matrices(probes).swapaxes(-1, -2)  # crystal -> laboratory
    for ph, model in models.items():
        sel = np.flatnonzero(phase == ph)
        if not sel.size:
            continue
        best_q = matrix_quaternions(best[sel].transpose(0, 2, 1))
        # as distinct_candidates, with the probes' symmetric forms made once: one product
        forms = _probe_forms(phase_list[ph].point_group)  # (4, k * PROBES)
        dot = np.abs(best_q @ forms).reshape(sel.size, -1, PROBES).max(axis=1)
        other = np.degrees(2 * np.arccos(np.clip(dot, 0.0, 1.0))) > min_misorientation
        if array_module(p) is np:  # the probes' spots found once for every pattern
            score = np.concatenate([
                contrast_scores(p, best[sel][:, None], model, gamma, radial, azimuthal, rows=sel),
                shared_contrast_scores(p, mats, model, gamma, radial, azimuthal, sel)], axis=1)
        else:  # (device patterns: one call, its matrices in and scores out)
            both = np.concatenate([best[sel][:, None],
                                   np.broadcast_to(mats, (sel.size,) + mats.shape)], axis=1)
            score = to_host_array(contrast_scores(p, both, model, gamma, radial, azimuthal,
                                                  rows=sel))
        own, score = score[:, 0], np.where(other, score[:, 1:], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.nanstd(score, axis=1)
            # the scores do not scale with the pattern: a spread this small is rounding (a
            # constant frame's polar bins differ by float32's last digits), not a signal
            significance[sel] = np.where(spread > 1e-7, (own - np.nanmean(score, axis=1)) / spread,
                                         np.nan)
        pick = np.argmax(np.where(np.isnan(score), -np.inf, score), axis=1)
        alt[sel, :4] = probes[pick]
        alt[sel, 5] = score[np.arange(sel.size), pick]
        alt[sel, 6] = model_similarity(best[sel], mats[pick], model, exponent, sigma)
    return alt, significance


def _candidate_similarity(cand_q, phases, models, gamma, sigma, phase_list):
    """Correlation of every candidate's noiseless spot pattern with the best's
    (:func:`~diffgpu.kernels.refine.model_similarity`): ``(..., n_best)``, 1 for the best,
    NaN for candidates that are the best's orientation (get_reliability weighs only the
    others)."""
    from .kernels.refine import model_similarity, quaternion_matrices

    n_best = cand_q.shape[-2]
    mats = quaternion_matrices(cand_q.reshape(-1, n_best, 4)).swapaxes(-1, -2)
    ph = phases.reshape(-1, n_best)
    far = distinct_candidates(cand_q.reshape(-1, n_best, 4), ph, phase_list)
    out = np.full(ph.shape, np.nan)
    out[:, 0] = 1.0
    for rank in range(1, n_best):
        for pa in np.unique(ph[:, 0]):
            for pb in np.unique(ph[:, rank]):
                sel = np.flatnonzero((ph[:, 0] == pa) & (ph[:, rank] == pb) & far[:, rank])
                if sel.size:
                    out[sel, rank] = model_similarity(mats[sel, 0], mats[sel, rank], models[pa],
                                                      gamma, sigma, model_b=models[pb])
    return out.reshape(phases.shape)


# A pattern mirrored across the detector's x axis (M = diag(1, -1, 1)) is the pattern of the
# orientation turned half round the laboratory's y axis: M v = C2y (-v), and -g is a
# reflection of the same intensity (Friedel). So a mirrored match of rotation R is R * C2y,
# for every crystal: (M R M), as before 2026-12-07, is that only where C2y (about the
# crystal's y axis) is one of the crystal's symmetries (m-3m, mmm, 6/mmm), and was 180
# degrees off for 4/m, -3 or -1.
_HALF_TURN_Y = np.diag([-1.0, 1.0, -1.0])


def match_quaternions(m, library_rotations):
    """Quaternions (crystal orientation, diffsims' convention) of template matches.

    Parameters
    ----------
    m : array ``(..., n_best, 5)``
        Matches as :meth:`~diffgpu.PolarPatterns.get_orientation` records them: template
        index, phase, score, in-plane angle (degrees), and a negative fifth column for a
        mirrored template.
    library_rotations : array ``(templates, 4)``
        The library's quaternions.

    Returns
    -------
    numpy.ndarray ``(..., n_best, 4)``

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.orientation import match_quaternions
    >>> m = np.array([[[0, 0, 1.0, 90.0, 1.0]]])    # template 0 (identity) turned 90 degrees
    >>> np.round(match_quaternions(m, np.array([[1.0, 0, 0, 0]])), 4).tolist()
    [[[0.7071, 0.0, 0.0, -0.7071]]]
    """
    from .kernels.refine import matrix_quaternions, quaternion_matrices

    m = np.asarray(m, dtype=np.float64)
    idx = m[..., 0].astype(np.int64)
    mats = quaternion_matrices(np.asarray(library_rotations, dtype=np.float64))[idx]
    mirrored = m[..., 4] < 0
    mats = np.where(mirrored[..., None, None], mats @ _HALF_TURN_Y, mats)
    g = -np.deg2rad(m[..., 3])  # a pattern turned by +gamma is R * Rz(-gamma) in diffsims
    c, s = np.cos(g), np.sin(g)
    rz = np.zeros(g.shape + (3, 3))
    rz[..., 0, 0], rz[..., 0, 1], rz[..., 1, 0], rz[..., 1, 1], rz[..., 2, 2] = c, -s, s, c, 1
    # (orix's from_matrix returns the wrong half turn for exactly symmetric matrices)
    return matrix_quaternions(mats @ rz)


def _check_same_library(library, recorded):
    """A ValueError unless ``library`` (a :class:`TemplateLibrary`) is the one recorded in
    matches' ``metadata.Library``: the same templates' rotations, in order, and phases."""
    mine = library.rotations.data.reshape(-1, 4).astype(np.float64)
    theirs = np.asarray(recorded.rotations, dtype=np.float64).reshape(-1, 4)
    names = [p.name for p in library.phases]
    their_names = [str(n) for n in recorded.phase_names]
    problem = None
    if mine.shape != theirs.shape:
        problem = f"it has {len(mine)} templates, the matches' library {len(theirs)}"
    elif names != their_names:
        problem = f"its phases are {names}, the matches' library's {their_names}"
    elif not np.array_equal(np.asarray(library.phase_index), np.asarray(recorded.phase_index)):
        problem = "its templates belong to other phases than the matches' library's"
    elif not np.allclose(mine, theirs, atol=1e-6):  # (saved as float64: the same to rounding)
        differ = int(np.sum(~np.isclose(mine, theirs, atol=1e-6).all(axis=1)))
        problem = f"{differ} of its {len(mine)} templates have other rotations"
    if problem:
        raise ValueError(f"the library is not the one these matches were made with ({problem}): "
                         "pass the library given to get_orientation")


def _spread_sample(data, nav_dims, n=32, runs=4):
    """Up to ``n`` items of ``data`` (navigation axes first) spread over the scan, as an
    array ``(m, ...)``; slices, so device-resident data move to the host once, explicitly.

    ``runs`` runs of consecutive positions along scan rows, evenly spaced over the scan: the
    same positions whatever the chunks (lazy and eager refine alike), and few chunks of a
    lazy scan made again for them (32 positions one apart touched up to 32 chunks: all of a
    small scan's, each made twice).
    """
    nav = data.shape[:nav_dims]
    rest = data.shape[nav_dims:]
    flat = int(np.prod(nav))
    row = nav[-1] if nav else 1
    per = -(-n // runs)
    if flat <= n or row < per:
        every = max(1, flat // n)
        return data.reshape((flat,) + rest)[::every][:n]
    rows = flat // row
    pieces = []
    for k in range(runs):
        r = round(k * (rows - 1) / max(1, runs - 1))  # a scan row, first to last
        c = round((row - per) * (k + 0.5) / runs)  # and a place along it
        at = np.unravel_index(r, nav[:-1]) if nav_dims > 1 else ()
        pieces.append(data[tuple(int(i) for i in at) + (slice(c, c + per),)])
    if hasattr(data, "dask"):
        import dask.array as da

        return da.concatenate(pieces)[:n]
    return array_module(data).concatenate(pieces)[:n]


def _within_detector(models, sample, radial):
    """The spot models cut to the radius inside which the sampled polar patterns have every
    bin: where the radial range reaches past a detector's edge (its short side, or its
    corners), the bins there are NaN and read as 0, and refinement tilted the crystals to
    take the excitation off the spots it cannot see (a 256 x 192 detector integrated to
    the long side's radius: median error 0.36 degrees, fewer within 2 degrees than
    matched). Only a run of such bins out to the last is the detector's edge (a beam stop
    or masked pixels further in are not)."""
    bad = ~np.isfinite(sample).all(axis=(0, 2))
    if not bad.size or not bad[-1] or bad.all():
        return models
    first = bad.size - int(np.argmin(bad[::-1]))  # the outer run of bins with gaps
    cut = radial[0] + radial[1] * (first - 1)  # the last bin read whole
    return {p: tuple(m[:4]) + (min(float(m[4]), cut),) for p, m in models.items()}


def refine_orientations(matches, polar, library, gamma=None, smooth=1.0, step=0.5, min_step=0.02,
                        accelerating_voltage=None, max_excitation_error=None, candidates=3,
                        margin=0.1, intensity_exponent=None, fit_center=True):
    """Shared implementation of :meth:`OrientationMatches.refine`: an in-memory
    ``orientation_matches`` :class:`~diffgpu.results.OperationResult` on the host.

    Device-resident patterns are refined on their GPU (:mod:`diffgpu.kernels.refine`'s
    device kernels): per block, only the candidates' matrices, rows and scores cross (small
    host arrays, moved explicitly), and the block's result goes back to the patterns' device,
    so lazy graphs keep their CuPy meta; the joined result is moved to the host once at the
    end. A sample of up to 32 patterns is moved to the host once, explicitly, to estimate the
    intensity exponent and the spots' width (host kernels). The spot geometry of twins
    (:func:`_twin_alternative`: images and similarities of noiseless patterns, no pattern
    data) is computed on the host.
    """
    from .kernels.refine import (contrast_scores, estimate_center_offset, estimate_exponent,
                                 estimate_spot_width, matrix_quaternions, prepare_patterns,
                                 quaternion_matrices, refine_rotations, shift_center)

    library = _as_library(library)  # (the simulation matched: its library is cached)
    if tuple(polar.axes_manager.navigation_shape) != tuple(matches.axes_manager.navigation_shape):
        raise ValueError(f"the polar patterns' scan {polar.axes_manager.navigation_shape} is not "
                         f"the matches' scan {matches.axes_manager.navigation_shape}")
    _check_same_library(library, matches.metadata.Library)
    for name, value in (("step", step), ("min_step", min_step)):
        if _positive(value) is None:
            raise ValueError(f"{name} must be a positive number of degrees; got {value!r}")
    if min_step > step:
        raise ValueError(f"min_step ({min_step!r}) must not exceed step ({step!r}): the search "
                         "halves the step down to min_step")
    # (a negative width was taken as none, a NaN failed deep in the kernel's taps)
    smooth_ = _real(smooth)
    if smooth_ is None or not 0 <= smooth_ < math.inf:
        raise ValueError(f"smooth (the patterns' Gaussian smoothing, in bins) must be a number "
                         f">= 0 (0: none); got {smooth!r}")
    for name, value, unit in (("accelerating_voltage", accelerating_voltage, "kV"),
                              ("max_excitation_error", max_excitation_error, "1/Å")):
        if value is not None and _positive(value) is None:
            raise ValueError(f"{name} must be a positive number ({unit}), or None for the "
                             f"library's; got {value!r}")
    cal = _polar_calibration(polar)
    az, rad, to_a, to_deg = cal.azimuth, cal.radius, cal.to_angstrom, cal.to_degrees
    radial = (float(rad.axis[0]) * to_a, float(rad.scale) * to_a)
    azimuthal = (float(az.axis[0]) * to_deg, float(az.scale) * to_deg)
    if gamma is not None:
        _check_gamma(gamma)
    gamma = float(matches.metadata.Matching.gamma if gamma is None else gamma)
    lib_q = np.asarray(matches.metadata.Library.rotations, dtype=np.float64)
    phase_list = matches._phases()[0]
    nav = tuple(matches.data.shape[:-2])
    n_best, n_cols = (int(n) for n in matches.data.shape[-2:])
    if not _whole(candidates) or candidates < 1:
        raise ValueError(f"candidates must be a positive integer; got {candidates!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1); got {margin!r}")
    c = min(int(candidates), n_best)
    if intensity_exponent is not None and not 0 < intensity_exponent <= 4:
        raise ValueError(f"intensity_exponent must be in (0, 4]; got {intensity_exponent!r}")
    # lazy matches not computed yet are computed with the refinement, in one graph: each
    # chunk of polar patterns is made once (from a file: read once) for both
    m_rows = matches._computed_matches()
    one_pass = m_rows is None and hasattr(polar.data, "dask")
    if m_rows is None:
        m_rows = matches.data if one_pass else matches._host_matches()
    models = {p: library.kinematic_model(p, accelerating_voltage, max_excitation_error)
              for p in range(len(phase_list))}

    def candidate_rows(mb):
        """For matches ``(n, n_best, columns)``: the matrices to start from (``(n, n_best, 3,
        3)``, crystal -> laboratory), phases, and which candidates to refine."""
        start = match_quaternions(mb, lib_q)
        # crystal -> laboratory matrices: diffsims puts g of rotation R at ~R * g
        mats = quaternion_matrices(start).swapaxes(-1, -2)
        phases = mb[..., 1]
        # the other candidates are refined only where their correlation comes within
        # `margin` of the best's: near-twins and close phases, decided by the full spot
        # model. Besides the first `c`, the best-ranked match of another orientation: the
        # alternative that get_reliability weighs against the best (on the library's grid,
        # 0.5 degrees off, a twin's predicted pattern differs from the truth's where refined
        # it would not)
        contender = mb[..., 2] >= (1 - margin) * mb[..., :1, 2]
        contender[..., 0] = True
        far = distinct_candidates(start, phases, phase_list)
        first_far = np.zeros_like(far)
        np.put_along_axis(first_far, far.argmax(axis=-1)[..., None], True, axis=-1)
        # (candidates near the best converge to its optimum: refining them cost a third of
        # the time and changed nothing measurable once the distinct ones are refined)
        rank = np.arange(n_best)
        contender &= ((rank < c) & (far | (rank == 0))) | (first_far & far)
        return mats, phases, contender

    # up to 32 patterns spread over the scan (a slice: one explicit move to the host for
    # device-resident patterns), at their best matches, of the phase most of them have: the
    # intensity exponent (unless given) and the spots' width are estimated from them
    sample = _spread_sample(polar.data, len(nav))
    m_sample = _spread_sample(m_rows, len(nav))
    if hasattr(sample, "dask") or hasattr(m_sample, "dask"):
        import dask

        sample, m_sample = dask.compute(sample, m_sample)
    sample = np.asarray(to_host_array(sample))
    m_sample = np.asarray(to_host_array(m_sample), dtype=np.float64)
    models = _within_detector(models, sample, radial)
    ph = m_sample[:, 0, 1].astype(np.int64)
    main = int(np.bincount(ph).argmax())
    pick = ph == main
    at = candidate_rows(m_sample)[0][:, 0]
    # only the sampled patterns that show a crystal: a scan half vacuum or amorphous support
    # (frames whose best match is some template, spots nowhere) made the spots' width NaN,
    # the exponent and the refined errors worse (median 0.10 -> 0.17 degrees on Si)
    sp = prepare_patterns(sample, gamma, smooth)
    seen = _probe_alternative(sp, at, ph, {main: models[main]}, phase_list, gamma, radial,
                              azimuthal, 1.0, radial[1])[1] >= MIN_SIGNIFICANCE
    if np.count_nonzero(pick & seen) >= min(4, np.count_nonzero(pick)):
        pick &= seen
    sp, sample, at = sp[pick], sample[pick], at[pick]
    given_exponent = intensity_exponent
    if intensity_exponent is None:
        intensity_exponent = estimate_exponent(sample, at, models[main], radial, azimuthal,
                                               smooth)
    # the patterns' centre: a pixel off (an uncalibrated centre) biased every refined
    # orientation; the offset common to the sample, from its refined orientations, is taken
    # out of every pattern where it is at least a quarter of a radial bin
    center = np.zeros(2)
    if fit_center and pick.any():
        mg = gamma * float(intensity_exponent)
        at_refined = refine_rotations(sp, at, models[main], mg, radial, azimuthal, step, min_step)[0]
        center = estimate_center_offset(sp, at_refined, models[main], mg, radial, azimuthal)
    recenter = bool(np.hypot(*center) >= 0.25 * radial[1])
    if recenter:
        sample = shift_center(sample, center, radial, azimuthal)
        models = _within_detector(models, sample, radial)
        if given_exponent is None:
            intensity_exponent = estimate_exponent(sample, at, models[main], radial, azimuthal,
                                                   smooth)
    # patterns are compared at the spots' width, or the radial bins' where wider
    spot_width = estimate_spot_width(sample, at, models[main], radial, azimuthal)
    sigma = max(radial[1], spot_width) if np.isfinite(spot_width) else radial[1]
    model_gamma = gamma * float(intensity_exponent)

    def refine(frames, mb, models):
        # the patterns stay where they are (device blocks are prepared, searched and scored
        # on their GPU); the matches, the per-candidate matrices and scores are small host
        # arrays, moved explicitly to and from the kernels, and the result goes back where
        # the frames were
        xp = array_module(frames)
        n = frames.shape[0]
        mb = np.asarray(to_host_array(mb), dtype=np.float64).reshape(n, n_best, n_cols)
        mat, phase, todo = candidate_rows(mb)
        mat = mat.copy()
        if recenter:
            frames = shift_center(frames, center, radial, azimuthal)
        p = prepare_patterns(frames, gamma, smooth)
        scores = np.full((n, n_best), -np.inf)
        for ph, model in models.items():  # every rank of a phase in one search
            i, rank = np.nonzero((phase == ph) & todo)
            if i.size:
                got = refine_rotations(p, mat[i, rank], model, model_gamma, radial, azimuthal,
                                       step, min_step, rows=i)
                mat[i, rank], scores[i, rank] = (to_host_array(a) for a in got)
        # every candidate (refined or as matched) scored against the patterns less their
        # rings' background: what get_reliability compares
        contrast = np.zeros((n, n_best))
        for ph, model in models.items():
            own = phase == ph
            if own.any():
                rows = np.flatnonzero(own.any(axis=1))
                part = to_host_array(contrast_scores(p, mat[rows], model, model_gamma, radial,
                                                     azimuthal, rows=rows))
                contrast[rows] = np.where(own[rows], part, contrast[rows])
        quats = matrix_quaternions(mat.transpose(0, 1, 3, 2))
        chosen = scores.argmax(axis=1)
        best, best_phase = mat[np.arange(n), chosen], phase[np.arange(n), chosen]
        alt = _twin_alternative(p, best, best_phase, models, phase_list, model_gamma, radial,
                                azimuthal, step, min_step, float(intensity_exponent), sigma)
        # unrelated orientations: how far the best stands out from them, and, where there
        # is no twin and no other orientation among the candidates, the alternative
        probe, significance = _probe_alternative(p, best, best_phase, models, phase_list,
                                                 model_gamma, radial, azimuthal,
                                                 float(intensity_exponent), sigma)
        lone = ~np.isfinite(alt[:, 0]) & ~distinct_candidates(
            quats, phase, phase_list).any(axis=1)
        alt = np.where(lone[:, None], probe, alt)
        # refined rotations and scores (-inf where not refined), contrast scores, the
        # alternative predicting (nearly) the same pattern, the significance, the winner
        out = np.concatenate([quats.reshape(n, 4 * n_best), scores, contrast, alt,
                              significance[:, None], chosen[:, None]], axis=1)
        return xp.asarray(out)

    def refine_eager(frames, mb, models):
        """In memory: blocks of patterns on all cores (device patterns: one block)."""
        if array_module(frames) is not np or frames.shape[0] <= 64:
            return refine(frames, mb, models)
        return _in_host_blocks(lambda a, b: refine(frames[a:b], mb[a:b], models),
                               frames.shape[0])

    width = 6 * n_best + 9
    data = map_frames(polar.data, refine, (width,), np.float64, constants=(models,),
                      per_frame=(m_rows.reshape(nav + (n_best * n_cols,)),),
                      eager_func=refine_eager)
    if one_pass:
        import dask

        data, m = dask.compute(data, matches.data)
        m = matches._keep_matches(m)
    else:
        m = m_rows
        if hasattr(data, "compute"):
            data = data.compute()
    data = np.asarray(to_host_array(data))
    start = match_quaternions(m, lib_q)
    chosen = data[..., -1].astype(np.int64)
    # all n_best candidates: refined rotation and score where refined, else as matched (NaN)
    refined_s = data[..., 4 * n_best:5 * n_best]
    done = np.isfinite(refined_s)
    cand_q = np.where(done[..., None], data[..., :4 * n_best].reshape(nav + (n_best, 4)), start)
    cand_s = np.where(done, refined_s, np.nan)
    contrast = data[..., 5 * n_best:6 * n_best].copy()
    twin = data[..., 6 * n_best:6 * n_best + 7]
    significance = data[..., 6 * n_best + 7]
    m = m.copy()  # (lazy matches' host copy is cached)
    if (chosen > 0).any():  # the refined winner becomes the best match
        idx = np.indices(nav)
        for a in (m, cand_q, cand_s, contrast):  # candidates along the axis after the scan's
            winner = a[(*idx, chosen)].copy()
            a[(*idx, chosen)] = a[(*idx, np.zeros_like(chosen))]
            a[(*idx, np.zeros_like(chosen))] = winner
    # how alike the candidates' noiseless patterns are, as recorded (intensities ** exponent)
    similarity = _candidate_similarity(cand_q, m[..., 1].astype(np.int64), models,
                                       float(intensity_exponent), sigma, phase_list)
    metadata = matches.metadata.as_dictionary()
    metadata["Refined"] = {"rotations": cand_q[..., 0, :], "score": cand_s[..., 0],
                           "candidate_rotations": cand_q, "candidate_scores": cand_s,
                           "contrast_scores": contrast, "similarity": similarity,
                           "twin_rotations": twin[..., :4], "twin_scores": twin[..., 4],
                           "twin_contrast_scores": twin[..., 5], "twin_similarity": twin[..., 6],
                           "significance": significance,
                           "changed_match": chosen > 0,
                           "parameters": {"gamma": gamma, "smooth": smooth, "step": step,
                                          "min_step": min_step, "candidates": c,
                                          "margin": margin,
                                          "intensity_exponent": float(intensity_exponent),
                                          "spot_width": float(spot_width),
                                          # (x, y) 1/Å; taken out where recentred
                                          "center_offset": [float(v) for v in center],
                                          # spots further out are left out (1/Å)
                                          "radius": float(models[main][4]),
                                          "recentred": recenter}}
    metadata.setdefault("General", {})["title"] = \
        f"Refined {matches.metadata.General.title}".strip()
    return OperationResult(m.astype(np.float32), [ax.get_axis_dictionary()
                                                  for ax in matches.axes_manager._axes],
                           metadata, "orientation_matches")
