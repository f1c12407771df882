"""Applying an integration matrix to many frames at once, on the host or on a GPU.

The matrix ``M`` (bins x pixels, see :mod:`diffgpu.geometry`) is applied to a
stack of frames ``(n, pixels)``: ``out = frames @ M.T``.

* **GPU** (CuPy frames): one cuSPARSE product per call, ``M @ frames.T``, with
  the matrix moved to each device once and cached there.
* **Host**: a numba kernel that works on tiles of ``TILE`` frames: it
  transposes the tile into ``(pixels, TILE)`` (so each matrix entry is loaded
  once per tile and the tile's frames are updated with one SIMD operation),
  scatters every pixel into its few bins, and writes the tile back.  Both the
  tile and its output stay in cache; on a 2-core machine this runs 3-4x faster
  than ``scipy.sparse`` on transposed frames.  Non-finite pixels are zeroed as
  the tile is read, and the frames that had any are reported so the caller can
  renormalise them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..device import array_module, is_device_array

__all__ = ["IntegrationEngine"]

TILE = 8  # frames per tile: one AVX2 vector of float32 (measured: benchmarks/NOTES.md)
PIXEL_BLOCK = 1024  # pixels transposed at a time: (1024, 8) float32 is 32 KiB, in L1


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
def _scatter_tiles(frames, indptr, indices, weights, out, bad):
    """out[f] = M @ frames[f] for all f, M given as CSC (pixel-major); flags non-finite frames.

    Frames go TILE at a time; their pixels PIXEL_BLOCK at a time are transposed
    into a small ``(PIXEL_BLOCK, TILE)`` buffer that stays in L1, so each matrix
    entry updates TILE frames with one vector operation.
    """
    n, n_pix = frames.shape
    n_bins = out.shape[1]
    xt = np.empty((PIXEL_BLOCK, TILE), np.float32)
    ot = np.empty((n_bins, TILE), np.float32)
    for f0 in range(0, n, TILE):
        m = min(TILE, n - f0)
        ot[:] = 0.0
        for p0 in range(0, n_pix, PIXEL_BLOCK):
            p1 = min(n_pix, p0 + PIXEL_BLOCK)
            for t in range(TILE):
                if t >= m:  # a short last tile: pad with zeros
                    for p in range(p0, p1):
                        xt[p - p0, t] = 0.0
                    continue
                if not _load_column(frames[f0 + t], p0, p1, xt, t):
                    # rare: zero the non-finite pixels, remember the frame
                    bad[f0 + t] = True
                    for p in range(p1 - p0):
                        if not np.isfinite(xt[p, t]):
                            xt[p, t] = 0.0
            for p in range(p0, p1):
                for j in range(indptr[p], indptr[p + 1]):
                    b = indices[j]
                    w = weights[j]
                    for t in range(TILE):
                        ot[b, t] += w * xt[p - p0, t]
        for t in range(m):
            for b in range(n_bins):
                out[f0 + t, b] = ot[b, t]


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
        self.n_bins, self.n_pixels = self.matrix.shape
        csc = self.matrix.tocsc()
        csc.sort_indices()
        self._csc = (csc.indptr.astype(np.int64), csc.indices.astype(np.int32),
                     csc.data.astype(np.float32))
        self.coverage = np.asarray(self.matrix.sum(axis=1), dtype=np.float64).ravel()
        self._device_copies = {}
        self._lock = threading.Lock()

    # -- device copies -------------------------------------------------------------
    def _on_device(self, cp):
        """The matrix and coverage on the current CUDA device (moved once, then cached)."""
        key = cp.cuda.runtime.getDevice()
        with self._lock:
            if key not in self._device_copies:
                from cupyx.scipy import sparse as cpsparse

                self._device_copies[key] = (cpsparse.csr_matrix(self.matrix),
                                            cp.asarray(self.coverage, dtype=cp.float32))
            return self._device_copies[key]

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
        if frames.dtype == np.bool_ or frames.dtype.kind not in "uif":
            frames = frames.astype(np.float32)
        frames = np.ascontiguousarray(frames)
        n = frames.shape[0]
        out = np.empty((n, self.n_bins), np.float32)
        bad = np.zeros(n, dtype=np.bool_)
        indptr, indices, weights = self._csc

        def run(lo, hi):
            _scatter_tiles(frames[lo:hi], indptr, indices, weights, out[lo:hi], bad[lo:hi])

        threads = max(1, min(threads, n // TILE))
        if threads == 1:
            run(0, n)
        else:
            bounds = np.linspace(0, n, 4 * threads + 1).astype(int)
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, bounds[:-1], bounds[1:]))
        out = out.astype(dtype, copy=False)
        if mean:
            out /= np.where(self.coverage > 0, self.coverage, np.nan).astype(dtype)
            rows = np.flatnonzero(bad)
            if rows.size:  # renormalise frames with non-finite pixels by their own coverage
                valid = np.isfinite(frames[rows]).astype(np.float32)
                cover = np.empty((rows.size, self.n_bins), np.float32)
                _scatter_tiles(valid, indptr, indices, weights, cover, np.zeros(rows.size, bool))
                out[rows] *= (self.coverage / np.where(cover > 0, cover, np.nan)).astype(dtype)
        return out

    def _apply_device(self, frames, mean, dtype):
        cp = array_module(frames)
        matrix, coverage = self._on_device(cp)
        if frames.dtype.kind != "f":
            frames = frames.astype(cp.float32)  # convert on the device: uint16 moves half the bytes
        elif frames.dtype != cp.float32:
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


def default_threads():
    """Host threads for eager integration: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
