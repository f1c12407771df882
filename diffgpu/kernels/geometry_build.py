"""Building the integration matrix of :mod:`diffgpu.geometry` with compiled code (numba).

The same arithmetic as the NumPy build in :mod:`diffgpu.geometry` (``_build_block``),
pixel by pixel instead of vectorised over (pixel, bin) pairs: each pixel's radial and angular
span, the sub-wedges it reaches, its edges clipped to each sub-wedge, and the area of the
clipped pixel between consecutive radial edges (closed-form areas of triangles inside discs).
The expressions, their order of evaluation and the thresholds are those of the NumPy build,
so the matrix has the same entries. The corners and their angles come from NumPy (a block
at a time), because NumPy's SIMD ``arctan2`` and libm's ``atan2`` (numba's) differ by an ulp
in about 8% of cases, which moves a corner lying on a wedge's ray (a centre on a pixel
corner, diagonal rays) from one wedge to the next; the kernel's other ``atan2`` (sector
angles) change the values by ~1e-16 of a pixel only. Angles that do not depend on the radius
are computed once per clipped edge, and only where the NumPy build's value is not exactly 0.

Pixels go in blocks (each block's entries only are held at a time beyond the result), the
blocks on host threads (the kernel releases the GIL); the entries of each block are in
pixel order and the blocks are joined in order, so the matrix does not depend on the number
of threads. The entries are then transposed into CSR (bins x pixels) by a counting sort,
which leaves every row's pixels in increasing order.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["split_pixels_csr"]

_TWO_PI = 2 * np.pi
# Pixels per block: a block's entries (a few hundred kB) stay in cache before they are copied
# out, and the blocks are many enough to share among threads.
BLOCK = 8192


@numba.njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _disc_area(ax, ay, bx, by, dx, dy, a2, b1, aa, r, c, angles):
    """Signed area of triangle (origin, a, b) inside the disc of radius r (as geometry._disc_area).

    The angles of the sectors that do not depend on ``r`` (from ``a`` to ``a + (b - a)``, from
    there to ``b``, and from ``a`` to ``b``) are computed once per edge ``c`` and kept in
    ``angles[c]`` (NaN until needed): the same atan2 of the same numbers as the NumPy build,
    once instead of once per radial edge. ``dx, dy, a2, b1, aa`` are ``b - a``, ``|b - a|^2``,
    ``a . (b - a)`` and ``|a|^2``, evaluated as there.
    """
    cc = aa - r * r
    disc = b1 * b1 - a2 * cc
    sq = math.sqrt(max(disc, 0.0))
    t1 = 1.0
    t2 = 1.0
    if disc > 0 and a2 > 0:
        t1 = min(max((-b1 - sq) / a2, 0.0), 1.0)
        t2 = min(max((-b1 + sq) / a2, 0.0), 1.0)
    half_r2 = 0.5 * r * r
    p1x, p1y = ax + t1 * dx, ay + t1 * dy
    p2x, p2y = ax + t2 * dx, ay + t2 * dy
    # sector from a to p1: 0 when p1 is a (cross product 0, atan2(0, x >= 0) = 0)
    if t1 == 0.0:
        s1 = 0.0
    elif t1 == 1.0:
        if math.isnan(angles[c, 0]):
            angles[c, 0] = math.atan2(ax * p1y - ay * p1x, ax * p1x + ay * p1y)
        s1 = half_r2 * angles[c, 0]
    else:
        s1 = half_r2 * math.atan2(ax * p1y - ay * p1x, ax * p1x + ay * p1y)
    # sector from p2 to b
    if t2 == 1.0:
        if p2x == bx and p2y == by:  # the usual case: a + (b - a) is b
            s2 = 0.0
        elif math.isnan(angles[c, 1]):
            angles[c, 1] = math.atan2(p2x * by - p2y * bx, p2x * bx + p2y * by)
            s2 = half_r2 * angles[c, 1]
        else:
            s2 = half_r2 * angles[c, 1]
    elif t2 == 0.0:
        if math.isnan(angles[c, 2]):
            angles[c, 2] = math.atan2(p2x * by - p2y * bx, p2x * bx + p2y * by)
        s2 = half_r2 * angles[c, 2]
    else:
        s2 = half_r2 * math.atan2(p2x * by - p2y * bx, p2x * bx + p2y * by)
    return s1 + 0.5 * (p1x * p2y - p1y * p2x) + s2


@numba.njit(nogil=True, cache=True, inline="always")
def _near_integer(u, tol):
    f = u - math.floor(u)
    return f < tol or f > 1.0 - tol


@numba.njit(nogil=True, cache=True)
def _searchsorted(edges, v, right):
    """np.searchsorted(edges, v, side="right" if right else "left")."""
    lo, hi = 0, edges.size
    while lo < hi:
        mid = (lo + hi) // 2
        if edges[mid] < v or (right and edges[mid] == v):
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _block_entries(keep, nx, cx, cy, m, flip, given, phic_all, ang, pixel_area, edges, npt, npt_azim,
                   a0, delta, n_sub, sub, full, cos_a, sin_a, cos_b, sin_b):
    """Entries of the pixels ``keep`` (flat indices): (entries per pixel, rows, weights).

    With ``given``, the angles of the corners' sum and of the corners are ``phic_all`` and
    ``ang``, from NumPy's arctan2 as in the NumPy build. Otherwise they come from libm's
    atan2, which differs from NumPy's SIMD arctan2 by an ulp in some 8% of cases: a pixel
    whose angular span is within 1e-12 rad of a decision (a sub-wedge's ray, the seam, half a
    turn), where an ulp can change which sub-wedges it reaches, gets the count -1 and no
    entries, to be redone with NumPy's angles.

    A pixel's entries are in the order the NumPy build makes them; entries of the same row
    (sub-wedges of one azimuthal bin, ``sub > 1``) are summed in that order.
    """
    n = keep.size
    counts = np.zeros(n, np.int64)
    cap = 8 * n + 64
    rows = np.empty(cap, np.int64)
    weights = np.empty(cap, np.float64)
    nnz = 0
    ax = np.empty(4)
    ay = np.empty(4)
    bx = np.empty(4)
    by = np.empty(4)
    cax = np.empty(4)
    cay = np.empty(4)
    cbx = np.empty(4)
    cby = np.empty(4)
    live = np.empty(4, np.bool_)
    norm2 = np.empty(4)
    ddx = np.empty(4)
    ddy = np.empty(4)
    da2 = np.empty(4)
    db1 = np.empty(4)
    daa = np.empty(4)
    nearx = np.empty(4)
    neary = np.empty(4)
    angles = np.empty((4, 3))
    offx = np.array([-0.5, 0.5, 0.5, -0.5])
    offy = np.array([-0.5, -0.5, 0.5, 0.5])
    tol_k = 1e-12 / delta
    tol_turn = 1e-12 / _TWO_PI
    n_edges = edges.size
    thr_piece = 1e-15 * pixel_area
    thr_entry = 1e-12 * pixel_area
    merge = sub > 1
    first_of_row = np.full(npt * npt_azim if merge else 0, -1, np.int64)
    for q in range(n):
        p = keep[q]
        i = p // nx
        j = p - i * nx
        x0 = float(j) - cx
        y0 = float(i) - cy
        for c in range(4):
            xx = x0 + offx[c]
            yy = y0 + offy[c]
            cc = 3 - c if flip else c  # keep the corners counter-clockwise after a reflection
            ax[cc] = m[0] * xx + m[1] * yy
            ay[cc] = m[2] * xx + m[3] * yy
        for c in range(4):
            bx[c] = ax[(c + 1) % 4]
            by[c] = ay[(c + 1) % 4]
        # radial span: the hypot of the corners (points) nearest to the extreme only, as
        # hypot is within an ulp of the exact norm and squares are far closer than 1e-12
        contains_origin = True
        nmax = -1.0
        for c in range(4):
            norm2[c] = ax[c] * ax[c] + ay[c] * ay[c]
            nmax = max(nmax, norm2[c])
            if not ax[c] * by[c] - ay[c] * bx[c] >= 0:
                contains_origin = False
        rmax = -1.0
        for c in range(4):
            if norm2[c] >= nmax * (1 - 1e-12):
                rmax = max(rmax, math.hypot(ax[c], ay[c]))
        rmin = 0.0
        if not contains_origin:
            nmin = np.inf
            for c in range(4):
                dx, dy = bx[c] - ax[c], by[c] - ay[c]
                dd = dx * dx + dy * dy
                t = -(ax[c] * dx + ay[c] * dy) / (dd if dd > 0 else 1.0)
                t = min(max(t, 0.0), 1.0)
                nearx[c] = ax[c] + t * dx
                neary[c] = ay[c] + t * dy
                norm2[c] = nearx[c] * nearx[c] + neary[c] * neary[c]
                nmin = min(nmin, norm2[c])
            rmin = np.inf
            for c in range(4):
                if norm2[c] <= nmin * (1 + 1e-12):
                    rmin = min(rmin, math.hypot(nearx[c], neary[c]))
        if not (rmax > edges[0] and rmin < edges[n_edges - 1]):
            continue
        r_lo = _searchsorted(edges, rmin, True)
        r_hi = _searchsorted(edges, rmax, False)
        n_in = max(r_hi - r_lo, 0)
        k_lo = np.int64(0)
        k_hi = np.int64(0)
        hi = 0.0
        everywhere = contains_origin
        if not contains_origin:
            # angular span, unwrapped around the centre direction, from a0 upwards
            if given:
                phic = phic_all[q]
                rel_min = np.inf
                rel_max = -np.inf
                for c in range(4):
                    rel = (ang[q, c] - phic + np.pi) % _TWO_PI - np.pi
                    rel_min = min(rel_min, rel)
                    rel_max = max(rel_max, rel)
            else:
                # the pixel lies in an open half-plane: the corners' order by angle is the
                # order of their cross products, so only the extreme two need an atan2
                c_lo, c_hi = 0, 0
                for c in range(1, 4):
                    if ax[c] * ay[c_lo] - ay[c] * ax[c_lo] > 0:
                        c_lo = c
                    if ax[c_hi] * ay[c] - ay[c_hi] * ax[c] > 0:
                        c_hi = c
                phic = math.atan2(((ay[0] + ay[1]) + ay[2]) + ay[3], ((ax[0] + ax[1]) + ax[2]) + ax[3])
                rel_min = (math.atan2(ay[c_lo], ax[c_lo]) - phic + np.pi) % _TWO_PI - np.pi
                rel_max = (math.atan2(ay[c_hi], ax[c_hi]) - phic + np.pi) % _TWO_PI - np.pi
            lo = phic + rel_min
            hi = phic + rel_max
            u_turn = (lo - a0) / _TWO_PI
            turn = _TWO_PI * math.floor(u_turn)
            lo, hi = lo - turn, hi - turn
            everywhere = hi - lo >= np.pi
            u_lo = (lo - a0) / delta
            u_hi = (hi - a0) / delta
            u_wrap = (hi - _TWO_PI - a0) / delta
            k_lo = np.int64(math.floor(u_lo))
            k_hi = np.int64(math.floor(u_hi))
            if not given and (_near_integer(u_turn, tol_turn) or _near_integer(u_lo, tol_k)
                              or _near_integer(u_hi, tol_k) or _near_integer(u_wrap, tol_k)
                              or abs(hi - lo - np.pi) < 1e-12 or rel_min < 1e-12 - np.pi
                              or rel_max > np.pi - 1e-12):
                counts[q] = -1
                continue
        start = nnz
        for span in range(1 if full else 2):
            if span == 0:
                k0 = 0 if everywhere else k_lo
                k1 = n_sub - 1 if everywhere else k_hi
                if not full:
                    k0 = max(k0, 0)
                    k1 = min(k1, n_sub - 1)
            else:  # the part that wraps past the seam to the start of the range
                k0 = 0
                k1 = -1 if everywhere else np.int64(math.floor((hi - _TWO_PI - a0) / delta))
                k1 = min(k1, n_sub - 1)
            for k in range(k0, k1 + 1):
                wedge = k % n_sub
                # clip each edge to the wedge (as geometry._clip_to_wedge)
                area_sum = 0.0
                for c in range(4):
                    dx, dy = bx[c] - ax[c], by[c] - ay[c]
                    t0, t1 = 0.0, 1.0
                    for side in range(2):
                        if side == 0:
                            ux, uy, sign = cos_a[wedge], sin_a[wedge], 1.0
                        else:
                            ux, uy, sign = cos_b[wedge], sin_b[wedge], -1.0
                        h0 = sign * (ux * ay[c] - uy * ax[c])
                        hd = sign * (ux * dy - uy * dx)
                        # the division only where it can move t0 or t1: with hd > 0 and
                        # h0 >= 0, -h0 / hd <= 0; with hd < 0 and h0 >= -hd, it is >= 1
                        if hd > 0:
                            if h0 < 0:
                                t0 = max(t0, -h0 / hd)
                        elif hd < 0:
                            if h0 < -hd:
                                t1 = min(t1, -h0 / hd)
                        elif h0 < 0:
                            t1 = t0
                    t1 = max(t1, t0)
                    cax[c] = ax[c] + t0 * dx
                    cay[c] = ay[c] + t0 * dy
                    cbx[c] = ax[c] + t1 * dx
                    cby[c] = ay[c] + t1 * dy
                    # an edge clipped to a point adds exactly 0 to every area
                    live[c] = t1 != t0
                    ddx[c] = cbx[c] - cax[c]
                    ddy[c] = cby[c] - cay[c]
                    da2[c] = ddx[c] * ddx[c] + ddy[c] * ddy[c]
                    db1[c] = cax[c] * ddx[c] + cay[c] * ddy[c]
                    daa[c] = cax[c] * cax[c] + cay[c] * cay[c]
                    area_sum += cax[c] * cby[c] - cay[c] * cbx[c]
                full_area = 0.5 * area_sum
                if not full_area > thr_piece:
                    continue
                col_bin = wedge // sub
                angles[:] = np.nan
                prev = 0.0
                for s in range(n_in + 1):
                    if s < n_in:
                        r = edges[r_lo + s]
                        val = 0.0
                        for c in range(4):
                            if live[c]:
                                val += _disc_area(cax[c], cay[c], cbx[c], cby[c], ddx[c], ddy[c], da2[c],
                                                  db1[c], daa[c], r, c, angles)
                    else:
                        val = full_area
                    area = val - prev
                    prev = val
                    r_bin = r_lo - 1 + s
                    if r_bin < 0 or r_bin >= npt or not area > thr_entry:
                        continue
                    row = r_bin * npt_azim + col_bin
                    w = area / pixel_area
                    if merge:
                        at = first_of_row[row]
                        if at >= 0:  # another sub-wedge of this bin: add to its entry
                            weights[at] += w
                            continue
                        first_of_row[row] = nnz
                    if nnz == cap:
                        cap *= 2
                        rows2 = np.empty(cap, np.int64)
                        weights2 = np.empty(cap, np.float64)
                        rows2[:nnz] = rows[:nnz]
                        weights2[:nnz] = weights[:nnz]
                        rows, weights = rows2, weights2
                    rows[nnz] = row
                    weights[nnz] = w
                    nnz += 1
        if merge:
            for e in range(start, nnz):
                first_of_row[rows[e]] = -1
        counts[q] = nnz - start
    return counts, rows[:nnz].astype(np.int32), weights[:nnz].astype(np.float32)


@numba.njit(nogil=True, cache=True)
def _splice(counts, rows, weights, counts2, rows2, weights2):
    """The entries of the pixels with count -1 taken, in order, from the second set."""
    n = counts.size
    out_counts = counts.copy()
    total = 0
    q2 = 0
    for q in range(n):
        if counts[q] < 0:
            out_counts[q] = counts2[q2]
            q2 += 1
        total += out_counts[q]
    out_rows = np.empty(total, rows.dtype)
    out_weights = np.empty(total, weights.dtype)
    e = e1 = e2 = 0
    q2 = 0
    for q in range(n):
        if counts[q] < 0:
            for _ in range(counts2[q2]):
                out_rows[e] = rows2[e2]
                out_weights[e] = weights2[e2]
                e += 1
                e2 += 1
            q2 += 1
        else:
            for _ in range(counts[q]):
                out_rows[e] = rows[e1]
                out_weights[e] = weights[e1]
                e += 1
                e1 += 1
    return out_counts, out_rows, out_weights


@numba.njit(nogil=True, cache=True)
def _count_rows(row_counts, rows):
    """Add each entry of ``rows`` to its row's count (``row_counts[row + 1]``)."""
    for e in range(rows.size):
        row_counts[rows[e] + 1] += 1


