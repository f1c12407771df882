"""Template matching of polar patterns: all in-plane rotations, direct and mirrored, at once.

With a polar pattern ``P(r, theta)`` and a template ``T(r, theta)``, the correlation over
all in-plane rotations ``gamma`` is an inverse FFT over theta of
``sum_r P^(r, k) conj(T^(r, k))``. For each frequency ``k`` that sum is a
``(patterns x radii) @ (radii x templates)`` product, so BLAS or cuBLAS do the work for
many patterns and templates per call. Writing ``P^ = a + ib`` and ``T^ = c + id``, the
direct correlation needs ``ac + bd`` and ``bc - ad`` and the mirrored template
(``theta -> -theta``, whose transform is ``conj(T^)``) needs ``ac - bd`` and ``bc + ad``:
the same four real products serve both, and stacking ``[a; b] @ [c, d]`` gets all four
from one matrix product (larger matrices: 1.7x faster than four calls here). Frequencies
above ``K`` carry little (spots are a degree or two wide) and are dropped, so the inverse
FFT has ``2K`` points; the best angle is refined by a parabola through its neighbours.
Only templates whose bound (:func:`_bounds`) beats a pattern's running n-th best score
are searched over angle.

Written once against the array module of the patterns (NumPy or CuPy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ..device import array_module, host_threads

__all__ = ["prepare_templates", "pack_templates", "packed_shape", "pack_into", "template_major",
           "spectral_norms", "radial_projection", "positive_power", "packed_norms",
           "RadialProjection", "TemplateGroups", "template_groups",
           "match_patterns"]

MAX_TILE = 2048  # templates per product: bounds the (K, 2n, 2t) intermediate of a block
# Frequencies of the first stage (two-stage search, prefilter). On simulated Si, the full
# search's best template was in the top 3% / 10% by this stage for 98% / 100% of patterns.
PREFILTER_FREQUENCIES = 16
# Radial bins per block of the two-stage search's Cauchy-Schwarz bound. One block over all
# radii (the bound of 2026-11-25) let 50-95% of 1,081 Si templates through at 128 radial bins
# (their energy at high azimuthal frequency grows as the spots narrow); per block, the
# pattern's energy on rings where a template has no spot no longer counts against it.
# Measured 2026-12-01 (256 random Si patterns, 128 bins): templates correlated fully per
# pattern ~540 -> ~60 (blocks of 4) -> ~40 (blocks of 2); patterns ** 0.5: ~1,036 -> ~190.
RADIAL_BLOCK = 2
# Energy of the templates' spectra left outside their radial basis (:func:`radial_projection`).
# Spots are Gaussians in radius, so their radial profiles span few dimensions: for 1,081 Si
# templates all but 1e-6 of the energy lies in 17 of 32, 20 of 64, 21 of 128 and 27 of 256
# radial bins' worth of basis vectors (measured 2026-12-02).
BASIS_TOLERANCE = 1e-6
# ... and outside the basis of the exact correlations: 1e-12 of the energy is 1e-6 of the norm,
# below float32 rounding over the radial bins (Si: 45 of 128 bins, 53 of 256).
EXACT_TOLERANCE = 1e-12
# The exact basis serves the full correlations only where no template leaves more than this
# of its energy outside it (3e-5 of the norm: the sampled basis left 1.1e-10 on Si).
_EXACT_RESIDUAL = 1e-9
# A residual norm computed in float32 is raised by this fraction of the whole norm, so that
# rounding never makes a bound lower than the true value.
_RESIDUAL_MARGIN = 1e-4
# Large libraries are searched a group of alike templates at a time first (:func:`template_groups`):
# templates per group, and the fewest templates for which groups are made.
GROUP_SIZE = 4
GROUP_MIN_TEMPLATES = 8192


def prepare_templates(rendered, max_frequency, workers=None):
    """Rendered templates ``(n_t, R, N)`` -> ``(real, imag)`` spectra, each ``(K, R, n_t)``
    float32 (views of one complex array: :func:`pack_templates` gathers them into place).
    ``workers``: SciPy FFT threads (None: :func:`~diffgpu.device.host_threads`; the values do
    not depend on it).

    Examples
    --------
    >>> rendered = np.zeros((2, 3, 16), np.float32)
    >>> rendered[1, 2, 0] = 1.0  # one bin: every frequency 1
    >>> real, imag = prepare_templates(rendered, 4, workers=1)
    >>> real.shape, real[:, 2, 1].tolist(), float(abs(imag).max())
    ((4, 3, 2), [1.0, 1.0, 1.0, 1.0], 0.0)
    """
    # SciPy's FFT: ~3x NumPy's on float32 here, and threaded
    x = rendered.astype(np.float32, copy=False)
    if workers is None:
        spec = _fft(np)[0](x, axis=-1)
    else:
        import scipy.fft as sfft

        spec = sfft.rfft(x, axis=-1, workers=workers)
    spec = spec[..., :max_frequency]
    return spec.real.transpose(2, 1, 0), spec.imag.transpose(2, 1, 0)


def packed_shape(n_t, K, R, max_tile=MAX_TILE):
    """Shape ``(n_tiles, K, R, 2 tile)`` of :func:`pack_templates`'s output for ``n_t`` templates.

    Examples
    --------
    >>> packed_shape(5, 3, 4, max_tile=2)
    (3, 3, 4, 4)
    """
    n_tiles = max(1, math.ceil(n_t / max_tile))
    return n_tiles, K, R, 2 * math.ceil(n_t / n_tiles)


def pack_into(packed, t0, real, imag):
    """Write the spectra ``(K, R, m)`` of templates ``t0 .. t0 + m`` into their tiles, so a
    large library is packed a slice at a time without a whole-library intermediate."""
    tile = packed.shape[-1] // 2
    m = real.shape[-1]
    t = t0
    while t < t0 + m:
        i, j = divmod(t, tile)
        n = min(tile - j, t0 + m - t)
        packed[i, :, :, j:j + n] = real[..., t - t0:t - t0 + n]
        packed[i, :, :, tile + j:tile + j + n] = imag[..., t - t0:t - t0 + n]
        t += n


def pack_templates(real, imag, max_tile=MAX_TILE):
    """Template spectra ``(K, R, n_t)`` -> ``(n_tiles, K, R, 2 tile)`` float32 and ``n_t``.

    Each tile holds the real parts of its templates, then their imaginary parts, so that
    one matrix product per block of patterns gives all four real products (see
    :func:`match_patterns`). Tiles are equal in size; the last is padded with empty
    templates, which the search skips.

    Examples
    --------
    >>> real = np.ones((3, 4, 5), np.float32)
    >>> packed, n_t = pack_templates(real, 2 * real, max_tile=2)
    >>> packed.shape, n_t
    ((3, 3, 4, 4), 5)
    """
    K, R, n_t = real.shape
    out = np.zeros(packed_shape(n_t, K, R, max_tile), dtype=np.float32)
    pack_into(out, 0, real, imag)
    return out, n_t


def template_major(packed, n_t):
    """Packed tiles -> ``(n_t, K, 2, R)``: each template's spectrum (real, imaginary parts
    over radius, per frequency) in one contiguous piece, for the searches that read a
    different subset of templates for every pattern.

    Examples
    --------
    >>> real = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> major = template_major(*pack_templates(real, -real, max_tile=3))
    >>> major.shape, float(major[3, 1, 0, 2]), float(major[3, 1, 1, 2])
    ((4, 2, 2, 3), 23.0, -23.0)
    """
    n_tiles, K, R, tile2 = packed.shape
    x = packed.reshape(n_tiles, K, R, 2, tile2 // 2).transpose(0, 4, 1, 3, 2)
    return np.ascontiguousarray(x.reshape(-1, K, 2, R)[:n_t])


@numba.njit(nogil=True, cache=True)
def _packed_norms(packed, n_t, block, sq):
    n_tiles, K, R, tile2 = packed.shape
    tile = tile2 // 2
    for i in range(n_tiles):
        j1 = min(tile, n_t - i * tile)
        for k in range(K):
            for r in range(R):  # each packed row read once, in order
                row = sq[k, r // block]
                for j in range(j1):
                    re = packed[i, k, r, j]
                    im = packed[i, k, r, tile + j]
                    row[i * tile + j] += re * re + im * im


def packed_norms(packed, n_t):
    """:func:`spectral_norms` read straight from the packed tiles, in one compiled pass (no
    template-major copy).

    Examples
    --------
    >>> real = np.arange(60, dtype=np.float32).reshape(2, 5, 6)
    >>> packed, n_t = pack_templates(real, -real, max_tile=4)
    >>> bool(np.allclose(packed_norms(packed, n_t), spectral_norms(template_major(packed, n_t))))
    True
    """
    n_tiles, K, R, _ = packed.shape
    # float32 throughout (sums of RADIAL_BLOCK squares): fresh float64 arrays and their
    # conversion cost ~1 s at 256 bins on a VM slow to touch new memory
    sq = np.zeros((K, len(_radial_blocks(R)), n_t), np.float32)
    if n_t:
        _packed_norms(packed, n_t, RADIAL_BLOCK, sq)
    return np.sqrt(sq, out=sq)


def _radial_blocks(R):
    """Start of every radial block of ``RADIAL_BLOCK`` bins (the last may be shorter)."""
    return np.arange(0, R, RADIAL_BLOCK)


def spectral_norms(major):
    """``(K, B, n_t)``: every template's spectral norm over each block of ``RADIAL_BLOCK``
    radial bins at each frequency, for the Cauchy-Schwarz part of the two-stage bound
    (``_match_two_stage``).

    Examples
    --------
    >>> major = np.ones((3, 2, 2, 10), np.float32)  # 3 templates, K = 2, R = 10
    >>> spectral_norms(major).shape  # 10 radial bins in blocks of RADIAL_BLOCK = 2: 5 blocks
    (2, 5, 3)
    """
    sq = np.square(major[:, :, 0]) + np.square(major[:, :, 1])  # (n_t, K, R), no float copy
    blocks = np.add.reduceat(sq, _radial_blocks(sq.shape[-1]), axis=-1)  # (n_t, K, B)
    return np.ascontiguousarray(np.sqrt(blocks).transpose(1, 2, 0))


def _over_threads(func, items):
    """``[func(x) for x in items]``, on :func:`~diffgpu.device.host_threads` threads where there
    are several items."""
    threads = min(host_threads(), len(items))
    if threads <= 1:
        return [func(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(func, items))


class RadialProjection(NamedTuple):
    """The templates' spectra in their radial basis (:func:`radial_projection`)."""

    basis: np.ndarray         # (R, m) orthonormal columns, by decreasing energy
    m_bound: int              # the first m_bound columns bound the scores
    low_packed: np.ndarray    # (n_tiles, low, m_bound, 2 tile): the first stage's products
    coefficients: np.ndarray  # (n_t, K, 2, m): every template in the basis
    bounding: np.ndarray      # (n_t, K, 2, m_bound): the same, first m_bound (contiguous)
    residual: np.ndarray      # (K, n_t): norms outside the first m_bound columns
    exact: bool               # the m columns also serve the exact correlation


