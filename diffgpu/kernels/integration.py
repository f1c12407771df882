"""Applying an integration matrix to many frames at once, on the host or on a GPU.

The matrix ``M`` (bins x pixels, see :mod:`diffgpu.geometry`) is applied to a
stack of frames ``(n, pixels)``: ``out = frames @ M.T``.

* **GPU** (CuPy frames): one cuSPARSE product per call, ``M @ frames.T``, with
  the matrix moved to each device once and cached there.
* **Host**: a numba kernel that works on tiles of ``TILE`` frames.  The tile is
  transposed into ``(pixels, TILE)`` one *band* of at most 65,536 pixels at a time
  (2 MiB, which stays in cache where the whole tile of a large detector did not),
  ``TILE x TILE`` blocks at a time converted and transposed in registers, so that
  each matrix entry updates the tile's frames with one SIMD operation.  Vector
  code is written as llvmlite intrinsics (numba has no vector types, and LLVM did
  not vectorise the scalar form).  The entries of a band are stored in
  *chunks* of ``CHUNK`` consecutive bins, each bin padded with zero weights to
  the chunk's longest bin (sliced ELLPACK): the kernel keeps the ``CHUNK`` bins'
  accumulators in registers (independent chains, no branch per bin), transposes
  the ``CHUNK x TILE`` block in registers and writes it as ``TILE`` vector
  stores.  A bin spread over several bands continues from the partial sum
  written by the band before, so every bin sums its pixels in the same order as
  a plain CSR product and the results do not depend on the band size.
  Non-finite pixels are zeroed as the tile is read, and the frames that had any
  are reported so that their means are renormalised (only the bins their non-finite pixels
  reach, once per set of such pixels). Means (``mean=True``) use a copy of
  the weights divided by each bin's coverage, so the result is written once.

Measured on a 2-core VM, with the figures, in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import math
import uuid
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..device import DeviceCache, array_module, is_device_array
from .dtypes import CONVERT_BLOCK, check_dtype, kernel_ready, needs_conversion

__all__ = ["IntegrationEngine"]

TILE = 8  # frames per tile: one AVX2 vector of float32 (measured best of 4-32: benchmarks/NOTES.md)
CHUNK = 8  # bins per chunk (= TILE: the block is transposed in registers)
# transposed pixels per band: 2 MiB (65,536 pixels; L2 is 1 MiB a core here, L3 32 MiB):
# 1 and 4 MiB were 5-25% slower at 1024^2 (more bins cut at band borders, or out of cache)
BAND_BYTES = 2 << 20

_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)

# Fast-math without "reassoc" (each bin sums its pixels in a fixed order) and without
# "no NaNs" / "no infs" (the kernel must see them).
_FASTMATH = {"nsz", "arcp", "contract", "afn"}


def _block_transpose(builder, rows):
    """Transpose n vectors of n lanes (n a power of 2) with log2(n) rounds of shuffles.

    Round ``s`` swaps the off-diagonal ``s x s`` blocks of every ``2s x 2s`` block.
    """
    n = len(rows)
    i32 = ir.IntType(32)
    s = 1
    while s < n:
        new = list(rows)
        for i in range(n):
            if i & s:
                continue
            a, b = rows[i], rows[i + s]
            lo = [j if not j & s else n + j - s for j in range(n)]
            hi = [j + s if not j & s else n + j for j in range(n)]
            new[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), lo))
            new[i + s] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), hi))
        rows = new
        s *= 2
    return rows


@intrinsic
def _chunk_sums(typingctx, xt, indices, weights, start, width, p0, blk, resume):
    """``blk[t, i] (+)= sum_e weights[j] * xt[indices[j] - p0, t]``, ``j = start + e CHUNK + i``.

    One chunk of ``CHUNK`` bins (sliced ELLPACK, ``width`` entries per bin, interleaved),
    for the ``TILE`` frames of ``xt``: each bin's sum is a vector over frames kept in a
    register (a fused multiply-add per entry, in entry order), and the ``CHUNK x TILE``
    block is transposed in registers into ``blk`` (``TILE x CHUNK``, the output's dtype).
    With ``resume``, the sums continue from the values in ``blk``.
    """
    acc_ty = blk.dtype
    index_signed = indices.dtype.signed
    sig = types.void(xt, indices, weights, start, width, p0, blk, resume)

    def codegen(context, builder, signature, args):
        xt_v, ind_v, w_v, start_v, width_v, p0_v, blk_v, resume_v = args
        xt_a = context.make_array(signature.args[0])(context, builder, xt_v)
        ind_a = context.make_array(signature.args[1])(context, builder, ind_v)
        w_a = context.make_array(signature.args[2])(context, builder, w_v)
        blk_a = context.make_array(signature.args[6])(context, builder, blk_v)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        f32 = ir.FloatType()
        acc_t = context.get_value_type(acc_ty)
        vty = ir.VectorType(acc_t, TILE)
        x_ty = ir.VectorType(f32, TILE).as_pointer()
        suffix = "f32" if acc_ty == types.float32 else "f64"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.v{TILE}{suffix}")
        start_ = context.cast(builder, start_v, signature.args[3], types.int64)
        width_ = context.cast(builder, width_v, signature.args[4], types.int64)
        p0_ = context.cast(builder, p0_v, signature.args[5], types.int64)
        blk_rows = [builder.bitcast(builder.gep(blk_a.data, [ir.Constant(i64, t * CHUNK)]),
                                    vty.as_pointer()) for t in range(TILE)]
        accs = [cgutils.alloca_once(builder, vty) for _ in range(CHUNK)]
        zero = ir.Constant(vty, None)
        with builder.if_else(builder.icmp_unsigned("!=", resume_v, ir.Constant(resume_v.type, 0))) \
                as (then, otherwise):
            with then:
                cols = _block_transpose(builder, [builder.load(r, align=1) for r in blk_rows])
                for i in range(CHUNK):
                    builder.store(cols[i], accs[i])
            with otherwise:
                for i in range(CHUNK):
                    builder.store(zero, accs[i])
        splat = ir.Constant(ir.VectorType(i32, TILE), [0] * TILE)
        with cgutils.for_range(builder, width_) as loop:
            base = builder.add(start_, builder.mul(loop.index, ir.Constant(i64, CHUNK)))
            for i in range(CHUNK):
                j = builder.add(base, ir.Constant(i64, i))
                raw = builder.load(builder.gep(ind_a.data, [j]))
                raw = builder.zext(raw, i64) if not index_signed else builder.sext(raw, i64)
                idx = builder.sub(raw, p0_)
                row = builder.mul(idx, ir.Constant(i64, TILE))
                x_ptr = builder.bitcast(builder.gep(xt_a.data, [row]), x_ty)
                x = builder.load(x_ptr, align=4)
                w = builder.load(builder.gep(w_a.data, [j]))
                if acc_ty != types.float32:
                    x = builder.fpext(x, vty)
                    w = builder.fpext(w, acc_t)
                wv = builder.insert_element(ir.Constant(vty, ir.Undefined), w, ir.Constant(i32, 0))
                wv = builder.shuffle_vector(wv, ir.Constant(vty, ir.Undefined), splat)
                builder.store(builder.call(fma, [wv, x, builder.load(accs[i])]), accs[i])
        rows = _block_transpose(builder, [builder.load(a) for a in accs])
        for t in range(TILE):
            builder.store(rows[t], blk_rows[t], align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _load_tile(typingctx, frames, f0, m, q, xt, r):
    """``xt[r + i, t] = float32(frames[f0 + t, q + i])`` for ``i, t < TILE`` (0 for ``t >= m``).

    Loads a TILE x TILE block (frames x pixels), converts it as ``np.float32()`` does and
    transposes it in registers. Returns a bit mask of the frames ``t`` with a NaN or inf
    among these pixels (always 0 for integers).
    """
    sig = types.int64(frames, f0, m, q, xt, r)
    src_ty = frames.dtype

    def codegen(context, builder, signature, args):
        fr_v, f0_v, m_v, q_v, xt_v, r_v = args
        fr = context.make_array(signature.args[0])(context, builder, fr_v)
        xa = context.make_array(signature.args[4])(context, builder, xt_v)
        i64, i8 = ir.IntType(64), ir.IntType(8)
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, TILE)
        el = context.get_data_type(src_ty)
        vsrc = ir.VectorType(el, TILE)
        f0_ = context.cast(builder, f0_v, signature.args[1], types.int64)
        m_ = context.cast(builder, m_v, signature.args[2], types.int64)
        q_ = context.cast(builder, q_v, signature.args[3], types.int64)
        r_ = context.cast(builder, r_v, signature.args[5], types.int64)
        stride0 = builder.extract_value(fr.strides, 0)
        base = builder.bitcast(fr.data, i8.as_pointer())
        size = ir.Constant(i64, context.get_abi_sizeof(el))
        rows = []
        for t in range(TILE):
            slot = cgutils.alloca_once_value(builder, ir.Constant(vf, None))
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, t), m_)):
                off = builder.add(builder.mul(builder.add(f0_, ir.Constant(i64, t)), stride0),
                                  builder.mul(q_, size))
                ptr = builder.bitcast(builder.gep(base, [off]), vsrc.as_pointer())
                v = builder.load(ptr, align=1)
                if isinstance(src_ty, types.Float):
                    v = builder.fptrunc(v, vf) if src_ty.bitwidth > 32 else v
                elif src_ty.signed:
                    v = builder.sitofp(v, vf)
                else:
                    v = builder.uitofp(v, vf)
                builder.store(v, slot)
            rows.append(builder.load(slot))
        bad = ir.Constant(i64, 0)
        if isinstance(src_ty, types.Float):
            fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]),
                                                  f"llvm.fabs.v{TILE}f32")
            limit = ir.Constant(vf, [float(_FLOAT32_MAX)] * TILE)
            reduce_or = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(1), [ir.VectorType(ir.IntType(1), TILE)]),
                f"llvm.vector.reduce.or.v{TILE}i1")
            for t in range(TILE):
                notfinite = builder.fcmp_unordered(">", builder.call(fabs, [rows[t]]), limit)
                anybad = builder.zext(builder.call(reduce_or, [notfinite]), i64)
                bad = builder.or_(bad, builder.shl(anybad, ir.Constant(i64, t)))
        cols = _block_transpose(builder, rows)
        xbase = builder.mul(r_, ir.Constant(i64, TILE))
        for i in range(TILE):
            p = builder.gep(xa.data, [builder.add(xbase, ir.Constant(i64, i * TILE))])
            builder.store(cols[i], builder.bitcast(p, vf.as_pointer()), align=4)
        return bad

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _load_block(row, q0, q1, xt, t, base):
    """xt[q - base, t] = row[q] for q0 <= q < q1, as float32; False if any is NaN or inf.

    Compiled without fast-math (which may assume finite values) so the check holds.
    """
    finite = 0
    for q in range(q0, q1):
        v = np.float32(row[q])
        xt[q - base, t] = v
        finite += abs(v) <= _FLOAT32_MAX  # False for NaN and inf
    return finite == q1 - q0


@numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _integrate_tiles(frames, band_pix, band_ptr, chunk_bin, chunk_ptr, chunk_width, chunk_first,
                     indices, weights, empty_chunks, out, bad):
    """out[f] = M @ frames[f] for every frame (M in banded sliced ELLPACK); flags non-finite frames."""
    n, n_pix = frames.shape
    n_bins = out.shape[1]
    xt = np.empty((band_pix, TILE), np.float32)
    blk = np.empty((TILE, CHUNK), out.dtype)
    for f0 in range(0, n, TILE):
        m = min(TILE, n - f0)
        for k in range(len(band_ptr) - 1):
            p0 = k * band_pix
            p1 = min(p0 + band_pix, n_pix)
            # transpose the band, TILE x TILE blocks in registers
            q1 = p0 + (p1 - p0) // TILE * TILE
            for q0 in range(p0, q1, TILE):
                flags = _load_tile(frames, f0, m, q0, xt, q0 - p0)
                if flags:  # rare: zero the non-finite pixels, remember the frame
                    for t in range(m):
                        if (flags >> t) & 1:
                            bad[f0 + t] = True
                            for q in range(q0, q0 + TILE):
                                if not np.isfinite(xt[q - p0, t]):
                                    xt[q - p0, t] = 0.0
            for t in range(TILE):  # the band's last few pixels
                if t >= m:  # a short last tile: pad with zeros
                    for q in range(q1, p1):
                        xt[q - p0, t] = 0.0
                elif not _load_block(frames[f0 + t], q1, p1, xt, t, p0):
                    bad[f0 + t] = True
                    for q in range(q1, p1):
                        if not np.isfinite(xt[q - p0, t]):
                            xt[q - p0, t] = 0.0
            for c in range(band_ptr[k], band_ptr[k + 1]):
                b0 = chunk_bin[c]
                nb = min(CHUNK, n_bins - b0)
                resume = not chunk_first[c]
                if resume:  # the partial sums of an earlier band
                    for t in range(m):
                        for i in range(nb):
                            blk[t, i] = out[f0 + t, b0 + i]
                _chunk_sums(xt, indices, weights, chunk_ptr[c], chunk_width[c], 0, blk, resume)
                if m == TILE and nb == CHUNK:  # constant trip counts: vector stores
                    for t in range(TILE):
                        for i in range(CHUNK):
                            out[f0 + t, b0 + i] = blk[t, i]
                else:
                    for t in range(m):
                        for i in range(nb):
                            out[f0 + t, b0 + i] = blk[t, i]
        for b0 in empty_chunks:  # chunks of bins that no pixel reaches
            for t in range(m):
                for i in range(min(CHUNK, n_bins - b0)):
                    out[f0 + t, b0 + i] = 0.0


def _banded_chunks(matrix, band_pix):
    """The CSR matrix in bands of ``band_pix`` pixels, each in chunks of CHUNK bins (sliced ELLPACK).

    Returns ``band_ptr`` (chunks of band k: ``band_ptr[k]:band_ptr[k+1]``), per chunk its
    first bin, start in the entry arrays, width (entries per bin) and whether it is the
    chunk's first band, the interleaved ``indices`` (counted from the band's first pixel)
    and ``weights`` (padding: weight 0 on the band's first pixel), and the first bins of
    chunks that have no entries at all.
    """
    n_bins, n_pix = matrix.shape
    n_bands = max(1, -(-n_pix // band_pix))
    counts = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(n_bins, dtype=np.int64), counts)
    band = matrix.indices // band_pix
    # entries by (band, bin, pixel): the CSR order is (bin, pixel), so a stable sort on the band
    order = np.argsort(band, kind="stable") if n_bands > 1 else np.arange(matrix.nnz)
    band, rows = band[order].astype(np.int64), rows[order]
    seg_key = band * n_bins + rows
    seg_start = np.flatnonzero(np.r_[True, seg_key[1:] != seg_key[:-1]]) if seg_key.size else \
        np.zeros(0, np.int64)
    seg_len = np.diff(np.r_[seg_start, seg_key.size])
    seg_band, seg_bin = band[seg_start], rows[seg_start]
    rank = np.arange(seg_key.size) - np.repeat(seg_start, seg_len)  # entry's place in its bin
    chunk_key = seg_band * (n_bins // CHUNK + 1) + seg_bin // CHUNK
    c_start = np.flatnonzero(np.r_[True, chunk_key[1:] != chunk_key[:-1]]) if chunk_key.size else \
        np.zeros(0, np.int64)
    width = np.maximum.reduceat(seg_len, c_start) if c_start.size else np.zeros(0, np.int64)
    c_band, c_bin = seg_band[c_start], seg_bin[c_start] // CHUNK * CHUNK
    c_ptr = np.r_[0, np.cumsum(width * CHUNK)]
    seg_chunk = np.repeat(np.arange(c_start.size), np.diff(np.r_[c_start, seg_start.size]))
    pos = (c_ptr[np.repeat(seg_chunk, seg_len)] + rank * CHUNK
           + np.repeat(seg_bin % CHUNK, seg_len))
    # pixel indices from the band's start: uint16 for bands of up to 65,536 pixels (a quarter
    # less matrix to stream than int32 indices)
    itype = np.uint16 if band_pix <= 1 << 16 else np.int32
    indices = np.zeros(c_ptr[-1], itype)  # padding: the band's first pixel, weight 0
    weights = np.zeros(c_ptr[-1], np.float32)
    indices[pos] = matrix.indices[order] - band * band_pix
    weights[pos] = matrix.data[order]
    # a chunk's first band stores, later bands add (chunks are in band order); sorting is
    # cheaper than np.unique's hashing here (0.7 s at 1024^2 -> 1000 x 1440)
    by_bin = np.argsort(c_bin, kind="stable")
    first = np.zeros(c_start.size, np.bool_)
    first[by_bin[np.r_[True, c_bin[by_bin][1:] != c_bin[by_bin][:-1]][:by_bin.size]]] = True
    band_ptr = np.searchsorted(c_band, np.arange(n_bands + 1)).astype(np.int64)
    reached = np.zeros(-(-n_bins // CHUNK), np.bool_)
    reached[c_bin // CHUNK] = True
    empty = (np.flatnonzero(~reached) * CHUNK).astype(np.int64)
    return (band_ptr, c_bin.astype(np.int64), c_ptr[:-1].astype(np.int64), width.astype(np.int64),
            first, indices, weights, empty)


class IntegrationEngine:
    """A built integration matrix, ready to apply to stacks of frames on any device.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        ``(n_bins, n_pixels)`` pixel fractions (float32).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.geometry import PolarGeometry, integration_matrix
    >>> from diffgpu.kernels.integration import IntegrationEngine
    >>> g = PolarGeometry((32, 32), (15.5, 15.5), (1.0, 1.0), npt=8, npt_azim=1,
    ...                   radial_range=(0.0, 16.0), azimuth_range=(-180.0, 180.0))
    >>> eng = IntegrationEngine(integration_matrix(g))
    >>> eng.apply(np.ones((3, 32 * 32), "uint16"), mean=True).round(4)[0]
    array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)
    """

    def __init__(self, matrix):
        self.matrix = matrix.tocsr()
        self.matrix.sort_indices()
        self.n_bins, self.n_pixels = self.matrix.shape
        # bands of pixels whose transposed tile fits BAND_BYTES (the whole frame if it fits)
        band_pix = self.n_pixels
        if self.n_pixels * TILE * 4 > BAND_BYTES:
            n_bands = math.ceil(self.n_pixels * TILE * 4 / BAND_BYTES)
            band_pix = -(-self.n_pixels // n_bands)
        self.band_pixels = max(1, band_pix)
        csr = self.matrix.copy()
        csr.indices = csr.indices.astype(np.int32)
        csr.data = csr.data.astype(np.float32)
        self._bands = (self.band_pixels,) + _banded_chunks(csr, self.band_pixels)
        self.coverage = np.asarray(self.matrix.sum(axis=1), dtype=np.float64).ravel()
        self._mean_bands = None  # the same with each bin's weights divided by its coverage
        self._columns = None  # the matrix as CSC, for frames with non-finite pixels (made once)
        # moved to each GPU once, on first use there
        self._device = DeviceCache((self.matrix, self.coverage), _matrix_to_device)
        self._token = uuid.uuid4().hex

    def __dask_tokenize__(self):
        # one token per engine (it does not change once built): dask would otherwise pickle
        # and hash the matrix and its bands whenever a graph is built (24 ms at 1024^2 ->
        # 500 x 360, a sixth of a lazy call on 136 frames)
        return ("IntegrationEngine", self._token)

    # -- applying ------------------------------------------------------------------
    def apply(self, frames, mean=False, dtype=np.float32, threads=1, out=None):
        """Integrate a stack ``(n, n_pixels)`` of frames; returns ``(n, n_bins)``.

        Parameters
        ----------
        frames : numpy.ndarray or cupy.ndarray
            Any real dtype; integers are integrated without overflow (float
            accumulation). Non-finite pixels count as masked for that frame.
        mean : bool
            Divide each bin by the area of the unmasked pixels it covers (the
            mean intensity per pixel); bins that cover nothing give NaN.
            Otherwise return the sum, which conserves the total intensity.
        dtype : numpy dtype
            ``float32`` (default) or ``float64``.
        threads : int
            Host threads (the kernel releases the GIL); ignored on a GPU.
        out : numpy.ndarray, optional
            C-contiguous ``(n, n_bins)`` array of ``dtype`` to write the result into (host
            frames only), e.g. the part of a lazy computation's result that these frames
            make.
        """
        dtype = np.dtype(dtype)
        if frames.ndim != 2 or frames.shape[1] != self.n_pixels:
            raise ValueError(f"frames must be (n, {self.n_pixels}); got {frames.shape}")
        if is_device_array(frames):
            if out is not None:
                raise TypeError("out= is for host frames; these are on a GPU")
            return self._apply_device(frames, mean, dtype)
        if out is not None and (out.shape != (frames.shape[0], self.n_bins) or out.dtype != dtype
                                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous {(frames.shape[0], self.n_bins)} array "
                             f"of {dtype}; got {out.shape} {out.dtype}")
        return self._apply_host(frames, mean, dtype, threads, out)

    def _apply_host(self, frames, mean, dtype, threads, out=None):
        check_dtype(frames.dtype)
        n = frames.shape[0]
        out = np.empty((n, self.n_bins), dtype) if out is None else out
        bad = np.zeros(n, dtype=np.bool_)
        # big-endian (Merlin), float16, bool or strided frames: the kernel reads a converted
        # copy of CONVERT_BLOCK frames at a time, never of the whole stack
        direct = frames.flags.c_contiguous and not needs_conversion(frames.dtype)

        # means: weights already divided by each bin's coverage, so the kernel writes the
        # result once (dividing afterwards read and wrote every output value again: 144 KB a
        # frame at 100 x 360 bins, more than a 256 x 256 uint16 frame)
        bands = self._mean_weights() if mean else self._bands

        def run(lo, hi):
            if hi <= lo:
                return
            step = hi - lo if direct else CONVERT_BLOCK
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                block = frames[a:b] if direct else np.ascontiguousarray(kernel_ready(frames[a:b]))
                _integrate_tiles(block, *bands, out[a:b], bad[a:b])

        threads = max(1, min(threads, n // TILE))
        if threads == 1:
            run(0, n)
        else:
            # pieces of whole tiles (a short tile only at the end)
            bounds = np.r_[np.linspace(0, n // TILE, 4 * threads + 1).astype(int)[:-1] * TILE, n]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, bounds[:-1], bounds[1:]))
        if mean:
            empty = np.flatnonzero(self.coverage <= 0)
            if empty.size:  # bins that cover no pixel: no mean
                out[:, empty] = np.nan
            rows = np.flatnonzero(bad)
            if rows.size:  # renormalise frames with non-finite pixels by their own coverage
                self._renormalise(frames, rows, out)
        return out

    def _renormalise(self, frames, rows, out):
        """Rescale the means ``out[rows]`` of frames with non-finite pixels to the coverage of
        their finite pixels alone (a bin with none left: NaN).

        Only the bins the non-finite pixels reach change, and frames usually share their
        non-finite pixels (dead pixels flagged NaN in every frame): each pattern's factors are
        worked out once. Integrating every such frame's validity image again took 6 times
        as long as the integral itself, and as much memory as the frames.
        """
        if self._columns is None:
            self._columns = self.matrix.tocsc()
        reached = np.diff(self._columns.indptr) > 0  # pixels with entries (not masked, in range)
        factors = {}
        for a in range(0, rows.size, CONVERT_BLOCK):
            block = rows[a:a + CONVERT_BLOCK]
            lost = ~np.isfinite(frames[block]) & reached
            keys = np.packbits(lost, axis=1)
            for i, row in enumerate(block):
                key = keys[i].tobytes()
                if key not in factors:
                    factors[key] = self._factors(np.flatnonzero(lost[i]))
                bins, factor = factors[key]
                if bins.size:
                    out[row, bins] *= factor.astype(out.dtype)

    def _factors(self, pixels):
        """The bins that ``pixels`` reach, and coverage / coverage without them, for those bins."""
        bins = np.unique(self._columns[:, pixels].indices)
        if not bins.size:
            return bins, np.zeros(0)
        valid = np.ones(self.n_pixels)
        valid[pixels] = 0.0
        cover = self.matrix[bins] @ valid  # sums of the remaining pixels' fractions: 0 if none
        return bins, self.coverage[bins] / np.where(cover > 0, cover, np.nan)

    def _mean_weights(self):
        """``self._bands`` with each bin's weights divided by its coverage (made once)."""
        if self._mean_bands is None:
            bands = list(self._bands)
            chunk_bin, chunk_ptr, chunk_width, weights = bands[2], bands[3], bands[4], bands[7]
            # every entry's bin: a chunk holds CHUNK bins interleaved, `width` entries each
            sizes = chunk_width * CHUNK
            offset = np.arange(weights.size) - np.repeat(chunk_ptr, sizes)
            entry_bin = np.repeat(chunk_bin, sizes) + offset % CHUNK
            cover = self.coverage[np.minimum(entry_bin, self.n_bins - 1)]
            weights = np.where(cover > 0, weights / np.where(cover > 0, cover, 1.0), 0.0)
            weights = weights.astype(np.float32)
            bands[7] = weights
            self._mean_bands = tuple(bands)
        return self._mean_bands

    def _apply_device(self, frames, mean, dtype):
        cp = array_module(frames)
        matrix, coverage = self._device.get(cp)
        check_dtype(frames.dtype)
        if frames.dtype != cp.float32:  # converted on the device: uint16 moves half the bytes
            frames = frames.astype(cp.float32)
        finite = cp.isfinite(frames)
        any_bad = not bool(finite.all())
        if any_bad:
            frames = cp.where(finite, frames, 0)
        out = (matrix @ frames.T).T
        out = cp.ascontiguousarray(out, dtype=dtype)
        if mean:
            if any_bad:
                cover = (matrix @ finite.astype(cp.float32).T).T
            else:
                cover = coverage[None, :]
            out /= cp.where(cover > 0, cover, cp.nan).astype(dtype)
        return out


def _matrix_to_device(cp, host):
    from cupyx.scipy import sparse as cpsparse

    matrix, coverage = host
    return cpsparse.csr_matrix(matrix), cp.asarray(coverage, dtype=cp.float32)
