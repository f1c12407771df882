"""Lattice fits to Bragg disk positions, vectorised over frames (NumPy or CuPy).

Positions come as the fixed-capacity, NaN-padded arrays of
:class:`~diffgpu.kernels.disks.DiskFinder`: ``(n, K, 2)`` positions and ``(n, K)`` weights.
Every frame is fitted at once with 3 x 3 normal equations per frame; nothing loops over
frames in Python.

Model: disk ``(h, k)`` of a frame sits at ``o + h g1 + k g2``. Each frame is indexed from a
seed disk outwards (see :func:`fit_lattices`): rounding every position in the reference
basis, as before, gave a wrong lattice, with no warning, once a rotation or strain moved the
far disks by half a spacing (from about 10 degrees or 13 % on a 160 px detector with 18 px
spacings). The seed is a disk of the frame, so beam shifts of any size are absorbed. The
fit is weighted least squares (weights: disk intensities, which is the inverse of the
shot-noise variance of a position up to a constant, capped at 2 x the frame's median so that
no single spot dominates), then disks further than ``tolerance`` from their lattice site are
rejected and the frame refitted (re-indexing with the frame's own fit each time, until the
disks kept no longer change, at most ``iterations`` times). The adaptive tolerance is
robust: 4.8 x the median distance of the fitted disks from their sites (4 x the RMS for
Gaussian errors), which a few bright outliers (hot pixels beside disks) do not inflate as
they did the weighted RMS used before. A frame whose disks do not sit on its fitted lattice
(RMS residual above a tenth of the spacing) gets NaN.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numba
import numpy as np

from ..device import array_module, to_host_array

__all__ = ["fit_lattices", "find_basis", "reduce_basis", "LATTICE_FIELDS", "BasisError"]

LATTICE_FIELDS = ("origin_x", "origin_y", "g1_x", "g1_y", "g2_x", "g2_y", "n_disks", "rms_residual")


class BasisError(ValueError):
    """No lattice basis could be found in the disk positions (the message says what to set)."""


# Indexing constants. A rotation by theta moves a disk n spacings from the seed by about
# n * theta spacings, a strain e by n * e: near the seed both stay well below the half
# spacing that rounding tolerates, far from it they do not.
_SEEDS = 3          # strongest disks tried as the seed
_NEAR = 1.8         # neighbours: within this many (longer, reduced) reference spacings of the seed
_GROW = 4.5         # second fit: disks within this many spacings of the seed
_MATCH = 0.4        # a neighbour matches a site within this fraction of the shortest spacing
_STEP = 5.0         # degrees between trial rotations (neighbours move < 0.08 spacing in half a step)
_UNTURNED = 0.75    # an unrotated score of this fraction of the neighbours skips the search
_SEED_OFF = 0.15    # a seed further than this fraction of the spacing from the site its
#                     neighbours put it on is no lattice disk (a point off the lattice sees
#                     its neighbours all shifted alike, which matches as well)
_SUPPORT = 0.2      # ... and the lattice of its neighbours must put at least two thirds of the
#                     disks within _GROW spacings this close to sites (a few neighbours of a
#                     spurious seed can fit a wrong lattice exactly; with half, a hot pixel
#                     near the detector's corner passed with 18 of 36 disks)
_MAX_RMS = 0.1      # a fit whose RMS residual exceeds this fraction of the spacing is refused
_REJECT = 4.8       # adaptive rejection: disks further from their site than this many times the
#                     median distance of the previous fit's disks (4.8 x the median is 4 x the
#                     RMS for Gaussian errors). The weighted RMS it replaced was inflated by the
#                     outlier itself: a hot pixel next to a disk (0.5 px RMS) was kept
_FLOOR = 1 / 400    # ... but never below this fraction of the spacing (1/40, 0.4 px, kept the
#                     disks that hot pixels nearby had moved by a few tenths of a pixel)
_WEIGHT_CAP = 2.0   # no disk weighs more than this many times the frame's median weight: bright
#                     spurious spots (hot pixels) otherwise pull the fit to themselves and keep
#                     their residuals too small to be rejected (with 3 or 5, ten hot pixels of
#                     1e6 counts still failed or biased frames; the direct beam loses weight)
_SYMMETRY = 0.1     # a reference within this (lattice units) of 4- or 6-fold symmetry has it
_TURN = 0.005       # the output basis has the least ||V - I||^2 + _TURN (1 - cos theta): a
#                     quarter turn weighs as much as a strain of +5 % and -5 % along two axes
# relabellings of a fitted basis tried for the output: the 20 integer matrices of entries
# -1, 0, 1 and determinant 1 (among them the turns of square and hexagonal lattices), the
# identity first
_RELABEL = np.array([np.eye(2)] + [
    m for m in (np.array(v, float).reshape(2, 2) for v in itertools.product((-1, 0, 1), repeat=4))
    if m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0] == 1 and not np.array_equal(m, np.eye(2))])


class _Plan(NamedTuple):
    """Host constants of the indexing, made once per reference basis by :func:`_plan`."""

    g0: np.ndarray       # the basis given (columns g1, g2): outputs are made closest to it
    gr: np.ndarray       # its reduced basis, in which disks are indexed
    ar: np.ndarray       # inverse of gr
    cands: np.ndarray    # (20, 2, 2): fitted basis @ cands[i] are the outputs to choose from
    cos: np.ndarray      # trial rotations (smallest first), their cosines and sines
    sin: np.ndarray
    spacing: float       # shortest lattice spacing of the reference
    near: float          # radius of the seed's neighbourhood
    grow: float          # radius of the second fit


def _rot(deg):
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _plan(basis):
    """The indexing constants of a reference basis (host array, columns ``g1``, ``g2``).

    The trial rotations cover the reference lattice's own rotational symmetry (a half turn,
    or a quarter or sixth turn for a square or hexagonal lattice), so the search ranges over
    +-90, +-45 or +-30 degrees; which of the equivalent bases of the fitted lattice is output
    is decided afterwards (``_RELABEL``, ``_TURN``).
    """
    b = np.asarray(basis, dtype=np.float64)
    r1, r2 = reduce_basis(b[:, 0], b[:, 1])
    gr = np.stack([r1, r2], axis=1)
    ar = np.linalg.inv(gr)
    back = np.rint(ar @ b)  # b = gr @ back
    order = 2
    for n in (6, 4):
        u = [ar @ _rot(360.0 * j / n) @ gr for j in range(n)]
        if all(np.abs(x - np.rint(x)).max() < _SYMMETRY for x in u):
            order = n
            break
    half = 180.0 / order
    n_steps = int(math.ceil(half / _STEP - 1e-9))
    angles = [0.0]
    for j in range(1, n_steps + 1):
        angles += [j * half / n_steps] + ([-j * half / n_steps] if j < n_steps else [])
    rad = np.deg2rad(angles)
    spacing, longer = float(np.hypot(*r1)), float(np.hypot(*r2))
    return _Plan(b.copy(), gr, ar, _RELABEL @ back, np.cos(rad), np.sin(rad), spacing,
                 _NEAR * longer, _GROW * longer)


def fit_lattices(positions, weights, basis, origin, min_disks=6, tolerance=None,
                 iterations=8, plan=None):
    """Fit ``o, g1, g2`` to the disks of every frame.

    Each frame is indexed from a seed outwards, so that a lattice turned or strained far
    from the reference is still indexed right: the seed is the strongest disk (the next
    ones if it has no lattice around it); its neighbours (within 1.8 spacings) are matched
    to the reference lattice turned by trial angles (5 degree steps over the lattice's
    symmetry: +-90, +-45 or +-30 degrees); the origin and basis fitted to them index the
    disks within 4.5 spacings, whose fit then indexes all disks, and the fit is refined
    (reject the disks beyond ``tolerance``, re-index, refit) until the disks kept and their
    indices no longer change, at most ``iterations`` times. Each disk weighs its weight,
    at most 2 x the median weight of its frame (a hot pixel is as bright as many disks). Of the
    equivalent bases of the fitted lattice, the one closest to ``basis`` is returned (the
    smallest deformation), with the origin on the lattice site nearest ``origin``.

    Parameters
    ----------
    positions : array ``(n, K, 2)``
        Disk ``(x, y)``; NaN rows are empty slots.
    weights : array ``(n, K)``
        Non-negative weights (NaN or 0: unused).
    basis : array ``(2, 2)``
        Reference basis, columns ``g1``, ``g2``: non-zero and not parallel (a host basis that
        is not raises ``ValueError``).
    origin : array ``(2,)``
        Reference origin (where ``h = k = 0``); the fitted origin is the lattice site nearest
        it.
    min_disks : int
        Frames with fewer disks in the fit give NaN (as do frames whose disks all lie on
        one lattice row, which cannot fix both vectors).
    tolerance : float, optional
        Largest distance of a kept disk from its lattice site, in the positions' units;
        default adaptive: 4.8 x the median distance of the previous fit's disks from their
        sites (robust to outliers; 4 x the RMS for Gaussian errors), between 1/400 and 1/4
        of the shortest lattice spacing.
    iterations : int
        Most fit - reject - re-index passes (fewer once the disks kept stop changing: the
        fit is then final; 3 passes used to leave frames with ten hot pixels biased).
    plan : optional
        The indexing constants of ``basis`` (from ``_plan``), for callers holding ``basis``
        on a device; made from ``basis`` when not given.

    Returns
    -------
    array ``(n, 8)`` float64: ``LATTICE_FIELDS`` (origin, g1, g2, disks used, RMS residual).
    A frame whose RMS residual exceeds a tenth of the shortest spacing (its disks fit no
    lattice near the reference) gets NaN origin and vectors, and keeps its disk count and
    residual.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.lattice import fit_lattices
    >>> h, k = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3))
    >>> g = np.array([[10.0, 1.0], [-1.0, 9.0]]).T       # columns g1, g2
    >>> pos = (np.stack([h.ravel(), k.ravel()], -1) @ g.T + [50, 40])[None]
    >>> fit = fit_lattices(pos, np.ones(pos.shape[:2]), g * 1.01, np.array([50.5, 39.6]))
    >>> fit[0, :6].round(6).tolist()
    [50.0, 40.0, 10.0, 1.0, -1.0, 9.0]

    A lattice turned by 30 degrees, against the unturned reference:

    >>> t = np.radians(30)
    >>> turned = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ g
    >>> pos = (np.stack([h.ravel(), k.ravel()], -1) @ turned.T + [50, 40])[None]
    >>> fit = fit_lattices(pos, np.ones(pos.shape[:2]), g, np.array([50.0, 40.0]))
    >>> bool(np.allclose(fit[0, 2:6], turned.T.ravel()))
    True
    """
    xp = array_module(positions)
    if isinstance(basis, np.ndarray):  # a host basis is checked here (a device one by its caller)
        b = np.asarray(basis, dtype=np.float64)
        det = b[0, 0] * b[1, 1] - b[0, 1] * b[1, 0] if b.shape == (2, 2) else np.nan
        if not (np.all(np.isfinite(b)) and np.isfinite(det) and det != 0):
            raise ValueError(f"basis {b.tolist()} (columns g1, g2) is degenerate: a vector of "
                             "zero length, two parallel vectors or non-finite numbers")
    if plan is None:
        plan = _plan(to_host_array(basis))
    if xp is np:  # the same arithmetic frame by frame, compiled (5-8x faster than NumPy's
        # temporaries over (frames, disks); equal to the array path within rounding, tested)
        p = np.ascontiguousarray(positions, dtype=np.float64)
        out = np.empty((p.shape[0], 8))
        given = tolerance is not None
        _fit_host(p, np.ascontiguousarray(weights, dtype=np.float64),
                  np.asarray(to_host_array(origin), dtype=np.float64).reshape(2),
                  int(min_disks), float(tolerance) if given else 0.0, given, int(iterations),
                  plan.g0, plan.gr, plan.ar, plan.cands, plan.cos, plan.sin, plan.spacing,
                  plan.near, plan.grow, out)
        return out
    return _fit_xp(positions, weights, basis, origin, min_disks, tolerance, iterations, xp, plan)


def _masked_median_xp(values, mask, xp):
    """Median of ``values (n, K)`` over the ``mask``ed entries of each row (0 for none), as
    ``_masked_median`` (sorted, the mean of the two middle values for an even count)."""
    n_in = mask.sum(-1)
    if values.shape[-1] == 0:
        return xp.zeros(values.shape[:-1])
    s = xp.sort(xp.where(mask, values, xp.inf), axis=-1)
    lo = xp.maximum((n_in - 1) // 2, 0)[:, None]
    hi = xp.maximum(n_in // 2, 0)[:, None]
    med = (xp.take_along_axis(s, lo, -1)[:, 0] + xp.take_along_axis(s, hi, -1)[:, 0]) / 2
    return xp.where(n_in > 0, med, 0.0)


def _solve_xp(px, py, w, h, k, use, xp):
    """Weighted least squares of ``p = o + h g1 + k g2`` over the ``use``d disks of each frame:
    whether it is well-conditioned, the disks used, ``o (n, 2)``, ``[g1 g2] (n, 2, 2)``, RMS."""
    # explicit 2 x 2 and 3 x 3 algebra: einsum on these tiny axes was 10x slower
    wu = w * use
    s0, sh, sk = wu.sum(-1), (wu * h).sum(-1), (wu * k).sum(-1)
    shh, shk, skk = (wu * h * h).sum(-1), (wu * h * k).sum(-1), (wu * k * k).sum(-1)
    m = xp.stack([xp.stack([s0, sh, sk], -1), xp.stack([sh, shh, shk], -1),
                  xp.stack([sk, shk, skk], -1)], -2)
    wx, wy = wu * px, wu * py
    rhs = xp.stack([xp.stack([wx.sum(-1), wy.sum(-1)], -1),
                    xp.stack([(wx * h).sum(-1), (wy * h).sum(-1)], -1),
                    xp.stack([(wx * k).sum(-1), (wy * k).sum(-1)], -1)], -2)  # (n, 3, 2)
    minv, ok = _inv3(m, xp)
    sol = (minv[:, :, :, None] * rhs[:, None, :, :]).sum(2)  # rows: o, g1, g2
    new_o = sol[:, 0, :]
    new_b = xp.stack([sol[:, 1, :], sol[:, 2, :]], axis=-1)  # columns g1, g2
    fx = px - new_o[:, 0:1] - new_b[:, 0, 0:1] * h - new_b[:, 0, 1:2] * k
    fy = py - new_o[:, 1:2] - new_b[:, 1, 0:1] * h - new_b[:, 1, 1:2] * k
    wsum = xp.maximum(wu.sum(-1), 1e-300)
    rms = xp.sqrt((wu * (fx * fx + fy * fy)).sum(-1) / wsum)
    return ok, use.sum(-1), new_o, new_b, rms


def _index_xp(px, py, o, b, xp):
    """Nearest lattice indices ``h, k`` of every disk in the basis ``b`` and their distances."""
    det = b[:, 0, 0] * b[:, 1, 1] - b[:, 0, 1] * b[:, 1, 0]
    det = xp.where(det == 0, 1e-300, det)
    rx, ry = px - o[:, 0:1], py - o[:, 1:2]
    h = xp.rint((b[:, 1, 1:2] * rx - b[:, 0, 1:2] * ry) / det[:, None])
    k = xp.rint((-b[:, 1, 0:1] * rx + b[:, 0, 0:1] * ry) / det[:, None])
    ex = rx - b[:, 0, 0:1] * h - b[:, 0, 1:2] * k
    ey = ry - b[:, 1, 0:1] * h - b[:, 1, 1:2] * k
    return h, k, xp.sqrt(ex * ex + ey * ey)


def _turned_sites_xp(dx, dy, c, s, plan, xp):
    """Offsets ``(dx, dy)`` from a seed in the reduced reference basis turned by the angle of
    cosine ``c``, sine ``s``: nearest indices and squared distances from those sites."""
    (g00, g01), (g10, g11) = plan.gr.tolist()
    (a00, a01), (a10, a11) = plan.ar.tolist()
    x = c * dx + s * dy  # turned back by the trial angle
    y = -s * dx + c * dy
    fh = a00 * x + a01 * y
    fk = a10 * x + a11 * y
    ih, ik = xp.rint(fh), xp.rint(fk)
    rh, rk = fh - ih, fk - ik
    ex = g00 * rh + g01 * rk
    ey = g10 * rh + g11 * rk
    return ih, ik, ex * ex + ey * ey


def _turned_xp(c, s, plan, xp):
    """The reduced reference basis turned by the angles of cosines ``c``, sines ``s`` (n,)."""
    (g00, g01), (g10, g11) = plan.gr.tolist()
    return xp.stack([xp.stack([c * g00 - s * g10, c * g01 - s * g11], -1),
                     xp.stack([s * g00 + c * g10, s * g01 + c * g11], -1)], -2)


def _neighbour_fit_xp(px, py, w, present, seed, c, s, plan, xp):
    """Origin and basis fitted to a seed's neighbours alone, indexed in the reference turned by
    the angle of cosine ``c``, sine ``s`` (arrays ``(n,)``): ``ok, o, b`` and the squared
    distance of the seed from its fitted site (as ``_neighbour_fit``). The fit is made again
    without the neighbours further from their sites than ``_REJECT`` x their median distance:
    one displaced neighbour (a hot pixel beside a disk) tilts a lattice fitted to a few, and
    the error grows with the distance from the seed."""
    is_seed = xp.arange(px.shape[1])[None, :] == seed[:, None]
    sx = xp.take_along_axis(px, seed[:, None], -1)
    sy = xp.take_along_axis(py, seed[:, None], -1)
    dx, dy = px - sx, py - sy
    ih, ik, e2 = _turned_sites_xp(dx, dy, c[:, None], s[:, None], plan, xp)
    hit = (present & ~is_seed & (dx * dx + dy * dy < plan.near * plan.near)
           & ~((ih == 0) & (ik == 0)) & (e2 < (_MATCH * plan.spacing) ** 2))
    h, k = xp.where(hit, ih, 0.0), xp.where(hit, ik, 0.0)
    ok, n_used, o, b, _ = _solve_xp(px, py, w, h, k, hit, xp)
    ex = px - o[:, 0:1] - b[:, 0, 0:1] * h - b[:, 0, 1:2] * k
    ey = py - o[:, 1:2] - b[:, 1, 0:1] * h - b[:, 1, 1:2] * k
    dist = xp.sqrt(ex * ex + ey * ey)
    tol = xp.maximum(_REJECT * _masked_median_xp(dist, hit, xp), _FLOOR * plan.spacing)
    kept = hit & (dist <= tol[:, None])
    ok2, n2, o2, b2, _ = _solve_xp(px, py, w, h, k, kept, xp)
    again = ok & ok2 & (n2 >= 3)
    o = xp.where(again[:, None], o2, o)
    b = xp.where(again[:, None, None], b2, b)
    off = (sx[:, 0] - o[:, 0]) ** 2 + (sy[:, 0] - o[:, 1]) ** 2
    return ok & (n_used >= 3), o, b, off


def _seed_xp(px, py, w, wf, present, plan, xp):
    """Per frame (as ``_seed_host``): the seed disk (the strongest by ``w``), the lattice
    (origin, basis) fitted (weights ``wf``) to its neighbours indexed in the trial rotation of
    the reference that matches most of them, and whether there was any disk."""
    n, n_k = present.shape
    near2 = plan.near * plan.near
    match2 = (_MATCH * plan.spacing) ** 2
    slots = xp.arange(n_k)[None, :]
    ws = xp.where(present, w, -xp.inf)
    tried = {k: [] for k in ("seed", "support", "accepted", "o", "b")}
    for _ in range(_SEEDS):
        seed = xp.argmax(ws, axis=-1)
        valid = xp.isfinite(xp.take_along_axis(ws, seed[:, None], -1)[:, 0])
        is_seed = slots == seed[:, None]
        ws = xp.where(is_seed, -xp.inf, ws)
        dx = px - xp.take_along_axis(px, seed[:, None], -1)
        dy = py - xp.take_along_axis(py, seed[:, None], -1)
        nb = present & ~is_seed & (dx * dx + dy * dy < near2)
        n_nb = nb.sum(-1)
        for j, (c, s) in enumerate(zip(plan.cos.tolist(), plan.sin.tolist())):
            ih, ik, e2 = _turned_sites_xp(dx, dy, c, s, plan, xp)
            hit = nb & ~((ih == 0) & (ik == 0)) & (e2 < match2)
            score = xp.where(hit, 1 - e2 / match2, 0.0).sum(-1)
            matched = hit.sum(-1)
            if j == 0:
                unturned = (n_nb > 0) & (score >= _UNTURNED * n_nb)
                best, best_m = score, matched
                best_c, best_s = xp.full((n,), c), xp.full((n,), s)
                continue
            better = ~unturned & (score > best)
            best = xp.where(better, score, best)
            best_m = xp.where(better, matched, best_m)
            best_c = xp.where(better, c, best_c)
            best_s = xp.where(better, s, best_s)
        ok, o, b, off = _neighbour_fit_xp(px, py, wf, present, seed, best_c, best_s, plan, xp)
        # without a fit: the seed and the turned reference
        sx = xp.take_along_axis(px, seed[:, None], -1)
        sy = xp.take_along_axis(py, seed[:, None], -1)
        o = xp.where(ok[:, None], o, xp.concatenate([sx, sy], -1))
        b = xp.where(ok[:, None, None], b, _turned_xp(best_c, best_s, plan, xp))
        _, _, resid = _index_xp(px, py, o, b, xp)
        around = present & (dx * dx + dy * dy < plan.grow * plan.grow)
        n_in = around.sum(-1)
        support = (around & (resid <= _SUPPORT * plan.spacing)).sum(-1)
        for key, v in (("seed", seed), ("support", xp.where(valid, support, -1)),
                       ("accepted", valid & (best_m >= 3) & (2 * best_m >= n_nb) & ok
                        & (off <= (_SEED_OFF * plan.spacing) ** 2) & (3 * support >= 2 * n_in)),
                       ("o", o), ("b", b)):
            tried[key].append(v)
    accepted = xp.stack(tried["accepted"], -1)
    # the first seed on the lattice of its neighbours, which holds most disks around it;
    # else the one whose lattice holds most
    t = xp.where(accepted.any(-1), xp.argmax(accepted, -1),
                 xp.argmax(xp.stack(tried["support"], -1), -1))
    picked = []
    for key in ("seed", "o", "b"):
        v = xp.stack(tried[key], -1)  # the seeds' axis last
        pick = t.reshape((n,) + (1,) * (v.ndim - 1))
        picked.append(xp.take_along_axis(v, pick, -1)[..., 0])
    return tuple(picked) + (present.any(-1),)


def _fit_xp(positions, weights, basis, origin, min_disks, tolerance, iterations, xp, plan=None):
    """:func:`fit_lattices` on arrays of any module, all frames at once."""
    if plan is None:
        plan = _plan(to_host_array(basis))
    p = positions.astype(xp.float64)
    w = xp.where(xp.isfinite(weights), xp.maximum(weights.astype(xp.float64), 0), 0)
    present = xp.all(xp.isfinite(p), axis=-1) & (w > 0)
    wf = xp.minimum(w, _WEIGHT_CAP * _masked_median_xp(w, present, xp)[:, None])
    p = xp.where(present[..., None], p, 0.0)
    n = p.shape[0]
    px, py = p[..., 0], p[..., 1]
    o_ref = _on(origin, xp).reshape(2)
    tol0 = float(tolerance) if tolerance is not None else 0.25 * plan.spacing
    floor = float(tolerance) if tolerance is not None else plan.spacing * _FLOOR

    # 1. the seed, and the lattice fitted to its neighbours indexed in the turn of the
    # reference that puts most of them on sites (a frame without disks: the reference)
    seed, o, b, has_seed = _seed_xp(px, py, w, wf, present, plan, xp)
    o = xp.where(has_seed[:, None], o, o_ref[None, :])
    dx = px - xp.take_along_axis(px, seed[:, None], -1)
    dy = py - xp.take_along_axis(py, seed[:, None], -1)
    # 2. grown to the disks within a few spacings of the seed (adaptive: those within
    # _REJECT x their median distance from the neighbours' lattice, at most tol0)
    h, k, resid = _index_xp(px, py, o, b, xp)
    use = present & (dx * dx + dy * dy < plan.grow * plan.grow) & (resid <= tol0)
    tol = xp.full((n,), tol0)
    if tolerance is None:
        tol = xp.clip(_REJECT * _masked_median_xp(resid, use, xp), floor, tol0)
        use &= resid <= tol[:, None]
    ok, n_used, new_o, new_b, _ = _solve_xp(px, py, wf, h, k, use, xp)
    fitted = has_seed & ok & (n_used >= 4)  # the previous fit succeeded
    o = xp.where(fitted[:, None], new_o, o)
    b = xp.where(fitted[:, None, None], new_b, b)

    # 3. all disks: fit, reject, re-index, until the disks kept and their indices no longer
    # change (the fit is then where it would stay), at most `iterations` fits
    tol = xp.full((n,), tol0)
    out = xp.full((n, 8), xp.nan)
    for it in range(iterations + 1):
        new_h, new_k, resid = _index_xp(px, py, o, b, xp)
        if tolerance is None:  # from the distances of the last fit's disks
            scale = _masked_median_xp(resid, use, xp)
            tol = xp.where(fitted, xp.clip(_REJECT * scale, floor, tol0), tol)
        new_use = present & (resid <= tol[:, None])
        same = it > 0 and bool(xp.all((new_use == use) & (~use | ((new_h == h) & (new_k == k)))))
        h, k, use = new_h, new_k, new_use
        if same or it == iterations:  # every frame at its fixed point, or the last pass
            break
        ok, n_used, new_o, new_b, rms = _solve_xp(px, py, wf, h, k, use, xp)
        ok &= n_used >= min_disks
        o = xp.where(ok[:, None], new_o, o)
        b = xp.where(ok[:, None, None], new_b, b)
        fitted = ok
        out[:, 0:2] = xp.where(ok[:, None], new_o, xp.nan)
        out[:, 2:4] = xp.where(ok[:, None], new_b[:, :, 0], xp.nan)
        out[:, 4:6] = xp.where(ok[:, None], new_b[:, :, 1], xp.nan)
        out[:, 6] = xp.where(ok, n_used, 0)
        out[:, 7] = xp.where(ok, rms, xp.nan)

    # 4. refused if the disks do not sit on the lattice; else the equivalent basis closest
    # to the reference, and the origin on the site nearest the reference origin
    refused = out[:, 7] > _MAX_RMS * plan.spacing
    g1x, g1y, g2x, g2y = (out[:, i].copy() for i in range(2, 6))  # (out is written below)
    (r00, r01), (r10, r11) = plan.g0.tolist()
    best = xp.full((n,), xp.inf)
    m00, m01, m10, m11 = g1x, g2x, g1y, g2y
    for (v00, v01), (v10, v11) in plan.cands.tolist():
        c00, c01 = g1x * v00 + g2x * v10, g1x * v01 + g2x * v11
        c10, c11 = g1y * v00 + g2y * v10, g1y * v01 + g2y * v11
        det = c00 * c11 - c01 * c10
        f00 = (c11 * r00 - c10 * r01) / det  # F = C^-T G0^T
        f01 = (c11 * r10 - c10 * r11) / det
        f10 = (-c01 * r00 + c00 * r01) / det
        f11 = (-c01 * r10 + c00 * r11) / det
        # F = V R: trace V = |(f00 + f11, f10 - f01)|, cos theta = (f00 + f11) / trace V
        trace = xp.sqrt((f00 + f11) ** 2 + (f10 - f01) ** 2)
        cost = (f00 * f00 + f01 * f01 + f10 * f10 + f11 * f11 - 2 * trace + 2
                + _TURN * (1 - (f00 + f11) / trace))
        better = cost < best
        best = xp.where(better, cost, best)
        m00, m01 = xp.where(better, c00, m00), xp.where(better, c01, m01)
        m10, m11 = xp.where(better, c10, m10), xp.where(better, c11, m11)
    det = g1x * g2y - g2x * g1y
    rx, ry = o_ref[0] - out[:, 0], o_ref[1] - out[:, 1]
    sh = xp.rint((g2y * rx - g2x * ry) / det)
    sk = xp.rint((-g1y * rx + g1x * ry) / det)
    ox, oy = out[:, 0] + g1x * sh + g2x * sk, out[:, 1] + g1y * sh + g2y * sk
    fields = [ox, oy, m00, m10, m01, m11]
    for i, v in enumerate(fields):
        out[:, i] = xp.where(refused, xp.nan, v)
    return out


@numba.njit(nogil=True, cache=True)
def _masked_median(values, mask, buf):
    """:func:`_masked_median_xp` for one frame (``buf``: scratch of the same length)."""
    m = 0
    falling = True  # weights come strongest first (find_bragg_disks): no search needed
    for q in range(values.shape[0]):
        if mask[q]:
            buf[m] = values[q]
            falling = falling and (m == 0 or buf[m] <= buf[m - 1])
            m += 1
    if m == 0:
        return 0.0
    j = (m - 1) // 2
    if falling:
        return (buf[m - 1 - j] + buf[m - 1 - (m // 2)]) / 2
    lo = _select(buf, m, j)
    if m % 2:
        return lo
    # the next value up: lo again if more than j + 1 values are <= lo, else the least above
    n_le, above = 0, np.inf
    for q in range(m):
        v = buf[q]
        n_le += v <= lo
        above = min(above, v if v > lo else np.inf)
    return (lo + (lo if n_le > j + 1 else above)) / 2


@numba.njit(nogil=True, cache=True)
def _select(a, m, j):
    """The ``j``-th smallest of ``a[:m]`` (reordering ``a[:m]``): quickselect with a
    branch-free partition. A sorted copy made the lattice fit 4x slower, Hoare's partition
    (mispredicted branches on random distances) 2.5x; ties end the search at once."""
    lo, hi = 0, m - 1
    while lo < hi:
        mid = (lo + hi) // 2
        pivot = a[mid]
        a[mid] = a[hi]
        a[hi] = pivot
        store, eq = lo, 0
        for i in range(lo, hi):
            v = a[i]
            less = v < pivot
            eq += v == pivot
            t = a[store]
            a[i] = t if less else v
            a[store] = v if less else t
            store += less
        a[hi] = a[store]
        a[store] = pivot
        # a[lo:store] < pivot, and eq more values equal it: the j-th is the pivot if among them
        if store <= j <= store + eq:
            return pivot
        if j < store:
            hi = store - 1
        else:
            lo = store + 1
    return a[lo]


@numba.njit(nogil=True, cache=True)
def _solve(px, py, w, h, k, use):
    """:func:`_solve_xp` for one frame: ``ok, n_used, o, g1, g2, rms``."""
    s0 = sh = sk = shh = shk = skk = 0.0
    sx = sy = sxh = syh = sxk = syk = 0.0
    n_used = 0
    for q in range(px.shape[0]):
        if not use[q]:
            continue
        wu = w[q]
        n_used += 1
        s0 += wu
        sh += wu * h[q]
        sk += wu * k[q]
        shh += wu * h[q] * h[q]
        shk += wu * h[q] * k[q]
        skk += wu * k[q] * k[q]
        sx += wu * px[q]
        sy += wu * py[q]
        sxh += wu * px[q] * h[q]
        syh += wu * py[q] * h[q]
        sxk += wu * px[q] * k[q]
        syk += wu * py[q] * k[q]
    # symmetric 3 x 3 inverse by cofactors (as _inv3)
    c00, c01, c02 = shh * skk - shk * shk, sk * shk - sh * skk, sh * shk - sk * shh
    c11, c12, c22 = s0 * skk - sk * sk, sh * sk - s0 * shk, s0 * shh - sh * sh
    dm = s0 * c00 + sh * c01 + sk * c02
    ok = abs(dm) > 1e-9 * max(s0 * shh * skk, 1e-300)
    if not ok:
        dm = 1.0
    # rows of the solution: origin, g1, g2 (x and y)
    no0 = (c00 * sx + c01 * sxh + c02 * sxk) / dm
    no1 = (c00 * sy + c01 * syh + c02 * syk) / dm
    g1x = (c01 * sx + c11 * sxh + c12 * sxk) / dm
    g1y = (c01 * sy + c11 * syh + c12 * syk) / dm
    g2x = (c02 * sx + c12 * sxh + c22 * sxk) / dm
    g2y = (c02 * sy + c12 * syh + c22 * syk) / dm
    acc = 0.0
    for q in range(px.shape[0]):
        if use[q]:
            fx = px[q] - no0 - g1x * h[q] - g2x * k[q]
            fy = py[q] - no1 - g1y * h[q] - g2y * k[q]
            acc += w[q] * (fx * fx + fy * fy)
    rms = math.sqrt(acc / max(s0, 1e-300))
    return ok, n_used, no0, no1, g1x, g1y, g2x, g2y, rms


@numba.njit(nogil=True, cache=True)
def _turned_site(dx, dy, c, s, gr, ar):
    """:func:`_turned_sites_xp` for one offset: ``h, k, squared distance``."""
    x = c * dx + s * dy
    y = -s * dx + c * dy
    fh = ar[0, 0] * x + ar[0, 1] * y
    fk = ar[1, 0] * x + ar[1, 1] * y
    ih, ik = np.rint(fh), np.rint(fk)
    rh, rk = fh - ih, fk - ik
    ex = gr[0, 0] * rh + gr[0, 1] * rk
    ey = gr[1, 0] * rh + gr[1, 1] * rk
    return ih, ik, ex * ex + ey * ey


@numba.njit(nogil=True, cache=True)
def _neighbour_fit(px, py, w, present, seed, c, s, gr, ar, spacing, near, h, k, use, dist, buf):
    """:func:`_neighbour_fit_xp` for one frame: ``ok, o, g1, g2, seed's squared distance``."""
    match2 = (_MATCH * spacing) ** 2
    for q in range(px.shape[0]):
        dx, dy = px[q] - px[seed], py[q] - py[seed]
        ih, ik, e2 = _turned_site(dx, dy, c, s, gr, ar)
        hit = (present[q] and q != seed and dx * dx + dy * dy < near * near
               and not (ih == 0 and ik == 0) and e2 < match2)
        h[q], k[q] = (ih, ik) if hit else (0.0, 0.0)
        use[q] = hit
    ok, n_used, o0, o1, g1x, g1y, g2x, g2y, _ = _solve(px, py, w, h, k, use)
    for q in range(px.shape[0]):
        ex = px[q] - o0 - g1x * h[q] - g2x * k[q]
        ey = py[q] - o1 - g1y * h[q] - g2y * k[q]
        dist[q] = math.sqrt(ex * ex + ey * ey)
    tol = max(_REJECT * _masked_median(dist, use, buf), _FLOOR * spacing)
    for q in range(px.shape[0]):
        use[q] = use[q] and dist[q] <= tol
    ok2, n2, p0, p1, q1x, q1y, q2x, q2y, _ = _solve(px, py, w, h, k, use)
    if ok and ok2 and n2 >= 3:
        o0, o1, g1x, g1y, g2x, g2y = p0, p1, q1x, q1y, q2x, q2y
    off = (px[seed] - o0) ** 2 + (py[seed] - o1) ** 2
    return ok and n_used >= 3, o0, o1, g1x, g1y, g2x, g2y, off


