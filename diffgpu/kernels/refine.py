"""Orientation refinement below the library's grid: a kinematic spot model scored on polar patterns.

A template library samples orientations on a grid (1 degree: up to ~0.7 degrees from any
orientation). Refinement starts from a match and turns the crystal in small steps about
the three laboratory axes, keeping each turn that raises the score, and halves the step
when none does (a pattern search), for every pattern at once.

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

Host (NumPy) code: the rotations are few per pattern and the work is small next to the
matching itself.
"""

from __future__ import annotations

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
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    out = np.zeros(a.shape + (6, 3, 3))
    for j, (axis, sign) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1)]):
        c, s = np.cos(sign * a), np.sin(sign * a)
        u, w = [(1, 2), (2, 0), (0, 1)][axis]
        out[:, j, axis, axis] = 1
        out[:, j, u, u], out[:, j, u, w], out[:, j, w, u], out[:, j, w, w] = c, -s, s, c
    return out


def refine_rotations(p, matrices, model, gamma, radial, azimuthal, step=0.5, min_step=0.02,
                     max_iter=60):
    """Pattern search from ``matrices`` ``(n, 3, 3)``: the refined matrices and their scores.

    ``model`` is ``(g, f2, k, max_excitation_error, reciprocal_radius)``. Every pattern
    tries turns of ``step`` degrees about the laboratory x, y and z axes, moves to the
    best one if it scores higher, and otherwise halves its step, until the step is below
    ``min_step`` degrees.
    """
    g, f2, k, smax, radius = model

    def score(m):
        return score_rotations(p, m, g, f2, k, smax, gamma, radial, azimuthal, radius)

    current = np.asarray(matrices, dtype=np.float64)
    n = current.shape[0]
    best = score(current[:, None])[:, 0]
    steps = np.full(n, float(step))
    for _ in range(max_iter):
        active = steps >= min_step
        if not active.any():
            break
        idx = np.flatnonzero(active)
        cand = axis_rotations(steps[idx]) @ current[idx, None]  # turned in the laboratory frame
        sc = score_rotations(p[idx], cand, g, f2, k, smax, gamma, radial, azimuthal, radius)
        j = sc.argmax(axis=1)
        top = sc[np.arange(idx.size), j]
        better = top > best[idx]
        moved = idx[better]
        current[moved] = cand[better, j[better]]
        best[moved] = top[better]
        steps[idx[~better]] /= 2
    return current, best
