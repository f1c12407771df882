"""How diffgpu cuts a stack of frames into dask chunks.

Whatever chunks a file reader gives, diffgpu's frame-wise operations work on chunks of
**whole frames** (the detector axes are never split) whose size it chooses itself:

- about :data:`HOST_CHUNK_BYTES` (8 MiB) of stored data per chunk on the host: large
  enough that dask's per-task overhead (~0.1-1 ms) is small next to the work on the chunk
  (64 frames of 256 x 256 uint16 take a few ms), small enough that memory is bounded by
  ``threads x chunk x ~4`` whatever the file's size, and well below glibc's largest
  ``mmap`` threshold (32 MiB): a chunk's array is then reused heap memory, not fresh pages
  from the kernel (decoding 32 MiB chunks of a ``.mib`` file ran at 19,000 frames/s per
  core, 8 MiB chunks at 33,000, CPU time on this 2-core VM, where a first touch of memory
  is expensive);
- about :data:`DEVICE_CHUNK_BYTES` (256 MiB) per chunk for CuPy blocks, since a GPU needs
  many frames per kernel call to be busy;
- about :data:`CLUSTER_CHUNK_BYTES` (30 MiB) when a dask.distributed client is active where
  the chunks are chosen (``diffgpu.start_cluster()`` before ``diffgpu.load``): a distributed
  task costs a millisecond or more of scheduling, so chunks carry more work (and stay below
  glibc's threshold);
- about :data:`STORED_CHUNK_BYTES` (64 MiB) of a file's frames per scan region when a
  frame-wise operation reads frames where an uncompressed file stores them (``.mib``,
  EMPAD, DigitalMicrograph: :func:`diffgpu.mapping.map_stored`): such a task keeps no
  decoded copy of its region, only a map of the file and a few frames decoded at a time,
  so a larger region costs no memory and less per-task set-up (virtual imaging from a
  ``.mib`` in the page cache, 2 threads: 29,000 frames/s with regions of 16 MiB, 53,000
  with 64 MiB); chunks asked of the reader (``diffgpu.load(..., chunks=...)``) are the
  regions instead;
- at least two chunks per worker thread where the data allow it (with at least
  :data:`MIN_CHUNK_BYTES` per chunk), so that small data sets still keep every core busy;
- each chunk a contiguous run of frames in scan order where possible: whole scan rows,
  or a run of frames along one scan row when a row is larger than the target; a reader
  then reads each chunk in one contiguous piece.

:func:`frame_chunks` computes the chunks; :func:`whole_frame_chunks` applies them to an
existing dask array (for example RosettaSciIO's, which can split the frames into tiles).
"""

from __future__ import annotations

import math

import numpy as np

from .readers.errors import ReaderArgumentError

__all__ = ["frame_chunks", "whole_frame_chunks", "chunks_of_frames", "check_chunk_frames",
           "navigation_chunks",
           "HOST_CHUNK_BYTES", "DEVICE_CHUNK_BYTES",
           "CLUSTER_CHUNK_BYTES", "MIN_CHUNK_BYTES", "STORED_CHUNK_BYTES"]

HOST_CHUNK_BYTES = 8 * 2**20
CLUSTER_CHUNK_BYTES = 30 * 2**20
DEVICE_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_BYTES = 4 * 2**20
MIN_CHUNK_FRAMES = 8  # the host integration kernel's tile
MAX_CHUNK_BYTES = 64 * 2**20
STORED_CHUNK_BYTES = 64 * 2**20


def _split(n, parts):
    """``n`` cut into ``parts`` nearly equal pieces (larger ones first), as a tuple."""
    parts = max(1, min(int(parts), n))
    base, extra = divmod(n, parts)
    return tuple(base + 1 if i < extra else base for i in range(parts))


def _distributed_client():
    """The default dask.distributed client here, or None."""
    import sys

    if "distributed" not in sys.modules:  # never imported: no client
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def check_chunk_frames(frames):
    """``frames`` (frames per chunk, as ``chunks=N`` and ``--chunks N`` take it) as an int,
    or a ``ValueError`` naming the problem: it must be a whole number of at least 1.

    Examples
    --------
    >>> from diffgpu.chunking import check_chunk_frames
    >>> check_chunk_frames(12)
    12
    >>> check_chunk_frames(0)
    Traceback (most recent call last):
    ...
    ValueError: chunks must be a positive number of frames per chunk; got 0
    """
    ok = not isinstance(frames, (bool, np.bool_))
    try:
        value = int(frames)
        ok = ok and value == frames
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or value < 1:
        raise ValueError(f"chunks must be a positive number of frames per chunk; got {frames!r}")
    return value


