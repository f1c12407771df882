"""Detector calibration from a polycrystalline ring standard (e.g. gold): centre, scale, ellipticity.

Model: a point ``p`` on the detector (pixels) is at ``k = M (p - c)`` in reciprocal space
(1/Å), with ``M`` a symmetric positive 2 x 2 matrix (a rotation of the detector cannot be
seen in rings, so none is fitted). Ring ``i`` of a standard with spacing ``d_i`` is the
ellipse ``|M (p - c)| = 1 / d_i``. In diffgpu's calibration ``M = scale * affine`` with
``scale = sqrt(det M)`` and ``det(affine) = 1``: exactly the geometry azimuthal
integration uses (``affine`` applied to ``(x - cx, y - cy)`` before the scale) and the
strain map's correction.

Steps: (1) a radial profile around a first centre; its peaks are matched to the
``1 / d`` ratios, which gives a first scale; (2) on each matched ring, the ring's radius
along 180 rays (centroid of the background-subtracted ray profile, recentred) gives points
on the ellipse; (3) ``c`` and ``M`` (5 numbers) are fitted to all points by robust least
squares; (2)-(3) are repeated with the new geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RingCalibration", "calibrate_from_rings", "ring_d_spacings"]


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
        Direction (degrees, from +x towards +y) of the rings' long axis.
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


def _radial_profile(img, weight, center, step=0.5):
    y, x = np.indices(img.shape)
    r = np.hypot(x - center[0], y - center[1])
    b = (r / step).astype(int)
    s = np.bincount(b.ravel(), (img * weight).ravel())
    n = np.bincount(b.ravel(), weight.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = s / n
    return np.nan_to_num(prof), step


def _sharpest_center(img, weight, guess, half_range, step):
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
    offsets = np.arange(-half_range, half_range + step / 2, step)
    best, where = -np.inf, guess
    for dy in offsets:
        for dx in offsets:
            cx, cy = guess[0] + dx, guess[1] + dy
            b = np.hypot(x - cx, y - cy).astype(np.int64)
            n = np.bincount(b)
            t = np.bincount(b, v)
            score = np.sum(t[n > 0] ** 2 / n[n > 0])
            if score > best:
                best, where = score, (cx, cy)
    return np.array(where, float)


def _robust_center(img, weight):
    """A first centre for the ring fit: coarse then fine :func:`_sharpest_center` around
    the middle of the detector (over a quarter of its size either way)."""
    ny, nx = img.shape
    size = max(nx, ny)
    c = _sharpest_center(img, weight, ((nx - 1) / 2, (ny - 1) / 2), size / 4, max(1.0, size / 48))
    c = _sharpest_center(img, weight, c, max(1.0, size / 48), 1.0)
    return _sharpest_center(img, weight, c, 1.0, 0.25)


def _profile_peaks(prof, n_peaks=8):
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    sm = gaussian_filter1d(prof, 1.0)
    idx, props = find_peaks(sm, prominence=0)
    order = np.argsort(props["prominences"])[::-1][:n_peaks]
    return idx[order], props["prominences"][order]


def _match_scale(radii, weights, inv_d, tol=0.02):
    """The px-per-(1/Å) factor that puts most (weighted) peaks on rings; and the rings hit."""
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
        First guess of the centre (x, y) in pixels; default the point about which the
        rings are sharpest (a search over the middle half of the detector, unmasked pixels
        only, the brightest 0.1% clipped).
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
        Fewer than two rings could be matched to the given spacings.

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
    if center is None:
        center = _robust_center(img, weight)
    c = np.asarray(center, float)
    ny, nx = img.shape
    if c.shape != (2,) or not np.all(np.isfinite(c)) or not (0 <= c[0] <= nx - 1
                                                             and 0 <= c[1] <= ny - 1):
        raise ValueError(f"center must be (x, y) on the {nx} x {ny} detector; got {center!r}")
    prof, step = _radial_profile(img, weight, c)
    peaks, prom = _profile_peaks(prof)
    if len(peaks) < 2:
        raise ValueError("fewer than two rings visible in the radial profile: check the "
                         "pattern, or give center= nearer the true centre")
    radii = peaks * step + step / 2
    f = _match_scale(radii, prom, 1.0 / d)
    if f is None:
        raise ValueError("the rings do not match the given d-spacings: check d_spacings/phase")
    rmax = min(c[0], c[1], nx - 1 - c[0], ny - 1 - c[1])
    use = [g for g in 1.0 / d if 4 < g * f < rmax - 4]
    if ring_width is None:  # the peaks' median width at half their prominence (so a diffuse
        # background under the rings does not count; the median: not a merged pair), as sigma
        from scipy.ndimage import gaussian_filter1d
        from scipy.signal import peak_widths

        fwhm = np.median(peak_widths(gaussian_filter1d(prof, 1.0), peaks, rel_height=0.5)[0])
        ring_width = max(1.0, fwhm * step / 2.355)
    # a ring within four widths of another reflection is biased by it: use such rings only
    # when fewer than two resolved ones are left, with a narrower window (never nearer than
    # two widths: those cannot be separated)
    all_r = np.sort(1.0 / d) * f
    seps = {}
    for g in use:
        others = np.abs(all_r - g * f)
        seps[g] = np.min(others[others > 1e-9]) if np.any(others > 1e-9) else np.inf
    resolved = [g for g in use if seps[g] >= 4 * ring_width]
    use = resolved if len(resolved) >= 2 else [g for g in use if seps[g] >= 2 * ring_width]
    widths = {g: min(ring_width, seps[g] / 4) for g in use}
    if n_rings is not None:
        use = use[: int(n_rings)]
    if len(use) < 2:
        raise ValueError(f"fewer than two of the given rings fit on the detector, resolved from "
                         f"their neighbours (scale {1 / f:.4g} 1/Å per pixel, ring width "
                         f"{ring_width:.2g} px): check d_spacings/phase and the centre")
    minv = np.eye(2) * f  # pixels per 1/Å (inverse of M)
    params = None
    for _ in range(iterations):
        pts, gs = [], []
        for g in use:
            p = _ring_points(img, weight, c, minv, g, widths[g])
            pts.append(p)
            gs.append(np.full(len(p), g))
        p_all, g_all = np.concatenate(pts), np.concatenate(gs)
        if len(p_all) < 10:
            raise ValueError("too few ring points found: check the centre and the d-spacings")
        m0 = np.linalg.inv(minv)
        x0 = np.array([c[0], c[1], m0[0, 0], m0[0, 1], m0[1, 1]]) if params is None else params

        def resid(q):
            m = np.array([[q[2], q[3]], [q[3], q[4]]])
            v = (p_all - q[:2]) @ m.T
            return (np.hypot(v[:, 0], v[:, 1]) - g_all) / g_all

        sol = least_squares(resid, x0, loss="soft_l1", f_scale=0.5 / (f * np.mean(use)))
        params = sol.x
        c = params[:2]
        m = np.array([[params[2], params[3]], [params[3], params[4]]])
        minv = np.linalg.inv(m)
    w, vecs = np.linalg.eigh(m)
    if np.any(w <= 0):
        raise ValueError("the fitted ring geometry is not an ellipse: check the d-spacings")
    scale = float(math.sqrt(w[0] * w[1]))
    affine = m / scale
    res = resid(params) * g_all * f  # in pixels, roughly
    big = vecs[:, 0]  # smallest eigenvalue of M: the rings' long axis
    return RingCalibration(
        center=(float(c[0]), float(c[1])), scale=scale, affine=affine,
        ellipticity=float(w[1] / w[0] - 1), ellipse_angle=float(np.degrees(
            np.arctan2(big[1], big[0])) % 180), rings=[float(1 / g) for g in use],
        rms_residual=float(np.sqrt(np.mean(res**2))), n_points=int(len(p_all)))
