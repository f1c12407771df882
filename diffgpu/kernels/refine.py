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
norm) read at the spot positions (cubic convolution along the azimuth, linear along the
radius): the correlation with a template of narrow spots.

Host code: :func:`refine_rotations` runs a numba kernel, one pattern after another
(``nogil``, so callers can run blocks of patterns in threads); :func:`score_rotations` is the
same score in NumPy, for checking it. Device patterns (CuPy) take the same search written
against their array module (the end of this module): :func:`prepare_patterns`,
:func:`refine_rotations` and :func:`contrast_scores` dispatch on the patterns' type and
return device arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..device import array_module
from .matching import positive_power

__all__ = ["prepare_patterns", "score_rotations", "refine_rotations", "axis_rotations",
           "shared_contrast_scores",
           "estimate_exponent", "model_similarity", "contrast_scores", "pattern_images",
           "matrix_quaternions", "quaternion_matrices", "estimate_spot_width",
           "estimate_center_offset", "shift_center"]


def prepare_patterns(patterns, gamma, smooth=0.5):
    """Polar patterns ``(n, R, A)`` -> ``** gamma``, smoothed by ``smooth`` bins, unit norm.

    Non-finite and negative bins count as 0 (as in matching). The smoothing is a Gaussian
    (truncated at 4 sigma) that repeats the edge bins along the radius and wraps around the
    azimuth, as ``scipy.ndimage.gaussian_filter(mode=("nearest", "wrap"))``; one numba pass
    per pattern does it all (the NumPy/SciPy steps took 1.4 ms per 128 x 360 pattern, more
    than the search itself).

    Examples
    --------
    >>> p = prepare_patterns(np.ones((2, 4, 8)), 0.5)
    >>> p.shape, round(float((p[0] ** 2).sum()), 6)
    ((2, 4, 8), 1.0)
    """
    if np.ndim(patterns) != 3:
        raise ValueError(f"polar patterns must be (n, radial, azimuthal); got {np.shape(patterns)}")
    xp = array_module(patterns)
    if xp is not np:  # device blocks: prepared where they are
        return _prepare_xp(xp, patterns, gamma, smooth)
    pw = positive_power(patterns, gamma, np.empty(np.shape(patterns), np.float32))
    out = np.empty_like(pw)
    _prepare(pw, _gauss_taps(smooth), out)
    return out


def _gauss_taps(sigma):
    """Normalised Gaussian taps of ``sigma`` bins, radius ``int(4 sigma + 0.5)`` (as SciPy)."""
    if sigma <= 0:
        return np.ones(1, np.float32)
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


@numba.njit(nogil=True, fastmath=True, cache=True)
def _prepare(pw, taps, out):
    # smoothing (separable) and unit norm, one pattern at a time while it is in cache. The
    # azimuth is read from a copy of each row padded by its own ends (wrapping), and every
    # inner loop runs over a 1D view: with 3D indexing inside them LLVM did not vectorise,
    # and the pass took 2.6x longer (0.37 against 0.15 ms per 128 x 360 pattern, 9 taps)
    n, n_r, n_a = pw.shape
    h = taps.shape[0] // 2
    n_t = taps.shape[0]
    row = np.empty(n_a + 2 * h, np.float32)
    acc = np.empty(n_a, np.float32)
    for i in range(n):
        total = 0.0
        for r in range(n_r):
            acc[:] = 0
            for t in range(n_t):  # along the radius, edge bins repeated
                w = taps[t]
                src = pw[i, min(max(r + t - h, 0), n_r - 1)]
                for a in range(n_a):
                    acc[a] += w * src[a]
            row[h:h + n_a] = acc  # around the azimuth: wrap
            row[:h] = acc[n_a - h:]
            row[n_a + h:] = acc[:h]
            o = out[i, r]
            o[:] = 0
            for t in range(n_t):
                w = taps[t]
                seg = row[t:t + n_a]
                for a in range(n_a):
                    o[a] += w * seg[a]
            s2 = np.float32(0)
            for a in range(n_a):
                s2 += o[a] * o[a]
            total += s2
        out[i] *= np.float32(1.0 / math.sqrt(total)) if total > 0 else np.float32(1)


def _spots(v, k, smax, radius, radial, azimuthal):
    """Where the reflections at laboratory positions ``v`` ``(..., 3)`` land and how strongly
    they are excited: ``inside`` (excited and within ``radius``), the rel-rod factor, and
    their radial and azimuthal positions in bins of the polar grid."""
    r = np.hypot(v[..., 0], v[..., 1])
    s = (k - np.sqrt(np.maximum(k * k - r * r, 0))) - v[..., 2]
    width = np.pi / smax
    rod = width / (np.pi * (width * width * s * s + 1)) * smax
    inside = (np.abs(s) < smax) & (r <= radius)
    fr = (r - radial[0]) / radial[1]
    fa = (np.rad2deg(np.arctan2(v[..., 1], v[..., 0])) - azimuthal[0]) / azimuthal[1]
    return inside, rod, fr, fa


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
    inside, rod, fr, fa = _spots(v, k, max_excitation_error, reciprocal_radius, radial,
                                 azimuthal)
    w = np.where(inside, f2 * rod, 0.0) ** gamma
    r0 = np.clip(np.floor(fr).astype(np.int64), 0, R - 2)
    ar = np.clip(fr - r0, 0.0, 1.0)
    a0 = np.floor(fa).astype(np.int64)
    t = fa - a0
    # cubic convolution along the azimuth (Keys, a = -0.5: a bilinear reading pulled spots
    # onto the bins, 0.2 degrees of refined error at 1-degree bins), linear along the radius
    c = [-0.5 * t**3 + t**2 - 0.5 * t, 1.5 * t**3 - 2.5 * t**2 + 1, -1.5 * t**3 + 2 * t**2 + 0.5 * t,
         0.5 * t**3 - 0.5 * t**2]
    i = np.arange(n)[:, None, None]
    lo = sum(c[q] * p[i, r0, (a0 - 1 + q) % A] for q in range(4))
    hi = sum(c[q] * p[i, r0 + 1, (a0 - 1 + q) % A] for q in range(4))
    value = (1 - ar) * lo + ar * hi
    return (w * value).sum(axis=-1) / np.sqrt((w * w).sum(axis=-1) + 1e-30)