@numba.njit(inline="always")
def _site(x, y, o0, o1, b00, b01, b10, b11):
    """The lattice site ``(h, k)`` nearest ``(x, y)`` for origin ``o`` and basis columns
    ``(b00, b10)``, ``(b01, b11)``, and the distance to it."""
    det = b00 * b11 - b01 * b10
    if det == 0:
        det = 1e-300
    rx, ry = x - o0, y - o1
    hq = np.rint((b11 * rx - b01 * ry) / det)
    kq = np.rint((-b10 * rx + b00 * ry) / det)
    ex = rx - b00 * hq - b01 * kq
    ey = ry - b10 * hq - b11 * kq
    return hq, kq, math.sqrt(ex * ex + ey * ey)


@numba.njit(nogil=True, cache=True)
def _seed_host(px, py, w, wf, present, gr, ar, cos_a, sin_a, spacing, near, grow, nbx, nby, h,
               k, use, dist, buf):
    """:func:`_seed_xp` for one frame: the seed slot (-1: no disk), and the origin and basis
    ``b00, b01, b10, b11`` of its neighbours' lattice."""
    n_k = px.shape[0]
    near2 = near * near
    match2 = (_MATCH * spacing) ** 2
    tried = np.full(_SEEDS, -1)
    chosen, chosen_support = (-1, 0.0, 0.0, gr[0, 0], gr[0, 1], gr[1, 0], gr[1, 1]), -1
    for t in range(_SEEDS):
        seed, wmax = -1, -1.0
        for q in range(n_k):
            if present[q] and w[q] > wmax:
                fresh = True
                for u in range(t):
                    fresh = fresh and tried[u] != q
                if fresh:
                    seed, wmax = q, w[q]
        if seed < 0:
            break
        tried[t] = seed
        n_nb = 0
        for q in range(n_k):
            dx, dy = px[q] - px[seed], py[q] - py[seed]
            if present[q] and q != seed and dx * dx + dy * dy < near2:
                nbx[n_nb], nby[n_nb] = dx, dy
                n_nb += 1
        best, best_m, best_j = -1.0, 0, 0
        for j in range(cos_a.shape[0]):
            score, matched = 0.0, 0
            for q in range(n_nb):
                ih, ik, e2 = _turned_site(nbx[q], nby[q], cos_a[j], sin_a[j], gr, ar)
                if e2 < match2 and not (ih == 0 and ik == 0):
                    score += 1 - e2 / match2
                    matched += 1
            if j == 0 or score > best:
                best, best_m, best_j = score, matched, j
            if j == 0 and n_nb > 0 and score >= _UNTURNED * n_nb:
                break  # the unturned reference fits: no search
        c, s = cos_a[best_j], sin_a[best_j]
        ok, o0, o1, b00, b10, b01, b11, off = _neighbour_fit(
            px, py, wf, present, seed, c, s, gr, ar, spacing, near, h, k, use, dist, buf)
        if not ok:  # the seed and the turned reference
            o0, o1 = px[seed], py[seed]
            b00, b01 = c * gr[0, 0] - s * gr[1, 0], c * gr[0, 1] - s * gr[1, 1]
            b10, b11 = s * gr[0, 0] + c * gr[1, 0], s * gr[0, 1] + c * gr[1, 1]
        n_in, support = 0, 0
        for q in range(n_k):
            dx, dy = px[q] - px[seed], py[q] - py[seed]
            if present[q] and dx * dx + dy * dy < grow * grow:
                n_in += 1
                if _site(px[q], py[q], o0, o1, b00, b01, b10, b11)[2] <= _SUPPORT * spacing:
                    support += 1
        found = (seed, o0, o1, b00, b01, b10, b11)
        if (best_m >= 3 and 2 * best_m >= n_nb and ok and off <= (_SEED_OFF * spacing) ** 2
                and 3 * support >= 2 * n_in):
            return found
        if support > chosen_support:
            chosen, chosen_support = found, support
    return chosen


