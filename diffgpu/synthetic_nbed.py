"""Simulated nanobeam diffraction (NBED) data with a known strain field, and ring standards.

Used by the tests, the strain benchmark, the docs and the example: every quantity the
strain workflow measures is known exactly here.

Model of one NBED frame (pixel convention of :mod:`diffgpu.calibration`):

* a lattice of Bragg disks of radius ``disk_radius`` at ``origin + h g1 + k g2``, each
  rendered with its exact area coverage (8 x 8 sub-samples per pixel, so the edges are
  anti-aliased), the direct beam brighter than the rest, the others fading with ``|g|``;
* the lattice of each scan position is the reference reciprocal lattice ``G0 = [g1, g2]``
  deformed by the real-space deformation gradient ``F = V R`` (``V = I + strain``,
  symmetric, in the detector (x, y) frame; ``R`` a rotation by ``theta``): ``G = F^-T G0``;
* an optional elliptical detector distortion: a point at ``c + u`` in the undistorted
  plane lands at ``c + D u``;
* Poisson noise (``dose`` electrons per pattern in total), stored as float32.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_nbed", "strain_field", "ring_pattern", "deformation_gradient"]

_SUB = 8  # sub-samples per pixel and axis for the area coverage of a disk edge


def deformation_gradient(exx, eyy, exy, theta_deg):
    """``F = V R`` with ``V = I + [[exx, exy], [exy, eyy]]`` and ``R`` a rotation by theta.

    Theta is positive from +x towards +y (clockwise on a screen whose y axis points down).

    Returns
    -------
    numpy.ndarray ``(..., 2, 2)``

    Examples
    --------
    >>> from diffgpu.synthetic_nbed import deformation_gradient
    >>> deformation_gradient(0.01, 0.0, 0.0, 0.0).round(3).tolist()
    [[1.01, 0.0], [0.0, 1.0]]
    """
    exx, eyy, exy, t = np.broadcast_arrays(*(np.asarray(v, float) for v in
                                             (exx, eyy, exy, np.deg2rad(theta_deg))))
    v = np.empty(exx.shape + (2, 2))
    v[..., 0, 0], v[..., 0, 1], v[..., 1, 0], v[..., 1, 1] = 1 + exx, exy, exy, 1 + eyy
    r = np.empty_like(v)
    c, s = np.cos(t), np.sin(t)
    r[..., 0, 0], r[..., 0, 1], r[..., 1, 0], r[..., 1, 1] = c, -s, s, c
    return v @ r


def strain_field(nav_shape, amplitude=0.01, rotation_deg=0.3):
    """A smooth known strain and rotation field: ``(exx, eyy, exy, theta)``, each nav-shaped.

    exx grows linearly across the scan columns, eyy is a Gaussian bump, exy a gentle
    sine and theta a linear ramp along the rows; the top-left 20 % of the scan is left
    unstrained (a reference region).

    Examples
    --------
    >>> from diffgpu.synthetic_nbed import strain_field
    >>> exx, eyy, exy, theta = strain_field((8, 8))
    >>> float(abs(exx).max()) <= 0.01, float(abs(theta).max()) <= 0.3
    (True, True)
    """
    rows, cols = nav_shape
    y, x = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
    ramp = np.clip((x - 0.2) / 0.8, 0, 1)
    rampy = np.clip((y - 0.2) / 0.8, 0, 1)
    exx = amplitude * ramp
    eyy = -amplitude * np.exp(-((x - 0.7) ** 2 + (y - 0.6) ** 2) / 0.08) * np.maximum(ramp, rampy)
    exy = 0.5 * amplitude * np.sin(np.pi * ramp) * rampy
    theta = rotation_deg * rampy
    return exx, eyy, exy, theta


def _disk_coverage(cx, cy, radius, shape):
    """Area fraction of each pixel covered by disks centred at ``(cx, cy)``: (n, rows, cols)."""
    n = len(cx)
    out = np.zeros(shape, np.float32)
    half = int(np.ceil(radius)) + 2
    box = np.arange(-half, half + 1)
    sub = (np.arange(_SUB) + 0.5) / _SUB - 0.5
    ix, iy = np.round(cx).astype(int), np.round(cy).astype(int)
    # sample coordinates relative to each disk centre: (n, box, sub) per axis
    dx = (ix[:, None] + box[None, :] - cx[:, None])[:, :, None] + sub[None, None, :]
    dy = (iy[:, None] + box[None, :] - cy[:, None])[:, :, None] + sub[None, None, :]
    inside = (dy[:, :, None, :, None] ** 2 + dx[:, None, :, None, :] ** 2) <= radius * radius
    cover = inside.mean(axis=(3, 4), dtype=np.float32)  # (n, box_y, box_x)
    rows = iy[:, None] + box[None, :]
    cols = ix[:, None] + box[None, :]
    ok_r = (rows >= 0) & (rows < shape[0])
    ok_c = (cols >= 0) & (cols < shape[1])
    for i in range(n):
        r, c = rows[i][ok_r[i]], cols[i][ok_c[i]]
        out[np.ix_(r, c)] += cover[i][np.ix_(ok_r[i], ok_c[i])]
    return out


def synthetic_nbed(nav_shape=(8, 8), sig_shape=(128, 128), g1=(17.0, 1.5), g2=(-4.0, 15.0),
                   disk_radius=4.0, dose=2e6, strain=None, descan=(0.0, 0.0), distortion=None,
                   center=None, n_max=None, seed=0, background=0.0, lazy=False):
    """Simulated NBED patterns of a strained crystal, with the truth in the metadata.

    Parameters
    ----------
    nav_shape, sig_shape : tuple of int
        Scan ``(rows, columns)``, or ``(n,)`` for a line scan, and detector
        ``(rows, columns)``.
    g1, g2 : (float, float)
        Reference reciprocal basis in pixels, detector (x, y).
    disk_radius : float
        Disk radius in pixels.
    dose : float or None
        Expected electrons per pattern (Poisson noise); None: no noise.
    strain : tuple of four arrays, optional
        ``(exx, eyy, exy, theta_deg)`` nav-shaped; default :func:`strain_field` (of a line
        scan: that of one row).
    descan : (float, float)
        Linear beam shift (x, y) in pixels from the first to the last scan column/row.
    distortion : 2x2 array, optional
        Detector distortion ``D``: an undistorted offset ``u`` from the centre lands at
        ``D u``. The affine correction that undoes it is ``inv(D)``.
    center : (float, float), optional
        Direct beam (x, y); default the middle of the detector.
    n_max : int, optional
        Largest ``|h|, |k|``; default what fits on the detector.
    seed : int
        Random seed of the noise.
    background : float
        Uniform background, counts per pixel, added before the noise.
    lazy : bool
        Return a lazy signal (one chunk).

    Returns
    -------
    DiffractionPatterns
        float32; ``metadata.Synthetic`` holds ``exx, eyy, exy, theta`` (truth),
        ``g1, g2``, ``positions`` of all disks ``(..., n, 2)`` and ``distortion``.

    Examples
    --------
    >>> from diffgpu.synthetic_nbed import synthetic_nbed
    >>> s = synthetic_nbed(nav_shape=(2, 3), sig_shape=(96, 96))
    >>> s.data.shape, s.metadata.Synthetic.exx.shape
    ((2, 3, 96, 96), (2, 3))
    >>> synthetic_nbed(nav_shape=(5,), sig_shape=(64, 64)).data.shape   # a line scan
    (5, 64, 64)
    """
    from .signals import DiffractionPatterns

    try:
        nav_shape = tuple(int(n) for n in nav_shape)
    except TypeError:  # a single number
        nav_shape = (int(nav_shape),)
    if len(nav_shape) not in (1, 2) or min(nav_shape) < 1:
        raise ValueError(f"nav_shape must be (rows, columns) of a scan or (n,) of a line scan, "
                         f"each at least 1; got {nav_shape}")
    scan_shape = nav_shape  # what is returned; a line scan is simulated as one row
    nav_shape = (1,) + nav_shape if len(nav_shape) == 1 else nav_shape
    sig_shape = tuple(int(n) for n in sig_shape)
    ny, nx = sig_shape
    c = np.array(((nx - 1) / 2, (ny - 1) / 2) if center is None else center, float)
    if strain is None:
        strain = tuple(v.reshape(scan_shape) for v in strain_field(nav_shape))
    exx, eyy, exy, theta = (np.broadcast_to(np.asarray(v, float), scan_shape).reshape(nav_shape)
                            for v in strain)
    g0 = np.array([g1, g2], float).T  # columns g1, g2
    d = np.eye(2) if distortion is None else np.asarray(distortion, float)
    if n_max is None:
        n_max = int(np.ceil(max(nx, ny) / min(np.linalg.norm(g0, axis=0)))) + 1
    h, k = (a.ravel() for a in np.meshgrid(np.arange(-n_max, n_max + 1),
                                           np.arange(-n_max, n_max + 1)))
    hk = np.stack([h, k]).astype(float)
    f = deformation_gradient(exx, eyy, exy, theta)  # (..., 2, 2)
    g = np.linalg.inv(np.swapaxes(f, -1, -2)) @ g0  # F^-T G0
    rows_i, cols_i = np.indices(nav_shape)
    shift = np.stack([descan[0] * (cols_i / max(nav_shape[-1] - 1, 1) - 0.5),
                      descan[1] * (rows_i / max(nav_shape[0] - 1, 1) - 0.5)], axis=-1)
    rng = np.random.default_rng(seed)
    data = np.empty(nav_shape + sig_shape, np.float32)
    margin = disk_radius + 1
    max_disks = hk.shape[1]
    positions = np.full(nav_shape + (max_disks, 2), np.nan)
    g_mag = np.linalg.norm(g0 @ hk, axis=0)
    amp = np.exp(-(g_mag / (0.6 * max(nx, ny))) ** 2)  # weaker at high |g|
    amp[(h == 0) & (k == 0)] = 3.0
    for idx in np.ndindex(nav_shape):
        u = g[idx] @ hk  # undistorted offsets from the beam
        p = c[:, None] + d @ u + shift[idx][:, None]
        keep = ((p[0] > margin - 0.5) & (p[0] < nx - 0.5 - margin) & (p[1] > margin - 0.5)
                & (p[1] < ny - 0.5 - margin))
        cover = np.zeros(sig_shape, np.float32)
        ids = np.flatnonzero(keep)
        for j in ids:  # one disk at a time keeps each its own amplitude
            cover += amp[j] * _disk_coverage(p[0, j:j + 1], p[1, j:j + 1], disk_radius, sig_shape)
        positions[idx][: len(ids)] = p[:, ids].T
        frame = cover + np.float32(background)
        if dose is not None:
            frame = rng.poisson(frame * (dose / frame.sum())).astype(np.float32)
        data[idx] = frame
    s = DiffractionPatterns(data.reshape(scan_shape + sig_shape))
    s.metadata.General.title = "Synthetic NBED"
    s.metadata.set_item("Synthetic.exx", np.asarray(exx, float).reshape(scan_shape))
    s.metadata.set_item("Synthetic.eyy", np.asarray(eyy, float).reshape(scan_shape))
    s.metadata.set_item("Synthetic.exy", np.asarray(exy, float).reshape(scan_shape))
    s.metadata.set_item("Synthetic.theta", np.asarray(theta, float).reshape(scan_shape))
    s.metadata.set_item("Synthetic.g1", list(map(float, g1)))
    s.metadata.set_item("Synthetic.g2", list(map(float, g2)))
    s.metadata.set_item("Synthetic.positions", positions.reshape(scan_shape + positions.shape[-2:]))
    s.metadata.set_item("Synthetic.distortion", d.tolist())
    s.calibration.center = tuple(c)
    if lazy:
        s = s.as_lazy()
    return s


def ring_pattern(sig_shape=(256, 256), center=None, scale=None, d_spacings=None,
                 distortion=((1.0, 0.0), (0.0, 1.0)), width=1.2, dose=5e7, background=0.0,
                 seed=0):
    """A polycrystalline ring pattern (e.g. gold) for calibrating centre, scale and ellipticity.

    Each ring ``i`` sits at ``1 / d_i`` (1/Å) in the undistorted plane, i.e. at the
    radius ``1 / (d_i * scale)`` pixels, Gaussian in radius with ``width`` pixels sigma,
    then distorted by ``distortion`` about ``center`` (as in :func:`synthetic_nbed`).

    Parameters
    ----------
    sig_shape : tuple of int
        Detector ``(rows, columns)``.
    center : (float, float), optional
        Ring centre (x, y) in pixels; default just off the detector middle,
        ``((nx - 1) / 2 + 2.8, (ny - 1) / 2 - 2.7)`` ((130.3, 124.8) on 256 x 256).
    scale : float, optional
        1/Å per pixel (undistorted); default ``0.0105 * 256 / min(sig_shape)``, so the rings
        take the same part of any detector.
    d_spacings : sequence of float, optional
        Å; default the first five rings of gold (fcc, a = 4.0782 Å).

    Returns
    -------
    numpy.ndarray ``sig_shape``, float32 (Poisson noise with ``dose`` electrons in total).

    Examples
    --------
    >>> from diffgpu.synthetic_nbed import ring_pattern
    >>> ring_pattern((64, 64), center=(31.5, 31.5), scale=0.05).shape
    (64, 64)
    """
    if d_spacings is None:
        a = 4.0782
        d_spacings = [a / np.sqrt(h2) for h2 in (3, 4, 8, 11, 12)]
    ny, nx = sig_shape
    # defaults relative to the detector: fixed ones put the rings off a small detector
    if center is None:
        center = ((nx - 1) / 2 + 2.8, (ny - 1) / 2 - 2.7)
    if scale is None:
        scale = 0.0105 * 256 / min(ny, nx)
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    y, x = np.indices(sig_shape, dtype=float)
    xs = (x[..., None, None] + sub[None, :] - center[0])
    ys = (y[..., None, None] + sub[:, None] - center[1])
    dinv = np.linalg.inv(np.asarray(distortion, float))
    ux = dinv[0, 0] * xs + dinv[0, 1] * ys
    uy = dinv[1, 0] * xs + dinv[1, 1] * ys
    r = np.hypot(ux, uy)
    img = np.full(r.shape, background, float)
    for i, dsp in enumerate(d_spacings):
        r0 = 1.0 / (dsp * scale)
        img += np.exp(-0.5 * ((r - r0) / width) ** 2) * (1.0 / (1 + 0.3 * i))
    img = img.mean(axis=(-1, -2))
    rng = np.random.default_rng(seed)
    if dose is not None:
        img = rng.poisson(img * (dose / img.sum()))
    return img.astype(np.float32)