def radial_projection(packed, n_t, tolerance=BASIS_TOLERANCE, low=PREFILTER_FREQUENCIES,
                      exact_tolerance=EXACT_TOLERANCE):
    """The templates' spectra in a small radial basis, for the host's search.

    The radial profiles of all templates at all frequencies (the packed tiles' columns at
    each frequency) span few dimensions: the eigenvectors of their Gram matrix (in
    float64, from a sample of templates) that hold all but ``tolerance`` of the energy.
    With ``T_k = U c_k + T_perp`` and the same split of a pattern's spectrum,
    ``|<P_k, T_k>| <= |<U'P_k, c_k>| + ||P_perp|| ||T_perp||``: products over ``m_bound``
    basis vectors instead of ``R`` radial bins bound every frequency, and the bound stays
    valid whatever the basis (every template's residual norms are measured, not assumed).
    More vectors, up to ``exact_tolerance``, leave out less than float32 rounding does, so
    the full correlations of the chosen templates are products over them too (``exact``:
    where they are at most half the radial bins and every template's measured residual
    is below 3e-5 of its norm; then no template-major copy over the radial bins is needed).

    Parameters
    ----------
    packed : float32 array ``(n_tiles, K, R, 2 tile)``
        From :func:`pack_templates`.
    n_t : int
        Templates in ``packed``.
    tolerance, exact_tolerance : float
        Relative energy left outside the bounding and the exact basis.
    low : int
        Frequencies packed for one product per block of patterns (the first stage).

    Returns
    -------
    :class:`RadialProjection`, or None where the bounding basis would not be smaller than
    half the radial bins (no gain).

    Examples
    --------
    Templates of three spots on 40 radial bins, each spot a Gaussian of 2 bins in radius at
    any radius: 20 basis vectors hold all but 1e-6 of their spectra's energy; 1e-12 would
    take more than 20, so the exact correlations stay on the radial bins.

    >>> rng = np.random.default_rng(0)
    >>> r, th = np.arange(40)[:, None], np.arange(90)[None]
    >>> def spot():
    ...     d = (th - rng.uniform(0, 90) + 45) % 90 - 45
    ...     return np.exp(-0.5 * ((r - rng.uniform(5, 35)) / 2.0) ** 2 - 0.5 * d ** 2)
    >>> spots = np.array([spot() + spot() + spot() for _ in range(50)])
    >>> p = radial_projection(*pack_templates(*prepare_templates(spots, 8)))
    >>> p.basis.shape, p.m_bound, p.coefficients.shape, p.residual.shape, p.exact
    ((40, 20), 20, (50, 8, 2, 20), (8, 50), False)
    >>> float(p.residual.max()) < 0.02  # spectra of norm 2 or more at every frequency
    True
    """
    n_tiles, K, R, tile2 = packed.shape
    tile = tile2 // 2
    if n_t == 0:
        return None
    # the Gram matrix of the radial profiles, from every step-th template (both parts)
    step = max(1, n_t // 256)
    G = np.zeros((R, R))
    for i in range(n_tiles):
        cols = np.arange(0, min(tile, n_t - i * tile), step)
        cols = np.concatenate([cols, tile + cols])
        for k in range(K):  # one frequency at a time: small float64 copies, reused memory
            X = packed[i, k][:, cols].astype(np.float64)
            G += X @ X.T
    values, vectors = np.linalg.eigh(G)
    values, vectors = np.maximum(values[::-1], 0), vectors[:, ::-1]
    if values.sum() <= 0:
        return None
    left = 1 - np.cumsum(values) / values.sum()

    def size(tol):
        return int(np.argmax(left <= tol)) + 1 if (left <= tol).any() else R

    m1, m = size(tolerance), size(exact_tolerance)
    if 2 * m1 > R:
        return None
    exact = 2 * m <= R
    m = m if exact else m1
    U = np.ascontiguousarray(vectors[:, :m], dtype=np.float32)
    coefficients = np.empty((n_t, K, 2, m), np.float32)
    residual = np.empty((K, n_t), np.float32)
    chunk = 128  # temporaries of ~16 MB at 256 bins: larger ones are fresh pages every time

    def project(i, j0):
        """One chunk's coefficients and residual norms; the largest relative residual energy
        outside all m vectors."""
        j1 = min(j0 + chunk, tile, n_t - i * tile)
        t0, t1, w = i * tile + j0, i * tile + j1, j1 - j0
        part = np.concatenate([packed[i][:, :, j0:j1], packed[i][:, :, tile + j0:tile + j1]],
                              axis=2)  # (K, R, 2w): real parts, then imaginary
        c = np.matmul(U.T, part)  # (K, m, 2w)
        coefficients[t0:t1] = c.reshape(K, m, 2, w).transpose(3, 0, 2, 1)
        norm_sq = np.einsum("krc,krc->kc", part, part)
        part -= np.matmul(U, c)  # what all m vectors leave out, measured
        sq = np.einsum("krc,krc->kc", part, part)
        worst = 0.0
        if exact:
            whole = norm_sq.sum(axis=0)
            worst = float(np.max(sq.sum(axis=0) / np.where(whole > 0, whole, 1)))
        # outside the first m1: that, plus the coefficients m1..m (U is orthonormal)
        sq += np.einsum("kjc,kjc->kc", c[:, m1:], c[:, m1:]) + _RESIDUAL_MARGIN ** 2 * norm_sq
        residual[:, t0:t1] = np.sqrt(sq[:, :w] + sq[:, w:])
        return worst

    chunks = [(i, j0) for i in range(n_tiles) for j0 in range(0, min(tile, n_t - i * tile), chunk)]
    # the chunks on all host threads (the products and sums release the GIL; each chunk
    # writes its own templates, so the values do not depend on the threads)
    worst = max(_over_threads(lambda ij: project(*ij), chunks))
    exact = exact and worst <= _EXACT_RESIDUAL
    if not exact and m > m1:
        U, coefficients = U[:, :m1].copy(), np.ascontiguousarray(coefficients[..., :m1])
        m = m1
    K1 = min(low, K)
    low_packed = np.zeros(packed_shape(n_t, K1, m1), np.float32)
    pack_into(low_packed, 0, coefficients[:, :K1, 0, :m1].transpose(1, 2, 0),
              coefficients[:, :K1, 1, :m1].transpose(1, 2, 0))
    bounding = np.ascontiguousarray(coefficients[..., :m1]) if m > m1 else coefficients
    return RadialProjection(U, m1, low_packed, coefficients, bounding, residual, exact)


class TemplateGroups(NamedTuple):
    """Groups of alike templates with what bounds every member's first-stage score
    (:func:`template_groups`)."""

    order: np.ndarray       # (n_t,) the templates, group after group
    starts: np.ndarray      # (g + 1,) group j is order[starts[j]:starts[j + 1]]
    low_packed: np.ndarray  # (n_tiles, low, m_bound, 2 tile): the groups' centres, packed
    slack: np.ndarray       # (low, g): how far a member's coefficients lie from the centre
    residual: np.ndarray    # (low, g): the members' largest residual norms (see RadialProjection)
    norms: np.ndarray       # ((K - low) B, g): the members' largest radial-block norms
    members: np.ndarray     # (g, size): each group's templates (-1: none)
    member_low: np.ndarray  # (g, size, low, 2, m_bound): their low-frequency coefficients
    member_res: np.ndarray  # (g, size, low): their residual norms
    member_norms: np.ndarray  # (g, size, (K - low) B): their radial-block norms


def _balanced_groups(X, size, seed=0):
    """Groups of ``size`` rows of ``X`` that lie close together: the rows are halved along
    their principal direction (a few power iterations), then each half again, down to
    ``size`` (halves are whole numbers of groups, so only the last of a branch is short)."""
    rng = np.random.default_rng(seed)
    pending, done = [np.arange(X.shape[0])], []
    while pending:
        idx = pending.pop()
        if idx.size <= size:
            done.append(idx)
            continue
        Y = X[idx] - X[idx].mean(axis=0)
        v = rng.standard_normal(X.shape[1]).astype(X.dtype)
        for _ in range(4):
            v = Y.T @ (Y @ v)
            norm = np.linalg.norm(v)
            if norm == 0:
                break
            v /= norm
        ordered = idx[np.argsort(Y @ v, kind="stable")]
        half = ordered.size // 2
        if ordered.size > 2 * size:
            half = max(size, half // size * size)
        pending += [ordered[half:], ordered[:half]]
    return done[::-1]


def template_groups(projection, norms, size=GROUP_SIZE, low=PREFILTER_FREQUENCIES):
    """Groups of ``size`` alike templates, and what bounds each member's first-stage score.

    For a template ``t`` of group ``G`` with centre ``c_G`` (the members' mean coefficients
    in the radial basis), at each low frequency ``k``,
    ``|<P_k, c_k(t)>| <= |<P_k, c_G,k>| + ||P_k|| max_t ||c_k(t) - c_G,k||`` (Cauchy-Schwarz,
    direct and mirrored alike), and the residual and radial-block norms of the members are
    at most their largest. One product with the centres thus bounds a whole group: on a
    0.2-degree Si library (25,651 templates, 64 radial bins), groups of 8 let through
    ~100 of 3,207 groups per pattern where the search needs ~60 templates.

    Parameters
    ----------
    projection : RadialProjection
        From :func:`radial_projection`.
    norms : float32 array ``(K, B, n_t)``
        From :func:`packed_norms`.
    size : int
        Templates per group.
    low : int
        Frequencies of the first stage.

    Returns
    -------
    :class:`TemplateGroups`

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r, th = np.arange(40)[:, None], np.arange(90)[None]
    >>> def spot(r0, a0):
    ...     d = (th - a0 + 45) % 90 - 45
    ...     return np.exp(-0.5 * ((r - r0) / 2.0) ** 2 - 0.5 * d ** 2)
    >>> spots = np.array([spot(10 + i % 20, 3 * i % 90) + spot(30, i % 7) for i in range(64)])
    >>> packed, n_t = pack_templates(*prepare_templates(spots, 8))
    >>> g = template_groups(radial_projection(packed, n_t), packed_norms(packed, n_t), size=8)
    >>> g.starts.tolist(), sorted(g.order.tolist()) == list(range(64))
    ([0, 8, 16, 24, 32, 40, 48, 56, 64], True)
    """
    coef = projection.coefficients
    n_t, K = coef.shape[:2]
    m1, K1 = projection.m_bound, min(low, K)
    low_c = np.ascontiguousarray(coef[:, :K1, :, :m1])  # (n_t, K1, 2, m1)
    flat = low_c.reshape(n_t, -1)
    # grouped on the leading principal components (the Gram of a sample): halving 25,651
    # templates on all 640 coefficients took seconds
    sample = flat[::max(1, n_t // 4096)].astype(np.float64)
    values, vectors = np.linalg.eigh(sample.T @ sample)
    lead = np.ascontiguousarray(vectors[:, ::-1][:, :min(32, flat.shape[1])], dtype=np.float32)
    parts = _balanced_groups(flat @ lead, size)
    order = np.concatenate(parts).astype(np.int64)
    starts = np.r_[0, np.cumsum([p.size for p in parts])].astype(np.int64)
    counts = np.diff(starts)
    g = starts.size - 1
    # each group's members' data side by side (:func:`_member_bounds` reads a group at a
    # time); a short group's missing members (-1) hold zeros
    members = np.full((g, size), -1, np.int64)
    members[np.repeat(np.arange(g), counts), np.arange(n_t) - np.repeat(starts[:-1], counts)] = order
    live = members >= 0
    safe = np.where(live, members, 0)
    member_low = low_c[safe]  # (g, size, K1, 2, m1)
    member_low[~live] = 0
    member_res = np.ascontiguousarray(projection.residual[:K1].T[safe])  # (g, size, K1)
    member_res[~live] = 0
    by_template = np.ascontiguousarray(norms[K1:].reshape(-1, n_t).T)  # (n_t, T)
    member_norms = by_template[safe]  # (g, size, T)
    member_norms[~live] = 0
    del by_template
    centre = member_low.sum(axis=1) / counts[:, None, None, None]  # (g, K1, 2, m1)
    dev = member_low - centre[:, None]
    spread = np.sqrt(np.einsum("gskjm,gskjm->gsk", dev, dev)) * live[..., None]
    length = np.sqrt(np.einsum("gskjm,gskjm->gsk", member_low, member_low))
    # rounding: float32 products and norms may miss by ~1e-6 of the norms; the margin covers it
    slack = (spread.max(axis=1) + _RESIDUAL_MARGIN * length.max(axis=1)).T  # (K1, g)
    low_packed = np.zeros(packed_shape(g, K1, m1), np.float32)
    pack_into(low_packed, 0, centre[:, :, 0].transpose(1, 2, 0), centre[:, :, 1].transpose(1, 2, 0))
    return TemplateGroups(order, starts, low_packed, np.ascontiguousarray(slack, np.float32),
                          np.ascontiguousarray(member_res.max(axis=1).T),
                          np.ascontiguousarray(member_norms.max(axis=1).T), members,
                          member_low, member_res, member_norms)


@numba.njit(inline="always")
def _four_products(p, t):
    """``(ac, ad, bc, bd)``: the four real products of a pattern's spectrum ``p = (a, b)`` and
    a template's ``t = (c, d)`` at one frequency (``(2, R)`` each: real, imaginary parts)."""
    ac = np.float32(0)
    ad = np.float32(0)
    bc = np.float32(0)
    bd = np.float32(0)
    for r in range(p.shape[1]):
        a, b = p[0, r], p[1, r]
        c, d = t[0, r], t[1, r]
        ac += a * c
        ad += a * d
        bc += b * c
        bd += b * d
    return ac, ad, bc, bd


@numba.njit(nogil=True, fastmath=True, cache=True)
def _member_bounds(spec_low, p_tail, wp, weights, passing, group_tail, members, low, res, tail,
                   limit):
    """The members of every passing group whose first-stage bound beats their pattern's
    ``limit``: ``(n, w)`` template indices, left-aligned, their bounds (``-inf`` where a row
    is padded) and how many each row has.

    The bound is the one :func:`_match_two_stage` gives every template without groups: the
    magnitudes at the low frequencies over the radial basis (``spec_low`` ``(n, low, 2,
    m)``), plus the residual term (``wp`` ``(low, n)`` times ``res``) and the radial-block
    Cauchy-Schwarz term of the higher frequencies (``p_tail`` ``(n, T)`` times ``tail``),
    direct or mirrored, whichever is larger. The last term is computed only for members
    that the group's own (``group_tail``, ``(n, g)``) does not already rule out."""
    n, n_g = passing.shape
    K1 = spec_low.shape[1]
    size = members.shape[1]
    T = p_tail.shape[1]
    width = 0
    for i in range(n):
        width = max(width, passing[i].sum())
    out = np.zeros((n, width * size), np.int64)
    top = np.full((n, width * size), -np.inf, np.float32)
    counts = np.zeros(n, np.int64)
    for i in range(n):
        c = 0
        for j in range(n_g):
            if not passing[i, j]:
                continue
            for q in range(size):
                t = members[j, q]
                if t < 0:
                    continue
                direct = np.float32(0)
                mirrored = np.float32(0)
                extra = np.float32(0)
                for k in range(K1):
                    # scalar sums over the basis (r innermost): 20x faster here than the
                    # members' lanes as small arrays
                    ac, ad, bc, bd = _four_products(spec_low[i, k], low[j, q, k])
                    s2 = ac * ac + bd * bd + bc * bc + ad * ad
                    q2 = np.float32(2) * (ac * bd - bc * ad)
                    direct += weights[k] * math.sqrt(max(s2 + q2, np.float32(0)))
                    mirrored += weights[k] * math.sqrt(max(s2 - q2, np.float32(0)))
                    extra += wp[k, i] * res[j, q, k]
                v = max(direct, mirrored) + extra
                if v + group_tail[i, j] <= limit[i]:
                    continue  # even the group's largest norms leave it out
                for x in range(T):
                    v += p_tail[i, x] * tail[j, q, x]
                if v > limit[i]:
                    out[i, c] = t
                    top[i, c] = v
                    c += 1
        counts[i] = c
    w = counts.max() if n else 0
    return out[:, :w], top[:, :w], counts


@numba.njit(nogil=True, cache=True)
def _group_members(chosen, order, starts):
    """Boolean ``(n, g)`` of groups -> their templates ``(n, w)`` for each row, left-aligned,
    and how many each row has (as :func:`_ragged`)."""
    n, g = chosen.shape
    counts = np.zeros(n, np.int64)
    for i in range(n):
        for j in range(g):
            if chosen[i, j]:
                counts[i] += starts[j + 1] - starts[j]
    width = counts.max() if n else 0
    out = np.zeros((n, width), np.int64)
    for i in range(n):
        c = 0
        for j in range(g):
            if chosen[i, j]:
                for q in range(starts[j], starts[j + 1]):
                    out[i, c] = order[q]
                    c += 1
    return out, counts


def _fft(xp):
    """(rfft, irfft) for the array module: SciPy's multithreaded FFT on the host, CuPy's on a GPU."""
    if xp is np:
        import scipy.fft as sfft

        workers = host_threads()
        return (lambda x, **k: sfft.rfft(x, workers=workers, **k),
                lambda x, **k: sfft.irfft(x, workers=workers, **k))
    return xp.fft.rfft, xp.fft.irfft


def positive_power(patterns, gamma, out):
    """``patterns ** gamma`` into float32 ``out``, with NaN, infinite and negative bins 0.

    NumPy's float32 ``fmax`` and ``power`` are vectorised, except for zeros, which most
    bins of a spot pattern are: powers of the positive bins only. 64 simulated Si patterns
    of 128 x 360: 2.7 ms, against 25 ms for a compiled loop of scalar powers and 11 ms for
    ``exp2(gamma * log2(p))``.

    Examples
    --------
    >>> out = np.empty(4, np.float32)
    >>> positive_power(np.array([4.0, -1.0, np.nan, np.inf]), 0.5, out).tolist()
    [2.0, 0.0, 0.0, 0.0]
    """
    np.fmax(patterns, 0, out=out, dtype=np.float32)  # NaN and negative bins count 0
    out[out == np.inf] = 0
    if gamma != 1:
        np.power(out, np.float32(gamma), out=out, where=out > 0)
    return out


def _scale_host(patterns, gamma, out):
    """Host version of the scaling in :func:`_pattern_spectra`, into float32 ``out``."""
    positive_power(patterns, gamma, out)
    flat = out.reshape(len(out), -1)
    norm = np.sqrt(np.einsum("ij,ij->i", flat, flat))
    flat *= (1 / np.where(norm > 0, norm, 1))[:, None].astype(np.float32)


def _pattern_spectra(patterns, gamma, max_frequency, xp):
    """Polar patterns ``(n, R, N)`` -> their spectra ``(K, 2n, R)``: real parts, then imaginary."""
    if xp is np:
        p = np.empty(patterns.shape, dtype=np.float32)
        _scale_host(patterns, gamma, p)
    else:
        p = patterns.astype(xp.float32)
        p = xp.where(xp.isfinite(p), xp.maximum(p, 0), 0)  # NaN bins (outside the detector) count 0
        if gamma != 1:
            p = p ** xp.float32(gamma)
        norm = xp.sqrt((p * p).sum(axis=(1, 2), keepdims=True))
        p = p / xp.where(norm > 0, norm, 1)
    spec = _fft(xp)[0](p, axis=-1)[..., :max_frequency]  # (n, R, K)
    n, R, K = spec.shape
    out = xp.empty((K, 2 * n, R), dtype=xp.float32)
    out[:, :n] = xp.moveaxis(spec.real, -1, 0)
    out[:, n:] = xp.moveaxis(spec.imag, -1, 0)
    return out


def _best_angles(re, im, n_azim, n_corr, xp):
    """Max over in-plane angle of the correlation whose spectrum is ``re + i im`` (K, n, t).

    Returns the peak value (parabola through the best sample and its neighbours) and its
    angle in degrees, both ``(n, t)``.
    """
    hat = xp.empty(re.shape, dtype=xp.complex64)
    hat.real[...] = re
    hat.imag[...] = im
    corr = _fft(xp)[1](hat, n=n_corr, axis=0)  # (n_corr, n, t)
    i = corr.argmax(axis=0)[None]
    best = xp.take_along_axis(corr, i, axis=0)[0]
    left = xp.take_along_axis(corr, (i - 1) % n_corr, axis=0)[0]
    right = xp.take_along_axis(corr, (i + 1) % n_corr, axis=0)[0]
    curv = left - 2 * best + right
    frac = xp.where(curv < 0, 0.5 * (left - right) / xp.where(curv < 0, curv, -1), 0)
    frac = xp.clip(frac, -0.5, 0.5)
    scale = n_corr / n_azim  # so that the value is the sum over (r, theta)
    peak = (best - 0.25 * (left - right) * frac) * scale
    angle = ((i[0] + frac) * (360.0 / n_corr) + 180.0) % 360.0 - 180.0
    return peak, angle


@numba.njit(nogil=True, fastmath=True, cache=True)
def _bounds_host(prod, n, t, weights, out):
    """Host version of :func:`_bounds`: one pass over the products, no temporaries."""
    K = prod.shape[0]
    out[:] = 0
    for k in range(K):
        w = weights[k]
        for i in range(n):
            for j in range(t):
                a = prod[k, i, j]          # Re(P) Re(T)
                d = prod[k, i, t + j]      # Re(P) Im(T)
                c = prod[k, n + i, j]      # Im(P) Re(T)
                b = prod[k, n + i, t + j]  # Im(P) Im(T)
                out[0, i, j] += w * math.sqrt((a + b) * (a + b) + (c - d) * (c - d))
                out[1, i, j] += w * math.sqrt((a - b) * (a - b) + (c + d) * (c + d))


def _bounds(prod, n, t, weights, xp):
    """For every (pattern, template): the largest value its correlation could reach at any
    angle, direct and mirrored: ``(2, n, t)``.

    With ``X_k`` the correlation's spectrum, the correlation at any angle is at most
    ``(|X_0| + 2 sum_k |X_k|) / N`` (``weights``). ``|direct|^2 = (A+B)^2 + (C-D)^2``
    and ``|mirrored|^2 = (A-B)^2 + (C+D)^2`` come straight from the four products.
    """
    if xp is np:
        out = np.empty((2, n, t), dtype=np.float32)
        _bounds_host(prod, n, t, weights, out)
        return out
    return _bounds_four(prod[:, :n, :t], prod[:, n:, t:], prod[:, n:, :t], prod[:, :n, t:],
                        weights, xp)


def _bounds_four(A, B, C, D, weights, xp):
    """:func:`_bounds` from the four products given apart, each ``(K, n, t)``."""
    S = A * A + B * B + C * C + D * D
    Q = 2 * (A * B - C * D)
    direct = xp.tensordot(weights, xp.sqrt(xp.maximum(S + Q, 0)), axes=(0, 0))
    mirrored = xp.tensordot(weights, xp.sqrt(xp.maximum(S - Q, 0)), axes=(0, 0))
    return xp.stack([direct, mirrored])


def match_patterns(patterns, templates, n_best=1, gamma=0.5, n_corr=None, keep=None,
                   ring_means=True):
    """Best ``n_best`` (template, rotation, mirror) for every polar pattern.

    Parameters
    ----------
    patterns : array ``(n, R, N)``
        Polar patterns (radius x azimuth), NumPy or CuPy.
    templates : tuple ``(packed, n_templates[, major])``
        From :func:`pack_templates` (and :func:`template_major` for ``keep``), the
        arrays on the patterns' device.
    n_best : int
        Matches kept per pattern.
    gamma : float
        Patterns are scaled as ``intensity ** gamma`` (templates were, when rendered).
    n_corr : int, optional
        Points of the inverse FFT over angle (default ``2 (K - 1)``).
    keep : int, optional
        Prefilter: correlate fully only the ``keep`` templates of each pattern that score
        best on the lowest ``PREFILTER_FREQUENCIES`` azimuthal frequencies; ``templates``
        must then also hold :func:`template_major` of the packed spectra.
    ring_means : bool
        Whether each radius's azimuthal mean (the zero azimuthal frequency) counts; with
        ``False`` the patterns are matched less their rings' means (a diffuse background).

    Returns
    -------
    float32 array ``(n, n_best, 4)``: template index, correlation (cosine-like, 1 =
    identical), in-plane rotation in degrees, mirror flag (+1 direct, -1 mirrored).

    Examples
    --------
    A template matched against itself turned by 30 degrees:

    >>> th = np.arange(360)
    >>> tmpl = np.exp(-0.5 * ((th[None] - np.array([[40], [100]])) / 2.0) ** 2)[None]
    >>> packed, n_t = pack_templates(*prepare_templates(tmpl / np.linalg.norm(tmpl), 181))
    >>> best = match_patterns(np.roll(tmpl, 30, axis=-1), (packed, n_t), gamma=1)
    >>> round(float(best[0, 0, 1]), 2), round(float(best[0, 0, 2]))
    (1.0, 30)
    """
    xp = array_module(patterns)
    packed, n_t = templates[:2]
    n_tiles, K, R, tile2 = packed.shape
    tile = tile2 // 2
    n, R_p, n_azim = patterns.shape
    if R_p != R:
        raise ValueError(f"patterns have {R_p} radial bins but the templates {R}")
    n_corr = n_corr or 2 * (K - 1)  # K = n_corr // 2 + 1: the spectrum needs no padding
    # Blocks of patterns bound the (K, 2n, 2t) intermediates: 64 fit a host core's caches
    # best; a GPU needs larger products to be busy (512: ~1 GB per product at 2,048 templates).
    block = 64 if xp is np else 512
    if keep is not None and keep < n_t:  # bound what the prefilter holds per pattern
        per_pattern = 16 * K * keep if xp is np else 16 * K * R * keep  # products | gathered
        block = max(1, min(block, 2**28 // per_pattern))  # ~256 MB at most
    if n > block:
        parts = [match_patterns(patterns[i:i + block], templates, n_best, gamma, n_corr, keep,
                                ring_means) for i in range(0, n, block)]
        return xp.concatenate(parts, axis=0)
    ab = _pattern_spectra(patterns, gamma, K, xp)  # (K, 2n, R)
    if not ring_means:  # the rings' azimuthal means: frequency 0 (its bounds then count 0)
        ab[0] = 0
    weights = xp.full(K, 2.0 / n_azim, dtype=xp.float32)
    weights[0] = 1.0 / n_azim
    if keep is not None and keep < n_t:
        if len(templates) < 3:
            raise ValueError("the prefilter needs the template-major spectra: pass "
                             "(packed, n_templates, template_major(packed, n_templates))")
        return _match_prefiltered(ab, packed, templates[2], n_t, weights, n_best, n_azim, n_corr,
                                  keep, xp)
    if xp is np and len(templates) >= 4:
        return _match_two_stage(ab, packed, templates[2], templates[3], n_t, weights, n_best,
                                n_azim, n_corr, templates[4] if len(templates) > 4 else None,
                                templates[5] if len(templates) > 5 else None)
    best_score = xp.full((n, n_best), -np.inf, dtype=xp.float32)
    best_info = xp.zeros((n, n_best, 3), dtype=xp.float32)
    for i in range(n_tiles):
        prod = ab @ packed[i]  # (K, 2n, 2t): all four real products in one call
        bounds = _bounds(prod, n, tile, weights, xp)
        valid = min(tile, n_t - i * tile)
        if valid < tile:  # padding in the last tile: never a candidate
            bounds[:, :, valid:] = -np.inf
        products = (prod[:, :n, :tile], prod[:, n:, tile:], prod[:, n:, :tile], prod[:, :n, tile:])
        for sign, bound in ((1.0, bounds[0]), (-1.0, bounds[1])):
            best_score, best_info = _search(products, bound, sign, i * tile, best_score, best_info,
                                            n_azim, n_corr, xp)
    return _pack(best_score, best_info, xp)


def _search(products, bound, sign, t0, best_score, best_info, n_azim, n_corr, xp, ids=None):
    """Fold the best angles of one tile of templates (direct or mirrored) into the running best.

    ``bound`` is, for every (pattern, template), the weighted sum of the magnitudes of the
    correlation's spectrum: no angle can score higher. Templates are searched over angle in
    decreasing order of it, and for each pattern the search stops once the bound falls below
    the n-th best score found. The result is the same as searching every template (the bound
    is tight: on simulated Si only 0.2-5% of templates had a bound above the best score), at a
    fraction of the inverse FFTs. Columns whose bound is ``-inf`` (padding) are never
    chosen. ``ids`` maps the columns to template indices for every pattern (default: the
    column plus ``t0``).
    """
    A, B, C, D = products
    n, t = bound.shape
    order = xp.argsort(-bound, axis=1)
    ranked = xp.take_along_axis(bound, order, axis=1)
    done, upto = 0, min(16, t)
    active = xp.arange(n)
    while active.size:
        cand = order[active, done:upto]  # (m, c) template indices in this tile
        rows = active[:, None]
        a_, b_, c_, d_ = A[:, rows, cand], B[:, rows, cand], C[:, rows, cand], D[:, rows, cand]
        re, im = (a_ + b_, c_ - d_) if sign > 0 else (a_ - b_, c_ + d_)
        peak, angle = _best_angles(re, im, n_azim, n_corr, xp)
        peak = xp.where(ranked[active, done:upto] > -np.inf, peak, -np.inf)
        tid = cand + t0 if ids is None else ids[rows, cand]
        info = xp.stack([tid.astype(xp.float32), angle.astype(xp.float32),
                         xp.full(peak.shape, sign, dtype=xp.float32)], axis=-1)
        s, i = _merge(best_score[active], best_info[active], peak.astype(xp.float32), info,
                      best_score.shape[1], xp)
        best_score[active], best_info[active] = s, i
        if upto >= t:
            break
        # patterns whose next template could still beat their n-th best need more
        still = ranked[active, upto] > best_score[active, -1]
        active = active[still]
        done, upto = upto, min(4 * upto, t)
    return best_score, best_info


@numba.njit(nogil=True, fastmath=True, cache=True)
def _gathered_bounds_host(spec, major, chosen, counts, weights, wp, t_res, bound, A, B, C, D):
    """The four real products of every pattern with its own chosen templates, read straight
    from the template-major spectra (a transposed gather cost 6 ms per pattern), for the
    first ``counts[i]`` templates of each row (the rest of a ragged row is padding: its
    bounds are -inf and, where the products are kept, they are 0), with the bounds of
    :func:`_bounds_four` made as the products are:
    ``bound`` ``(2, n, width)``, direct and mirrored, each plus ``sum_k wp[k, i] t_res[k, t]``
    (the residual term of the bounds in the radial basis; ``wp`` of shape ``(0, 0)`` for
    none). The products are written to ``A .. D`` where they are ``(K, n, width)`` (pass
    empty arrays where only the bounds are wanted)."""
    n, width = chosen.shape
    K = major.shape[1]
    keep = A.shape[0] == K
    residual = wp.shape[0] == K
    for i in range(n):
        for j in range(width):
            if j >= counts[i]:  # padding
                bound[0, i, j] = -np.inf
                bound[1, i, j] = -np.inf
                if keep:
                    for k in range(K):
                        A[k, i, j], B[k, i, j], C[k, i, j], D[k, i, j] = 0, 0, 0, 0
                continue
            t = chosen[i, j]
            direct = 0.0
            mirrored = 0.0
            for k in range(K):
                ac, ad, bc, bd = _four_products(spec[i, k], major[t, k])
                if keep:
                    A[k, i, j], B[k, i, j], C[k, i, j], D[k, i, j] = ac, bd, bc, ad
                s2 = ac * ac + bd * bd + bc * bc + ad * ad
                q2 = np.float32(2) * (ac * bd - bc * ad)
                direct += weights[k] * math.sqrt(max(s2 + q2, np.float32(0)))
                mirrored += weights[k] * math.sqrt(max(s2 - q2, np.float32(0)))
                if residual:
                    extra = wp[k, i] * t_res[k, t]
                    direct += extra
                    mirrored += extra
            bound[0, i, j] = direct
            bound[1, i, j] = mirrored


def _low_frequency_bounds(ab, packed, n_t, weights, K1, xp):
    """:func:`_bounds` over the ``K1`` lowest frequencies only, for every template: ``(2, n, n_t)``."""
    n_tiles, tile = packed.shape[0], packed.shape[-1] // 2
    n = ab.shape[1] // 2
    return xp.concatenate([_bounds(ab[:K1] @ packed[i, :K1], n, tile, weights[:K1], xp)
                           for i in range(n_tiles)], axis=2)[:, :, :n_t]


# the two-stage search correlates fully at least one template in this many first (see there)
FIRST_PER_TEMPLATES = 512


def _match_two_stage(ab, packed, major, norms, n_t, weights, n_best, n_azim, n_corr,
                     projection=None, groups=None):
    """The exact search on the host, with most of the products left out.

    Stage 1 bounds every template's best score: the magnitudes of the correlation's
    spectrum on the ``PREFILTER_FREQUENCIES`` lowest frequencies (one product, a quarter
    of the full one) plus, for the higher ones, ``|X_k| <= ||P_k|| ||T_k||`` (Cauchy-Schwarz
    over radius). Stage 2 correlates fully the templates with the highest bounds, then
    every other template whose bound beats a pattern's n-th best score so far, reading each
    from the template-major copy. No template that could beat the result is left out, so
    the matches are those of the full search.

    With a ``projection`` (:func:`radial_projection`), the low frequencies of stage 1 are
    products over the templates' radial basis (``m`` instead of ``R`` per product), and
    before the full correlation every remaining template's bound is tightened to the
    magnitudes at all frequencies, also over the basis: on 1,081 Si templates at 128 radial
    bins, templates correlated fully per pattern ~130 -> ~20 for the five best.

    With ``groups`` (:func:`template_groups`, made for large libraries), stage 1 bounds
    whole groups of alike templates (one product per group), the members of the groups with
    the highest bounds are correlated first, and only the members of the groups whose bound
    beats a pattern's n-th best go on to the tightened bounds.
    """
    K = packed.shape[1]
    n = ab.shape[1] // 2
    K1 = min(PREFILTER_FREQUENCIES, K)
    if projection is None:
        groups = None
        bound = _low_frequency_bounds(ab, packed, n_t, weights, K1, np)  # (2, n, n_t)
        first = 32
    else:
        m1 = projection.m_bound
        abp = ab @ projection.basis  # (K, 2n, m)
        full = np.einsum("kir,kir->ki", ab, ab)
        kept = np.einsum("kir,kir->ki", abp[..., :m1], abp[..., :m1])
        p_sq = full[:, :n] + full[:, n:] - kept[:, :n] - kept[:, n:]  # (K, n)
        p_residual = np.sqrt(np.maximum(p_sq, 0) + _RESIDUAL_MARGIN * (full[:, :n] + full[:, n:]))
        # |X_k| <= |projected X_k| + ||P_perp|| ||T_perp||, weighted: (n, n_t) over k < K1
        wp = weights[:, None] * p_residual
        t_residual = projection.residual
        if groups is None:
            bound = _low_frequency_bounds(np.ascontiguousarray(abp[..., :m1]),
                                          projection.low_packed, n_t, weights, K1, np)
            bound += (wp[:K1].T @ t_residual[:K1])[None]
        else:  # one bound per group: the centre's, plus how far its members may lie from it
            n_g = groups.starts.size - 1
            bound = _low_frequency_bounds(np.ascontiguousarray(abp[..., :m1]), groups.low_packed,
                                          n_g, weights, K1, np)
            p_low = weights[:K1, None] * np.sqrt(kept[:K1, :n] + kept[:K1, n:])  # (K1, n)
            bound += (p_low.T @ groups.slack + wp[:K1].T @ groups.residual)[None]
        # the more templates, the more pass a weak first n-th best: start from more of them
        # (one thread, 64 patterns: 1,081 templates 3,260 patterns/s with 8 and 2,830 with
        # 32; 25,651 templates 263 with 8 and 312-325 with 32-64)
        first = max(8, 2 * n_best, n_t // FIRST_PER_TEMPLATES)
    p_norm, tail = np.zeros((n, 0), np.float32), None
    if K1 < K:  # Cauchy-Schwarz in each radial block: a template's spots lie in a few blocks
        a, b = ab[K1:, :n], ab[K1:, n:]
        p_norm = np.sqrt(np.add.reduceat(a * a + b * b, _radial_blocks(a.shape[-1]), axis=-1))
        p_norm = (weights[K1:, None, None] * p_norm).transpose(1, 0, 2).reshape(n, -1)
        tail = norms[K1:].reshape(-1, norms.shape[-1]) if groups is None else groups.norms
        tail = p_norm @ tail  # (n, (K - K1) B) @ ((K - K1) B, n_t or groups)
        bound += tail[None]
    top = bound.max(axis=0)  # (n, n_t or groups): either side
    if projection is not None:
        spec_basis = _spectra_by_pattern(abp, K, n)
    if projection is not None and projection.exact:  # full correlations in the basis too
        spec, major = spec_basis, projection.coefficients
    else:
        spec = _spectra_by_pattern(ab, K, n)
    best_score = np.full((n, n_best), -np.inf, dtype=np.float32)
    best_info = np.zeros((n, n_best, 3), dtype=np.float32)

    none = np.empty((0, 0), np.float32)  # no residual term / no products kept
    none3 = np.empty((0, 0, 0), np.float32)

    def correlate(ids, counts):
        """Correlate fully the first ``counts[i]`` templates ``ids[i]`` of every pattern."""
        nonlocal best_score, best_info
        c = ids.shape[1]
        A, B, C, D = np.empty((4, K, n, c), dtype=np.float32)
        exact = np.empty((2, n, c), dtype=np.float32)
        _gathered_bounds_host(spec, major, ids, counts, weights, none, none, exact, A, B, C, D)
        for sign, side in ((1.0, exact[0]), (-1.0, exact[1])):
            best_score, best_info = _search((A, B, C, D), side, sign, 0, best_score, best_info,
                                            n_azim, n_corr, np, ids=ids)

    first = min(n_t, max(first, n_best))
    more = None  # the templates left to consider, per pattern (ragged)
    if groups is not None:
        # the members of the groups with the highest bounds first, then those of every other
        # group whose bound beats the n-th best so far
        n_g = top.shape[1]
        pick = min(n_g, -(-first // groups.members.shape[1]))
        taken = np.zeros((n, n_g), np.bool_)
        taken[np.arange(n)[:, None], np.argpartition(-top, pick - 1, axis=1)[:, :pick]] = True
        correlate(*_group_members(taken, groups.order, groups.starts))
        # the members of every other group whose bound beats the n-th best, by their own
        # first-stage bounds; of those, the `first` highest correlated next (the groups' ranks
        # are rougher than their members': with only the first groups' members correlated,
        # ~10x more templates went on to the full correlation)
        cand, cand_top, counts = _member_bounds(
            _spectra_by_pattern(abp[:K1, :, :m1], K1, n),
            np.ascontiguousarray(p_norm, dtype=np.float32),
            np.ascontiguousarray(wp[:K1], dtype=np.float32), weights,
            (top > best_score[:, -1:]) & ~taken,
            np.zeros(top.shape, np.float32) if tail is None else
            np.ascontiguousarray(tail, dtype=np.float32),
            groups.members, groups.member_low,
            groups.member_res, groups.member_norms, np.ascontiguousarray(best_score[:, -1]))
        if cand.shape[1] > first:
            order = np.argsort(-cand_top, axis=1, kind="stable")
            cand, cand_top = (np.take_along_axis(x, order, axis=1) for x in (cand, cand_top))
            now = np.minimum(counts, first)
            correlate(np.ascontiguousarray(cand[:, :first]), now)
            more, counts = _kept(cand[:, first:], cand_top[:, first:] > best_score[:, -1:], n_t)
        else:
            more = cand
    else:
        ids = np.argpartition(-top, first - 1, axis=1)[:, :first] if first < n_t else \
            np.broadcast_to(np.arange(n_t), (n, n_t))
        ids = np.ascontiguousarray(ids)
        correlate(ids, np.full(n, ids.shape[1], np.int64))
        if first < n_t:
            rest = top > best_score[:, -1:]
            rest[np.arange(n)[:, None], ids] = False
            more, counts = _ragged(rest)
    if more is not None:
        # (rows are ragged: a few patterns near many alike templates pass far more than the
        # median, 503 against 13 of 25,651; the kernels skip the padding, which was 7-19x the
        # work of the real candidates there)
        if more.shape[1] and projection is not None:  # tighten: all frequencies, in the basis
            tight = np.empty((2,) + more.shape, dtype=np.float32)
            # contiguous copies: on views of the first m_bound columns the loop is not vectorised
            _gathered_bounds_host(np.ascontiguousarray(spec_basis[..., :m1]),
                                  projection.bounding, more, counts, weights,
                                  np.ascontiguousarray(wp, dtype=np.float32),
                                  t_residual, tight, none3, none3, none3, none3)
            more, counts = _kept(more, tight.max(axis=0) > best_score[:, -1:], n_t)  # (padding: -inf)
        if more.shape[1]:
            correlate(more, counts)
    return _pack(best_score, best_info, np)


def _kept(ids, keep, n_t):
    """The template indices ``ids`` ``(n, w)`` where ``keep`` is True, per row, as
    :func:`_ragged` gives them (in template order, left-aligned, with the counts)."""
    chosen = np.zeros((ids.shape[0], n_t), np.bool_)
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
    chosen[rows[keep], ids[keep]] = True
    return _ragged(chosen)


def _spectra_by_pattern(ab, K, n):
    """``(K, 2n, R)`` -> ``(n, K, 2, R)``: each pattern's spectrum in one contiguous piece."""
    return np.ascontiguousarray(np.moveaxis(ab.reshape(K, 2, n, -1), 2, 0))


def _ragged(chosen):
    """Boolean ``(n, t)`` -> column indices ``(n, w)`` of each row's True entries, left-aligned,
    and how many each row has (``w`` is the largest count; the rest is padding)."""
    counts = chosen.sum(axis=1)
    width = int(counts.max()) if counts.size else 0
    more = np.zeros((chosen.shape[0], width), dtype=np.int64)
    valid = np.arange(width)[None] < counts[:, None]
    rows, cols = np.nonzero(chosen)  # row-major: each row's columns in order
    more[valid] = cols
    return more, counts.astype(np.int64)


def _match_prefiltered(ab, packed, major, n_t, weights, n_best, n_azim, n_corr, keep, xp):
    """Score every template on the lowest frequencies, then correlate fully the ``keep``
    best of each pattern.

    Stage 1 is the same product as the full search, cut to ``PREFILTER_FREQUENCIES``
    frequencies, and the score is the bound of :func:`_bounds` over those frequencies
    (direct or mirrored, the larger). Stage 2 takes all four products of each pattern with
    its chosen templates at all frequencies, reading them from the template-major layout
    (one contiguous piece each): a numba kernel on the host, a gather and a batched
    product on a GPU.
    """
    n_tiles, K, R, tile2 = packed.shape
    n = ab.shape[1] // 2
    K1 = min(PREFILTER_FREQUENCIES, K)
    low = _low_frequency_bounds(ab, packed, n_t, weights, K1, xp).max(axis=0)  # (n, n_t)
    chosen = xp.argpartition(-low, keep - 1, axis=1)[:, :keep]  # (n, keep)
    spec = xp.ascontiguousarray(xp.moveaxis(ab.reshape(K, 2, n, R), 2, 0))  # (n, K, 2, R)
    if xp is np:
        A, B, C, D = np.empty((4, K, n, keep), dtype=np.float32)
        none = np.empty((0, 0), np.float32)
        _gathered_bounds_host(spec, major, chosen, np.full(n, keep, np.int64), weights, none,
                              none, np.empty((2, n, keep), np.float32), A, B, C, D)
    else:
        picked = major[chosen]  # (n, keep, K, 2, R)
        picked = xp.ascontiguousarray(picked.transpose(0, 2, 4, 3, 1)).reshape(n, K, R, 2 * keep)
        prod = xp.moveaxis(xp.matmul(spec, picked), 1, 0)  # (K, n, 2, 2 keep): [[ac, ad], [bc, bd]]
        A, D = prod[:, :, 0, :keep], prod[:, :, 0, keep:]
        C, B = prod[:, :, 1, :keep], prod[:, :, 1, keep:]
    best_score = xp.full((n, 0), -np.inf, dtype=xp.float32)
    best_info = xp.zeros((n, 0, 3), dtype=xp.float32)
    for sign, re, im in ((1.0, A + B, C - D), (-1.0, A - B, C + D)):
        peak, angle = _best_angles(re, im, n_azim, n_corr, xp)
        info = xp.stack([chosen.astype(xp.float32), angle.astype(xp.float32),
                         xp.full(peak.shape, sign, dtype=xp.float32)], axis=-1)
        best_score, best_info = _merge(best_score, best_info, peak.astype(xp.float32), info,
                                       n_best, xp)
    return _pack(best_score, best_info, xp)


def _merge(score, info, new_score, new_info, n_best, xp):
    """Keep the n_best highest scores (descending) of the old and new candidates."""
    s = xp.concatenate([score, new_score], axis=1)
    i = xp.concatenate([info, new_info], axis=1)
    k = min(n_best, s.shape[1])
    top = xp.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else \
        xp.broadcast_to(xp.arange(s.shape[1]), s.shape)
    top_s = xp.take_along_axis(s, top, axis=1)
    order = xp.argsort(-top_s, axis=1)
    top = xp.take_along_axis(top, order, axis=1)
    return xp.take_along_axis(s, top, axis=1), xp.take_along_axis(i, top[..., None], axis=1)


def _pack(score, info, xp):
    return xp.concatenate([info[..., :1], score[..., None], info[..., 1:]], axis=-1).astype(
        xp.float32)
