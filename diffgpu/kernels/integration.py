"""Applying an integration matrix to many frames at once, on the host or on a GPU.

The matrix ``M`` (bins x pixels, see :mod:`diffgpu.geometry`) is applied to a
stack of frames ``(n, pixels)``: ``out = frames @ M.T``.

* **GPU** (CuPy frames): one cuSPARSE product per call, ``M @ frames.T``, with
  the matrix moved to each device once and cached there.
* **Host**: a numba kernel that works on tiles of ``TILE`` frames: it
  transposes the tile into ``(pixels, TILE)`` (so each matrix entry is loaded
  once per tile and updates the tile's frames with one SIMD operation), then
  gathers each bin's few pixels into a register accumulator and writes the
  bin once.  Output is written sequentially and never re-read, which made this
  gather form 2x faster than scattering pixels into bins and about 5x faster
  than ``scipy.sparse`` on a 2-core machine.  Non-finite pixels are zeroed as
  the tile is read, and the frames that had any are reported so the caller can
  renormalise them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..device import DeviceCache, array_module, is_device_array
from .dtypes import CONVERT_BLOCK, check_dtype, kernel_ready, needs_conversion

__all__ = ["IntegrationEngine"]

TILE = 8  # frames per tile: one AVX2 vector of float32 (measured best of 4-32: benchmarks/NOTES.md)


_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)

# Every fast-math flag except "no NaNs" and "no infs": the kernel must still see them.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(nogil=True, cache=True)
def _load_column(row, p0, p1, xt, t):
    """xt[:, t] = row[p0:p1] as float32; False if any value is NaN or inf.

    Compiled without fast-math (which may assume finite values) so the check holds.
    """
    finite = 0
    for p in range(p0, p1):
        v = np.float32(row[p])
        xt[p - p0, t] = v
        finite += abs(v) <= _FLOAT32_MAX  # False for NaN and inf
    return finite == p1 - p0


@numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _gather_tiles(frames, indptr, indices, weights, out, acc, bad):
    """out[f] = M @ frames[f] for every frame, M in CSR (bin-major); flags non-finite frames.

    Frames go TILE at a time, transposed into ``(pixels, TILE)`` so that each
    matrix entry updates the TILE frames with one vector operation; every bin
    is accumulated in registers (``acc``, of the output's dtype) and written
    once, sequentially.
    """
    n, n_pix = frames.shape
    n_bins = out.shape[1]
    xt = np.empty((n_pix, TILE), np.float32)
    for f0 in range(0, n, TILE):
        m = min(TILE, n - f0)
        for t in range(TILE):
            if t >= m:  # a short last tile: pad with zeros
                for p in range(n_pix):
                    xt[p, t] = 0.0
            elif not _load_column(frames[f0 + t], 0, n_pix, xt, t):
                bad[f0 + t] = True  # rare: zero the non-finite pixels, remember the frame
                for p in range(n_pix):
                    if not np.isfinite(xt[p, t]):
                        xt[p, t] = 0.0
        for b in range(n_bins):
            acc[:] = 0.0
            for j in range(indptr[b], indptr[b + 1]):
                p = indices[j]
                w = weights[j]
                for t in range(TILE):
                    acc[t] += w * xt[p, t]
            if m == TILE:  # constant trip count: unrolled
                for t in range(TILE):
                    out[f0 + t, b] = acc[t]
            else:
                for t in range(m):
                    out[f0 + t, b] = acc[t]


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
        self._csr = (self.matrix.indptr, self.matrix.indices.astype(np.int32),
                     self.matrix.data.astype(np.float32))
        self.coverage = np.asarray(self.matrix.sum(axis=1), dtype=np.float64).ravel()
        # moved to each GPU once, on first use there
        self._device = DeviceCache((self.matrix, self.coverage), _matrix_to_device)

    # -- applying ------------------------------------------------------------------
    def apply(self, frames, mean=False, dtype=np.float32, threads=1):
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
        """
        dtype = np.dtype(dtype)
        if frames.ndim != 2 or frames.shape[1] != self.n_pixels:
            raise ValueError(f"frames must be (n, {self.n_pixels}); got {frames.shape}")
        if is_device_array(frames):
            return self._apply_device(frames, mean, dtype)
        return self._apply_host(frames, mean, dtype, threads)

    def _apply_host(self, frames, mean, dtype, threads):
        check_dtype(frames.dtype)
        n = frames.shape[0]
        out = np.empty((n, self.n_bins), dtype)
        bad = np.zeros(n, dtype=np.bool_)
        indptr, indices, weights = self._csr
        # big-endian (Merlin), float16, bool or strided frames: the kernel reads a converted
        # copy of CONVERT_BLOCK frames at a time, never of the whole stack
        direct = frames.flags.c_contiguous and not needs_conversion(frames.dtype)

        def run(lo, hi):
            acc = np.empty(TILE, dtype)
            step = hi - lo if direct else CONVERT_BLOCK
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                block = frames[a:b] if direct else np.ascontiguousarray(kernel_ready(frames[a:b]))
                _gather_tiles(block, indptr, indices, weights, out[a:b], acc, bad[a:b])

        threads = max(1, min(threads, n // TILE))
        if threads == 1:
            run(0, n)
        else:
            bounds = np.linspace(0, n, 4 * threads + 1).astype(int)
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, bounds[:-1], bounds[1:]))
        if mean:
            out /= np.where(self.coverage > 0, self.coverage, np.nan).astype(dtype)
            rows = np.flatnonzero(bad)
            if rows.size:  # renormalise frames with non-finite pixels by their own coverage
                valid = np.isfinite(frames[rows]).astype(np.float32)
                cover = np.empty((rows.size, self.n_bins), np.float32)
                _gather_tiles(valid, indptr, indices, weights, cover, np.empty(TILE, np.float32),
                              np.zeros(rows.size, bool))
                out[rows] *= (self.coverage / np.where(cover > 0, cover, np.nan)).astype(dtype)
        return out

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
