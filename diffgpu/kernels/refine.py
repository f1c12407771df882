"""Orientation refinement below the library's grid: a kinematic spot model scored on polar patterns.

A template library samples orientations on a grid (1 degree: up to ~0.7 degrees from any
orientation). Refinement starts from a match and turns the crystal in small steps about
the three laboratory axes, keeping each turn that raises the score, and halves the step
when none does (a pattern search), for every pattern.

The model is diffsims' kinematic one, evaluated here for many rotations per call: the
phase's reciprocal lattice vectors ``g`` (crystal frame, 1/Å) and their intensities
``|F|^2`` are computed once; for a rotation whose matrix ``M`` takes crystal to laboratory
coordinates a vector lands at ``v = M g``, its excitation error is
``s = k - sqrt(k^2 - r^2) - v_z`` (``r = |v_xy|``, ``k = 1 / wavelength``), and spots with
``|s| < max_excitation_error`` get the intensity ``|F|^2`` times a Lorentzian rel-rod
factor. The score of a rotation is ``sum_s w_s P(r_s, theta_s) / sqrt(sum_s w_s^2)`` with
``w = intensity ** gamma`` and ``P`` the polar pattern (``** gamma``, lightly smoothed, unit
norm) read by bilinear interpolation at the spot positions: the correlation with a template
of narrow spots.

Host code: :func:`refine_rotations` runs a numba kernel, one pattern after another
(``nogil``, so callers can run blocks of patterns in threads); :func:`score_rotations` is the
same score in NumPy, for checking it.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["prepare_patterns", "score_rotations", "refine_rotations", "axis_rotations"]


def prepare_patterns(patterns, gamma, smooth=0.5):
    """Polar patterns ``(n, R, A)`` -> ``** gamma``, smoothed by ``smooth`` bins, unit norm.

    Non-finite and negative bins count as 0 (as in matching).

    Examples
    --------
    >>> p = prepare_patterns(np.ones((2, 4, 8)), 0.5)
    >>> p.shape, round(float((p[0] ** 2).sum()), 6)
    ((2, 4, 8), 1.0)
    """
    from scipy.ndimage import gaussian_filter

    p = np.asarray(patterns, dtype=np.float32)
    p = np.where(np.isfinite(p), np.maximum(p, 0), 0) ** np.float32(gamma)
    if smooth > 0:
        p = gaussian_filter(p, sigma=(0, smooth, smooth), mode=("nearest", "nearest", "wrap"))
    norm = np.sqrt((p.astype(np.float64) ** 2).sum(axis=(1, 2)))
    return (p / np.where(norm > 0, norm, 1)[:, None, None]).astype(np.float32)


def score_rotations(p, matrices, g, f2, k, max_excitation_error, gamma, radial, azimuthal,
                    reciprocal_radius):
    """Scores ``(n, c)`` of ``c`` candidate rotations for each of ``n`` patterns.

    Parameters
    ----------
    p : array ``(n, R, A)``
        From :func:`prepare_patterns`.
    matrices : array ``(n, c, 3, 3)``
        Crystal-to-laboratory rotation matrices.
    g, f2 : arrays ``(N, 3)``, ``(N,)``
        Reciprocal lattice vectors (crystal frame, 1/Å) and kinematic intensities.
    k : float
        ``1 / wavelength``, 1/Å.
    max_excitation_error : float
        1/Å.
    gamma : float
        Spot intensities are weighted as ``intensity ** gamma``.
    radial, azimuthal : tuples ``(first_centre, step)``
        The polar grid: radii in 1/Å, azimuths in degrees (the azimuth covers 360).
    reciprocal_radius : float
        Spots further out are left out (as in the templates).
    """
    n, R, A = p.shape
    v = np.einsum("ncij,gj->ncgi", matrices, g)
    r = np.hypot(v[..., 0], v[..., 1])
    s = (k - np.sqrt(np.maximum(k * k - r * r, 0))) - v[..., 2]
    width = np.pi / max_excitation_error
    rod = width / (np.pi * (width * width * s * s + 1)) * max_excitation_error
    inside = (np.abs(s) < max_excitation_error) & (r <= reciprocal_radius)
    w = np.where(inside, f2 * rod, 0.0) ** gamma
    theta = np.rad2deg(np.arctan2(v[..., 1], v[..., 0]))
    fr = (r - radial[0]) / radial[1]
    fa = (theta - azimuthal[0]) / azimuthal[1]
    r0 = np.clip(np.floor(fr).astype(np.int64), 0, R - 2)
    ar = np.clip(fr - r0, 0.0, 1.0)
    a0 = np.floor(fa).astype(np.int64)
    aa = fa - a0
    a0 %= A
    a1 = (a0 + 1) % A
    i = np.arange(n)[:, None, None]
    value = ((1 - ar) * ((1 - aa) * p[i, r0, a0] + aa * p[i, r0, a1])
             + ar * ((1 - aa) * p[i, r0 + 1, a0] + aa * p[i, r0 + 1, a1]))
    return (w * value).sum(axis=-1) / np.sqrt((w * w).sum(axis=-1) + 1e-30)


def axis_rotations(angle_deg):
    """Rotation matrices ``(n, 6, 3, 3)`` by ``+-angle`` (one per pattern) about x, y and z.

    Examples
    --------
    >>> m = axis_rotations(np.array([90.0]))
    >>> np.round(m[0, 4] @ [1.0, 0, 0], 6).tolist()   # +90 degrees about z
    [0.0, 1.0, 0.0]
    """
    return np.stack([_turns(float(a)) for a in np.atleast_1d(angle_deg)])


@numba.njit(nogil=True, fastmath=True, cache=True)
def _score_one(p, m, g, f2, k, smax, gamma, r_first, dr, a_first, da, radius):
    """:func:`score_rotations` for one pattern ``p`` ``(R, A)`` and one matrix ``m``."""
    n_r, n_a = p.shape
    width = math.pi / smax
    total = 0.0
    norm = 0.0
    for j in range(g.shape[0]):
        vx = m[0, 0] * g[j, 0] + m[0, 1] * g[j, 1] + m[0, 2] * g[j, 2]
        vy = m[1, 0] * g[j, 0] + m[1, 1] * g[j, 1] + m[1, 2] * g[j, 2]
        vz = m[2, 0] * g[j, 0] + m[2, 1] * g[j, 1] + m[2, 2] * g[j, 2]
        r = math.sqrt(vx * vx + vy * vy)
        s = (k - math.sqrt(max(k * k - r * r, 0.0))) - vz
        if abs(s) >= smax or r > radius:
            continue
        rod = width / (math.pi * (width * width * s * s + 1.0)) * smax
        w = (f2[j] * rod) ** gamma
        fr = (r - r_first) / dr
        fa = (math.degrees(math.atan2(vy, vx)) - a_first) / da
        r0 = min(max(int(math.floor(fr)), 0), n_r - 2)
        ar = min(max(fr - r0, 0.0), 1.0)
        a0f = math.floor(fa)
        aa = fa - a0f
        a0 = int(a0f) % n_a
        a1 = (a0 + 1) % n_a
        value = ((1 - ar) * ((1 - aa) * p[r0, a0] + aa * p[r0, a1])
                 + ar * ((1 - aa) * p[r0 + 1, a0] + aa * p[r0 + 1, a1]))
        total += w * value
        norm += w * w
    return total / math.sqrt(norm + 1e-30)


@numba.njit(nogil=True, cache=True)
def _turns(angle_deg):
    """Rotation matrices ``(6, 3, 3)`` by ``+-angle`` degrees about x, y and z (the turns of
    the search; :func:`axis_rotations` for several angles)."""
    out = np.zeros((6, 3, 3))
    a = math.radians(angle_deg)
    for j in range(6):
        axis, sign = j // 2, 1.0 - 2.0 * (j % 2)
        c, s = math.cos(sign * a), math.sin(sign * a)
        u, w = (axis + 1) % 3, (axis + 2) % 3
        out[j, axis, axis] = 1.0
        out[j, u, u], out[j, u, w], out[j, w, u], out[j, w, w] = c, -s, s, c
    return out


@numba.njit(nogil=True, fastmath=True, cache=True)
def _refine_host(p, matrices, g, f2, k, smax, gamma, r_first, dr, a_first, da, radius, step,
                 min_step, max_iter, out, scores):
    """Pattern search for every pattern, one after another (see :func:`refine_rotations`)."""
    cand = np.empty((3, 3))
    for i in range(p.shape[0]):
        m = matrices[i].copy()
        best = _score_one(p[i], m, g, f2, k, smax, gamma, r_first, dr, a_first, da, radius)
        st = step
        for _ in range(max_iter):
            if st < min_step:
                break
            turns = _turns(st)
            best_j = -1
            best_value = best
            for j in range(6):
                cand[:] = turns[j] @ m
                value = _score_one(p[i], cand, g, f2, k, smax, gamma, r_first, dr, a_first, da,
                                   radius)
                if value > best_value:
                    best_j, best_value = j, value
            if best_j >= 0:
                m = turns[best_j] @ m
                best = best_value
            else:
                st /= 2
        out[i] = m
        scores[i] = best


def refine_rotations(p, matrices, model, gamma, radial, azimuthal, step=0.5, min_step=0.02,
                     max_iter=60):
    """Pattern search from ``matrices`` ``(n, 3, 3)``: the refined matrices and their scores.

    ``model`` is ``(g, f2, k, max_excitation_error, reciprocal_radius)``. Every pattern
    tries turns of ``step`` degrees about the laboratory x, y and z axes, moves to the
    best one if it scores higher, and otherwise halves its step, until the step is below
    ``min_step`` degrees.

    Examples
    --------
    A pattern made of the model's own spots (radius 0.5 1/Å, azimuths 0, 45, 90 and 180
    degrees), started 1.5 degrees away about the beam:

    >>> g = np.array([[0.5, 0, 0], [0, 0.5, 0], [-0.5, 0, 0], [0.35, 0.35, 0]])
    >>> model = (g, np.ones(4), 39.87, 0.05, 1.0)
    >>> centres = np.arange(360) + 0.5
    >>> p = np.zeros((1, 50, 360), np.float32)
    >>> for c in (0, 45, 90, 180):
    ...     p[0, 24:26] += np.exp(-0.5 * ((centres - c + 180) % 360 - 180) ** 2)
    >>> start = axis_rotations(np.array([1.5]))[:, 4]   # +1.5 degrees about z
    >>> found, score = refine_rotations(p, start, model, 1.0, (0.01, 0.02), (0.5, 1.0))
    >>> turn = np.degrees(np.arctan2(found[0, 1, 0], found[0, 0, 0]))
    >>> bool(abs(turn) < 0.2)
    True
    """
    g, f2, k, smax, radius = model
    matrices = np.ascontiguousarray(matrices, dtype=np.float64)
    out = np.empty_like(matrices)
    scores = np.empty(matrices.shape[0])
    _refine_host(np.ascontiguousarray(p, dtype=np.float32), matrices,
                 np.ascontiguousarray(g, dtype=np.float64), np.asarray(f2, dtype=np.float64),
                 float(k), float(smax), float(gamma), float(radial[0]), float(radial[1]),
                 float(azimuthal[0]), float(azimuthal[1]), float(radius), float(step),
                 float(min_step), int(max_iter), out, scores)
    return out, scores