@numba.njit(nogil=True, cache=True)
def _scatter(fill, indices, data, keep, counts, rows, weights):
    """Place a block's entries (pixels ``keep`` in order) in their CSR rows, at ``fill[row]``."""
    e = 0
    for q in range(keep.size):
        col = keep[q]
        for _ in range(counts[q]):
            r = rows[e]
            at = fill[r]
            indices[at] = col
            data[at] = weights[e]
            fill[r] = at + 1
            e += 1


def split_pixels_csr(detector_shape, center, corner_matrix, edges, npt, npt_azim, azimuth_range,
                     keep=None, threads=1):
    """CSR arrays of the exact fraction of each pixel's area in each (radial, azimuthal) bin.

    Pixel (row i, column j) is the unit square centred on ``(x, y) = (j, i)``, mapped by
    ``corner_matrix`` applied to ``(x - cx, y - cy)``; a bin is an annular sector between two
    radii of ``edges`` (in the mapped plane) and two azimuths of ``npt_azim`` equal parts of
    ``azimuth_range``. See :mod:`diffgpu.geometry` for the method.

    Parameters
    ----------
    detector_shape : tuple of int
        ``(rows, columns)``.
    center : tuple of float
        ``(cx, cy)`` in pixels.
    corner_matrix : array_like
        2x2 matrix from pixel offsets to the plane of ``edges`` (scale times affine).
    edges : array_like
        ``npt + 1`` increasing radii.
    npt, npt_azim : int
        Radial and azimuthal bins.
    azimuth_range : tuple of float
        ``(start, stop)`` in degrees, ``stop - start <= 360``.
    keep : array_like of int, optional
        Flat indices of the pixels to include (increasing); default all.
    threads : int
        Host threads; the result does not depend on it.

    Returns
    -------
    indptr, indices, data : numpy.ndarray
        CSR arrays of the ``(npt * npt_azim, rows * columns)`` matrix (int32 indices where they
        fit, float32 data); row ``j * npt_azim + k`` is radial bin ``j``, azimuthal bin ``k``.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.geometry_build import split_pixels_csr
    >>> indptr, indices, data = split_pixels_csr((8, 8), (3.5, 3.5), np.eye(2), [0.0, 1.0, 2.0],
    ...                                          2, 4, (-180.0, 180.0))
    >>> indptr.size - 1, round(float(data.sum()), 6) == round(np.pi * 4, 6)
    (8, True)
    """
    ny, nx = (int(v) for v in detector_shape)
    m = np.asarray(corner_matrix, dtype=np.float64).reshape(2, 2)
    det = float(np.linalg.det(m))
    edges = np.ascontiguousarray(edges, dtype=np.float64)
    keep = (np.arange(ny * nx, dtype=np.int64) if keep is None
            else np.ascontiguousarray(keep, dtype=np.int64))
    # the sub-wedges (at most 90 degrees) and their bounding rays, as the NumPy build
    a0, a1 = np.deg2rad(azimuth_range)
    full = math.isclose(a1 - a0, 2 * np.pi, rel_tol=0, abs_tol=1e-9)
    sub = max(1, math.ceil((a1 - a0) / npt_azim / (np.pi / 2) - 1e-12))
    n_sub = npt_azim * sub
    delta = (a1 - a0) / n_sub
    alpha = a0 + np.arange(n_sub) * delta
    beta = alpha + delta
    cx, cy = float(center[0]), float(center[1])
    # corner offsets in the order that is counter-clockwise for a right-handed (x, y)
    offs = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    args = (abs(det), edges, int(npt), int(npt_azim), float(a0), float(delta), int(n_sub), int(sub),
            bool(full), np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta))
    blocks = [keep[i:i + BLOCK] for i in range(0, keep.size, BLOCK)]

    no_angles = (np.zeros(0), np.zeros((0, 4)))

    def one(block):
        counts, rows, weights = _block_entries(block, nx, cx, cy, m.ravel().copy(), det < 0, False,
                                               *no_angles, *args)
        redo = np.flatnonzero(counts < 0)
        if redo.size == 0:
            return counts, rows, weights
        # pixels near a decision: the corners' angles as the NumPy build computes them
        row, col = np.divmod(block[redo], nx)
        x = (col - cx)[:, None] + offs[None, :, 0]
        y = (row - cy)[:, None] + offs[None, :, 1]
        px = m[0, 0] * x + m[0, 1] * y
        py = m[1, 0] * x + m[1, 1] * y
        if det < 0:  # keep the corners counter-clockwise after a reflection
            px, py = px[..., ::-1], py[..., ::-1]
        poly = np.stack([px, py], axis=-1)
        phic = np.arctan2(poly[..., 1].sum(axis=1), poly[..., 0].sum(axis=1))
        ang = np.arctan2(poly[..., 1], poly[..., 0])
        again = _block_entries(block[redo], nx, cx, cy, m.ravel().copy(), det < 0, True, phic, ang,
                               *args)
        return _splice(counts, rows, weights, *again)

    threads = max(1, min(int(threads), len(blocks)))
    if threads == 1:
        parts = [one(b) for b in blocks]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one, blocks))
    # CSR by a counting sort over the blocks in order: every row's pixels stay increasing
    n_rows = int(npt) * int(npt_azim)
    nnz = sum(pc[1].size for pc in parts)
    # scipy's choice: int32 indices where the shape and the entries fit
    itype = np.int32 if max(n_rows, ny * nx, nnz) <= np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_rows + 1, itype)
    for pc in parts:
        _count_rows(indptr, pc[1])
    np.cumsum(indptr, out=indptr)
    fill = indptr[:-1].copy()
    indices = np.empty(nnz, itype)
    data = np.empty(nnz, np.float32)
    for b, pc in zip(blocks, parts):
        _scatter(fill, indices, data, b, *pc)
    return indptr, indices, data
