"""Lattice fits to Bragg disk positions, vectorised over frames (NumPy or CuPy).

Positions come as the fixed-capacity, NaN-padded arrays of
:class:`~diffgpu.kernels.disks.DiskFinder`: ``(n, K, 2)`` positions and ``(n, K)`` weights.
Every frame is fitted at once with 3 x 3 normal equations per frame; nothing loops over
frames in Python.

Model: disk ``(h, k)`` of a frame sits at ``o + h g1 + k g2``. Each frame's translation is
found first (the intensity-weighted circular mean of its disks' fractional lattice
coordinates), so beam shifts of any size are absorbed (the origin may then sit on another
disk of the lattice, which changes neither ``g1`` nor ``g2``). Indices come from rounding
each position in the current basis; the fit is weighted least squares (weights: disk
intensities, which is the inverse of the shot-noise variance of a position up to a
constant), then disks further than ``tolerance`` from their lattice site are rejected and
the frame refitted (``iterations`` times, re-indexing with the frame's own fit each time).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..device import array_module

__all__ = ["fit_lattices", "find_basis", "reduce_basis", "LATTICE_FIELDS", "BasisError"]

LATTICE_FIELDS = ("origin_x", "origin_y", "g1_x", "g1_y", "g2_x", "g2_y", "n_disks", "rms_residual")


class BasisError(ValueError):
    """No lattice basis could be found in the disk positions (the message says what to set)."""


def fit_lattices(positions, weights, basis, origin, min_disks=6, tolerance=None,
                 iterations=3):
    """Fit ``o, g1, g2`` to the disks of every frame.

    Parameters
    ----------
    positions : array ``(n, K, 2)``
        Disk ``(x, y)``; NaN rows are empty slots.
    weights : array ``(n, K)``
        Non-negative weights (NaN or 0: unused).
    basis : array ``(2, 2)``
        Starting basis, columns ``g1``, ``g2``: non-zero and not parallel (a host basis that
        is not raises ``ValueError``).
    origin : array ``(2,)``
        Starting origin (where ``h = k = 0``).
    min_disks : int
        Frames with fewer disks in the fit give NaN (as do frames whose disks all lie on
        one lattice row, which cannot fix both vectors).
    tolerance : float, optional
        Largest distance of a kept disk from its lattice site, in the positions' units;
        default a quarter of the shorter basis vector in the first pass, then
        ``max(4 * rms, tolerance_floor)`` with a floor of 1/40 of it.
    iterations : int
        Fit - reject - re-index passes.

    Returns
    -------
    array ``(n, 8)`` float64: ``LATTICE_FIELDS`` (origin, g1, g2, disks used, RMS residual).

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
    """
    xp = array_module(positions)
    if isinstance(basis, np.ndarray):  # a host basis is checked here (a device one by its caller)
        b = np.asarray(basis, dtype=np.float64)
        det = b[0, 0] * b[1, 1] - b[0, 1] * b[1, 0] if b.shape == (2, 2) else np.nan
        if not (np.all(np.isfinite(b)) and np.isfinite(det) and det != 0):
            raise ValueError(f"basis {b.tolist()} (columns g1, g2) is degenerate: a vector of "
                             "zero length, two parallel vectors or non-finite numbers")
    if xp is np:  # the same arithmetic frame by frame, compiled (5-8x faster than NumPy's
        # temporaries over (frames, disks); equal to the array path within rounding, tested)
        p = np.ascontiguousarray(positions, dtype=np.float64)
        out = np.empty((p.shape[0], 8))
        given = tolerance is not None
        _fit_host(p, np.ascontiguousarray(weights, dtype=np.float64),
                  np.asarray(basis, dtype=np.float64), np.asarray(origin, dtype=np.float64),
                  int(min_disks), float(tolerance) if given else 0.0, given, int(iterations), out)
        return out
    return _fit_xp(positions, weights, basis, origin, min_disks, tolerance, iterations, xp)


def _fit_xp(positions, weights, basis, origin, min_disks, tolerance, iterations, xp):
    """:func:`fit_lattices` on arrays of any module, all frames at once."""
    p = positions.astype(xp.float64)
    w = xp.where(xp.isfinite(weights), xp.maximum(weights.astype(xp.float64), 0), 0)
    present = xp.all(xp.isfinite(p), axis=-1) & (w > 0)
    p = xp.where(present[..., None], p, 0.0)
    n = p.shape[0]
    b0 = _on(basis, xp)
    b = xp.broadcast_to(b0, (n, 2, 2))
    o = xp.broadcast_to(_on(origin, xp), (n, 2))
    if tolerance is None:  # from the basis, on its device (no transfer)
        gmin = xp.sqrt((b0 * b0).sum(axis=0)).min()
        tol = 0.25 * gmin * xp.ones((n,))
        floor = gmin / 40
    else:
        tol = xp.full((n,), float(tolerance))
        floor = float(tolerance)
    out = xp.full((n, 8), xp.nan)
    px, py = p[..., 0], p[..., 1]
    # each frame's translation first (beam shifts, descan): the weighted circular mean of the
    # disks' fractional lattice coordinates moves the origin onto the frame's own lattice
    det0 = b[:, 0, 0] * b[:, 1, 1] - b[:, 0, 1] * b[:, 1, 0]
    rx0, ry0 = px - o[:, 0:1], py - o[:, 1:2]
    fh = (b[:, 1, 1:2] * rx0 - b[:, 0, 1:2] * ry0) / det0[:, None]
    fk = (-b[:, 1, 0:1] * rx0 + b[:, 0, 0:1] * ry0) / det0[:, None]
    wp = w * present
    dh = xp.arctan2((wp * xp.sin(2 * np.pi * fh)).sum(-1), (wp * xp.cos(2 * np.pi * fh)).sum(-1))
    dk = xp.arctan2((wp * xp.sin(2 * np.pi * fk)).sum(-1), (wp * xp.cos(2 * np.pi * fk)).sum(-1))
    dh, dk = dh / (2 * np.pi), dk / (2 * np.pi)
    o = o + xp.stack([b[:, 0, 0] * dh + b[:, 0, 1] * dk, b[:, 1, 0] * dh + b[:, 1, 1] * dk], -1)
    for it in range(iterations + 1):
        # explicit 2 x 2 and 3 x 3 algebra: einsum on these tiny axes was 10x slower
        det = b[:, 0, 0] * b[:, 1, 1] - b[:, 0, 1] * b[:, 1, 0]
        det = xp.where(det == 0, 1e-300, det)
        rx, ry = px - o[:, 0:1], py - o[:, 1:2]
        h = xp.rint((b[:, 1, 1:2] * rx - b[:, 0, 1:2] * ry) / det[:, None])
        k = xp.rint((-b[:, 1, 0:1] * rx + b[:, 0, 0:1] * ry) / det[:, None])
        ex = rx - b[:, 0, 0:1] * h - b[:, 0, 1:2] * k
        ey = ry - b[:, 1, 0:1] * h - b[:, 1, 1:2] * k
        resid = xp.sqrt(ex * ex + ey * ey)
        use = present & (resid <= tol[:, None])
        if it == iterations:
            break
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
        n_used = use.sum(-1)
        ok &= n_used >= min_disks
        new_o = sol[:, 0, :]
        new_b = xp.stack([sol[:, 1, :], sol[:, 2, :]], axis=-1)  # columns g1, g2
        fx = px - new_o[:, 0:1] - new_b[:, 0, 0:1] * h - new_b[:, 0, 1:2] * k
        fy = py - new_o[:, 1:2] - new_b[:, 1, 0:1] * h - new_b[:, 1, 1:2] * k
        wsum = xp.maximum(wu.sum(-1), 1e-300)
        rms = xp.sqrt((wu * (fx * fx + fy * fy)).sum(-1) / wsum)
        o = xp.where(ok[:, None], new_o, o)
        b = xp.where(ok[:, None, None], new_b, b)
        if tolerance is None:
            tol = xp.where(ok, xp.maximum(4 * rms, floor), tol)
        out[:, 0:2] = xp.where(ok[:, None], new_o, xp.nan)
        out[:, 2:4] = xp.where(ok[:, None], new_b[:, :, 0], xp.nan)
        out[:, 4:6] = xp.where(ok[:, None], new_b[:, :, 1], xp.nan)
        out[:, 6] = xp.where(ok, n_used, 0)
        out[:, 7] = xp.where(ok, rms, xp.nan)
    return out


@numba.njit(nogil=True, cache=True)
def _fit_host(p, weights, basis, origin, min_disks, tolerance, given, iterations, out):
    """:func:`_fit_xp` one frame at a time (see there for the steps)."""
    n, n_k = p.shape[0], p.shape[1]
    px, py = np.empty(n_k), np.empty(n_k)
    w, h, k = np.empty(n_k), np.empty(n_k), np.empty(n_k)
    use = np.empty(n_k, np.bool_)
    present = np.empty(n_k, np.bool_)
    gmin = min(math.hypot(basis[0, 0], basis[1, 0]), math.hypot(basis[0, 1], basis[1, 1]))
    floor = tolerance if given else gmin / 40
    two_pi = 2 * np.pi
    for f in range(n):
        for q in range(n_k):
            x, y, v = p[f, q, 0], p[f, q, 1], weights[f, q]
            wq = max(v, 0.0) if np.isfinite(v) else 0.0
            present[q] = np.isfinite(x) and np.isfinite(y) and wq > 0
            px[q] = x if present[q] else 0.0
            py[q] = y if present[q] else 0.0
            w[q] = wq
        b00, b01, b10, b11 = basis[0, 0], basis[0, 1], basis[1, 0], basis[1, 1]
        o0, o1 = origin[0], origin[1]
        tol = tolerance if given else 0.25 * gmin
        det0 = b00 * b11 - b01 * b10
        sh_, ch_, sk_, ck_ = 0.0, 0.0, 0.0, 0.0
        for q in range(n_k):
            rx, ry = px[q] - o0, py[q] - o1
            fh = (b11 * rx - b01 * ry) / det0
            fk = (-b10 * rx + b00 * ry) / det0
            wp = w[q] * present[q]
            sh_ += wp * math.sin(two_pi * fh)
            ch_ += wp * math.cos(two_pi * fh)
            sk_ += wp * math.sin(two_pi * fk)
            ck_ += wp * math.cos(two_pi * fk)
        dh = math.atan2(sh_, ch_) / two_pi
        dk = math.atan2(sk_, ck_) / two_pi
        o0, o1 = o0 + b00 * dh + b01 * dk, o1 + b10 * dh + b11 * dk
        for c in range(8):
            out[f, c] = np.nan
        for it in range(iterations + 1):
            det = b00 * b11 - b01 * b10
            if det == 0:
                det = 1e-300
            for q in range(n_k):
                rx, ry = px[q] - o0, py[q] - o1
                h[q] = np.rint((b11 * rx - b01 * ry) / det)
                k[q] = np.rint((-b10 * rx + b00 * ry) / det)
                ex = rx - b00 * h[q] - b01 * k[q]
                ey = ry - b10 * h[q] - b11 * k[q]
                use[q] = present[q] and math.sqrt(ex * ex + ey * ey) <= tol
            if it == iterations:
                break
            s0 = sh = sk = shh = shk = skk = 0.0
            sx = sy = sxh = syh = sxk = syk = 0.0
            n_used = 0
            for q in range(n_k):
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
            ok = abs(dm) > 1e-9 * max(s0 * shh * skk, 1e-300) and n_used >= min_disks
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
            for q in range(n_k):
                if use[q]:
                    fx = px[q] - no0 - g1x * h[q] - g2x * k[q]
                    fy = py[q] - no1 - g1y * h[q] - g2y * k[q]
                    acc += w[q] * (fx * fx + fy * fy)
            rms = math.sqrt(acc / max(s0, 1e-300))
            if ok:
                o0, o1 = no0, no1
                b00, b10, b01, b11 = g1x, g1y, g2x, g2y
                if not given:
                    tol = max(4 * rms, floor)
                out[f, 0], out[f, 1] = no0, no1
                out[f, 2], out[f, 3], out[f, 4], out[f, 5] = g1x, g1y, g2x, g2y
                out[f, 6] = n_used
                out[f, 7] = rms
            else:
                for c in range(6):
                    out[f, c] = np.nan
                out[f, 6] = 0
                out[f, 7] = np.nan


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
    """
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
                         "lower the detection threshold, or pass basis=((g1x, g1y), (g2x, g2y)) "
                         "in detector pixels")
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
