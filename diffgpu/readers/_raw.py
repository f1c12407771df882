"""Frames stored one after another at a fixed stride in a file (EMPAD, DigitalMicrograph),
read chunk by chunk for dask."""

from __future__ import annotations

import os

import numpy as np

from ..sources import StoredFrames, block_runs, register
from .errors import DetectorFileError


def _read_region(read, ranges, nav_shape, frame_shape, dtype):
    """The frames of a box of the scan (``ranges``: ``(start, stop, step)`` per navigation axis,
    steps of 1) through ``read(first, last + 1)`` of flat frame indices, and the box's shape.
    Where the box is one run of frames in scan order (whole rows, or part of one row: how
    diffgpu chunks a scan) the frames read are returned as they are; otherwise the box's
    runs are picked out of the span read."""
    shape = tuple(b - a for a, b, _ in ranges)
    if 0 in shape:
        return np.empty((0,) + tuple(frame_shape), dtype), shape
    runs = block_runs([(a, b) for a, b, _ in ranges], nav_shape)
    first, last = runs[0][0], runs[-1][0] + runs[-1][1]
    frames = read(first, last)
    if len(runs) == 1:  # one run: no copy
        return frames, shape
    return np.concatenate([frames[start - first:start - first + n] for start, n in runs]), shape


class RawFrames:
    """Array-like view ``nav_shape + frame_shape`` of frames in a file, for ``da.from_array``.

    Frame ``i`` (in scan order) starts at byte ``offset + i * stride``; its first
    ``frame_shape`` pixels of ``dtype`` are the frame (a longer stride skips per-frame
    metadata after the pixels, as EMPAD writes). Holds only the file name, so it pickles to
    cluster workers; every read opens the file and reads one contiguous run of frames.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from diffgpu.readers._raw import RawFrames
    >>> path = os.path.join(tempfile.mkdtemp(), "frames.raw")
    >>> np.arange(2 * 3 * 5 * 4, dtype="<u2").tofile(path)   # 6 frames of 5 x 4, last row extra
    >>> frames = RawFrames(path, 0, (2, 3), (4, 4), "<u2", stride=5 * 4 * 2)
    >>> frames[1:2, 0:2].shape, int(frames[1:2, 0:2][0, 1, 0, 0])
    ((1, 2, 4, 4), 80)
    """

    def __init__(self, path, offset, nav_shape, frame_shape, dtype, stride=None):
        # absolute: a relative name would read whatever file has it in the working
        # directory of each read (another scan after os.chdir)
        self.path = os.path.abspath(os.fspath(path))
        self.offset = int(offset)
        self.nav_shape = tuple(int(n) for n in nav_shape)
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.dtype = np.dtype(dtype)
        self.frame_bytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        self.stride = self.frame_bytes if stride is None else int(stride)
        self.shape = self.nav_shape + self.frame_shape
        self.ndim = len(self.shape)

    def read(self, start, stop):
        """Frames ``start:stop`` (flat scan index)."""
        n = stop - start
        want = n * self.stride - (self.stride - self.frame_bytes)  # no metadata after the last
        buf = np.empty(n * self.stride, np.uint8)  # writable, read into without a copy
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.stride)
            got = f.readinto(memoryview(buf)[:want])
        if got < want:
            raise DetectorFileError(self.path, f"the file ended before frame {stop - 1} "
                                               "(truncated after it was opened?)")
        if self.stride == self.frame_bytes:
            out = buf.view(self.dtype)
        else:  # drop each frame's trailing metadata
            out = buf.reshape(n, self.stride)[:, :self.frame_bytes].copy().view(self.dtype)
        return out.reshape((n,) + self.frame_shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        nav = len(self.nav_shape)
        nav_key = key[:nav]
        rest = (Ellipsis,) + key[nav:]
        if len(nav_key) < nav or not all(isinstance(k, slice) for k in nav_key):
            return self.read(0, int(np.prod(self.nav_shape))).reshape(self.shape)[key]
        ranges = [k.indices(n) for k, n in zip(nav_key, self.nav_shape)]
        if any(step != 1 for _, _, step in ranges):
            return self[tuple(slice(None) for _ in ranges)][key]
        frames, shape = _read_region(self.read, ranges, self.nav_shape, self.frame_shape,
                                     self.dtype)
        return frames.reshape(shape + self.frame_shape)[rest]


def lazy_raw(frames, name, chunks=None):
    """A dask array of ``frames`` (a :class:`RawFrames`) in chunks of whole frames.

    ``chunks``: frames per chunk along the scan (an int) or navigation chunks; default
    :func:`diffgpu.chunking.frame_chunks`.
    """
    import dask.array as da
    from dask.base import tokenize

    from ..chunking import navigation_chunks

    nav_chunks = navigation_chunks(chunks, frames.nav_shape, frames.frame_bytes)
    stat = os.stat(frames.path)
    token = tokenize(frames.path, stat.st_mtime_ns, stat.st_size, frames.offset, frames.shape,
                     frames.stride, str(frames.dtype), nav_chunks)
    data = da.from_array(frames, chunks=tuple(nav_chunks) + frames.frame_shape, asarray=False,
                         lock=False, fancy=False, meta=np.empty((0,) * frames.ndim, frames.dtype),
                         name=f"{name}-{token}")
    if frames.stride % frames.dtype.itemsize or frames.offset % frames.dtype.itemsize:
        return data  # records not at whole words: operations decode chunks as usual
    # frame-wise operations read the stored words in place, in the chunks asked for if any
    auto = chunks is None or (isinstance(chunks, str) and chunks == "auto")
    asked = None if auto else nav_chunks
    return register(data, StoredFrames(frames.path, frames.offset, frames.stride,
                                       0, frames.dtype, frames.frame_shape, frames.nav_shape,
                                       nav_chunks=asked))