def estimate_center_offset(p, matrices, model, gamma, radial, azimuthal, reach=3.0):
    """Where the patterns' centre lies from the centre their polar grid was integrated about.

    With the centre off by ``d``, every spot ``g`` appears at ``g + d``: no orientation
    moves all spots alike, so an offset of one pixel biases the refined orientations
    (median errors of 0.16-0.24 degrees against 0.08-0.10 on simulated Si). The offset
    common to the patterns is the ``d`` that maximises the sum of their scores at their
    orientations with the spots read at ``g + d``: a grid of 13 x 13 offsets out to ``reach``
    radial bins or 0.03 1/Å, whichever is further, then a grid five times finer around its
    best.

    Parameters
    ----------
    p : array ``(n, R, A)``
        From :func:`prepare_patterns`.
    matrices : array ``(n, 3, 3)``
        Crystal-to-laboratory matrices of the patterns' (refined) orientations.
    model : tuple
        ``(g, f2, k, max_excitation_error, reciprocal_radius)``.
    gamma : float
        Spot intensities are weighted as ``intensity ** gamma``.
    radial, azimuthal : tuples ``(first_centre, step)``
        The polar grid (1/Å, degrees).
    reach : float
        Largest offset tried, in radial bins (at least 0.03 1/Å).

    Returns
    -------
    numpy.ndarray ``(2,)``
        ``(x, y)`` in 1/Å, in the detector's frame (columns, rows).

    Examples
    --------
    Four spots at 0.5 1/Å drawn about a centre 0.02 1/Å along x:

    >>> g = np.array([[0.5, 0, 0], [0, 0.5, 0], [-0.5, 0, 0], [0, -0.5, 0]])
    >>> model = (g, np.ones(4), 39.87, 0.05, 1.0)
    >>> r, a = np.arange(0.005, 1.0, 0.01)[:, None], np.radians(np.arange(-179.5, 180))[None]
    >>> x, y = r * np.cos(a), r * np.sin(a)
    >>> p = sum(np.exp(-((x - gx - 0.02) ** 2 + (y - gy) ** 2) / (2 * 0.01 ** 2)) for gx, gy, _ in g)
    >>> d = estimate_center_offset(prepare_patterns(p[None], 1.0), np.eye(3)[None], model, 1.0,
    ...                            (0.005, 0.01), (-179.5, 1.0))
    >>> (np.round(d, 2) + 0.0).tolist()
    [0.02, 0.0]
    """
    g, f2, k, smax, radius = model
    p = np.asarray(p, dtype=np.float32)
    n, R, A = p.shape
    mats = np.asarray(matrices, dtype=np.float64).reshape(n, 3, 3)
    # the excited spots, found once: only where they are read moves with the offset
    v = np.einsum("nij,gj->ngi", mats, g)
    inside, rod, _, _ = _spots(v, k, smax, radius, radial, azimuthal)
    at, j = np.nonzero(inside)
    w = (f2[j] * rod[at, j]) ** gamma
    w /= np.sqrt(np.bincount(at, w * w, minlength=n))[at]  # every pattern weighs alike
    x, y = v[at, j, 0], v[at, j, 1]

    def totals(dx, dy):  # bilinear reading: the offset is common to spots at every fraction
        # every offset of a grid at once, (offsets, spots): one pass instead of one per offset
        xs, ys = x[None] + dx[:, None], y[None] + dy[:, None]
        fr = np.clip((np.hypot(xs, ys) - radial[0]) / radial[1], 0, R - 1)
        fa = (np.rad2deg(np.arctan2(ys, xs)) - azimuthal[0]) / azimuthal[1]
        r0 = np.minimum(fr.astype(np.int64), R - 2)
        a0 = np.floor(fa)
        wr, wa = fr - r0, fa - a0
        a0 = a0.astype(np.int64) % A
        a1 = (a0 + 1) % A
        value = ((1 - wr) * ((1 - wa) * p[at, r0, a0] + wa * p[at, r0, a1])
                 + wr * ((1 - wa) * p[at, r0 + 1, a0] + wa * p[at, r0 + 1, a1]))
        return value @ w

    best = np.zeros(2)
    if not at.size:
        return best
    # out to 0.03 1/Å at least (3 pixels at a usual 0.01 1/Å per pixel, whatever the bins)
    far = max(reach * radial[1], 0.03)
    for offsets in (np.arange(-6, 7) * far / 6, np.arange(-5, 6) * far / 30):
        dx, dy = (v.ravel() for v in np.meshgrid(offsets, offsets, indexing="ij"))
        scores = totals(best[0] + dx, best[1] + dy)
        top = int(np.argmax(scores))
        if not scores[top] > scores[dx.size // 2]:  # no better than where it is (the middle)
            top = dx.size // 2
        best = best + [dx[top], dy[top]]
    return best


def shift_center(patterns, offset, radial, azimuthal):
    """Polar patterns ``(n, R, A)`` resampled about a centre ``offset`` ``(x, y)`` (1/Å) from
    the one they were integrated about (bilinear, the azimuth wrapping around; bins whose
    source lies beyond the outermost radius are NaN, as outside the detector).

    Examples
    --------
    >>> r, a = np.arange(0.005, 1.0, 0.01)[:, None], np.radians(np.arange(-179.5, 180))[None]
    >>> p = np.exp(-((r * np.cos(a) - 0.52) ** 2 + (r * np.sin(a)) ** 2) / (2 * 0.01 ** 2))
    >>> q = shift_center(p[None], (0.02, 0.0), (0.005, 0.01), (-179.5, 1.0))[0]
    >>> [int(i) for i in np.unravel_index(np.nanargmax(q), q.shape)]   # 0.5 1/Å, azimuth 0
    [49, 179]
    """
    xp = array_module(patterns)
    n, R, A = patterns.shape
    r = radial[0] + radial[1] * np.arange(R)[:, None]
    a = np.deg2rad(azimuthal[0] + azimuthal[1] * np.arange(A))[None]
    x, y = r * np.cos(a) + offset[0], r * np.sin(a) + offset[1]
    fr = (np.hypot(x, y) - radial[0]) / radial[1]
    fa = ((np.rad2deg(np.arctan2(y, x)) - azimuthal[0]) / azimuthal[1]) % A
    beyond = fr > R - 1
    fr = np.clip(fr, 0, R - 1)
    r0 = np.minimum(np.floor(fr).astype(np.int64), R - 2)
    a0 = np.floor(fa).astype(np.int64) % A
    wr, wa = fr - r0, fa - np.floor(fa)
    src = xp.asarray(patterns, dtype=xp.float32)

    def at(rr, aa):
        return src[:, xp.asarray(rr), xp.asarray(aa)]

    weights = ((1 - wr) * (1 - wa), (1 - wr) * wa, wr * (1 - wa), wr * wa)
    w = [xp.asarray(v, dtype=xp.float32) for v in weights]
    out = (w[0] * at(r0, a0) + w[1] * at(r0, (a0 + 1) % A) + w[2] * at(r0 + 1, a0)
           + w[3] * at(r0 + 1, (a0 + 1) % A))
    return xp.where(xp.asarray(beyond)[None], xp.float32(xp.nan), out)


def estimate_exponent(patterns, matrices, model, radial, azimuthal, smooth=0.5, min_spots=6):
    """How the patterns' spot intensities scale with the kinematic model's: the exponent ``a``
    in ``pattern ~ (|F|^2 x rel-rod factor) ** a`` at the spots of the given orientations.

    1 for patterns proportional to kinematic intensities; 0.5 for patterns a user raised to
    ``** 0.5`` before matching; below 1 where dynamical scattering evens the spots out.
    Refinement weights its model's spots by ``intensity ** (a * gamma)`` so that they scale
    like the patterns it scores them on (``pattern ** gamma``): with the weights scaling
    otherwise, the tilt that best matches the spots' intensities is biased (refined errors of
    0.40-0.45 degrees instead of 0.17-0.20 on patterns raised to ``** 0.5``; see
    ``benchmarks/NOTES.md``).

    Parameters
    ----------
    patterns : array ``(n, R, A)``
        Polar patterns as they are (not yet raised to ``gamma``).
    matrices : array ``(n, 3, 3)``
        Crystal-to-laboratory matrices of the patterns' matches.
    model : tuple
        ``(g, f2, k, max_excitation_error, reciprocal_radius)``.
    radial, azimuthal : tuples ``(first_centre, step)``
        The polar grid (1/Å, degrees).
    smooth : float
        Gaussian smoothing (bins) before the patterns are read at the spots.
    min_spots : int
        Patterns with fewer excited spots above their ring's background are left out.

    Returns
    -------
    float
        The median over the patterns of each one's least-squares slope of ``log(pattern)``
        against ``log(model intensity)``, clipped to ``[0.05, 2]``; 1.0 when no pattern has
        ``min_spots`` usable spots.

    Examples
    --------
    Spots whose pattern values are the square roots of the model's intensities:

    >>> g = np.array([[0.3 * np.cos(a), 0.3 * np.sin(a), 0] for a in np.radians(np.arange(0, 360, 30))])
    >>> f2 = np.linspace(1.0, 20.0, len(g))
    >>> model = (g, f2, 39.87, 0.05, 1.0)
    >>> p = np.zeros((1, 40, 360))
    >>> for (x, y, _), f in zip(g, f2):
    ...     p[0, 29, int(np.degrees(np.arctan2(y, x))) % 360] = np.sqrt(f)
    >>> round(estimate_exponent(p, np.eye(3)[None], model, (0.005, 0.01), (0.5, 1.0),
    ...                         smooth=0), 2)
    0.5
    """
    g, f2, k, smax, radius = model
    # smoothed as prepare_patterns does (scaled to unit norm: a constant in log space, so the
    # slopes are unchanged; SciPy's filter in float64 cost 8 ms for 32 patterns)
    p = prepare_patterns(patterns, 1.0, smooth)
    # a ring's background: the median over azimuth at each radius (spots are sparse), in
    # float32 (half the time of float64; the values read at the spots become float64 with
    # their float64 interpolation weights)
    p = np.maximum(p - np.median(p, axis=2, keepdims=True), np.float32(0))
    n, R, A = p.shape
    mats = np.asarray(matrices, dtype=np.float64).reshape(n, 3, 3)
    # all patterns at once (a loop over patterns cost 0.3 ms each)
    inside, rod, fr, fa = _spots(np.einsum("nij,gj->ngi", mats, g), k, smax, radius, radial,
                                 azimuthal)
    inside &= (fr >= 0) & (fr <= R - 1)
    model_i = f2 * rod
    r0 = np.clip(np.floor(np.where(inside, fr, 0)).astype(np.int64), 0, R - 2)
    ar = np.clip(fr - r0, 0, 1)
    a0f = np.floor(np.where(inside, fa, 0))
    aa = np.where(inside, fa, 0) - a0f
    a0 = a0f.astype(np.int64) % A
    a1 = (a0 + 1) % A
    i = np.arange(n)[:, None]
    value = ((1 - ar) * ((1 - aa) * p[i, r0, a0] + aa * p[i, r0, a1])
             + ar * ((1 - aa) * p[i, r0 + 1, a0] + aa * p[i, r0 + 1, a1]))
    ok = inside & (value > 0) & (model_i > 0)
    count = ok.sum(axis=1)
    x = np.log(np.where(ok, model_i, 1.0))
    y = np.log(np.where(ok, value, 1.0))
    safe = np.maximum(count, 1)
    x = np.where(ok, x - x.sum(axis=1, keepdims=True) / safe[:, None], 0)
    y = np.where(ok, y - y.sum(axis=1, keepdims=True) / safe[:, None], 0)
    sxx = (x * x).sum(axis=1)
    usable = (inside.sum(axis=1) >= min_spots) & (count >= min_spots) & (sxx > 1e-12)
    if not usable.any():
        return 1.0
    slopes = (x * y).sum(axis=1)[usable] / sxx[usable]
    return float(np.clip(np.median(slopes), 0.05, 2.0))


def estimate_spot_width(patterns, matrices, model, radial, azimuthal, n_spots=6):
    """The spots' width in the patterns (Gaussian sigma along the radius, 1/Å).

    At the ``n_spots`` strongest model spots of each pattern's match, the pattern's radial
    profile in the spot's azimuthal bin (5 bins either side, or 4 sigma where the spots
    are wider; its lowest value taken off) gives a second moment; the median over spots
    and patterns, less the variance of one bin's width (``dr^2 / 12``), is the spot's
    own. Pattern similarities (:func:`model_similarity`) use it: two orientations whose
    spots differ by much less than a spot's width cannot be told apart.

    Parameters
    ----------
    patterns : array ``(n, R, A)``
        Polar patterns as they are.
    matrices : array ``(n, 3, 3)``
        Crystal-to-laboratory matrices of their matches.
    model : tuple
        ``(g, f2, k, max_excitation_error, reciprocal_radius)``.
    radial, azimuthal : tuples ``(first_centre, step)``
    n_spots : int

    Returns
    -------
    float
        1/Å; NaN when no spot could be measured.

    Examples
    --------
    One spot of sigma 0.02 1/Å on a grid of 0.005 1/Å bins:

    >>> g = np.array([[0.5, 0.0, 0.0]])
    >>> r = 0.0025 + 0.005 * np.arange(200)
    >>> p = np.zeros((1, 200, 360))
    >>> p[0, :, 0] = np.exp(-0.5 * ((r - 0.5) / 0.02) ** 2)
    >>> w = estimate_spot_width(p, np.eye(3)[None], (g, np.ones(1), 39.87, 0.05, 1.0),
    ...                         (0.0025, 0.005), (0.5, 1.0))
    >>> bool(abs(w - 0.02) < 0.002)
    True
    """
    p = np.asarray(patterns, dtype=np.float64)
    mats = np.asarray(matrices, dtype=np.float64).reshape(p.shape[0], 3, 3)
    widest = (p.shape[1] - 1) // 2  # a window of 2 half + 1 bins fits the radial axis
    half = min(5, widest)
    sigma = float("nan")
    for _ in range(5):  # wide spots: widen the window to +-4 sigma until it holds them
        if half < 1:
            break
        sigma = _spot_width_bins(p, mats, model, radial, azimuthal, n_spots, half)
        if not np.isfinite(sigma) or 4 * sigma <= half or half == widest:
            break  # (spots wider than a quarter of the radial range: measured as they fit)
        half = min(int(math.ceil(4 * sigma)) + 1, widest)
    return sigma * radial[1]


def _spot_width_bins(p, mats, model, radial, azimuthal, n_spots, half):
    g, f2, k, smax, radius = model
    n, R, A = p.shape
    inside, rod, fr, fa = _spots(np.einsum("nij,gj->ngi", mats, g), k, smax, radius, radial,
                                 azimuthal)
    inside &= (fr >= half) & (fr <= R - 1 - half)
    # the n_spots strongest spots of each pattern, all patterns at once
    strength = np.where(inside, f2 * rod, -np.inf)
    top = np.argsort(-strength, axis=1)[:, :n_spots]
    rows = np.arange(n)[:, None]
    keep = np.isfinite(strength[rows, top])
    fr, fa = fr[rows, top], fa[rows, top]
    r0 = np.round(np.where(keep, fr, half)).astype(np.int64)
    a0 = np.floor(np.where(keep, fa, 0) + 0.5).astype(np.int64) % A  # nearest bin centre
    offsets = np.arange(-half, half + 1)
    prof = p[rows[..., None], r0[..., None] + offsets, a0[..., None]]  # (n, n_spots, 2h + 1)
    keep &= np.isfinite(prof).all(axis=-1)
    prof = np.where(keep[..., None], prof - prof.min(axis=-1, keepdims=True), 0)
    total = prof.sum(axis=-1)
    keep &= total > 0
    if not keep.any():
        return float("nan")
    x = r0[..., None] + offsets - fr[..., None]
    widths = (prof * x * x).sum(axis=-1)[keep] / total[keep]
    return math.sqrt(max(float(np.median(widths)) - 1.0 / 12.0, 0.0))


def axis_rotations(angle_deg):
    """Rotation matrices ``(n, 6, 3, 3)`` by ``+-angle`` (one per pattern) about x, y and z.

    Examples
    --------
    >>> m = axis_rotations(np.array([90.0]))
    >>> np.round(m[0, 4] @ [1.0, 0, 0], 6).tolist()   # +90 degrees about z
    [0.0, 1.0, 0.0]
    """
    return np.stack([_turns(float(a)) for a in np.atleast_1d(angle_deg)])


@numba.njit(inline="always")
def _project(m, g, j, k):
    """Reflection ``j`` at crystal-to-laboratory matrix ``m``: its laboratory x and y, its
    radius on the detector plane and its excitation error."""
    vx = m[0, 0] * g[j, 0] + m[0, 1] * g[j, 1] + m[0, 2] * g[j, 2]
    vy = m[1, 0] * g[j, 0] + m[1, 1] * g[j, 1] + m[1, 2] * g[j, 2]
    vz = m[2, 0] * g[j, 0] + m[2, 1] * g[j, 1] + m[2, 2] * g[j, 2]
    r = math.sqrt(vx * vx + vy * vy)
    return vx, vy, r, (k - math.sqrt(max(k * k - r * r, 0.0))) - vz


@numba.njit(inline="always")
def _keys(t):
    """Weights of the 4 samples around ``t`` in [0, 1) for cubic convolution (Keys, a = -0.5)."""
    t2 = t * t
    t3 = t2 * t
    return (-0.5 * t3 + t2 - 0.5 * t, 1.5 * t3 - 2.5 * t2 + 1.0,
            -1.5 * t3 + 2.0 * t2 + 0.5 * t, 0.5 * t3 - 0.5 * t2)


# atan(a) = a + a^3 P(a^2) on [0, 1], P of degree 7 fitted here by iteratively reweighted least
# squares (Lawson) to a largest error of 7.4e-9 rad (4e-7 degrees, against bins of ~1 degree)
_ATAN = (0.002622322483976473, -0.015132838392340784, 0.04112233609380801,
         -0.07366745219877525, 0.10573949918930561, -0.14185979719501837, 0.1999039716072074,
         -0.33332987082637633)


@numba.njit(inline="always", fastmath=True)
def _atan2_deg(y, x):
    """``degrees(atan2(y, x))`` to 4e-7 degrees, by a polynomial: libm's atan2 was a fifth of
    the search's time."""
    ax, ay = abs(x), abs(y)
    hi = max(ax, ay)
    a = min(ax, ay) / hi if hi > 0 else 0.0
    s = a * a
    c = _ATAN
    poly = c[0]
    poly = poly * s + c[1]
    poly = poly * s + c[2]
    poly = poly * s + c[3]
    poly = poly * s + c[4]
    poly = poly * s + c[5]
    poly = poly * s + c[6]
    poly = poly * s + c[7]
    t = poly * s * a + a
    if ay > ax:
        t = 0.5 * math.pi - t
    if x < 0:
        t = math.pi - t
    return math.degrees(-t if y < 0 else t)


_ROD_NODES = 8192  # nodes of the tabulated rel-rod weight (linear reading: <= 1.2e-6 relative)


@numba.njit(nogil=True, cache=True)
def _weights(f2, gamma):
    """What the score weighs each spot by, ``(|F|^2 rod(s)) ** gamma``, split so that no power
    is taken per spot: ``f2 ** gamma`` per reflection, and ``rod(s) ** gamma`` tabulated
    against ``u = (pi s / smax)^2`` in ``[0, pi^2]`` (|s| < smax), read linearly (its
    largest error, ``h^2 gamma (gamma + 1) / 8`` relative, is below 1.2e-6 for gamma <= 2).
    In ``u`` the rel-rod is ``1 / (1 + u)`` whatever ``smax``. Returns ``(f2g, table, nodes
    per unit of u)``."""
    f2g = np.empty(f2.shape[0])
    for j in range(f2.shape[0]):
        f2g[j] = f2[j] ** gamma
    table = np.empty(_ROD_NODES + 1)
    per_u = _ROD_NODES / (math.pi * math.pi)
    for i in range(_ROD_NODES + 1):
        table[i] = (1.0 / (1.0 + i / per_u)) ** gamma
    return f2g, table, per_u


_WEIGHTS = {}


def _spot_weights(f2, gamma):
    """:func:`_weights`, made once per model and exponent (8,193 powers: 0.12 ms, which every
    kernel call of a refinement paid again, a dozen per block of patterns)."""
    f2 = np.asarray(f2, dtype=np.float64)
    key = (f2.tobytes(), float(gamma))
    got = _WEIGHTS.get(key)
    if got is None:
        if len(_WEIGHTS) >= 32:  # a few models and exponents per session
            _WEIGHTS.clear()
        got = _WEIGHTS[key] = _weights(f2, float(gamma))
    return got


@numba.njit(inline="always")
def _rod_weight(table, per_u, width, s):
    """``rod(s) ** gamma`` read from :func:`_weights`' table."""
    u = width * width * s * s * per_u
    i0 = min(int(u), table.shape[0] - 2)
    return table[i0] + (u - i0) * (table[i0 + 1] - table[i0])


@numba.njit(inline="always")
def _spot_bin(m, g, j, k, f2g, table, per_u, width, smax, r_first, dr, a_first, da, radius, n_r):
    """Spot ``j`` of reciprocal vectors ``g`` under matrix ``m``: its weight (-1 where it is
    not excited or lies beyond ``radius``), fractional radial and azimuthal bin, and its
    first radial bin."""
    vx, vy, r, s = _project(m, g, j, k)
    if abs(s) >= smax or r > radius:
        return -1.0, 0.0, 0.0, 0
    w = f2g[j] * _rod_weight(table, per_u, width, s)
    fr = (r - r_first) / dr
    fa = (_atan2_deg(vy, vx) - a_first) / da
    return w, fr, fa, min(max(int(math.floor(fr)), 0), n_r - 2)


@numba.njit(nogil=True, fastmath=True, cache=True)
def _score_one(p, m, g, f2g, table, per_u, idx, n_idx, k, smax, r_first, dr, a_first, da,
               radius):
    """:func:`score_rotations` for one pattern ``p`` ``(R, A)`` and one matrix ``m``, over the
    reflections ``idx[:n_idx]`` (those that can be excited near ``m``: see ``_near``); the
    spots' weights from ``f2g, table, per_u`` (:func:`_weights`)."""
    n_r, n_a = p.shape
    width = math.pi / smax
    total = 0.0
    norm = 0.0
    for q in range(n_idx):
        j = idx[q]
        w, fr, fa, r0 = _spot_bin(m, g, j, k, f2g, table, per_u, width, smax, r_first, dr,
                                  a_first, da, radius, n_r)
        if w < 0:
            continue
        ar = min(max(fr - r0, 0.0), 1.0)
        a0f = math.floor(fa)
        c0, c1, c2, c3 = _keys(fa - a0f)
        a0 = int(a0f) % n_a
        am, a1, a2 = (a0 - 1) % n_a, (a0 + 1) % n_a, (a0 + 2) % n_a
        lo = c0 * p[r0, am] + c1 * p[r0, a0] + c2 * p[r0, a1] + c3 * p[r0, a2]
        hi = c0 * p[r0 + 1, am] + c1 * p[r0 + 1, a0] + c2 * p[r0 + 1, a1] + c3 * p[r0 + 1, a2]
        total += w * ((1 - ar) * lo + ar * hi)
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
def _near(m, g, gnorm, k, smax, radius, near_deg, idx):
    """Reflections that can be excited (and fall inside ``radius``) at any orientation within
    ``near_deg`` of ``m``: a turn by ``t`` radians moves a vector by at most ``|g| t``, so its
    excitation error and radius change by at most that. Writes them to ``idx``, returns how
    many (a search scores these only: 5-10x fewer than all reflections)."""
    reach = math.radians(near_deg)
    n = 0
    for j in range(g.shape[0]):
        _, _, r, s = _project(m, g, j, k)
        d = gnorm[j] * reach
        # the excitation error k - sqrt(k^2 - r^2) - vz: vz and r each move by at most d, and
        # the curvature term changes by at most d r / sqrt(k^2 - r^2) <= d (r << k)
        if abs(s) < smax + 2.0 * d and r <= radius + d:
            idx[n] = j
            n += 1
    return n


@numba.njit(inline="always")
def _matmul3(a, b, out):
    """``out = a @ b`` for 3 x 3 matrices, written out: ``@`` in numba calls BLAS, whose
    per-call overhead is larger than the product."""
    for i in range(3):
        for j in range(3):
            out[i, j] = a[i, 0] * b[0, j] + a[i, 1] * b[1, j] + a[i, 2] * b[2, j]


@numba.njit(nogil=True, cache=True)
def _turn_angle(a, b):
    """Degrees between two rotation matrices."""
    tr = 0.0
    for i in range(3):
        for j in range(3):
            tr += a[i, j] * b[i, j]
    return math.degrees(math.acos(min(1.0, max(-1.0, (tr - 1.0) / 2.0))))


@numba.njit(nogil=True, fastmath=True, cache=True)
def _refine_host(p, rows, matrices, g, f2g, table, per_u, k, smax, r_first, dr, a_first, da,
                 radius, step, min_step, max_iter, out, scores):
    """Pattern search for every matrix, one after another, on pattern ``p[rows[i]]`` (see
    :func:`refine_rotations`)."""
    # the reflections scored are those that can be excited within near_deg of where the
    # kept set was made; it is made again before a trial turn could leave that reach
    cand = np.empty((3, 3))
    gnorm = np.sqrt((g * g).sum(axis=1))
    idx = np.empty(g.shape[0], np.int64)
    near_deg = max(2.0, 4.0 * step)
    for i in range(matrices.shape[0]):
        pi = p[rows[i]]
        m = matrices[i].copy()
        origin = m.copy()
        n_idx = _near(m, g, gnorm, k, smax, radius, near_deg, idx)
        best = _score_one(pi, m, g, f2g, table, per_u, idx, n_idx, k, smax, r_first, dr,
                          a_first, da, radius)
        st = step
        for _ in range(max_iter):
            if st < min_step:
                break
            if _turn_angle(m, origin) > near_deg - 2 * step:  # a trial could leave the reach
                origin[:] = m
                n_idx = _near(m, g, gnorm, k, smax, radius, near_deg, idx)
            turns = _turns(st)
            best_j = -1
            best_value = best
            for j in range(6):
                _matmul3(turns[j], m, cand)
                value = _score_one(pi, cand, g, f2g, table, per_u, idx, n_idx, k, smax,
                                   r_first, dr, a_first, da, radius)
                if value > best_value:
                    best_j, best_value = j, value
            if best_j >= 0:
                _matmul3(turns[best_j], m, cand)
                m[:] = cand
                best = best_value
            else:
                st /= 2
        out[i] = m
        scores[i] = best


def refine_rotations(p, matrices, model, gamma, radial, azimuthal, step=0.5, min_step=0.02,
                     max_iter=60, rows=None):
    """Pattern search from ``matrices`` ``(n, 3, 3)``: the refined matrices and their scores.

    ``model`` is ``(g, f2, k, max_excitation_error, reciprocal_radius)``. Every pattern
    tries turns of ``step`` degrees about the laboratory x, y and z axes, moves to the
    best one if it scores higher, and otherwise halves its step, until the step is below
    ``min_step`` degrees. Matrix ``i`` is refined on pattern ``p[rows[i]]`` (``rows``
    defaults to ``0 .. n - 1``): a subset of a block's patterns is read in place, not copied
    (copying the block's patterns for every candidate rank cost 7% of the refinement).

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
    xp = array_module(p)
    if xp is not np:  # device patterns: searched there, matrices moved there if they are not
        mats = xp.asarray(matrices, dtype=xp.float64)
        return _refine_xp(xp, p, _rows_xp(xp, rows, p, mats), mats, _device_model(xp, model, gamma),
                          radial, azimuthal, step, min_step, max_iter)
    matrices = np.ascontiguousarray(matrices, dtype=np.float64)
    out = np.empty_like(matrices)
    scores = np.empty(matrices.shape[0])
    _refine_host(np.ascontiguousarray(p, dtype=np.float32), _rows(rows, p, matrices), matrices,
                 np.ascontiguousarray(g, dtype=np.float64), *_spot_weights(f2, gamma),
                 float(k), float(smax), float(radial[0]), float(radial[1]),
                 float(azimuthal[0]), float(azimuthal[1]), float(radius), float(step),
                 float(min_step), int(max_iter), out, scores)
    return out, scores


@numba.njit(nogil=True, fastmath=True, cache=True)
def _excited(m, g, f2, k, smax, gamma, radius, x, y, z, w):
    """The spots of matrix ``m``: laboratory x, y, z and weight ``(|F|^2 rod) ** gamma``
    written to ``x``, ``y``, ``z``, ``w``; returns how many."""
    width = math.pi / smax
    n = 0
    for j in range(g.shape[0]):
        vx, vy, r, s = _project(m, g, j, k)
        if abs(s) >= smax or r > radius:
            continue
        x[n], y[n] = vx, vy
        z[n] = m[2, 0] * g[j, 0] + m[2, 1] * g[j, 1] + m[2, 2] * g[j, 2]
        w[n] = (f2[j] * (width / (math.pi * (width * width * s * s + 1.0)) * smax)) ** gamma
        n += 1
    return n


@numba.njit(nogil=True, fastmath=True, cache=True)
def _overlap(xa, ya, wa, na, xb, yb, wb, nb, inv4s2):
    """``sum_ij wa_i wb_j exp(-|a_i - b_j|^2 / (4 sigma^2))``: the inner product of two
    images of Gaussian spots of width ``sigma`` (up to a constant factor)."""
    total = 0.0
    for i in range(na):
        for j in range(nb):
            dx = xa[i] - xb[j]
            dy = ya[i] - yb[j]
            d2 = (dx * dx + dy * dy) * inv4s2
            if d2 < 30.0:
                total += wa[i] * wb[j] * math.exp(-d2)
    return total


@numba.njit(nogil=True, cache=True)
def _similarity(ma, mb, ga, fa, gb, fb, k, smax, gamma, radius, sigma, out):
    na, nb = ga.shape[0], gb.shape[0]
    xa, ya, za, wa = np.empty(na), np.empty(na), np.empty(na), np.empty(na)
    xb, yb, zb, wb = np.empty(nb), np.empty(nb), np.empty(nb), np.empty(nb)
    inv4s2 = 1.0 / (4.0 * sigma * sigma)
    for i in range(ma.shape[0]):
        na = _excited(ma[i], ga, fa, k, smax, gamma, radius, xa, ya, za, wa)
        nb = _excited(mb[i], gb, fb, k, smax, gamma, radius, xb, yb, zb, wb)
        aa = _overlap(xa, ya, wa, na, xa, ya, wa, na, inv4s2)
        bb = _overlap(xb, yb, wb, nb, xb, yb, wb, nb, inv4s2)
        ab = _overlap(xa, ya, wa, na, xb, yb, wb, nb, inv4s2)
        out[i] = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0


def model_similarity(matrices_a, matrices_b, model, gamma, sigma, model_b=None):
    """How alike the patterns of two orientations are: the correlation of their noiseless spot
    patterns in the kinematic model, pair by pair.

    Each orientation's excited spots are drawn as Gaussians of width ``sigma`` (1/Å) in the
    detector plane, weighted ``(|F|^2 x rel-rod factor) ** gamma``; the result is the
    cosine of the angle between the two images, ``<A, B> / (|A| |B|)``, computed from the spot
    lists (no image is drawn). 1 when the two predict the same spots with the same
    intensities: a pattern cannot tell them apart.

    Parameters
    ----------
    matrices_a, matrices_b : arrays ``(n, 3, 3)``
        Crystal-to-laboratory matrices of the pairs.
    model : tuple
        ``(g, f2, k, max_excitation_error, reciprocal_radius)``
        (:meth:`~diffgpu.TemplateLibrary.kinematic_model`).
    gamma : float
        Spot weights are ``intensity ** gamma`` (as the patterns are scored).
    sigma : float
        Spot width, 1/Å (e.g. one radial bin of the polar patterns).
    model_b : tuple, optional
        The model of ``matrices_b`` when it is another phase (same ``k``, excitation
        error and radius); ``model`` by default.

    Returns
    -------
    numpy.ndarray ``(n,)`` in [0, 1]

    Examples
    --------
    A 180-degree turn about the beam maps the spots ``g`` onto ``-g``: the same pattern for a
    centrosymmetric set of reflections, a different one otherwise.

    >>> g = np.array([[0.3, 0, 0], [-0.3, 0, 0], [0, 0.4, 0]])
    >>> model = (g, np.array([1.0, 1.0, 2.0]), 39.87, 0.05, 1.0)
    >>> turn = np.diag([-1.0, -1.0, 1.0])[None]
    >>> np.round(model_similarity(np.eye(3)[None], np.eye(3)[None], model, 1.0, 0.01), 6).tolist()
    [1.0]
    >>> bool(model_similarity(np.eye(3)[None], turn, model, 1.0, 0.01)[0] < 0.5)
    True
    """
    g, f2, k, smax, radius = model
    gb, fb = (g, f2) if model_b is None else model_b[:2]
    a = np.ascontiguousarray(matrices_a, dtype=np.float64).reshape(-1, 3, 3)
    b = np.ascontiguousarray(matrices_b, dtype=np.float64).reshape(-1, 3, 3)
    if a.shape != b.shape:
        raise ValueError(f"pairs of matrices needed; got {a.shape} and {b.shape}")
    out = np.empty(a.shape[0])
    _similarity(a, b, np.ascontiguousarray(g, dtype=np.float64), np.asarray(f2, dtype=np.float64),
                np.ascontiguousarray(gb, dtype=np.float64), np.asarray(fb, dtype=np.float64),
                float(k), float(smax), float(gamma), float(radius), float(sigma), out)
    return out


def _rows(rows, p, matrices):
    """The pattern of each matrix: ``rows`` checked against ``p``, or ``0 .. n - 1``."""
    n = matrices.shape[0]
    if rows is None:
        if np.shape(p)[0] != n:
            raise ValueError(f"{np.shape(p)[0]} patterns for {n} matrices: give rows")
        return np.arange(n, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size != n or (n and (rows.min() < 0 or rows.max() >= np.shape(p)[0])):
        raise ValueError(f"rows must give one of the {np.shape(p)[0]} patterns for each of the "
                         f"{n} matrices")
    return rows


@numba.njit(nogil=True, fastmath=True, cache=True, inline="always")
def _less_ring_means(src, q):
    """``q`` = the pattern ``src`` ``(radius, azimuth)`` less each ring's mean."""
    n_r, n_a = src.shape
    for r in range(n_r):
        row = src[r]
        total = 0.0
        for a in range(n_a):
            total += row[a]
        mean = np.float32(total / n_a)
        dst = q[r]
        for a in range(n_a):
            dst[a] = row[a] - mean


@numba.njit(nogil=True, fastmath=True, cache=True)
def _contrast(p, rows, matrices, g, f2g, table, per_u, k, smax, r_first, dr, a_first, da, radius,
              out):
    idx = np.arange(g.shape[0])
    n_r, n_a = p.shape[1:]
    q = np.empty((n_r, n_a), np.float32)  # one pattern less its rings' means at a time
    for i in range(matrices.shape[0]):
        _less_ring_means(p[rows[i]], q)
        for j in range(matrices.shape[1]):
            out[i, j] = _score_one(q, matrices[i, j], g, f2g, table, per_u, idx, idx.size, k,
                                   smax, r_first, dr, a_first, da, radius)


@numba.njit(nogil=True, cache=True)
def _shared_spots(matrices, g, f2g, table, per_u, k, smax, r_first, dr, a_first, da, radius,
                  n_r, n_a):
    """The excited spots of matrices shared by every pattern, as :func:`_score_one` reads
    them: per matrix ``c`` and spot, the radial bin and fraction, the four azimuthal bins and
    cubic keys, and the weight; and every matrix's ``sqrt(sum w^2 + 1e-30)``."""
    c = matrices.shape[0]
    bins = np.zeros((c, g.shape[0], 5), np.int64)
    keys = np.zeros((c, g.shape[0], 6))
    count = np.zeros(c, np.int64)
    norms = np.empty(c)
    width = math.pi / smax
    for i in range(c):
        m = matrices[i]
        n = 0
        norm = 0.0
        for j in range(g.shape[0]):
            w, fr, fa, r0 = _spot_bin(m, g, j, k, f2g, table, per_u, width, smax, r_first, dr,
                                      a_first, da, radius, n_r)
            if w < 0:
                continue
            a0f = math.floor(fa)
            c0, c1, c2, c3 = _keys(fa - a0f)
            a0 = int(a0f) % n_a
            bins[i, n, 0] = r0
            bins[i, n, 1] = (a0 - 1) % n_a
            bins[i, n, 2] = a0
            bins[i, n, 3] = (a0 + 1) % n_a
            bins[i, n, 4] = (a0 + 2) % n_a
            keys[i, n, 0] = min(max(fr - r0, 0.0), 1.0)
            keys[i, n, 1] = c0
            keys[i, n, 2] = c1
            keys[i, n, 3] = c2
            keys[i, n, 4] = c3
            keys[i, n, 5] = w
            norm += w * w
            n += 1
        count[i] = n
        norms[i] = math.sqrt(norm + 1e-30)
    return bins, keys, count, norms


@numba.njit(nogil=True, fastmath=True, cache=True)
def _contrast_shared(p, rows, bins, keys, count, norms, out):
    n_r, n_a = p.shape[1:]
    q = np.empty((n_r, n_a), np.float32)  # one pattern less its rings' means at a time
    for i in range(rows.shape[0]):
        _less_ring_means(p[rows[i]], q)
        for j in range(count.shape[0]):
            total = 0.0
            for s in range(count[j]):
                r0 = bins[j, s, 0]
                am, a0, a1, a2 = bins[j, s, 1], bins[j, s, 2], bins[j, s, 3], bins[j, s, 4]
                ar, c0, c1, c2, c3, w = (keys[j, s, 0], keys[j, s, 1], keys[j, s, 2],
                                         keys[j, s, 3], keys[j, s, 4], keys[j, s, 5])
                lo = c0 * q[r0, am] + c1 * q[r0, a0] + c2 * q[r0, a1] + c3 * q[r0, a2]
                hi = (c0 * q[r0 + 1, am] + c1 * q[r0 + 1, a0] + c2 * q[r0 + 1, a1]
                      + c3 * q[r0 + 1, a2])
                total += w * ((1 - ar) * lo + ar * hi)
            out[i, j] = total / norms[j]


def shared_contrast_scores(p, matrices, model, gamma, radial, azimuthal, rows):
    """:func:`contrast_scores` of the same ``c`` matrices ``(c, 3, 3)`` on every pattern of
    ``rows``: ``(len(rows), c)``. On the host their spots are found once, not once per
    pattern (the unrelated orientations that the significance weighs: 128 per pattern cost
    40% of a refinement when every pattern projected every reflection again).

    Examples
    --------
    >>> g = np.array([[0.5, 0, 0], [0, 0.5, 0]])
    >>> model = (g, np.ones(2), 39.87, 0.05, 1.0)
    >>> p = np.full((2, 50, 360), 0.1, np.float32)
    >>> p[:, 24:26, [0, 90]] += 1.0
    >>> mats = np.stack([np.eye(3), axis_rotations(np.array([45.0]))[0, 4]])
    >>> got = shared_contrast_scores(p, mats, model, 1.0, (0.01, 0.02), (0.5, 1.0), [0, 1])
    >>> ref = contrast_scores(p, np.broadcast_to(mats, (2, 2, 3, 3)), model, 1.0, (0.01, 0.02),
    ...                       (0.5, 1.0))
    >>> bool(np.allclose(got, ref, atol=1e-6))
    True
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    mats = np.ascontiguousarray(matrices, dtype=np.float64)
    if array_module(p) is not np:  # device patterns: scored there, as any matrices
        return contrast_scores(p, np.broadcast_to(mats, (rows.size,) + mats.shape), model,
                               gamma, radial, azimuthal, rows=rows)
    g, f2, k, smax, radius = model
    q = np.ascontiguousarray(p, dtype=np.float32)
    _rows(rows, q, np.empty((rows.size, 1)))  # (checks them)
    f2g, table, per_u = _spot_weights(f2, gamma)
    spots = _shared_spots(mats, np.ascontiguousarray(g, dtype=np.float64), f2g, table, per_u,
                          float(k), float(smax), float(radial[0]), float(radial[1]),
                          float(azimuthal[0]), float(azimuthal[1]), float(radius), *q.shape[1:])
    out = np.empty((rows.size, mats.shape[0]))
    _contrast_shared(q, rows, *spots, out)
    return out


def contrast_scores(p, matrices, model, gamma, radial, azimuthal, rows=None):
    """Scores of rotations on patterns less their rings' background: what tells two
    orientations apart.

    The refinement's score reads ``P`` (:func:`prepare_patterns`) at the model's spots; the
    background under the spots (noise counts raised to ``** gamma`` weigh nearly as much as
    the spots) adds about the same to every orientation's score, so score ratios crowd near
    1. Here each ring's mean over the azimuth is taken off first (spots are sparse: the mean
    is the background's to a few per cent, and costs a twentieth of a median): the ratio of
    two orientations' scores then approaches the correlation of their noiseless patterns
    when the pattern is one of them (see :meth:`~diffgpu.OrientationMatches.get_reliability`).

    Parameters
    ----------
    p : array ``(n, R, A)``
        From :func:`prepare_patterns`.
    matrices : array ``(n, c, 3, 3)``
        Crystal-to-laboratory matrices, ``c`` per pattern.
    model, gamma, radial, azimuthal
        As for :func:`refine_rotations`.
    rows : int array ``(n,)``, optional
        The pattern of ``p`` each row of ``matrices`` is scored on (``0 .. n - 1`` by
        default); read in place, one pattern less its background at a time.

    Returns
    -------
    numpy.ndarray ``(n, c)``

    Examples
    --------
    >>> g = np.array([[0.5, 0, 0], [0, 0.5, 0]])
    >>> model = (g, np.ones(2), 39.87, 0.05, 1.0)
    >>> p = np.full((1, 50, 360), 0.1, np.float32)
    >>> p[0, 24:26, [0, 90]] += 1.0     # spots at 0 and 90 degrees on a flat background
    >>> turned = axis_rotations(np.array([45.0]))[:, 4]
    >>> on, off = contrast_scores(p, np.stack([np.eye(3)[None], turned], axis=1), model, 1.0,
    ...                           (0.01, 0.02), (0.5, 1.0))[0]
    >>> bool(on > 0.5), bool(abs(off) < 0.01)
    (True, True)
    """
    g, f2, k, smax, radius = model
    xp = array_module(p)
    if xp is not np:  # device patterns: scored there
        mats = xp.asarray(matrices, dtype=xp.float64)
        return _contrast_xp(xp, p, _rows_xp(xp, rows, p, mats), mats,
                            _device_model(xp, model, gamma), radial, azimuthal)
    q = np.ascontiguousarray(p, dtype=np.float32)
    mats = np.ascontiguousarray(matrices, dtype=np.float64)
    n, c = mats.shape[:2]
    out = np.empty((n, c))
    _contrast(q, _rows(rows, q, mats), mats, np.ascontiguousarray(g, dtype=np.float64),
              *_spot_weights(f2, gamma), float(k), float(smax),
              float(radial[0]), float(radial[1]), float(azimuthal[0]), float(azimuthal[1]),
              float(radius), out)
    return out


@numba.njit(nogil=True, cache=True)
def _zone_frame(x, y, z, order, n_s):
    """The laboratory direction of the zone axis the spots ``(x, y, z)`` lie around, from
    the two strongest (``order``: strongest first) that are not collinear (the beam, z, when
    it is more than 10 degrees off, or no pair is found), and two unit vectors across it."""
    ax, ay, az = 0.0, 0.0, 1.0
    f = order[0]
    ux, uy, uz = x[f], y[f], z[f]
    for q in range(1, n_s):
        j = order[q]
        vx, vy, vz = x[j], y[j], z[j]
        cx, cy, cz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
        norm = math.sqrt(cx * cx + cy * cy + cz * cz)
        if norm > 0.3 * math.sqrt((ux * ux + uy * uy + uz * uz) * (vx * vx + vy * vy + vz * vz)):
            if cz < 0:
                cx, cy, cz = -cx, -cy, -cz
            if cz / norm > math.cos(math.radians(10.0)):
                ax, ay, az = cx / norm, cy / norm, cz / norm
            break
    # across the axis: x made perpendicular to it, and axis x that
    e1x, e1y, e1z = 1.0 - ax * ax, -ax * ay, -ax * az
    n1 = math.sqrt(e1x * e1x + e1y * e1y + e1z * e1z)
    e1x, e1y, e1z = e1x / n1, e1y / n1, e1z / n1
    e2 = (ay * e1z - az * e1y, az * e1x - ax * e1z, ax * e1y - ay * e1x)
    return (ax, ay, az), (e1x, e1y, e1z), e2


@numba.njit(nogil=True, cache=True)
def _images(mats, g, f2, k, smax, gamma, radius, sigma, n_top, out, count):
    n_g = g.shape[0]
    x, y, vz, w = np.empty(n_g), np.empty(n_g), np.empty(n_g), np.empty(n_g)
    p1, p2 = np.empty(n_g), np.empty(n_g)
    reach2 = 4.0 * sigma * sigma  # spots mapped within 2 sigma of a spot count as matched
    n_out = out.shape[1]
    op = np.empty((3, 3))
    for i in range(mats.shape[0]):
        m = mats[i]
        n_s = _excited(m, g, f2, k, smax, gamma, radius, x, y, vz, w)
        count[i] = 0
        if n_s < 2:
            continue
        order = np.argsort(-w[:n_s])
        top = order[:n_top]
        # turns and half turns about the zone axis the strong spots lie around (the beam
        # exactly down a zone axis; tilted off it, the zone axis itself, so the images are
        # the tilted crystal's twins): spot positions across that axis
        (ax, ay, az), (e1x, e1y, e1z), (e2x, e2y, e2z) = _zone_frame(x, y, vz, order, n_s)
        for q in range(n_s):
            p1[q] = x[q] * e1x + y[q] * e1y + vz[q] * e1z
            p2[q] = x[q] * e2x + y[q] * e2y + vz[q] * e2z
        s0 = top[0]
        r0 = math.hypot(p1[s0], p2[s0])
        a0 = math.atan2(p2[s0], p1[s0])
        for j in range(n_s):
            if abs(math.hypot(p1[j], p2[j]) - r0) > 2.0 * sigma or w[j] < 0.5 * w[s0]:
                continue
            aj = math.atan2(p2[j], p1[j])
            for kind in range(2):
                if j == s0 and kind == 0:  # (the turn by 0; the half turn about its axis stays)
                    continue
                if kind == 0:  # a turn about the zone axis taking the strongest spot onto j
                    t = aj - a0
                    c, sn = math.cos(t), math.sin(t)
                    ux, uy, uz = ax, ay, az
                    op[0, 0] = c + ux * ux * (1 - c)
                    op[0, 1] = ux * uy * (1 - c) - uz * sn
                    op[0, 2] = ux * uz * (1 - c) + uy * sn
                    op[1, 0] = uy * ux * (1 - c) + uz * sn
                    op[1, 1] = c + uy * uy * (1 - c)
                    op[1, 2] = uy * uz * (1 - c) - ux * sn
                    op[2, 0] = uz * ux * (1 - c) - uy * sn
                    op[2, 1] = uz * uy * (1 - c) + ux * sn
                    op[2, 2] = c + uz * uz * (1 - c)
                else:  # a half turn about the axis across it, halfway between the two
                    phi = 0.5 * (aj + a0)
                    ux = math.cos(phi) * e1x + math.sin(phi) * e2x
                    uy = math.cos(phi) * e1y + math.sin(phi) * e2y
                    uz = math.cos(phi) * e1z + math.sin(phi) * e2z
                    op[0, 0], op[0, 1], op[0, 2] = 2 * ux * ux - 1, 2 * ux * uy, 2 * ux * uz
                    op[1, 0], op[1, 1], op[1, 2] = 2 * uy * ux, 2 * uy * uy - 1, 2 * uy * uz
                    op[2, 0], op[2, 1], op[2, 2] = 2 * uz * ux, 2 * uz * uy, 2 * uz * uz - 1
                ok = True
                for tq in top:  # every strong spot must land on a spot (across the axis)
                    qx = op[0, 0] * x[tq] + op[0, 1] * y[tq] + op[0, 2] * vz[tq]
                    qy = op[1, 0] * x[tq] + op[1, 1] * y[tq] + op[1, 2] * vz[tq]
                    qz = op[2, 0] * x[tq] + op[2, 1] * y[tq] + op[2, 2] * vz[tq]
                    d1 = qx * e1x + qy * e1y + qz * e1z
                    d2 = qx * e2x + qy * e2y + qz * e2z
                    hit = False
                    for q in range(n_s):
                        if (d1 - p1[q]) ** 2 + (d2 - p2[q]) ** 2 < reach2:
                            hit = True
                            break
                    if not hit:
                        ok = False
                        break
                if ok and count[i] < n_out:
                    _matmul3(op, m, out[i, count[i]])
                    count[i] += 1


def pattern_images(matrices, model, gamma, sigma, n_top=8, max_images=16):
    """Orientations whose spots coincide with those of ``matrices``: candidate twins.

    For each crystal-to-laboratory matrix, the turns about its zone axis and the half turns
    about axes across it that take its strongest spot onto a spot of similar radius and
    weight (itself too, for a half turn about its own axis) and its ``n_top`` strongest
    spots all onto spots (within ``2 sigma``, seen along that axis). The zone axis is the
    one the two strongest non-collinear spots lie around, when it is within 10 degrees of
    the beam (the beam otherwise): tilted off a zone axis, the twin is turned about the
    zone axis, not the beam. They include
    the crystal's own symmetries seen down the beam, and orientations that are not
    symmetry-equivalent yet predict the same (or nearly the same) pattern: exactly down
    <111> a cubic crystal's twin by 60 degrees about the beam is the same template at
    another in-plane angle, which matching never lists as a separate candidate. Compare with
    :func:`model_similarity` and a misorientation check to tell the two apart.

    Parameters
    ----------
    matrices : array ``(n, 3, 3)``
    model : tuple
        ``(g, f2, k, max_excitation_error, reciprocal_radius)``.
    gamma, sigma : float
        Spot weights ``intensity ** gamma``; spot width (1/Å).
    n_top, max_images : int
        Strong spots checked; images kept per matrix, at most.

    Returns
    -------
    images : array ``(n, max_images, 3, 3)``
    count : int array ``(n,)``
        How many of ``images[i]`` are filled.

    Examples
    --------
    Four equal spots at 90 degrees: the turns by 90, 180 and 270 degrees, and the half turns
    about the in-plane axes at 0, 45, 90 and 135 degrees, map them onto themselves.

    >>> g = np.array([[0.5, 0, 0], [0, 0.5, 0], [-0.5, 0, 0], [0, -0.5, 0]])
    >>> images, count = pattern_images(np.eye(3)[None], (g, np.ones(4), 39.87, 0.05, 1.0),
    ...                                1.0, 0.01)
    >>> int(count[0])
    7
    """
    g, f2, k, smax, radius = model
    m = np.ascontiguousarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    out = np.zeros((m.shape[0], int(max_images), 3, 3))
    count = np.zeros(m.shape[0], np.int64)
    _images(m, np.ascontiguousarray(g, dtype=np.float64), np.asarray(f2, dtype=np.float64),
            float(k), float(smax), float(gamma), float(radius), float(sigma), int(n_top), out,
            count)
    return out, count


def matrix_quaternions(matrices):
    """Unit quaternions ``(..., 4)`` (``w >= 0``, orix's order ``w, x, y, z``) of rotation
    matrices ``(..., 3, 3)``: ``orix.quaternion.Rotation(q).to_matrix()`` gives the matrices
    back.

    Shepperd's method (from the largest of the trace and the diagonal), exact for half turns
    too: orix 0.15's ``Rotation.from_matrix`` reads the axis' signs from the antisymmetric
    part, which vanishes for a half turn, and returned the wrong half turn (0.59 off in the
    matrix) for an exactly symmetric one, such as a zone-axis orientation turned 180
    degrees about an in-plane axis.

    Examples
    --------
    >>> half = np.diag([1.0, -1.0, -1.0])   # 180 degrees about x
    >>> matrix_quaternions(half).round(6).tolist()
    [0.0, 1.0, 0.0, 0.0]
    """
    a = np.asarray(matrices, dtype=np.float64)
    shape = a.shape[:-2]
    a = a.reshape(-1, 3, 3)
    d0, d1, d2 = a[:, 0, 0], a[:, 1, 1], a[:, 2, 2]
    pick = np.argmax(np.stack([d0 + d1 + d2, d0, d1, d2], axis=1), axis=1)
    q = np.empty((a.shape[0], 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        cases = [  # the component computed from the diagonal, then the others from it
            (0, lambda: 1 + d0 + d1 + d2, (a[:, 2, 1] - a[:, 1, 2], a[:, 0, 2] - a[:, 2, 0],
                                           a[:, 1, 0] - a[:, 0, 1]), (1, 2, 3)),
            (1, lambda: 1 + d0 - d1 - d2, (a[:, 2, 1] - a[:, 1, 2], a[:, 0, 1] + a[:, 1, 0],
                                           a[:, 0, 2] + a[:, 2, 0]), (0, 2, 3)),
            (2, lambda: 1 - d0 + d1 - d2, (a[:, 0, 2] - a[:, 2, 0], a[:, 0, 1] + a[:, 1, 0],
                                           a[:, 1, 2] + a[:, 2, 1]), (0, 1, 3)),
            (3, lambda: 1 - d0 - d1 + d2, (a[:, 1, 0] - a[:, 0, 1], a[:, 0, 2] + a[:, 2, 0],
                                           a[:, 1, 2] + a[:, 2, 1]), (0, 1, 2)),
        ]
        for k, diag, others, slots in cases:
            sel = pick == k
            if not sel.any():
                continue
            big = 0.5 * np.sqrt(np.maximum(diag()[sel], 0))
            q[sel, k] = big
            for value, slot in zip(others, slots):
                q[sel, slot] = value[sel] / (4 * big)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.reshape(shape + (4,))


def quaternion_matrices(quaternions):
    """Rotation matrices ``(..., 3, 3)`` of quaternions ``(..., 4)`` (orix's order ``w, x, y,
    z``; normalised here): ``orix.quaternion.Rotation(q).to_matrix()``, without building orix
    objects (the inverse of :func:`matrix_quaternions`). The crystal-to-laboratory matrices
    of refinement are their transposes.

    Examples
    --------
    >>> q = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])   # 90 degrees about z
    >>> quaternion_matrices(q).round(6).tolist()
    [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    q = np.asarray(quaternions, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
                    axis=-1).reshape(q.shape[:-1] + (3, 3))


# -- the same kernels on device blocks (CuPy), written against the patterns' array module ---
#
# Refinement on a GPU keeps the patterns there: they are prepared, searched and scored where
# they are, and only the small per-candidate arrays (matrices in, matrices and scores out)
# cross. The numba kernels above go pattern by pattern with early exits; here every pattern of
# a block takes a step at once (all six trial turns scored together), over all reflections
# (the numba kernels' ``_near`` subset leaves out only spots that cannot be excited, so the
# scores are the same), until every pattern's step is below ``min_step``.

_XP_SPOTS = 1 << 22  # candidate-reflection pairs scored at once: bounds the temporaries


def _model_arrays(model, gamma):
    """Host arrays of a model for the device kernels: ``g`` transposed ``(3, N)`` and the
    weights of :func:`_spot_weights`."""
    f2g, table, _ = _spot_weights(model[1], gamma)
    return np.ascontiguousarray(np.asarray(model[0], dtype=np.float64).T), f2g, table


def _arrays_to_device(cp, host):
    return tuple(cp.asarray(a) for a in host)


_DEVICE_MODELS = {}


def _device_model(xp, model, gamma):
    """``(gT, f2g, table, per_u, k, smax, radius)`` with the arrays on ``xp``'s device, moved
    once per model, exponent and device (a :class:`~diffgpu.device.DeviceCache`)."""
    from ..device import DeviceCache

    g, f2, k, smax, radius = model
    g = np.asarray(g, dtype=np.float64)
    key = (g.tobytes(), np.asarray(f2, dtype=np.float64).tobytes(), float(gamma))
    cache = _DEVICE_MODELS.get(key)
    if cache is None:
        if len(_DEVICE_MODELS) >= 32:
            _DEVICE_MODELS.clear()
        cache = _DEVICE_MODELS[key] = DeviceCache(_model_arrays(model, gamma), _arrays_to_device)
    gT, f2g, table = cache.get(xp)
    return gT, f2g, table, _ROD_NODES / (math.pi * math.pi), float(k), float(smax), float(radius)


def _scores_xp(xp, p, rows, mats, dm, radial, azimuthal):
    """Scores ``(m, c)`` of matrices ``(m, c, 3, 3)`` on patterns ``p[rows]``: the score of
    :func:`_score_one` (rel-rod weights read from the same table; ``arctan2`` where the
    numba kernel uses a polynomial good to 4e-7 degrees), in blocks of rows so that at most
    about :data:`_XP_SPOTS` spots are held at once."""
    m, c = mats.shape[:2]
    gT = dm[0]
    per = max(1, _XP_SPOTS // max(1, c * gT.shape[1]))
    if m <= per:
        return _scores_block(xp, p, rows, mats, dm, radial, azimuthal)
    return xp.concatenate([_scores_block(xp, p, rows[a:a + per], mats[a:a + per], dm, radial,
                                         azimuthal) for a in range(0, m, per)])


def _scores_block(xp, p, rows, mats, dm, radial, azimuthal):
    gT, f2g, table, per_u, k, smax, radius = dm
    n_r, n_a = p.shape[1:]
    v = xp.matmul(mats, gT)  # (m, c, 3, N): laboratory coordinates of every reflection
    vx, vy, vz = v[..., 0, :], v[..., 1, :], v[..., 2, :]
    r = xp.sqrt(vx * vx + vy * vy)
    s = (k - xp.sqrt(xp.maximum(k * k - r * r, 0.0))) - vz
    u = (math.pi / smax * s) ** 2 * per_u
    i0 = xp.minimum(u, table.shape[0] - 2).astype(xp.int64)  # u >= 0: truncation is floor
    rod = table[i0] + (u - i0) * (table[i0 + 1] - table[i0])
    w = xp.where((xp.abs(s) < smax) & (r <= radius), f2g * rod, 0.0)
    fr = (r - radial[0]) / radial[1]
    r0 = xp.clip(xp.floor(fr), 0, n_r - 2)
    ar = xp.clip(fr - r0, 0.0, 1.0)
    fa = (xp.degrees(xp.arctan2(vy, vx)) - azimuthal[0]) / azimuthal[1]
    a0 = xp.floor(fa)
    t = fa - a0
    t2 = t * t
    t3 = t2 * t
    keys = (-0.5 * t3 + t2 - 0.5 * t, 1.5 * t3 - 2.5 * t2 + 1.0,
            -1.5 * t3 + 2.0 * t2 + 0.5 * t, 0.5 * t3 - 0.5 * t2)
    a0 = a0.astype(xp.int64)
    flat = p.reshape(-1)
    base = (rows.astype(xp.int64)[:, None, None] * n_r + r0.astype(xp.int64)) * n_a
    lo = hi = 0.0
    for q, weight in enumerate(keys):  # the samples at azimuth bins a0 - 1 .. a0 + 2
        at = base + (a0 + (q - 1)) % n_a
        lo = lo + weight * xp.take(flat, at)
        hi = hi + weight * xp.take(flat, at + n_a)
    value = (1.0 - ar) * lo + ar * hi
    return (w * value).sum(axis=-1) / xp.sqrt((w * w).sum(axis=-1) + 1e-30)


def _turns_xp(xp, step):
    """:func:`_turns` for a step per pattern: ``(n, 6, 3, 3)`` on ``xp``."""
    a = xp.radians(step)
    out = xp.zeros(step.shape + (6, 3, 3))
    for j in range(6):
        axis, sign = j // 2, 1.0 - 2.0 * (j % 2)
        c, s = xp.cos(sign * a), xp.sin(sign * a)
        u, w = (axis + 1) % 3, (axis + 2) % 3
        out[:, j, axis, axis] = 1.0
        out[:, j, u, u], out[:, j, u, w], out[:, j, w, u], out[:, j, w, w] = c, -s, s, c
    return out


def _refine_xp(xp, p, rows, matrices, dm, radial, azimuthal, step, min_step, max_iter):
    """:func:`_refine_host`'s pattern search, every pattern stepping at once: each of the
    patterns whose step is still at least ``min_step`` scores its six trial turns, moves to
    the best if it scores higher, and otherwise halves its step (the same rule, the same
    order of ties)."""
    m = matrices.astype(xp.float64)  # a copy
    n = m.shape[0]
    best = _scores_xp(xp, p, rows, m[:, None], dm, radial, azimuthal)[:, 0]
    st = xp.full(n, float(step))
    live = xp.arange(n)
    for _ in range(max_iter):
        live = live[st[live] >= min_step]
        if live.shape[0] == 0:
            break
        cand = xp.matmul(_turns_xp(xp, st[live]), m[live][:, None])  # (l, 6, 3, 3)
        value = _scores_xp(xp, p, rows[live], cand, dm, radial, azimuthal)
        j = value.argmax(axis=1)
        top = xp.take_along_axis(value, j[:, None], axis=1)[:, 0]
        up = top > best[live]
        moved = live[up]
        m[moved] = cand[xp.flatnonzero(up), j[up]]
        best[moved] = top[up]
        halve = live[~up]
        st[halve] = st[halve] / 2
    return m, best


def _prepare_xp(xp, patterns, gamma, smooth):
    """:func:`prepare_patterns` on ``xp``'s arrays (padding by repeated edge bins along the
    radius and by wrapping around the azimuth, then the taps as shifted views)."""
    x = patterns.astype(xp.float32)
    x = xp.where(x > 0, x, xp.float32(0))  # NaN and negative bins count 0
    x[x == xp.inf] = 0
    if gamma != 1:
        x = xp.where(x > 0, xp.power(x, xp.float32(gamma)), xp.float32(0))
    taps = [float(w) for w in _gauss_taps(smooth)]
    h = len(taps) // 2
    n_r, n_a = x.shape[1:]
    if h:
        padded = xp.pad(x, ((0, 0), (h, h), (0, 0)), mode="edge")
        x = sum(xp.float32(w) * padded[:, t:t + n_r] for t, w in enumerate(taps))
        padded = xp.pad(x, ((0, 0), (0, 0), (h, h)), mode="wrap")
        x = sum(xp.float32(w) * padded[:, :, t:t + n_a] for t, w in enumerate(taps))
    norm = xp.sqrt((x.astype(xp.float64) ** 2).sum(axis=(1, 2)))
    x *= xp.where(norm > 0, 1.0 / xp.where(norm > 0, norm, 1.0), 1.0).astype(xp.float32)[
        :, None, None]
    return x


def _contrast_xp(xp, p, rows, matrices, dm, radial, azimuthal):
    """:func:`contrast_scores` on ``xp``'s arrays: the rows' patterns less their rings' means
    (taken in float64, as the numba kernel), scored by :func:`_scores_xp`."""
    q = p[rows]
    q = q - q.mean(axis=2, keepdims=True, dtype=xp.float64).astype(xp.float32)
    return _scores_xp(xp, q, xp.arange(q.shape[0]), matrices.astype(xp.float64), dm, radial,
                      azimuthal)


def _rows_xp(xp, rows, p, matrices):
    """:func:`_rows` for device kernels: ``rows`` on ``xp`` (checked where given on the host)."""
    if rows is None or not isinstance(rows, xp.ndarray):
        return xp.asarray(_rows(rows, p, matrices))
    if rows.shape != (matrices.shape[0],):
        raise ValueError(f"rows must give one of the {p.shape[0]} patterns for each of the "
                         f"{matrices.shape[0]} matrices")
    return rows.astype(xp.int64)