def chunks_of_frames(nav_shape, frame_bytes, frames):
    """Navigation chunks of about ``frames`` frames each: what ``chunks=N`` means for
    diffgpu's readers and ``--chunks N`` for the command line (whole scan rows where they
    fit; at least 8 frames while that stays below 64 MiB, as :func:`frame_chunks`).

    Raises
    ------
    ValueError
        If ``frames`` is not a whole number of at least 1 (:func:`check_chunk_frames`).

    Examples
    --------
    >>> from diffgpu.chunking import chunks_of_frames
    >>> chunks_of_frames((4, 6), 2048, 12)
    ((2, 2), (6,))
    """
    frames = check_chunk_frames(frames)
    return frame_chunks(nav_shape, frame_bytes, workers=1, target_bytes=frames * frame_bytes)


def navigation_chunks(chunks, nav_shape, frame_bytes):
    """Dask chunks of the navigation axes for a reader's ``chunks=`` (the frames stay whole).

    Parameters
    ----------
    chunks : None, "auto", int or tuple
        None or ``"auto"``: :func:`frame_chunks`'s choice; a number: about that many frames
        per chunk (:func:`chunks_of_frames`); a tuple: dask's chunks of the navigation axes,
        or of all axes (the detector's two entries are then ignored).
    nav_shape : tuple of int
        Navigation shape in array order.
    frame_bytes : int
        Bytes of one frame.

    Returns
    -------
    tuple of tuple of int

    Raises
    ------
    ValueError
        If a number is not a positive whole number of frames;
        :class:`~diffgpu.readers.errors.ReaderArgumentError` (a ``ValueError``) if a tuple has
        neither one entry per navigation axis nor one per axis, or is not dask chunks.

    Examples
    --------
    >>> from diffgpu.chunking import navigation_chunks
    >>> navigation_chunks((1, 5), (3, 5), 512)
    ((1, 1, 1), (5,))
    >>> navigation_chunks((2, 5, 16, 16), (3, 5), 512)
    ((2, 1), (5,))
    """
    import dask.array as da

    nav_shape = tuple(int(n) for n in nav_shape)
    if chunks is None or (isinstance(chunks, str) and chunks == "auto"):
        return frame_chunks(nav_shape, frame_bytes)
    if not isinstance(chunks, (tuple, list)):
        return chunks_of_frames(nav_shape, frame_bytes, chunks)
    chunks = tuple(chunks)
    if len(chunks) == len(nav_shape) + 2:
        chunks = chunks[:-2]  # chunks given for all axes: the frames stay whole
    if len(chunks) != len(nav_shape):
        raise ReaderArgumentError(
            f"chunks={chunks!r} has {len(chunks)} entries; the scan {nav_shape} (array order) "
            f"needs one per navigation axis ({len(nav_shape)}), or one per axis "
            f"({len(nav_shape) + 2})")
    for c in chunks:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c < 1 and c != -1:
            raise ReaderArgumentError(f"chunks={chunks!r}: a chunk size must be a positive "
                                      f"number of frames (or -1 for the whole axis); got {c}")
    try:
        return da.core.normalize_chunks(chunks, shape=nav_shape, dtype=np.uint8)
    except (TypeError, ValueError) as err:
        raise ReaderArgumentError(f"chunks={chunks!r} are not dask chunks of the scan "
                                  f"{nav_shape} (array order): {err}") from err


