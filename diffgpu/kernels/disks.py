"""Bragg disk detection: template cross-correlation, local maxima, sub-pixel refinement.

One :class:`DiskFinder` holds everything that does not change from frame to frame (the
template's spectrum, the allowed-pixel mask, the thresholds) and is called on stacks of
frames ``(n, rows, columns)``. It returns a fixed-capacity, NaN-padded array
``(n, max_disks, 3)`` of ``(x, y, intensity)``, strongest first.

Steps, and where they run
-------------------------
1. **Cross-correlation** with the probe template through real FFTs: ``scipy.fft`` in
   float32 on the host, ``cupy.fft`` on a GPU. ``correlation_power`` p < 1 divides each
   Fourier coefficient by ``|F T*|^(1 - p)`` (p = 0 is phase correlation; py4DSTEM's
   "hybrid" correlation), which sharpens the peaks of disks with inner structure.
2. **Local maxima**: a pixel is a disk when its correlation is above the threshold and no
   pixel within ``min_spacing`` (a square window: Chebyshev distance) is higher, nor as
   high and before it in row-major order (one peak per plateau: ties all passed, and a flat
   frame gave 128 "disks" 1 px apart), and it is neither masked nor within ``edge`` pixels
   of the detector's border. The relative threshold is a fraction of the frame's strongest
   peak, but of at most 10 x its second strongest (an NBED direct beam 30-300 x the disks
   hid them) and at least 1 % of the strongest. A frame whose correlation has no contrast (highest minus
   lowest at most ``1e-4`` of their magnitude, where peaks are allowed: no diffraction)
   has no disks. Host: a numba loop per frame; GPU: shifted maxima, the ties checked
   around each candidate, and one sort per block. Both give the same peaks.
3. **Sub-pixel refinement** of every peak on the correlation itself: the correlation near
   the peak is interpolated with a separable Lanczos-3 kernel (a windowed sinc: close to
   the band-limited interpolation that an upsampled DFT computes, at 49 samples per
   peak), and its maximum found by Newton's method, at most ``refine_iterations`` steps.
   Host: numba; GPU: the same arithmetic vectorised over all peaks of a block.

Bias of the refinement: on the simulated anti-aliased disks of the tests (radius 4-6
px, sharp edges, the hardest case: the disk's autocorrelation is a cone) the RMS
position error without noise is about 0.01-0.02 px and the systematic part ("pixel
locking") well below that; the error grows for disks smaller than about 2 px radius.
"""

from __future__ import annotations

import math
import threading
import warnings

import numba
import numpy as np

from ..device import DeviceCache, array_module

__all__ = ["DiskFinder", "disk_image", "probe_image"]

_SUB = 8  # sub-samples per pixel and axis when drawing a template disk
_HALF = 2  # cubic B-spline: coefficients within 2 pixels of a peak matter
_NB = 2 * _HALF + 1
_HOST_BATCH = 16  # frames correlated at a time on the host (16 x 192 x 192 float32: 2.4 MB)
_CONTRAST = 1e-4  # a correlation whose range is at most this fraction of its size is flat
_TIE_VALUES = 1 << 22  # correlation values gathered at a time to check candidates for ties
_DEVICE_BATCH = 2048  # frames at a time on a GPU (spectra of 2048 x 256 x 256: 0.5 GB)
# relative_threshold is a fraction of the strongest disk, but of at most _BRIGHT x the second
# strongest (an NBED direct beam 30-100 x the Bragg disks left 1-9 disks of 50), and of at
# least _FLOOR x the strongest (a vacuum frame's second "peak" is noise or round-off)
_BRIGHT = 10.0
_FLOOR = 0.01