@numba.njit(nogil=True, cache=True)
def _fit_host(p, weights, origin, min_disks, tolerance, given, iterations, g0, gr, ar, cands,
              cos_a, sin_a, spacing, near, grow, out):
    """:func:`_fit_xp` one frame at a time (see there for the steps)."""
    n, n_slots = p.shape[0], p.shape[1]
    all_px, all_py = np.empty(n_slots), np.empty(n_slots)
    all_w, all_wf = np.empty(n_slots), np.empty(n_slots)
    all_h, all_k = np.empty(n_slots), np.empty(n_slots)
    all_nbx, all_nby = np.empty(n_slots), np.empty(n_slots)
    all_dist, all_buf = np.empty(n_slots), np.empty(n_slots)
    all_use = np.empty(n_slots, np.bool_)
    all_present = np.ones(n_slots, np.bool_)
    tol0 = tolerance if given else 0.25 * spacing
    floor = tolerance if given else spacing * _FLOOR
    for f in range(n):
        # the frame's disks packed at the front, in slot order (the sums, hence the results,
        # are those over all slots; the loops skip the empty ones, often half of them)
        n_k = 0
        for q in range(n_slots):
            x, y, v = p[f, q, 0], p[f, q, 1], weights[f, q]
            wq = max(v, 0.0) if np.isfinite(v) else 0.0
            if np.isfinite(x) and np.isfinite(y) and wq > 0:
                all_px[n_k], all_py[n_k], all_w[n_k] = x, y, wq
                n_k += 1
        px, py, w, wf = all_px[:n_k], all_py[:n_k], all_w[:n_k], all_wf[:n_k]
        h, k, nbx, nby = all_h[:n_k], all_k[:n_k], all_nbx[:n_k], all_nby[:n_k]
        dist, buf, use, present = all_dist[:n_k], all_buf[:n_k], all_use[:n_k], all_present[:n_k]
        cap = _WEIGHT_CAP * _masked_median(w, present, buf)
        for q in range(n_k):
            wf[q] = min(w[q], cap)
        for c in range(8):
            out[f, c] = np.nan
        fitted = False  # the previous fit succeeded (its disks set the next tolerance)
        # 1. the seed, the turn of the reference that puts its neighbours on lattice sites,
        # and the lattice fitted to them
        seed, o0, o1, b00, b01, b10, b11 = _seed_host(
            px, py, w, wf, present, gr, ar, cos_a, sin_a, spacing, near, grow, nbx, nby, h, k,
            use, dist, buf)
        if seed < 0:
            o0, o1 = origin[0], origin[1]
        else:
            # 2. grown to the disks within a few spacings of the seed
            for q in range(n_k):
                h[q], k[q], dist[q] = _site(px[q], py[q], o0, o1, b00, b01, b10, b11)
                dx, dy = px[q] - px[seed], py[q] - py[seed]
                use[q] = present[q] and dx * dx + dy * dy < grow * grow and dist[q] <= tol0
            if not given:
                tol = min(max(_REJECT * _masked_median(dist, use, buf), floor), tol0)
                for q in range(n_k):
                    use[q] = use[q] and dist[q] <= tol
            ok, n_used, no0, no1, g1x, g1y, g2x, g2y, _ = _solve(px, py, wf, h, k, use)
            if ok and n_used >= 4:
                o0, o1, b00, b10, b01, b11 = no0, no1, g1x, g1y, g2x, g2y
                fitted = True
        # 3. all disks: fit, reject, re-index, until the disks kept and their indices no
        # longer change (then the array path's further passes leave the fit as it is)
        tol = tol0
        for it in range(iterations + 1):
            for q in range(n_k):
                nbx[q], nby[q], dist[q] = _site(px[q], py[q], o0, o1, b00, b01, b10, b11)
            if not given and fitted:  # from the distances of the last fit's disks
                tol = min(max(_REJECT * _masked_median(dist, use, buf), floor), tol0)
            same = it > 0
            for q in range(n_k):
                u = present[q] and dist[q] <= tol
                if u != use[q] or (u and (nbx[q] != h[q] or nby[q] != k[q])):
                    same = False
                use[q], h[q], k[q] = u, nbx[q], nby[q]
            if same or it == iterations:
                break
            ok, n_used, no0, no1, g1x, g1y, g2x, g2y, rms = _solve(px, py, wf, h, k, use)
            ok = ok and n_used >= min_disks
            fitted = ok
            if ok:
                o0, o1 = no0, no1
                b00, b10, b01, b11 = g1x, g1y, g2x, g2y
                out[f, 0], out[f, 1] = no0, no1
                out[f, 2], out[f, 3], out[f, 4], out[f, 5] = g1x, g1y, g2x, g2y
                out[f, 6] = n_used
                out[f, 7] = rms
            else:
                for c in range(6):
                    out[f, c] = np.nan
                out[f, 6] = 0
                out[f, 7] = np.nan
        # 4. refused if the disks do not sit on the lattice; else the equivalent basis
        # closest to the reference, and the origin on the site nearest the reference origin
        if not np.isfinite(out[f, 2]):
            continue
        if out[f, 7] > _MAX_RMS * spacing:
            for c in range(6):
                out[f, c] = np.nan
            continue
        g1x, g1y, g2x, g2y = out[f, 2], out[f, 3], out[f, 4], out[f, 5]
        best = np.inf
        m00, m01, m10, m11 = g1x, g2x, g1y, g2y
        for i in range(cands.shape[0]):
            v00, v01, v10, v11 = cands[i, 0, 0], cands[i, 0, 1], cands[i, 1, 0], cands[i, 1, 1]
            c00, c01 = g1x * v00 + g2x * v10, g1x * v01 + g2x * v11
            c10, c11 = g1y * v00 + g2y * v10, g1y * v01 + g2y * v11
            det = c00 * c11 - c01 * c10
            f00 = (c11 * g0[0, 0] - c10 * g0[0, 1]) / det
            f01 = (c11 * g0[1, 0] - c10 * g0[1, 1]) / det
            f10 = (-c01 * g0[0, 0] + c00 * g0[0, 1]) / det
            f11 = (-c01 * g0[1, 0] + c00 * g0[1, 1]) / det
            trace = math.sqrt((f00 + f11) ** 2 + (f10 - f01) ** 2)
            cost = (f00 * f00 + f01 * f01 + f10 * f10 + f11 * f11 - 2 * trace + 2
                    + _TURN * (1 - (f00 + f11) / trace))
            if cost < best:
                best, m00, m01, m10, m11 = cost, c00, c01, c10, c11
        det = g1x * g2y - g2x * g1y
        rx, ry = origin[0] - out[f, 0], origin[1] - out[f, 1]
        sh = np.rint((g2y * rx - g2x * ry) / det)
        sk = np.rint((-g1y * rx + g1x * ry) / det)
        out[f, 0] = out[f, 0] + g1x * sh + g2x * sk
        out[f, 1] = out[f, 1] + g1y * sh + g2y * sk
        out[f, 2], out[f, 3], out[f, 4], out[f, 5] = m00, m10, m01, m11