def frame_chunks(nav_shape, frame_bytes, workers=None, device="cpu", target_bytes=None):
    """Chunks of whole frames for a scan ``nav_shape`` of frames of ``frame_bytes`` each.

    Parameters
    ----------
    nav_shape : tuple of int
        Navigation (scan) shape in array order, e.g. ``(rows, columns)``.
    frame_bytes : int
        Bytes of one stored frame (detector rows x columns x itemsize).
    workers : int, optional
        Threads or workers that will process chunks (default: the CPUs this process
        may use).
    device : {"cpu", "gpu"}
        Sets the default ``target_bytes``.
    target_bytes : int, optional
        Bytes per chunk to aim for (default :data:`HOST_CHUNK_BYTES`,
        :data:`CLUSTER_CHUNK_BYTES` with a distributed client, or :data:`DEVICE_CHUNK_BYTES`).

    Returns
    -------
    tuple of tuple of int
        Dask chunks of the navigation axes (add ``((rows,), (columns,))`` for the
        detector axes).

    Examples
    --------
    A 480 x 480 scan of 256 x 256 uint16 frames (128 KiB each): 64 frames per chunk
    (8 MiB), runs of 60 along each scan row.

    >>> from diffgpu.chunking import frame_chunks
    >>> chunks = frame_chunks((480, 480), 256 * 256 * 2, workers=2)
    >>> chunks[0][:3], chunks[1]
    ((1, 1, 1), (60, 60, 60, 60, 60, 60, 60, 60))
    >>> frame_chunks((64, 64), 64 * 64 * 2, workers=2)   # 8 KiB frames: 16 rows a chunk
    ((16, 16, 16, 16), (64,))
    """
    nav_shape = tuple(int(n) for n in nav_shape)
    if not nav_shape:
        return ()
    if workers is None:
        from .device import host_threads

        workers = host_threads()
    if target_bytes is None:
        target_bytes = (DEVICE_CHUNK_BYTES if device == "gpu" else
                        CLUSTER_CHUNK_BYTES if _distributed_client() is not None else HOST_CHUNK_BYTES)
    frame_bytes = max(int(frame_bytes), 1)
    n_frames = math.prod(nav_shape)
    if n_frames == 0:
        return tuple((n,) for n in nav_shape)
    per_chunk = max(1, int(target_bytes) // frame_bytes)
    # enough chunks to keep every worker busy (two each), unless chunks would get tiny
    min_frames = max(1, MIN_CHUNK_BYTES // frame_bytes)
    busy = math.ceil(n_frames / (2 * max(1, int(workers))))
    if n_frames / per_chunk < 2 * workers:
        per_chunk = max(min(per_chunk, busy), min(min_frames, per_chunk))
    # at least one integration tile (8 frames) per chunk while that stays below 64 MiB:
    # 1024 x 1024 float32 chunks of 2 frames left 3/4 of each 8-frame tile empty
    per_chunk = max(per_chunk, min(MIN_CHUNK_FRAMES, MAX_CHUNK_BYTES // frame_bytes))
    per_chunk = min(per_chunk, n_frames)

    # fill axes from the last (fastest in the file) to the first: whole trailing axes
    # while they fit, then a split of the next axis
    chunks = [None] * len(nav_shape)
    inner = 1
    axis = len(nav_shape) - 1
    while axis >= 0 and inner * nav_shape[axis] <= per_chunk:
        chunks[axis] = (nav_shape[axis],)
        inner *= nav_shape[axis]
        axis -= 1
    if axis >= 0:
        size = nav_shape[axis]
        take = max(1, per_chunk // inner)
        chunks[axis] = _split(size, math.ceil(size / take))
        for a in range(axis - 1, -1, -1):
            chunks[a] = (1,) * nav_shape[a]
    return tuple(chunks)


def whole_frame_chunks(data, device=None, workers=None, target_bytes=None):
    """Rechunk a dask array ``(..., rows, columns)`` to diffgpu's chunks of whole frames.

    Returns ``data`` itself when it already has exactly those chunks, so calling it
    twice costs nothing.

    Parameters
    ----------
    data : dask.array.Array
        Navigation axes first, the detector's two axes last.
    device : {"cpu", "gpu"}, optional
        Default: "gpu" when the blocks are CuPy arrays.
    workers, target_bytes
        As in :func:`frame_chunks`.

    Returns
    -------
    dask.array.Array

    Examples
    --------
    >>> import dask.array as da
    >>> from diffgpu.chunking import whole_frame_chunks
    >>> x = da.zeros((8, 8, 256, 256), dtype="uint16", chunks=(8, 8, 128, 128))
    >>> whole_frame_chunks(x, workers=2).chunks[2:]
    ((256,), (256,))
    """
    if device is None:
        meta = getattr(data, "_meta", None)
        device = "gpu" if type(meta).__module__.startswith("cupy") else "cpu"
    frame_bytes = int(np.prod(data.shape[-2:])) * data.dtype.itemsize
    nav = frame_chunks(data.shape[:-2], frame_bytes, workers=workers, device=device,
                       target_bytes=target_bytes)
    chunks = nav + ((data.shape[-2],), (data.shape[-1],))
    if tuple(data.chunks) == chunks:
        return data
    return data.rechunk(chunks)
