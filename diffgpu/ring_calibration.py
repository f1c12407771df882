"""Detector calibration from a polycrystalline ring standard (e.g. gold): centre, scale, ellipticity.

Model: a point ``p`` on the detector (pixels) is at ``k = M (p - c)`` in reciprocal space
(1/Å), with ``M`` a symmetric positive 2 x 2 matrix (a rotation of the detector cannot be
seen in rings, so none is fitted). Ring ``i`` of a standard with spacing ``d_i`` is the
ellipse ``|M (p - c)| = 1 / d_i``. In diffgpu's calibration ``M = scale * affine`` with
``scale = sqrt(det M)`` and ``det(affine) = 1``: exactly the geometry azimuthal
integration uses (``affine`` applied to ``(x - cx, y - cy)`` before the scale) and the
strain map's correction.

Steps: (1) a first centre (where the rings are sharpest) and the distortion that makes
them round (sector profiles compared by radial scale), in turn; (2) the radial profile in
that frame; its peaks are matched to the ``1 / d`` ratios, which gives a first scale;
(3) on each well-separated ring, the ring's radius along 180 rays (centroid of the
background-subtracted ray profile, recentred) gives points on the ellipse, and ``c`` and
``M`` (5 numbers) are fitted to all points by robust least squares, repeated with the new
geometry; (4) a model of the whole pattern near the rings (Gaussian rings with azimuthally
varying amplitude on a smooth background) is fitted to the pixels from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RingCalibration", "calibrate_from_rings", "ring_d_spacings"]


def _half_turn_angle(axis):
    """The direction of an axis (a vector or its opposite) in degrees, in ``[0, 180)``.

    ``x % 180`` of a tiny negative angle rounds to 180.0 (an axis along -x read 180, not 0).

    Examples
    --------
    >>> from diffgpu.ring_calibration import _half_turn_angle
    >>> _half_turn_angle([-1.0, -1e-17]), _half_turn_angle([0.0, -1.0])
    (0.0, 90.0)
    """
    angle = math.degrees(math.atan2(float(axis[1]), float(axis[0]))) % 180.0
    return 0.0 if angle >= 180.0 else angle + 0.0  # + 0.0: no negative zero


@dataclass
class RingCalibration:
    """Result of :func:`calibrate_from_rings`.

    Attributes
    ----------
    center : (float, float)
        Pattern centre (x, y) in pixels.
    scale : float
        1/Å per pixel (geometric mean over directions).
    affine : numpy.ndarray (2, 2)
        Symmetric, determinant one: ``scale * affine`` maps pixel offsets to 1/Å.
    ellipticity : float
        Ratio of the longest to the shortest ring axis, minus one.
    ellipse_angle : float
        Direction (degrees, from +x towards +y) of the rings' long axis, in ``[0, 180)``:
        an axis a little below +x reads just under 180 (179.98 for -0.02 degrees, which a
        format of ``.1f`` shows as ``180.0``), the same axis as 0.
    rings : list of float
        d-spacings (Å) of the rings used.
    rms_residual : float
        RMS distance of the ring points from the fitted ellipses, pixels.
    n_points : int
        Ring points used in the fit.
    """

    center: tuple
    scale: float
    affine: np.ndarray
    ellipticity: float
    ellipse_angle: float
    rings: list
    rms_residual: float
    n_points: int

    def apply(self, signal, units="1/Å"):
        """Set ``signal.calibration`` centre, scale, units and affine from this result.

        ``units="1/nm"`` stores the scale in 1/nm.
        """
        factor = {"1/Å": 1.0, "1/A": 1.0, "1/nm": 10.0}.get(units)
        if factor is None:
            raise ValueError(f"units must be '1/Å' or '1/nm'; got {units!r}")
        cal = signal.calibration
        cal.scale = self.scale * factor
        cal.units = units
        cal.center = tuple(self.center)
        cal.affine = self.affine


def ring_d_spacings(phase, min_dspacing=0.8):
    """The distinct d-spacings (Å, largest first) of an orix ``Phase``'s allowed reflections.

    Reflections forbidden by the space group, or with a vanishing structure factor when the
    phase has atoms, are left out.

    Examples
    --------
    >>> import diffgpu
    >>> from diffgpu.ring_calibration import ring_d_spacings
    >>> [round(d, 3) for d in ring_d_spacings(diffgpu.TemplateLibrary.silicon(), 1.0)]
    [3.136, 1.92, 1.638, 1.358, 1.246, 1.109, 1.045]
    """
    from diffsims.crystallography import ReciprocalLatticeVector

    rlv = ReciprocalLatticeVector.from_min_dspacing(phase, min_dspacing)
    rlv = rlv[rlv.allowed]
    d = np.asarray(rlv.dspacing, float).ravel()
    if len(phase.structure) > 0:
        rlv.sanitise_phase()
        rlv.calculate_structure_factor()
        f = np.abs(np.asarray(rlv.structure_factor)).ravel()
        d = d[f > 1e-6 * f.max()]
    return sorted({round(float(x), 5) for x in d}, reverse=True)


def _offsets(shape, center, affine=None):
    """Pixel offsets from ``center`` (x, y), through ``affine`` where given."""
    y, x = np.indices(shape, dtype=float)
    dx, dy = x - center[0], y - center[1]
    if affine is None:
        return dx, dy
    return affine[0, 0] * dx + affine[0, 1] * dy, affine[1, 0] * dx + affine[1, 1] * dy


def _radial_profile(img, weight, center, step=0.5, affine=None):
    """Mean intensity in radius bins of ``step`` pixels (NaN where no unmasked pixel lies),
    and the fraction of each bin's circle that has unmasked pixels on the detector."""
    dx, dy = _offsets(img.shape, center, affine)
    r = np.hypot(dx, dy)
    b = (r / step).astype(int)
    s = np.bincount(b.ravel(), (img * weight).ravel())
    n = np.bincount(b.ravel(), weight.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = s / n
    radius = (np.arange(len(n)) + 0.5) * step
    coverage = np.minimum(n / (2 * np.pi * radius * step), 1.0)
    return prof, step, coverage


def _filled(prof):
    """``prof`` with its NaN bins (no pixels: a masked centre, a beam stop) interpolated
    from their neighbours (the ends held), for smoothing and peak search."""
    ok = np.isfinite(prof)
    if ok.all() or not ok.any():
        return np.nan_to_num(prof)
    i = np.arange(len(prof))
    return np.interp(i, i[ok], prof[ok])


def _beam_radius(prof, step):
    """Where the direct beam's tail ends in a radial profile: 0 unless the profile's
    maximum (over its inner third) lies within 3 pixels of its first measured radius; then
    the radius beyond which the (1-pixel smoothed) profile no longer falls by more than 15%
    per pixel. Rings sit outside it; inside, the beam's steep tail left peaks of the
    profile (next to a masked beam stop) and structure in its high-pass (where the rings
    are few) that the scale and the ellipticity were fitted to."""
    from scipy.ndimage import gaussian_filter1d

    ok = np.flatnonzero(np.isfinite(prof))
    if len(ok) < 8:
        return 0.0
    first = ok[0]
    sm = gaussian_filter1d(_filled(prof), 1.0 / step)
    inner = sm[first:first + max(8, (len(sm) - first) // 3)]
    top = first + int(np.argmax(inner))
    if (top - first) * step > 3 or sm[top] <= 0:
        return 0.0
    slope = -np.diff(np.log(np.maximum(sm, 1e-12 * sm[top]))) / step
    i = top
    while i < len(slope) and slope[i] > 0.15 and i - first < (len(sm) - first) // 3:
        i += 1
    return (i + 0.5) * step


def _sharpest_center(img, weight, guess, half_range, step, affine=None, score=False):
    """The centre, on a grid of ``step`` pixels within ``half_range`` of ``guess``, about
    which the pattern's radial profile explains most of its variance (rings are sharpest
    there): the sum over 1-pixel radius bins of ``bin sum^2 / bin count``. Only unmasked
    pixels count (the caller clips the brightest), so a beam stop, a masked half or a hot
    pixel does not pull it (the intensity centroid did, by up to 26 pixels)."""
    sel = weight > 0
    y, x = np.nonzero(sel)
    v = img[sel]
    if v.size > 40000:  # every n-th pixel is enough to compare centres
        every = v.size // 40000 + 1
        x, y, v = x[::every], y[::every], v[::every]
    a = np.eye(2) if affine is None else affine
    offsets = np.arange(-half_range, half_range + step / 2, step)
    best, where = -np.inf, guess
    for dy in offsets:
        for dx in offsets:
            cx, cy = guess[0] + dx, guess[1] + dy
            b = np.hypot(a[0, 0] * (x - cx) + a[0, 1] * (y - cy),
                         a[1, 0] * (x - cx) + a[1, 1] * (y - cy)).astype(np.int64)
            n = np.bincount(b)
            t = np.bincount(b, v)
            value = np.sum(t[n > 0] ** 2 / n[n > 0])
            if value > best:
                best, where = value, (cx, cy)
    return (np.array(where, float), best) if score else np.array(where, float)


def _robust_center(img, weight, affine=None, start=None, near=False):
    """A first centre for the ring fit: coarse then fine :func:`_sharpest_center` around
    the middle of the detector (over a quarter of its size either way) and around the
    brightest point of the smoothed pattern (the direct beam, where there is one: a pattern
    centred a fifth of the detector from its edge was out of the middle's reach), the
    sharper kept; or around ``start`` (over an eighth; a sixteenth when ``near``)."""
    ny, nx = img.shape
    size = max(nx, ny)

    def refined(c):
        c = _sharpest_center(img, weight, c, max(1.0, size / 48), 1.0, affine)
        return _sharpest_center(img, weight, c, 1.0, 0.25, affine, score=True)

    if start is not None:
        return refined(_sharpest_center(img, weight, start, size / (16 if near else 8),
                                        max(1.0, size / 96), affine))[0]
    middle = np.array([(nx - 1) / 2, (ny - 1) / 2])
    best = refined(_sharpest_center(img, weight, middle, size / 4, max(1.0, size / 48), affine))
    bright = _brightest(img, weight)
    if np.max(np.abs(bright - middle)) > size / 4 - size / 48:
        other = refined(_sharpest_center(img, weight, bright, size / 16, max(1.0, size / 96),
                                         affine))
        if other[1] > best[1]:
            best = other
    return best[0]


def _brightest(img, weight):
    """The brightest point (x, y) of the pattern smoothed over 2 pixels, unmasked only."""
    from scipy.ndimage import gaussian_filter

    num = gaussian_filter(img * weight, 2.0)
    den = gaussian_filter(weight.astype(float), 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sm = np.where(den > 0.5, num / den, -np.inf)
    y, x = np.unravel_index(np.argmax(sm), sm.shape)
    return np.array([x, y], float)


def _ellipse_affine(img, weight, center, start=None, n_sectors=24, iterations=4, r_beam=0.0):
    """The distortion that makes the rings round, from the rings' radii by direction.

    The rings' radius along a direction ``u`` is ``g / |M u|``: a radial scale that varies
    with the direction as ``1 / s(phi)^2 = a + b cos 2 phi + c sin 2 phi``. Each sector's
    radial profile (background removed) is compared with the whole pattern's at radial
    scales ``s`` within 30%; the best ``s`` per sector gives ``a, b, c`` by least squares,
    hence ``M^T M`` up to a factor, and the determinant-one affine ``A`` with
    ``|A (p - c)|`` round. Repeated in the corrected frame (the first whole-pattern profile
    is smeared by the distortion itself). Without this, rings more than ~8% elliptical
    smeared the circular profile's peaks into their neighbours, and the ring points were
    sought ``ellipticity / 2`` of the radius away from the rings. Sectors reach as far as
    the detector goes in their direction (arcs of rings count where the centre is off the
    middle); radii within ``r_beam`` + 6 pixels (the direct beam's tail) are left out.
    """
    from scipy.ndimage import gaussian_filter1d

    step = 0.5
    a_tot = np.eye(2) if start is None else np.array(start, float)
    sel = weight > 0
    ny, nx = img.shape
    rnear = min(center[0], center[1], nx - 1 - center[0], ny - 1 - center[1])
    rmax = _reach(_radial_profile(img, weight, center, step)[2], step)
    if rmax < 16:
        return a_tot
    v = img[sel]
    scales = np.exp(np.linspace(-0.3, 0.3, 601))
    for _ in range(iterations):
        dx, dy = _offsets(img.shape, center, a_tot)
        r, phi = np.hypot(dx, dy)[sel], np.arctan2(dy, dx)[sel]
        nb = int(rmax / step) + 1
        b = np.minimum((r / step).astype(np.int64), nb)
        k = ((phi + np.pi) / (2 * np.pi) * n_sectors).astype(np.int64) % n_sectors
        idx = k * (nb + 1) + b
        tot = np.bincount(idx, v, n_sectors * (nb + 1)).reshape(n_sectors, nb + 1)[:, :nb]
        cnt = np.bincount(idx, minlength=n_sectors * (nb + 1)).reshape(n_sectors, nb + 1)[:, :nb]
        radius = (np.arange(nb) + 0.5) * step
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = tot.sum(0) / cnt.sum(0)
            prof = tot / cnt

        def highpass(p):  # the rings without the smooth background (12-bin Gaussian)
            ok = np.isfinite(p)
            f = np.where(ok, p, 0.0)
            w = gaussian_filter1d(ok.astype(float), 12)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(ok & (w > 0.2), f - gaussian_filter1d(f, 12) / w, np.nan)

        ref = highpass(ref)
        inner = radius > max(0.1 * rnear, r_beam + 6.0)  # not the direct beam
        ref_ok = np.isfinite(ref)
        ref0 = np.where(ref_ok, ref, 0.0)
        phis, s_best = [], []
        for j in range(n_sectors):
            p = highpass(prof[j])
            ok = np.isfinite(p) & inner
            if ok.sum() < 0.3 * inner.sum():
                continue
            rr, pp = radius[ok], p[ok]
            # the sector's radius r matches the reference's r / s
            m = np.interp(rr[None, :] / scales[:, None], radius, ref0, right=0.0)
            score = (m * pp[None, :]).sum(1) / np.sqrt((m * m).sum(1) + 1e-300)
            i = int(np.argmax(score))
            if 0 < i < len(scales) - 1:  # parabolic peak in log s
                y0, y1, y2 = score[i - 1], score[i], score[i + 1]
                den = y0 - 2 * y1 + y2
                frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
                ls = np.log(scales[i]) + frac * (np.log(scales[1]) - np.log(scales[0]))
            else:
                ls = np.log(scales[i])
            phis.append((j + 0.5) * 2 * np.pi / n_sectors - np.pi)
            s_best.append(np.exp(ls))
        if len(phis) < 6:
            return a_tot
        phis, s_best = np.array(phis), np.array(s_best)
        design = np.stack([np.ones_like(phis), np.cos(2 * phis), np.sin(2 * phis)], 1)
        coef = np.linalg.lstsq(design, 1 / s_best**2, rcond=None)[0]
        q = np.array([[coef[0] + coef[1], coef[2]], [coef[2], coef[0] - coef[1]]])
        w, vecs = np.linalg.eigh(q)
        if np.any(w <= 0):
            return a_tot
        step_a = vecs @ np.diag(np.sqrt(w / np.sqrt(w[0] * w[1]))) @ vecs.T
        a_tot = step_a @ a_tot
        a_tot = (a_tot + a_tot.T) / 2  # symmetric (a rotation cannot be seen in rings)
        a_tot /= np.sqrt(np.linalg.det(a_tot))
        if np.max(np.abs(step_a - np.eye(2))) < 2e-4:
            break
    return a_tot


def _reach(coverage, step, least=0.25):
    """The largest radius whose circle has at least ``least`` of its length on the detector
    (unmasked): arcs of rings beyond the nearest edge still count."""
    ok = np.flatnonzero(coverage >= least)
    return float((ok[-1] + 0.5) * step) if len(ok) else 0.0


def _profile_peaks(prof, n_peaks=8, step=0.5, r_beam=0.0):
    """The radial profile's ``n_peaks`` most prominent peaks (bin indices) and their
    prominences, outside the direct beam's tail (``r_beam``, pixels) and at least 2 pixels
    from radii without pixels (the edge of a masked beam stop read as a peak)."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    sm = gaussian_filter1d(_filled(prof), 1.0)
    idx, props = find_peaks(sm, prominence=0)
    gap = np.flatnonzero(~np.isfinite(prof))
    keep = idx * step + step / 2 > r_beam
    if len(gap):
        keep &= np.min(np.abs(idx[:, None] - gap[None, :]), axis=1) * step > 2
    idx, prom = idx[keep], props["prominences"][keep]
    order = np.argsort(prom)[::-1][:n_peaks]
    return idx[order], prom[order]


def _match_scale(radii, weights, inv_d, tol=0.02):
    """The px-per-(1/Å) factor that puts most (weighted) peaks on rings; and the rings hit.

    A peak's weight is its prominence, at most the median's: one outstanding peak (what is
    left of a beam's tail, a hot ring of a texture) does not outvote the others."""
    weights = np.minimum(weights, np.median(weights))
    best = (-1.0, None)
    for r in radii:
        for g in inv_d:
            f = r / g  # pixels per 1/Å
            pred = inv_d * f
            score = 0.0
            for rr, w in zip(radii, weights):
                if np.min(np.abs(pred - rr) / rr) < tol:
                    score += w
            # prefer more rings explained, then larger scores
            if score > best[0] + 1e-12:
                best = (score, f)
    return best[1]


def _refine_scale(prof, step, inv_d, f, width, rmax, span=0.08, r_beam=0.0):
    """The scale (pixels per 1/Å) within ``span`` of ``f`` at which Gaussian rings of
    ``width`` at ``inv_d * scale`` best match the radial profile (its smooth background
    removed). Peaks of the profile alone put the first scale 6% off where rings merge
    (rings 8-17 px from the centre, 1.2 px wide), too far for the fits that follow. Radii
    without pixels and the direct beam's tail (within ``r_beam`` + 3 widths) do not count."""
    from scipy.ndimage import gaussian_filter1d

    radius = (np.arange(len(prof)) + 0.5) * step
    filled = _filled(prof)
    hp = filled - gaussian_filter1d(filled, 6 * width / step)
    hp[~np.isfinite(prof) | (radius < r_beam + 3 * width)] = 0.0
    scales = f * np.exp(np.linspace(-span, span, 641))
    best, where = -np.inf, f
    for trial in scales:
        r = inv_d * trial
        r = r[(r > max(4.0, r_beam)) & (r < rmax - 2 * width)]
        if len(r) < 2:
            continue
        model = np.exp(-0.5 * ((radius[:, None] - r[None, :]) / width) ** 2).sum(1)
        model -= gaussian_filter1d(model, 6 * width / step)
        norm = np.sqrt(np.sum(model * model))
        score = np.sum(model * hp) / norm if norm > 0 else -np.inf
        if score > best:
            best, where = score, trial
    return where


def _ring_points(img, weight, center, minv, g, width, n_rays=180, step=0.2):
    """Points on the ring |M (p - c)| = g: along rays from ``center``, the centroid of the
    background-subtracted profile near the predicted radius."""
    from scipy.ndimage import map_coordinates

    phi = (np.arange(n_rays) + 0.5) * 2 * np.pi / n_rays
    u = np.stack([np.cos(phi), np.sin(phi)])  # directions in pixels
    # predicted radius along each ray: |M r u| = g -> r = g / |M u|
    m = np.linalg.inv(minv)
    r0 = g / np.linalg.norm(m @ u, axis=0)
    half = 3.0 * width
    t = np.arange(-half, half + step / 2, step)
    pts = []
    for _ in range(3):  # recentre the window on the centroid
        rr = r0[:, None] + t[None, :]
        xs = center[0] + u[0][:, None] * rr
        ys = center[1] + u[1][:, None] * rr
        prof = map_coordinates(img, [ys, xs], order=1, mode="constant", cval=np.nan)
        wts = map_coordinates(weight, [ys, xs], order=1, mode="constant", cval=0.0)
        ok = np.all(wts > 0.99, axis=1) & np.all(np.isfinite(prof), axis=1)
        base = np.linspace(0, 1, len(t))[None, :] * (prof[:, -1:] - prof[:, :1]) + prof[:, :1]
        p = np.clip(prof - base, 0, None)
        inner = np.abs(t) <= 2.0 * width
        w = p * inner[None, :]
        tot = w.sum(1)
        ok &= tot > 0
        shift = np.where(ok, (w * t[None, :]).sum(1) / np.where(tot > 0, tot, 1), 0.0)
        r0 = r0 + np.clip(shift, -width, width)
        pts = (center[0] + u[0] * r0, center[1] + u[1] * r0, ok)
    x, y, ok = pts
    return np.stack([x[ok], y[ok]], axis=1)


def _fit_ring_model(img, weight, params, g_rings, sigma, max_pixels=25000):
    """Centre and ``M`` refined by fitting a model of the whole pattern near the rings.

    ``params`` = (cx, cy, m00, m01, m11) to start from; ``g_rings`` the rings' ``1 / d``
    (1/Å), ``sigma`` their first width (1/Å). The model at pixel ``p`` with
    ``rho = |M (p - c)|`` and ``phi`` the pixel's azimuth about the first centre:
    ``sum_i A_i(phi) exp(-(rho - g_i)^2 / 2 s_i^2) + B(rho, phi)``, with ``A_i`` linear
    in ``phi`` between 16 nodes (texture), ``B`` linear in ``rho`` between knots a few widths
    apart, times ``1, cos phi, sin phi``. Geometry and widths are fitted by non-linear
    least squares, the amplitudes and the background solved for (linear) at each trial
    (variable projection). A ring's centroid along a ray is biased where its window cuts
    noise or a neighbour's tail; the model has neither (a flat background five times the
    rings' height biased the centroids' scale by 0.15%; rings nearer than four widths could
    not be used at all).

    Returns the fitted ``(cx, cy, m00, m01, m11)`` and, per ring ``g``, its amplitude (the
    mean over the azimuths that have pixels) and how many standard errors that is above 0.
    """
    from scipy.linalg import solve
    from scipy.optimize import least_squares

    from .device import one_blas_thread

    g_rings = np.asarray(sorted(g_rings), float)
    lo, hi = g_rings[0] - 4 * sigma, g_rings[-1] + 4 * sigma
    yy, xx = np.nonzero(weight > 0)
    v = img[yy, xx]

    def geometry(q, x, y):
        m = np.array([[q[2], q[3]], [q[3], q[4]]])
        ux, uy = m[0, 0] * (x - q[0]) + m[0, 1] * (y - q[1]), m[1, 0] * (x - q[0]) + m[1, 1] * (y - q[1])
        return np.hypot(ux, uy)

    rho = geometry(params, xx, yy)
    keep = (rho > lo) & (rho < hi)
    xx, yy, v = xx[keep].astype(float), yy[keep].astype(float), v[keep]
    if len(v) > max_pixels:  # a regular subset: enough pixels per ring for the geometry
        every = len(v) // max_pixels + 1
        xx, yy, v = xx[::every], yy[::every], v[::every]
    # the azimuth of each pixel about the first centre, fixed: texture belongs to the
    # detector's directions, and an azimuth that moved with M let the fit shear M to
    # line the amplitude nodes up with the texture (ellipticity 0.3% from none)
    phi = np.arctan2(yy - params[1], xx - params[0])
    n_rings, n_nodes = len(g_rings), 16
    knot_step = max(6 * sigma, (hi - lo) / 16)
    knots = np.arange(lo, hi + knot_step, knot_step)

    # the design is sparse: a pixel lies on one or two rings, between two azimuth nodes and
    # two background knots (with 11 rings, dense products took 60 s of a 62 s calibration)
    pos = (phi + np.pi) / (2 * np.pi) * n_nodes  # azimuth nodes (fixed: made once)
    node0 = np.floor(pos).astype(int) % n_nodes
    node_fr = pos - np.floor(pos)
    turn = np.stack([np.ones_like(phi), np.cos(phi), np.sin(phi)], axis=1)
    n_ring_cols, n_cols = n_rings * n_nodes, n_rings * n_nodes + 3 * len(knots)
    pixel = np.arange(len(v))

    def linear_fit(theta):
        """The design at geometry and widths ``theta`` (sparse), its (regularised) Gram
        matrix and the amplitudes and background that fit the pixels best."""
        from scipy import sparse

        rho = geometry(theta[:5], xx, yy)
        z = (rho[:, None] - g_rings[None, :]) / np.exp(theta[5:])[None, :]
        p, r = np.nonzero(np.abs(z) < 7)  # beyond 7 widths a Gaussian is below 3e-11
        gauss = np.exp(-0.5 * z[p, r] ** 2)
        kpos = np.clip((rho - knots[0]) / (knots[1] - knots[0]), 0, len(knots) - 1 - 1e-9)
        k0 = np.floor(kpos).astype(int)
        kfr = kpos - k0
        bg_rows = np.repeat(pixel, 6)
        bg_cols = n_ring_cols + (np.stack([k0, k0 + 1], 1)[:, :, None] * 3
                                 + np.arange(3)[None, None, :]).reshape(-1)
        bg_vals = (np.stack([1 - kfr, kfr], 1)[:, :, None] * turn[:, None, :]).reshape(-1)
        rows = np.concatenate([p, p, bg_rows])
        cols = np.concatenate([r * n_nodes + node0[p], r * n_nodes + (node0[p] + 1) % n_nodes,
                               bg_cols])
        vals = np.concatenate([gauss * (1 - node_fr[p]), gauss * node_fr[p], bg_vals])
        design = sparse.csr_matrix((vals, (rows, cols)), shape=(len(v), n_cols))
        gram = (design.T @ design).toarray()
        gram[np.diag_indices_from(gram)] += 1e-9 * np.trace(gram) / len(gram)
        return design, gram, solve(gram, design.T @ v, assume_a="pos", check_finite=False)

    def resid(theta):
        design, _, coef = linear_fit(theta)
        return design @ coef - v

    theta0 = np.concatenate([np.asarray(params, float), np.full(n_rings, np.log(sigma))])
    # one BLAS thread: hundreds of small solves, which OpenBLAS's threads slowed 100-fold on
    # a busy machine (112 ms against 1 ms for a 330 x 330 system)
    with one_blas_thread():
        sol = least_squares(resid, theta0, x_scale="jac", max_nfev=60)
        # each ring's amplitude and how many standard errors it stands above zero, at the fit
        design, gram, coef = linear_fit(sol.x)
        inv = np.linalg.inv(gram)
    rss = float(np.sum((design @ coef - v) ** 2))
    var = rss / max(len(v) - design.shape[1], 1)
    avg = np.zeros((n_rings, design.shape[1]))
    support = np.diag(gram)[:n_rings * n_nodes].reshape(n_rings, n_nodes)
    for i in range(n_rings):  # over the azimuths that have pixels (not a masked half)
        seen = support[i] > 0.01 * support[i].max()
        avg[i, i * n_nodes:(i + 1) * n_nodes] = seen / max(seen.sum(), 1)
    amp = avg @ coef
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", avg, inv, avg) * var, 1e-300))
    return sol.x[:5], dict(zip(g_rings.tolist(), zip(amp.tolist(), (amp / se).tolist())))


def calibrate_from_rings(pattern, d_spacings=None, phase=None, center=None, mask=None,
                         ring_width=None, n_rings=None, iterations=3, min_dspacing=0.8):
    """Fit centre, scale and elliptical distortion to a ring pattern of a known standard.

    Parameters
    ----------
    pattern : 2D array or signal
        One pattern (e.g. the mean of a scan over a polycrystalline film). A signal with
        navigation axes is averaged over them.
    d_spacings : sequence of float, optional
        Known ring spacings in Å (e.g. gold's 2.355, 2.039, 1.442, 1.230, 1.177).
    phase : orix Phase, optional
        Instead of ``d_spacings``: the allowed reflections of this phase.
    center : (float, float), optional
        First guess of the centre (x, y) in pixels, searched around (an eighth of the
        detector either way); default the point about which the rings are sharpest (a
        search over the middle half of the detector, unmasked pixels only, the brightest
        0.1% clipped).
    mask : 2D bool array, optional
        True = pixel excluded (beam stop, bad pixels).
    ring_width : float, optional
        Ring width (Gaussian sigma) in pixels; default estimated from the profile.
    n_rings : int, optional
        Use at most this many of the matched rings (the innermost); default all on the
        detector.
    iterations : int
        Ring-point / fit passes.

    Returns
    -------
    RingCalibration
        Its :meth:`~RingCalibration.apply` stores the result in a signal's calibration.

    Raises
    ------
    ValueError
        Fewer than two rings could be matched to the given spacings, or a ring of the
        given spacings is missing where the fit of the others puts it (its fitted
        amplitude within 4 standard errors of zero, or below 2% of the strongest ring's).

    Examples
    --------
    >>> from diffgpu.synthetic_nbed import ring_pattern
    >>> from diffgpu.ring_calibration import calibrate_from_rings
    >>> img = ring_pattern((192, 192), center=(97.3, 94.1), scale=0.016,
    ...                    distortion=((1.01, 0.0), (0.0, 0.99)))
    >>> cal = calibrate_from_rings(img, d_spacings=[2.3546, 2.0391, 1.4419, 1.2296, 1.1773])
    >>> [round(v, 1) for v in cal.center], round(cal.scale, 4), round(cal.ellipticity, 3)
    ([97.3, 94.1], 0.016, 0.02)
    """
    from scipy.optimize import least_squares

    img = pattern.data if hasattr(pattern, "axes_manager") else pattern  # a signal
    if hasattr(img, "compute"):
        img = img.compute()
    from .device import to_host_array

    img = np.asarray(to_host_array(img), dtype=float)
    if img.ndim > 2:
        img = img.reshape((-1,) + img.shape[-2:]).mean(axis=0)
    if img.ndim != 2:
        raise ValueError(f"pattern must be a 2D image; got shape {img.shape}")
    if (d_spacings is None) == (phase is None):
        raise ValueError("give either d_spacings= (Å) or phase= (an orix Phase)")
    if phase is not None:
        d_spacings = ring_d_spacings(phase, min_dspacing)
    d = np.sort(np.asarray(d_spacings, float))[::-1]
    if len(d) < 2 or not np.all(np.isfinite(d) & (d > 0)):
        raise ValueError(f"need at least two positive d-spacings; got {d_spacings!r}")
    if np.any(np.diff(d) == 0):
        raise ValueError(f"d_spacings repeat a value: {sorted(set(d[:-1][np.diff(d) == 0]))}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or iterations < 1:
        raise ValueError(f"iterations must be a positive integer; got {iterations!r}")
    if n_rings is not None and (isinstance(n_rings, bool) or not isinstance(n_rings, (int, np.integer))
                                or n_rings < 2):
        raise ValueError(f"n_rings must be an integer of at least 2 (a scale and a distortion "
                         f"need two rings); got {n_rings!r}")
    if ring_width is not None and not (np.isfinite(ring_width) and ring_width > 0):
        raise ValueError(f"ring_width must be a positive number of pixels; got {ring_width!r}")
    weight = np.isfinite(img).astype(float)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape:
            raise ValueError(f"mask shape {mask.shape} is not the pattern's {img.shape}")
        weight[mask.astype(bool)] = 0
    img = np.where(weight > 0, img, 0.0)
    if not np.any(img > 0):
        raise ValueError("the pattern has no positive intensity (outside the mask)")
    # the brightest 0.1% clipped (the direct beam's core, hot pixels): one hot pixel made a
    # peak of the radial profile that the ring spacings were then matched to
    img = np.minimum(img, np.percentile(img[weight > 0], 99.9))
    ny, nx = img.shape
    if center is not None:
        c = np.asarray(center, float)
        if c.shape != (2,) or not np.all(np.isfinite(c)) or not (0 <= c[0] <= nx - 1
                                                                 and 0 <= c[1] <= ny - 1):
            raise ValueError(f"center must be (x, y) on the {nx} x {ny} detector; got "
                             f"{center!r}")
    # a first guess is searched around (a given one 25 px off was kept as it was, with a
    # 17% ellipticity to fit its rings); strongly elliptical rings are not sharpest about
    # their centre in a circular profile (15 px off at 20% on a 512 px detector): centre
    # and distortion in turn
    # (the rings are made round first, so that strongly elliptical rings neither smear the
    # profile nor leave the windows the ring points are sought in)
    a0 = None
    c = _robust_center(img, weight, start=None if center is None else c)
    r_beam = _beam_radius(_radial_profile(img, weight, c)[0], 0.5)
    for turn in range(4):
        a1 = _ellipse_affine(img, weight, c, a0, r_beam=r_beam)
        settled = np.max(np.abs(a1 - np.eye(2))) < 2e-3 or (
            a0 is not None and np.max(np.abs(a1 - a0)) < 1e-3)
        a0 = a1
        if settled or turn == 3:  # (the distortion at the last centre)
            break
        c = _robust_center(img, weight, a0, c, near=True)
    prof, step, coverage = _radial_profile(img, weight, c, affine=a0)
    peaks, prom = _profile_peaks(prof, step=step, r_beam=r_beam)
    if len(peaks) < 2:
        raise ValueError("fewer than two rings visible in the radial profile: check the "
                         "pattern, or give center= nearer the true centre")
    radii = peaks * step + step / 2
    f = _match_scale(radii, prom, 1.0 / d)
    if f is None:
        raise ValueError("the rings do not match the given d-spacings: check d_spacings/phase")
    if ring_width is None:  # the peaks' median width at half their prominence (so a diffuse
        # background under the rings does not count; the median: not a merged pair), as sigma
        from scipy.ndimage import gaussian_filter1d
        from scipy.signal import peak_widths

        fwhm = np.median(peak_widths(gaussian_filter1d(_filled(prof), 1.0), peaks,
                                     rel_height=0.5)[0])
        ring_width = max(1.0, fwhm * step / 2.355)
    # rings out to where a quarter of their circle (in the corrected frame) is on the
    # detector and unmasked: arcs of rings count (only whole circles did, so a centre a
    # third of the detector from an edge left two rings, and a beam's tail outweighed them)
    rmax = _reach(coverage, step)
    f = _refine_scale(prof, step, 1.0 / d, f, ring_width, rmax, r_beam=r_beam)
    on_detector = [g for g in 1.0 / d if max(4.0, r_beam) < g * f < rmax - 4]
    if n_rings is not None:
        on_detector = on_detector[: int(n_rings)]
    if len(on_detector) < 2:
        raise ValueError(f"fewer than two of the given rings fit on the detector (scale "
                         f"{1 / f:.4g} 1/Å per pixel, centre {c[0]:.1f}, {c[1]:.1f}): check "
                         f"d_spacings/phase and the centre")
    # ring points (centroids along rays) only on rings at least four widths from any other
    # reflection (two where fewer than two such are left, with a narrower window)
    all_r = np.sort(1.0 / d) * f
    seps = {}
    for g in on_detector:
        others = np.abs(all_r - g * f)
        seps[g] = np.min(others[others > 1e-9]) if np.any(others > 1e-9) else np.inf
    use = [g for g in on_detector if seps[g] >= 4 * ring_width]
    if len(use) < 2:
        use = [g for g in on_detector if seps[g] >= 2 * ring_width]
    widths = {g: min(ring_width, seps[g] / 4) for g in on_detector}
    m = a0 / f
    params = np.array([c[0], c[1], m[0, 0], m[0, 1], m[1, 1]])

    def ring_point_fit(q, rings):
        pts, gs = [], []
        mq = np.array([[q[2], q[3]], [q[3], q[4]]])
        for g in rings:
            p = _ring_points(img, weight, q[:2], np.linalg.inv(mq), g, max(widths[g], 0.5))
            pts.append(p)
            gs.append(np.full(len(p), g))
        p_all, g_all = np.concatenate(pts), np.concatenate(gs)

        def resid(t):
            mt = np.array([[t[2], t[3]], [t[3], t[4]]])
            v = (p_all - t[:2]) @ mt.T
            return (np.hypot(v[:, 0], v[:, 1]) - g_all) / g_all

        return p_all, g_all, resid

    if len(use) >= 2:  # a first geometry from ring points, robust to what the model lacks
        for _ in range(iterations):
            p_all, g_all, resid = ring_point_fit(params, use)
            if len(p_all) < 10:
                raise ValueError("too few ring points found: check the centre and the d-spacings")
            params = least_squares(resid, params, loss="soft_l1",
                                   f_scale=0.5 / (f * np.mean(use))).x
        m = np.array([[params[2], params[3]], [params[3], params[4]]])
    # then the whole pattern near the rings, every ring on the detector included (rings
    # too near a neighbour for their centroids to be used are modelled side by side)
    near = [g for g in 1.0 / d if min(on_detector) - 4 * ring_width / f < g
            < max(on_detector) + 4 * ring_width / f]
    q, amplitudes = _fit_ring_model(img, weight, params, near, ring_width / f)
    m_model = np.array([[q[2], q[3]], [q[3], q[4]]])
    # kept only if it stays near where it started (a model that wandered is not a result)
    tol = 1.0 if len(use) >= 2 else 2.5
    if np.all(np.isfinite(q)) and np.hypot(*(q[:2] - params[:2])) < 2 * tol * ring_width and \
            np.max(np.abs(m_model - m)) < 0.02 * tol * np.max(np.abs(m)):
        params, c, m = q, q[:2], m_model
        use = on_detector
    else:
        amplitudes = {}  # (of a geometry not kept)
    if len(use) < 2:
        raise ValueError(f"fewer than two of the given rings fit on the detector, resolved from "
                         f"their neighbours (scale {1 / f:.4g} 1/Å per pixel, ring width "
                         f"{ring_width:.2g} px): check d_spacings/phase and the centre")
    w, vecs = np.linalg.eigh(m)
    if np.any(w <= 0):
        raise ValueError("the fitted ring geometry is not an ellipse: check the d-spacings")
    scale = float(math.sqrt(w[0] * w[1]))
    affine = m / scale
    # every ring fitted must be there: a wrong d-spacing that the others' fit carries along
    # lands where the pattern has none (its amplitude within the noise, or tiny)
    top = max((a for a, _ in amplitudes.values()), default=0.0)
    missing = [g for g in use if g in amplitudes and (amplitudes[g][1] < 4 or
                                                      amplitudes[g][0] < 0.02 * top)]
    # a ring that is an arc (cut by the detector's edge) and not seen is left out rather than
    # refused: patterns fade towards the corners, and only a whole ring's absence shows that
    # a spacing is wrong
    rnear = min(c[0], c[1], nx - 1 - c[0], ny - 1 - c[1])
    stretch = np.linalg.norm(np.linalg.inv(affine), 2)  # a ring's longest radius / its mean
    arc = [g for g in missing if g / scale * stretch > rnear - 4]
    missing = [g for g in missing if g not in arc]
    use = [g for g in use if g not in arc]
    if len(use) < 2 and not missing:
        raise ValueError(f"fewer than two of the given rings are seen on the detector (scale "
                         f"{scale:.4g} 1/Å per pixel): check d_spacings/phase and the centre")
    if missing:
        raise ValueError(
            f"no ring at d = {', '.join(f'{1 / g:.4g}' for g in missing)} Å where the fit of the "
            f"others puts it (scale {scale:.4g} 1/Å per pixel): check d_spacings/phase (a "
            f"spacing this pattern lacks, or a wrong one), or limit the rings with n_rings=")
    p_all, g_all, resid = ring_point_fit(params, use)  # how far the ring points lie off
    res = resid(params) * g_all / scale  # in pixels, roughly
    rms = float(np.sqrt(np.mean(res**2)))
    if not rms <= max(ring_width, 0.5):  # ring points off by more than a ring's width: the
        # geometry followed something else (an unmasked beam stop's zeros, a wrong centre)
        raise ValueError(
            f"the rings' points lie {rms:.2g} px (RMS) off the fitted ellipses, more than the "
            f"rings' width ({ring_width:.2g} px): the fit did not settle on the rings. Mask what "
            f"is not the pattern (a beam stop, dead pixels: mask=), give center= (x, y), or "
            f"check d_spacings/phase")
    big = vecs[:, 0]  # smallest eigenvalue of M: the rings' long axis
    return RingCalibration(
        center=(float(c[0]), float(c[1])), scale=scale, affine=affine,
        ellipticity=float(w[1] / w[0] - 1), ellipse_angle=_half_turn_angle(big),
        rings=[float(1 / g) for g in use],
        rms_residual=rms, n_points=int(len(p_all)))
