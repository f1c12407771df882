"""Applying a function to every frame of a signal, eagerly or lazily, on host or GPU.

The one place where frame-wise operations meet dask: :func:`map_frames` hands
a kernel stacks of frames ``(n, rows, columns)`` of whatever array type the
signal's blocks are, and builds the lazy graph with an explicit ``dtype`` and
``meta`` (NumPy or CuPy, from the input), so nothing is computed on the host
to find out what a GPU function returns.
"""

from __future__ import annotations

import numpy as np

from .device import _is_dask, array_module, to_host_array
from .kernels.dtypes import check_dtype

__all__ = ["map_frames", "with_new_data"]


def map_frames(data, func, out_shape, dtype, eager_func=None, constants=(), per_frame=()):
    """Apply ``func`` to all frames of ``data`` ``(..., rows, columns)``.

    Parameters
    ----------
    data : numpy, cupy or dask array
        Navigation axes first, the detector's two axes last.
    func : callable
        ``func(frames, *per_frame, *constants) -> out`` with ``frames`` of shape
        ``(n, rows, columns)``, each per-frame input ``(n, m)`` and ``out`` of shape
        ``(n, *out_shape)``, on the frames' device.
    out_shape : tuple of int
        Shape of the result for one frame (``()`` for one number per frame).
    dtype : numpy dtype
        dtype of the result.
    eager_func : callable, optional
        Used instead of ``func`` for in-memory data (e.g. with more threads).
    constants : tuple
        Large constant inputs (integration matrices, detector weights, templates).
        In a lazy graph each becomes one node that every block depends on, so a
        distributed cluster sends it to each worker once, not with every task.
    per_frame : tuple of arrays
        Inputs with one row per frame, shaped ``navigation + (m,)`` (e.g. a shift per
        pattern); each block of frames gets its own rows.

    Returns
    -------
    array of shape ``data.shape[:-2] + out_shape``: lazy for dask input.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.mapping import map_frames
    >>> totals = map_frames(np.ones((2, 3, 4, 4)), lambda f: f.sum(axis=(1, 2)), (), "float64")
    >>> totals.shape, totals[0, 0]
    ((2, 3), np.float64(16.0))
    """
    check_dtype(data.dtype)  # diffraction intensities: bool, integer or real float, any byte order
    out_shape = tuple(int(n) for n in out_shape)
    dtype = np.dtype(dtype)
    nav_shape = data.shape[:-2]
    frame_shape = data.shape[-2:]

    n_rows = len(per_frame)

    def apply(block, *args, f=func):
        rows = [r.reshape(-1, r.shape[-1]) for r in args[:n_rows]]
        out = f(block.reshape((-1,) + frame_shape), *rows, *args[n_rows:])
        return out.reshape(block.shape[:-2] + out_shape)

    if not _is_dask(data):
        return apply(data, *per_frame, *constants, f=eager_func or func)

    import dask
    import dask.array as da

    if len(data.chunks[-1]) > 1 or len(data.chunks[-2]) > 1:
        from .chunking import whole_frame_chunks

        data = whole_frame_chunks(data)  # frames split by a reader: diffgpu's chunks of whole frames
    nav = len(nav_shape)
    aligned = []  # nav + (1, m): their blocks line up with the blocks of frames
    for r in per_frame:
        chunks_r = data.chunks[:nav] + ((r.shape[-1],),)
        r = r.rechunk(chunks_r) if _is_dask(r) else da.from_array(to_host_array(r), chunks=chunks_r)
        aligned.append(r[..., None, :])
    k = len(out_shape)
    # fewer than 2 numbers per frame: blocks keep two trailing axes (padded with 1s), dropped
    # by indexing afterwards. map_blocks(drop_axis=...) would make dask concatenate every
    # input block first, a copy of all the frames (a quarter of the time of virtual imaging
    # from a .mib file)
    pad = (1,) * max(0, 2 - k)
    block_out = out_shape + pad
    meta = array_module(data).empty((0,) * (nav + len(block_out)), dtype=dtype)
    chunks = data.chunks[:nav] + tuple((n,) for n in block_out)
    kwargs = {"new_axis": list(range(nav + 2, nav + k))} if k > 2 else {}
    consts = [dask.delayed(c, pure=True) for c in constants]

    def apply_padded(block, *args):
        out = apply(block, *args)
        return out.reshape(out.shape + pad)

    out = da.map_blocks(apply_padded if pad else apply, data, *aligned, *consts, dtype=dtype,
                        meta=meta, chunks=chunks, **kwargs)
    return out[(Ellipsis,) + (0,) * len(pad)] if pad else out


def with_new_data(signal, data, title, inplace=False):
    """``signal`` with ``data`` (same axes and metadata) and a title saying what was done.

    Returns a new signal, or replaces the data in place and returns None.
    """
    if inplace:
        signal.data = data
        return None
    out = signal._deepcopy_with_new_data(data)
    out.metadata.General.title = f"{title} {signal.metadata.General.title}".strip()
    return out