def _on(a, xp):
    """``a`` as a float64 array of module ``xp``: host values are moved, device ones kept."""
    if array_module(a) is xp:
        return a.astype(xp.float64, copy=False)
    return xp.asarray(np.asarray(a, dtype=np.float64))


def _inv3(m, xp):
    """Inverses of symmetric 3 x 3 matrices by cofactors, and whether each is well-conditioned."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 1], m[:, 1, 2], m[:, 2, 2]
    c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
    c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * c00 + b * c01 + c * c02
    scale = xp.maximum(a * d * f, 1e-300)
    ok = xp.abs(det) > 1e-9 * scale  # all disks on one row: h or k does not vary
    det = xp.where(ok, det, 1.0)
    inv = xp.stack([xp.stack([c00, c01, c02], -1), xp.stack([c01, c11, c12], -1),
                    xp.stack([c02, c12, c22], -1)], -2) / det[:, None, None]
    return inv, ok


def reduce_basis(g1, g2):
    """Lagrange-Gauss reduction: the shortest basis of the same 2D lattice, ``|g1| <= |g2|``,
    angle between 60 and 120 degrees, right-handed (``g1 x g2 > 0`` in (x, y)).

    Examples
    --------
    >>> from diffgpu.kernels.lattice import reduce_basis
    >>> [v.tolist() for v in reduce_basis([10.0, 0.0], [13.0, 9.0])]
    [[3.0, 9.0], [-10.0, 0.0]]
    """
    a, b = np.asarray(g1, float), np.asarray(g2, float)
    for _ in range(100):
        if a @ a > b @ b:
            a, b = b, a
        mu = np.rint((a @ b) / (a @ a))
        if mu == 0:
            break
        b = b - mu * a
    if a @ a > b @ b:
        a, b = b, a
    if a[0] * b[1] - a[1] * b[0] < 0:
        b = -b
    return a + 0.0, b + 0.0  # + 0.0: no negative zeros


def find_basis(point_sets, tolerance=1.0, min_fraction=0.25):
    """Two short, non-collinear lattice vectors from disk positions of one or more frames.

    Pairwise differences of the disks within each frame cluster at lattice vectors, the
    short ones most often; ``g1`` is the shortest difference that occurs in at least
    ``min_fraction`` of the disks (within ``tolerance``), ``g2`` the shortest such one not
    parallel to it. The pair is then reduced (:func:`reduce_basis`).

    With several frames, the basis of all their disks together competes with each frame's
    own (up to 16 frames spread over them): the one that puts most of the disks of the most
    frames on lattice sites wins. A reference region holding a grain turned against the
    rest gave a ``g1`` from one grain and a ``g2`` from the other, a lattice that fitted no
    frame.

    Parameters
    ----------
    point_sets : list of arrays ``(m, 2)``
        Disk positions of each frame (no NaN).
    tolerance : float
        Cluster radius, in the positions' units.

    Raises
    ------
    BasisError
        Too few disks, or no two frequent non-collinear differences.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.lattice import find_basis
    >>> h, k = np.meshgrid(np.arange(-3, 4), np.arange(-3, 4))
    >>> pts = np.stack([h.ravel(), k.ravel()], -1) @ np.array([[12.0, 1.0], [-2.0, 11.0]])
    >>> [v.round(3).tolist() for v in find_basis([pts])]    # reduced: shortest first
    [[2.0, -11.0], [12.0, 1.0]]
    >>> c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    >>> turned = pts @ np.array([[c, s], [-s, c]])    # one frame of four from another grain
    >>> [v.round(3).tolist() for v in find_basis([pts, pts, pts, turned])]
    [[2.0, -11.0], [12.0, 1.0]]
    """
    pooled = _frequent_differences(point_sets, tolerance, min_fraction)
    sets = [p for p in (np.asarray(p, float) for p in point_sets)]
    sets = [p[np.all(np.isfinite(p), axis=1)] for p in sets if p.ndim == 2 and len(p)]
    sets = [p for p in sets if len(p) >= 6]
    if len(sets) < 2:
        return pooled
    sample = [sets[i] for i in np.unique(np.linspace(0, len(sets) - 1, 16).round().astype(int))]
    candidates = [pooled]
    for pts in sample:
        try:
            candidates.append(_frequent_differences([pts], tolerance, min_fraction))
        except BasisError:
            pass
    # frames that the basis indexes: most of their disks within `tolerance` of a site
    score = [sum(_on_sites(pts, b, tolerance) >= 0.6 for pts in sample) for b in candidates]
    return candidates[int(np.argmax(score))]  # (ties: the pooled basis)


def _on_sites(pts, basis, tolerance):
    """The fraction of the points ``(m, 2)`` within ``tolerance`` of the sites of the lattice
    ``basis`` (two vectors), its origin on one of the five points nearest their middle."""
    near = pts[np.argsort(np.hypot(*(pts - pts.mean(axis=0)).T))[:5]]  # the origins tried
    b = np.broadcast_to(np.stack(basis, axis=1), (len(near), 2, 2))
    px, py = (np.broadcast_to(pts[:, i], (len(near), len(pts))) for i in (0, 1))
    off = _index_xp(px, py, near, b, np)[2]
    return float((off < tolerance).mean(axis=1).max())


def _frequent_differences(point_sets, tolerance, min_fraction):
    """:func:`find_basis` on all the frames' disks together."""
    diffs = []
    total = 0
    for pts in point_sets:
        pts = np.asarray(pts, float)
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        total += len(pts)
        if len(pts) < 3:
            continue
        i, j = np.triu_indices(len(pts), 1)  # each pair once (its +/- twin counted below)
        d = pts[i] - pts[j]
        d = d[np.hypot(*d.T) > tolerance]
        # one of each +/- pair: the half plane x > 0, or x == 0 and y > 0
        d = np.where(((d[:, 0] < 0) | ((d[:, 0] == 0) & (d[:, 1] < 0)))[:, None], -d, d)
        diffs.append(d)
    if total < 6 or not diffs:
        raise BasisError(f"only {total} disks to find a lattice basis from (need at least 6); "
                         "lower find_bragg_disks' threshold or relative_threshold (of the "
                         "frame's strongest disk), or pass basis=((g1x, g1y), (g2x, g2y)) in "
                         "detector pixels")
    d = np.concatenate(diffs)
    length = np.hypot(*d.T)
    order = np.argsort(length)
    d, length = d[order], length[order]
    # a cluster's size counts both differences of each pair (i - j and j - i)
    need = max(3, min_fraction * total) / 2
    found = []
    tried = 0
    # candidates in order of length; those near a found vector, or nearly parallel to g1, are
    # struck out all at once when it is found (one by one in Python they cost 30 ms for 32
    # frames), and a candidate's cluster is looked for only among the differences of about
    # its length (|d -+ c| < tolerance needs ||d| - |c|| < tolerance)
    queue, at = np.arange(len(d)), 0
    while at < len(queue):
        i = queue[at]
        at += 1
        c = d[i]
        lo, hi = np.searchsorted(length, [length[i] - tolerance, length[i] + tolerance])
        w = d[max(lo - 1, 0):hi + 1]
        close = np.hypot(*(w - c).T) < tolerance
        near = close | (np.hypot(*(w + c).T) < tolerance)
        tried += 1
        if near.sum() >= need:
            members = np.where(close[:, None], w, -w)[near]
            found.append(members.mean(axis=0))
            if len(found) == 2:
                return reduce_basis(*found)
            f, rest = found[0], d[i + 1:]
            alive = ((np.hypot(*(rest - f).T) >= 2 * tolerance)
                     & (np.hypot(*(rest + f).T) >= 2 * tolerance)
                     & (np.abs(f[0] * rest[:, 1] - f[1] * rest[:, 0])
                        >= 0.3 * length[i + 1:] * np.hypot(*f)))
            queue, at = np.flatnonzero(alive) + i + 1, 0
        if tried > 400:
            break
    raise BasisError("could not find two frequent, non-collinear disk spacings (a lattice "
                     "basis) in the reference disks; pass basis=((g1x, g1y), (g2x, g2y)) in "
                     "detector pixels, or choose a reference region with more disks")