def disk_image(radius, size=None):
    """An anti-aliased disk (exact area coverage to 1/64 pixel) centred on pixel ``size // 2``.

    Parameters
    ----------
    radius : float
        Disk radius in pixels.
    size : int, optional
        Side of the square image; default just large enough.

    Returns
    -------
    numpy.ndarray ``(size, size)`` float32, summing to one.

    Examples
    --------
    >>> from diffgpu.kernels.disks import disk_image
    >>> img = disk_image(3.0)
    >>> img.shape, round(float(img.sum()), 6)
    ((11, 11), 1.0)
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive (pixels); got {radius!r}")
    if size is None:
        size = 2 * int(math.ceil(radius)) + 5
    c = size // 2
    sub = (np.arange(_SUB) + 0.5) / _SUB - 0.5
    x = (np.arange(size) - c)[:, None] + sub[None, :]
    inside = (x[:, None, :, None] ** 2 + x[None, :, None, :] ** 2) <= radius * radius
    img = inside.mean(axis=(2, 3))
    return (img / img.sum()).astype(np.float32)


def probe_image(probe):
    """A measured vacuum probe as a template: centred on its middle pixel, background-free,
    summing to one; also returns its radius (from the area above half maximum).

    The probe's centre of mass (of the part above 10 % of its maximum) is moved onto pixel
    ``size // 2`` with a sub-pixel Fourier shift. The radius is ``sqrt(area / pi)`` with the
    area the probe's total over the median of its bright part (exact for a flat disk).

    Returns
    -------
    (numpy.ndarray, float)

    Examples
    --------
    >>> from diffgpu.kernels.disks import disk_image, probe_image
    >>> import numpy as np
    >>> probe = np.zeros((40, 40)); probe[10:23, 15:28] = disk_image(4.0) * 100
    >>> img, r = probe_image(probe)
    >>> round(r, 1)
    4.0
    """
    p = np.asarray(probe, dtype=float)
    if p.ndim != 2 or min(p.shape) < 3 or not np.all(np.isfinite(p)):
        raise ValueError("template must be a finite 2D image of the vacuum probe "
                         f"(got shape {p.shape})")
    p = p - np.median(np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]))
    from scipy.ndimage import median_filter

    # a hot pixel (or a cosmic ray's few) far above the probe's smooth level became the
    # template's maximum and centre, the probe itself cut as below 10 % of it: each such
    # pixel gets its neighbours' median (3 x: a bright rim, a Fresnel fringe, stays)
    smooth = median_filter(p, size=3, mode="nearest")
    if smooth.max() > 0:
        p = np.where(p > 3 * smooth.max(), smooth, p)
    top = p.max()
    if not top > 0:
        raise ValueError("template (vacuum probe) has no intensity above its border's level")
    p = np.where(p > 0.1 * top, p, 0.0)
    # the area of a flat-topped disk is its total over its plateau (edge pixels count in part)
    plateau = np.median(p[p > 0.5 * top])
    radius = math.sqrt(p.sum() / plateau / math.pi)
    y, x = np.indices(p.shape)
    cy, cx = (p * y).sum() / p.sum(), (p * x).sum() / p.sum()
    size = 2 * int(math.ceil(radius * 1.5)) + 5
    big = max(size, *p.shape) * 2
    canvas = np.zeros((big, big))
    canvas[: p.shape[0], : p.shape[1]] = p
    # move (cx, cy) to (big // 2, big // 2) with a Fourier shift
    ky = np.fft.fftfreq(big)[:, None]
    kx = np.fft.fftfreq(big)[None, :]
    phase = np.exp(-2j * np.pi * (kx * (big // 2 - cx) + ky * (big // 2 - cy)))
    moved = np.fft.ifft2(np.fft.fft2(canvas) * phase).real
    c = big // 2
    img = moved[c - size // 2: c - size // 2 + size, c - size // 2: c - size // 2 + size]
    img = np.where(img > 0.02 * img.max(), img, 0.0)
    return (img / img.sum()).astype(np.float32), radius


class DiskFinder:
    """Finds Bragg disks in stacks of frames: see the module docstring.

    Parameters
    ----------
    detector_shape : (int, int)
        ``(rows, columns)``.
    template : numpy.ndarray
        Small square template centred on pixel ``size // 2`` (see :func:`disk_image`,
        :func:`probe_image`).
    threshold : float
        Absolute minimum of the correlation (template normalised to sum one, so the
        correlation is the template-weighted mean counts per pixel of the disk).
    relative_threshold : float
        Minimum as a fraction of the frame's highest correlation (where peaks are allowed).
    min_spacing : int
        Half-width of the square window a peak must dominate (pixels).
    edge : int
        Peaks within this many pixels of the border are dropped.
    mask : numpy.ndarray of bool, optional
        Detector-shaped, True = no peak may sit there, and the pixel reads as zero (a beam
        stop, hot pixels).
    max_disks : int
        Capacity per frame; the strongest are kept. Frames that had more are counted in
        ``truncated`` (and with ``warn_truncated``, a RuntimeWarning says so).
    correlation_power : float
        1: cross-correlation; 0: phase correlation; between: hybrid.
    refine_iterations : int
        Newton steps of the sub-pixel refinement (0: integer positions).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.disks import DiskFinder, disk_image
    >>> frame = np.zeros((1, 64, 64), "float32")
    >>> frame[0, 20:31, 30:41] = disk_image(4.0, size=11) * 1000   # a disk centred at (35, 25)
    >>> found = DiskFinder((64, 64), disk_image(4.0))(frame)
    >>> found.shape, found[0, 0, :2].round(2).tolist()
    ((1, 64, 3), [35.0, 25.0])
    """

    def __init__(self, detector_shape, template, threshold=0.0, relative_threshold=0.01,
                 min_spacing=3, edge=0, mask=None, max_disks=64, correlation_power=1.0,
                 refine_iterations=6, sigma=1.0):
        ny, nx = (int(n) for n in detector_shape)
        t = np.asarray(template, dtype=np.float32)
        if t.ndim != 2 or t.shape[0] > ny or t.shape[1] > nx:
            raise ValueError(f"template shape {t.shape} must be 2D and fit in the detector "
                             f"{(ny, nx)}")
        self.shape = (ny, nx)
        # the FFTs run on frames zero-padded to sizes of small prime factors: a 515 x 515
        # Merlin quad took 2.3 x, a prime 251 x 251 detector 6 x the time of 512 / 256 px
        import scipy.fft

        py, px = (scipy.fft.next_fast_len(n, real=True) for n in (ny, nx))
        self.fft_shape = (py, px)
        full = np.zeros((py, px), np.float32)
        full[: t.shape[0], : t.shape[1]] = t
        full = np.roll(full, (-(t.shape[0] // 2), -(t.shape[1] // 2)), axis=(0, 1))
        spec = np.conj(np.fft.rfft2(full))
        if sigma and sigma > 0:  # Gaussian low-pass: a smoother peak, interpolated without bias
            k2 = np.fft.fftfreq(py)[:, None] ** 2 + np.fft.rfftfreq(px)[None, :] ** 2
            spec = spec * np.exp(-2 * np.pi**2 * float(sigma) ** 2 * k2)
        # divide by the cubic B-spline's frequency response: the inverse FFT then gives the
        # spline coefficients of the (periodic) correlation, interpolated exactly from them
        by = (4 + 2 * np.cos(2 * np.pi * np.fft.fftfreq(py))) / 6
        bx = (4 + 2 * np.cos(2 * np.pi * np.fft.rfftfreq(px))) / 6
        spec = spec / (by[:, None] * bx[None, :])
        self.template_conj = spec.astype(np.complex64)
        allowed = np.ones((ny, nx), bool)
        edge = int(edge)
        if edge > 0:
            allowed[:edge] = allowed[-edge:] = False
            allowed[:, :edge] = allowed[:, -edge:] = False
        keep = None
        if mask is not None:
            allowed &= ~np.asarray(mask, bool)
            keep = (~np.asarray(mask, bool)).astype(np.float32)  # masked pixels read as zero
        padded = np.zeros((py, px), bool)  # no peak in the padding
        padded[:ny, :nx] = allowed
        allowed = padded
        self.allowed = allowed
        self.keep = keep
        self.threshold = float(threshold)
        self.relative_threshold = float(relative_threshold)
        self.min_spacing = int(min_spacing)
        self.max_disks = int(max_disks)
        self.power = float(correlation_power)
        if not 0.0 <= self.power <= 1.0:
            raise ValueError(f"correlation_power must be in [0, 1]; got {correlation_power!r}")
        if self.max_disks < 1 or self.min_spacing < 1:
            raise ValueError("max_disks and min_spacing must be at least 1")
        self.refine_iterations = int(refine_iterations)
        self._earlier = DeviceCache(_earlier(self.min_spacing), _tuple_to_device)
        self.truncated = 0  # frames whose disks were cut to max_disks, since made
        self.warn_truncated = False  # warn when it happens (lazy detection: at compute time)
        self._lock = threading.Lock()
        self._dev = DeviceCache((self.template_conj, allowed) + ((keep,) if keep is not None
                                                                 else ()), _tuple_to_device)

    def __getstate__(self):  # pickled to dask workers: a lock cannot be, nor is it shared
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _count_truncated(self, n):
        if not n:
            return
        with self._lock:
            self.truncated += int(n)
        if self.warn_truncated:  # one message text: shown once, not once per block
            warnings.warn(f"some frames have more disks than max_disks={self.max_disks}: only the "
                          "strongest were kept; raise max_disks, or the threshold "
                          "(relative_threshold) to keep fewer", RuntimeWarning, stacklevel=2)

    # -- correlation ------------------------------------------------------------------
    def correlate(self, frames):
        """Cross-correlation of every frame with the template, float32, ``(n,) + fft_shape``
        (the frames' shape, zero-padded to a fast FFT size: the frame is the top-left part)."""
        xp = array_module(frames)
        tconj, _, *keep = self._dev.get(xp)
        floating = frames.dtype.kind == "f"
        frames = frames.astype(xp.float32, copy=False)
        if floating and xp is not np:  # NaN or inf pixels (masked, hot) count as zero
            frames = xp.where(xp.isfinite(frames), frames, xp.float32(0))
        if keep and xp is not np:
            frames = frames * keep[0]
        if xp is np:
            import scipy.fft as fft

            # one frame at a time: pocketfft's batched 2D transforms ran 2-3x slower per
            # frame here (the column pass over a stack has poor locality)
            out = np.empty(frames.shape[:1] + self.fft_shape, np.float32)
            for i in range(frames.shape[0]):
                frame = frames[i]
                if floating and not np.isfinite(frame).all():  # NaN or inf pixels count as zero
                    frame = np.where(np.isfinite(frame), frame, np.float32(0))
                if keep:  # masked pixels count as zero
                    frame = frame * keep[0]
                spec = fft.rfft2(frame, s=self.fft_shape, workers=1)
                spec *= tconj
                if self.power != 1.0:
                    spec /= np.maximum(np.abs(spec), np.float32(1e-12)) ** np.float32(1 - self.power)
                out[i] = fft.irfft2(spec, s=self.fft_shape, workers=1)
            return out
        spec = xp.fft.rfft2(frames, s=self.fft_shape)
        spec *= tconj
        if self.power != 1.0:
            spec /= xp.maximum(xp.abs(spec), xp.float32(1e-12)) ** xp.float32(1.0 - self.power)
        out = xp.fft.irfft2(spec, s=self.fft_shape)
        return out.astype(xp.float32, copy=False)

    # -- everything -------------------------------------------------------------------
    def __call__(self, frames):
        """``(n, rows, columns)`` -> ``(n, max_disks, 3)`` float32 of (x, y, intensity)."""
        xp = array_module(frames)
        n = frames.shape[0]
        if n == 0:
            return xp.full((0, self.max_disks, 3), xp.nan, dtype=xp.float32)
        if xp is np:  # a few frames at a time, so the correlations stay in cache
            out = np.empty((n, self.max_disks, 3), np.float32)
            cut = 0
            for i in range(0, n, _HOST_BATCH):
                corr = self.correlate(frames[i:i + _HOST_BATCH])
                out[i:i + _HOST_BATCH], more = _host_peaks(  # peaks, refinement, sorted output
                    corr, self.allowed, self.threshold, self.relative_threshold,
                    self.min_spacing, self.max_disks, self.refine_iterations)
                cut += more
            self._count_truncated(cut)
            return out
        if n > _DEVICE_BATCH:  # bounded device memory for large in-memory stacks
            return xp.concatenate([self(frames[i:i + _DEVICE_BATCH])
                                   for i in range(0, n, _DEVICE_BATCH)])
        corr = self.correlate(frames)
        idx, val = self._device_peaks(corr, xp)
        d, val = _device_refine(corr, idx, self.refine_iterations, xp)
        found = idx >= 0
        nx = self.fft_shape[1]
        out = xp.full((n, self.max_disks, 3), xp.nan, dtype=xp.float32)
        qy = (idx // nx).astype(xp.float32)
        qx = (idx % nx).astype(xp.float32)
        out[..., 0] = xp.where(found, qx + d[..., 0], xp.nan)
        out[..., 1] = xp.where(found, qy + d[..., 1], xp.nan)
        out[..., 2] = xp.where(found, val, xp.nan)
        # strongest first by the refined intensity (peaks were ranked on the pixel grid)
        key = xp.where(found, -val, xp.float32(np.inf))
        order = xp.argsort(key, axis=1, kind="stable")
        return xp.take_along_axis(out, order[:, :, None], axis=1)

    def _device_peaks(self, corr, xp):
        """Vectorised local maxima (any array module): (n, max_disks) flat index and value."""
        n, ny, nx = corr.shape
        _, allowed, *_ = self._dev.get(xp)
        m = self.min_spacing
        neg = xp.float32(-np.inf)
        mx = corr.copy()
        for s in range(1, m + 1):  # running maximum over the window, axis by axis
            mx[:, :, s:] = xp.maximum(mx[:, :, s:], corr[:, :, :-s])
            mx[:, :, :-s] = xp.maximum(mx[:, :, :-s], corr[:, :, s:])
        rows = mx.copy()
        for s in range(1, m + 1):
            mx[:, s:, :] = xp.maximum(mx[:, s:, :], rows[:, :-s, :])
            mx[:, :-s, :] = xp.maximum(mx[:, :-s, :], rows[:, s:, :])
        top = xp.where(allowed[None], corr, neg).reshape(n, -1).max(axis=1)
        bottom = xp.where(allowed[None], corr, -neg).reshape(n, -1).min(axis=1)
        # the lowest the relative threshold can be (_FLOOR); applied once the peaks are known
        thr = xp.maximum(xp.float32(self.threshold),
                         xp.float32(self.relative_threshold * _FLOOR) * top)
        # no contrast (a flat frame): no disks
        flat_frame = ~(top - bottom > xp.float32(_CONTRAST) * xp.maximum(xp.abs(top),
                                                                         xp.abs(bottom)))
        thr = xp.where(flat_frame, xp.float32(np.inf), thr)
        peak = (corr >= mx) & allowed[None] & (corr > thr[:, None, None])
        fi, flat = xp.nonzero(peak.reshape(n, -1))
        vals = corr.reshape(n, -1)[fi, flat]
        # ties: a candidate with a pixel as high before it (row-major) in its window is not
        # a peak (one per plateau, as on the host); checked around the candidates only, a
        # bounded number at a time (noisy frames have hundreds each)
        dy, dx = self._earlier.get(xp)
        step = max(1, _TIE_VALUES // dy.shape[0])
        first = xp.concatenate([_untied(corr, fi[i:i + step], flat[i:i + step],
                                        vals[i:i + step], dy, dx, xp)
                                for i in range(0, max(fi.shape[0], 1), step)])
        fi, flat, vals = fi[first], flat[first], vals[first]
        order = xp.lexsort(xp.stack([-vals, fi]))  # by frame, then strongest first
        fi, flat, vals = fi[order], flat[order], vals[order]
        first = xp.searchsorted(fi, xp.arange(n))
        rank = xp.arange(fi.shape[0]) - first[fi]
        # the relative threshold of each frame: of its strongest peak, but at most _BRIGHT x
        # its second (a bright direct beam) and at least _FLOOR x its strongest (as the host)
        second = xp.full(n, -np.inf, dtype=xp.float32)
        second[fi[rank == 1]] = vals[rank == 1]
        ref = xp.maximum(xp.minimum(top, xp.float32(_BRIGHT) * second), xp.float32(_FLOOR) * top)
        final = xp.maximum(xp.float32(self.threshold), xp.float32(self.relative_threshold) * ref)
        final = xp.where(second > -np.inf, final, -np.inf)  # one peak: kept (above thr)
        above = vals > final[fi]
        fi, flat, vals, rank = fi[above], flat[above], vals[above], rank[above]
        keep = rank < self.max_disks
        self._count_truncated(int((rank == self.max_disks).sum()))  # one per cut frame
        idx = xp.full((n, self.max_disks), -1, dtype=xp.int64)
        val = xp.zeros((n, self.max_disks), dtype=xp.float32)
        idx[fi[keep], rank[keep]] = flat[keep]
        val[fi[keep], rank[keep]] = vals[keep]
        return idx, val


def _tuple_to_device(cp, values):
    return tuple(cp.asarray(v) for v in values)


def _untied(corr, fi, flat, vals, dy, dx, xp):
    """Whether each candidate peak has no pixel as high before it (row-major) in its window
    (offsets ``dy, dx`` from :func:`_earlier`)."""
    ny, nx = corr.shape[1:]
    r = (flat // nx)[:, None] + dy[None, :]
    c = (flat % nx)[:, None] + dx[None, :]
    inside = (r >= 0) & (c >= 0) & (c < nx)
    around = corr[fi[:, None], xp.clip(r, 0, ny - 1), xp.clip(c, 0, nx - 1)]
    return ~(inside & (around >= vals[:, None])).any(axis=1)


def _earlier(m):
    """``(dy, dx)``: the offsets of the pixels before a pixel (row-major) in its window of
    half-width ``m`` (the rows above, then the left part of its own row)."""
    off = [(a, b) for a in range(-m, 1) for b in range(-m, m + 1) if a < 0 or b < 0]
    return np.array([a for a, _ in off], np.int64), np.array([b for _, b in off], np.int64)


# -- cubic B-spline interpolation: kernel value, first and second derivative ----------------
def _bspline_xp(u, xp):
    """Cubic B-spline beta3 and its first two derivatives at ``u`` (any shape, any xp)."""
    a = xp.abs(u)
    sg = xp.sign(u)
    inner = a < 1
    outer = (a >= 1) & (a < 2)
    t = 2 - a
    w = xp.where(inner, 2.0 / 3 - a * a + 0.5 * a**3, xp.where(outer, t**3 / 6, 0.0))
    dw = xp.where(inner, sg * (-2 * a + 1.5 * a * a), xp.where(outer, -sg * t * t / 2, 0.0))
    d2w = xp.where(inner, -2 + 3 * a, xp.where(outer, t, 0.0))
    return w, dw, d2w


def _device_refine(corr, idx, iterations, xp):
    """Newton refinement of every peak (vectorised; any array module): (n, K, 2) offsets."""
    n, ny, nx = corr.shape
    k = idx.shape[1]
    d = xp.zeros((n, k, 2), dtype=xp.float64)
    value = xp.zeros((n, k), dtype=xp.float64)
    valid = idx >= 0
    if not bool(valid.any()):
        return d.astype(xp.float32), value.astype(xp.float32)
    fi, pi_ = xp.nonzero(valid)
    flat = idx[fi, pi_]
    qy, qx = flat // nx, flat % nx
    off = xp.arange(-_HALF, _HALF + 1)
    rows = (qy[:, None] + off[None, :]) % ny
    cols = (qx[:, None] + off[None, :]) % nx
    nb = corr[fi[:, None, None], rows[:, :, None], cols[:, None, :]].astype(xp.float64)
    dd = xp.zeros((fi.shape[0], 2), dtype=xp.float64)
    offf = off.astype(xp.float64)
    for it in range(iterations + 1):
        wx, dwx, d2wx = _bspline_xp(offf[None, :] - dd[:, 0:1], xp)  # (P, 5)
        wy, dwy, d2wy = _bspline_xp(offf[None, :] - dd[:, 1:2], xp)
        # d/d(dx) of w(off - dx) is -w'(off - dx)
        bx0 = xp.einsum("pyx,px->py", nb, wx)
        bx1 = -xp.einsum("pyx,px->py", nb, dwx)
        bx2 = xp.einsum("pyx,px->py", nb, d2wx)
        val = (bx0 * wy).sum(1)
        if it == iterations:  # the last pass only evaluates the spline where the steps ended
            break
        gx = (bx1 * wy).sum(1)
        gy = -(bx0 * dwy).sum(1)
        hxx = (bx2 * wy).sum(1)
        hyy = (bx0 * d2wy).sum(1)
        hxy = -(bx1 * dwy).sum(1)
        step = _newton_step(gx, gy, hxx, hyy, hxy, xp)
        dd = xp.clip(dd + step, -0.999, 0.999)
    d[fi, pi_] = dd
    value[fi, pi_] = val
    return d.astype(xp.float32), value.astype(xp.float32)


def _newton_step(gx, gy, hxx, hyy, hxy, xp):
    det = hxx * hyy - hxy * hxy
    ok = (hxx < 0) & (det > 0)
    safe = xp.where(ok, det, 1.0)
    sx = xp.where(ok, -(hyy * gx - hxy * gy) / safe, 0.0)
    sy = xp.where(ok, -(-hxy * gx + hxx * gy) / safe, 0.0)
    # not concave here: a small uphill step along the gradient
    gn = xp.sqrt(gx * gx + gy * gy) + 1e-30
    sx = xp.where(ok, sx, 0.1 * gx / gn)
    sy = xp.where(ok, sy, 0.1 * gy / gn)
    return xp.clip(xp.stack([sx, sy], axis=1), -0.5, 0.5)


# -- host kernels -----------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def _bspline_host(x, w, dw, d2w):
    for i in range(x.shape[0]):
        u = x[i]
        a = abs(u)
        sg = 1.0 if u > 0 else (-1.0 if u < 0 else 0.0)
        if a < 1:
            w[i] = 2.0 / 3 - a * a + 0.5 * a**3
            dw[i] = sg * (-2 * a + 1.5 * a * a)
            d2w[i] = -2 + 3 * a
        elif a < 2:
            t = 2 - a
            w[i] = t**3 / 6
            dw[i] = -sg * t * t / 2
            d2w[i] = t
        else:
            w[i] = dw[i] = d2w[i] = 0.0


@numba.njit(nogil=True, cache=True)
def _refine_one(frame, qy, qx, iterations, nb, off, wx, dwx, d2wx, wy, dwy, d2wy, bx0, bx1, bx2):
    ny, nx = frame.shape
    for i in range(_NB):
        r = (qy + i - _HALF) % ny
        for j in range(_NB):
            nb[i, j] = frame[r, (qx + j - _HALF) % nx]
    dx = 0.0
    dy = 0.0
    for it in range(iterations + 1):
        for i in range(_NB):
            off[i] = (i - _HALF) - dx
        _bspline_host(off, wx, dwx, d2wx)
        for i in range(_NB):
            off[i] = (i - _HALF) - dy
        _bspline_host(off, wy, dwy, d2wy)
        for i in range(_NB):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for j in range(_NB):
                v = nb[i, j]
                a0 += v * wx[j]
                a1 -= v * dwx[j]
                a2 += v * d2wx[j]
            bx0[i] = a0
            bx1[i] = a1
            bx2[i] = a2
        gx = gy = hxx = hyy = hxy = value = 0.0
        for i in range(_NB):
            value += bx0[i] * wy[i]
            gx += bx1[i] * wy[i]
            gy -= bx0[i] * dwy[i]
            hxx += bx2[i] * wy[i]
            hyy += bx0[i] * d2wy[i]
            hxy -= bx1[i] * dwy[i]
        if it == iterations:  # the last pass only evaluates the spline where the steps ended
            break
        det = hxx * hyy - hxy * hxy
        if hxx < 0 and det > 0:
            sx = -(hyy * gx - hxy * gy) / det
            sy = -(-hxy * gx + hxx * gy) / det
        else:
            gn = math.sqrt(gx * gx + gy * gy) + 1e-30
            sx = 0.1 * gx / gn
            sy = 0.1 * gy / gn
        sx = min(max(sx, -0.5), 0.5)
        sy = min(max(sy, -0.5), 0.5)
        dx = min(max(dx + sx, -0.999), 0.999)
        dy = min(max(dy + sy, -0.999), 0.999)
    return dx, dy, value


@numba.njit(nogil=True, cache=True)
def _host_peaks(corr, allowed, threshold, relative, m, max_disks, iterations):
    n, ny, nx = corr.shape
    out = np.full((n, max_disks, 3), np.nan, np.float32)
    px = np.empty(max_disks, np.float32)
    py = np.empty(max_disks, np.float32)
    pv = np.empty(max_disks, np.float32)
    cand = np.empty(ny * nx, np.int64)
    cval = np.empty(ny * nx, np.float32)
    nb = np.empty((_NB, _NB))
    off = np.empty(_NB)
    wx, dwx, d2wx = np.empty(_NB), np.empty(_NB), np.empty(_NB)
    wy, dwy, d2wy = np.empty(_NB), np.empty(_NB), np.empty(_NB)
    bx0, bx1, bx2 = np.empty(_NB), np.empty(_NB), np.empty(_NB)
    rowmax = np.empty((ny, nx), np.float32)
    ninf = np.float32(-np.inf)
    pinf = np.float32(np.inf)
    cut = 0  # frames with more peaks than max_disks
    for f in range(n):
        frame = corr[f]
        # pass 1 (vectorisable): the maximum over each pixel's row triple, and the frame's
        # highest and lowest correlation where peaks are allowed
        top = ninf
        bottom = pinf
        for i in range(ny):
            rowmax[i, 0] = max(frame[i, 0], frame[i, 1])
            for j in range(1, nx - 1):
                rowmax[i, j] = max(max(frame[i, j - 1], frame[i, j]), frame[i, j + 1])
            rowmax[i, nx - 1] = max(frame[i, nx - 2], frame[i, nx - 1])
            for j in range(nx):
                top = max(top, frame[i, j] if allowed[i, j] else ninf)
                bottom = min(bottom, frame[i, j] if allowed[i, j] else pinf)
        # the lowest the relative threshold can be (see _BRIGHT, _FLOOR): candidates above it
        thr = max(np.float32(threshold), np.float32(relative * _FLOOR) * top)
        if not top - bottom > np.float32(_CONTRAST) * max(abs(top), abs(bottom)):
            thr = pinf  # no contrast (a flat frame): no disks
        # pass 2: 3 x 3 local maxima above the threshold, then the full window
        nc = 0
        for i in range(ny):
            i0 = max(i - 1, 0)
            i1 = min(i + 1, ny - 1)
            for j in range(nx):
                v = frame[i, j]
                if v < max(max(rowmax[i0, j], rowmax[i, j]), rowmax[i1, j]):
                    continue
                if not (v > thr) or not allowed[i, j]:
                    continue
                ok = True
                for a in range(max(0, i - m), min(ny, i + m + 1)):
                    for b in range(max(0, j - m), min(nx, j + m + 1)):
                        # higher, or as high and before it: one peak per plateau
                        if frame[a, b] > v or (frame[a, b] == v and (a < i or (a == i and b < j))):
                            ok = False
                            break
                    if not ok:
                        break
                if ok:
                    cand[nc] = i * nx + j
                    cval[nc] = v
                    nc += 1
        order = np.argsort(-cval[:nc], kind="mergesort")
        if nc > 1:  # the relative threshold, of a direct beam far brighter than the disks too
            ref = max(min(top, np.float32(_BRIGHT) * cval[order[1]]), np.float32(_FLOOR) * top)
            final = max(np.float32(threshold), np.float32(relative) * ref)
            above = 0
            while above < nc and cval[order[above]] > final:
                above += 1
            nc = above
        kept = min(nc, max_disks)
        cut += nc > max_disks
        for r in range(kept):
            c = cand[order[r]]
            dx, dy, value = _refine_one(frame, c // nx, c % nx, iterations, nb, off, wx, dwx,
                                        d2wx, wy, dwy, d2wy, bx0, bx1, bx2)
            px[r] = np.float32(c % nx) + np.float32(dx)
            py[r] = np.float32(c // nx) + np.float32(dy)
            pv[r] = np.float32(value)
        # strongest first by the refined intensity (peaks were ranked on the pixel grid)
        final = np.argsort(-pv[:kept], kind="mergesort")
        for r in range(kept):
            out[f, r, 0] = px[final[r]]
            out[f, r, 1] = py[final[r]]
            out[f, r, 2] = pv[final[r]]
    return out, cut
