"""Frames where a file stores them: operations that read them in place.

A reader that stores frames uncompressed at a fixed stride (Merlin ``.mib``, EMPAD,
DigitalMicrograph) registers its lazy array here with a :class:`StoredFrames` that says
where each frame's words lie and how they are stored (byte order, header words before the
pixels, rows bottom-up). An operation that can work on stored words directly (a weighted
sum, e.g. virtual images and centre of mass) then asks :func:`stored_frames` whether its
input is such an array, untouched, and if so reads each chunk's frames where they lie: the
file's bytes cross the memory bus once, without a decoded copy of the chunk that the
operation reads again (from a ``.mib`` in the page cache, 1.75x the frames per CPU-second
of decode-then-reduce; see ``benchmarks/NOTES.md``).

Regions are mapped (read ahead by the kernel) or, with ``DIFFGPU_READ=direct``, read with
``O_DIRECT`` around the page cache (:func:`read_mode`).

Only the array a reader returned qualifies: any further dask operation (slicing,
rechunking, ``to_device``) gives a new graph name, and the operation takes the ordinary
path on decoded frames.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["StoredFrames", "register", "stored_frames", "block_runs", "tune_allocator", "read_mode"]

# glibc's allocator: requests above this many bytes get memory of their own from the system
# (mmap) and give it back when freed; below it they reuse the process's freed memory. Its
# default threshold adapts up to 32 MiB at most, and frees above 2x the threshold are
# trimmed back to the system. Streaming a file larger than memory, every fresh page the
# outputs and temporaries of a task touch must first be reclaimed from the page cache, in
# the task's own thread: 2D integration from a 30 GB .mib spent 265-354 us of CPU per frame
# with the defaults and 190-220 us with these (benchmarks/NOTES.md)
_MMAP_THRESHOLD = 64 * 2**20
_TRIM_THRESHOLD = 256 * 2**20
_TUNED = []


def tune_allocator():
    """Let this process reuse freed blocks of up to 64 MiB (glibc on Linux; elsewhere a no-op).

    Done once per process by the first block an operation computes (so also on every dask
    worker). At most 256 MiB of freed memory is kept for reuse. Nothing is changed when
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set (the user's own tuning)
    or when ``DIFFGPU_TUNE_MALLOC=0``, except in a dask worker whose nanny set the trim
    threshold to distributed's default (64 KiB, configuration
    ``distributed.nanny.pre-spawn-environ``): that fixes glibc's threshold for fresh memory
    at 128 KiB, and every task's larger temporaries are then new pages from the system
    (template matching ran at half speed on such workers).

    Returns
    -------
    bool
        Whether the thresholds were set (now or earlier in this process).

    Examples
    --------
    >>> from diffgpu.sources import tune_allocator
    >>> tune_allocator() in (True, False)
    True
    """
    if _TUNED:
        return _TUNED[0]
    done = False
    if os.environ.get("DIFFGPU_TUNE_MALLOC", "1") != "0" and not _tuned_by_user():
        import ctypes
        import platform

        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
                done = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and bool(
                    libc.mallopt(m_trim_threshold, _TRIM_THRESHOLD))
            except (OSError, AttributeError):
                done = False
    _TUNED.append(done)
    return done


def _tuned_by_user():
    """Whether glibc's thresholds are set in the environment by someone other than a dask
    nanny with distributed's default setting."""
    names = [n for n in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if n in os.environ]
    if names != ["MALLOC_TRIM_THRESHOLD_"]:
        return bool(names)
    if "distributed" not in sys.modules:
        return True
    import dask
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not in a worker's task
        return True
    nanny = dask.config.get("distributed.nanny.pre-spawn-environ", {}).get("MALLOC_TRIM_THRESHOLD_")
    return nanny is None or str(nanny) != os.environ["MALLOC_TRIM_THRESHOLD_"]


# How stored frames are read (the environment variable DIFFGPU_READ): "mapped" (default: the
# file's pages mapped, read ahead by the kernel, unmapped after each region; page-cache speed
# where the file is cached) or "direct" (O_DIRECT reads into reused buffers, several in
# flight, around the page cache: nothing of the file is cached or reclaimed). From a 30 GB
# .mib on this 2-core VM (benchmarks/NOTES.md): direct reads ran at the disk's rate with
# 35-45% less CPU for virtual images, centre of mass and 1D integration, but mapped passes
# that followed one another were faster where part of the file was still cached.
_READ_MODES = ("mapped", "direct")
_DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: whole logical blocks
_DIRECT: dict = {}  # path -> False where O_DIRECT was refused (then mapped)


def read_mode():
    """The way stored frames are read: ``DIFFGPU_READ`` (``mapped``, the default, or
    ``direct``).

    Examples
    --------
    >>> from diffgpu.sources import read_mode
    >>> read_mode() in ("mapped", "direct")
    True
    """
    mode = os.environ.get("DIFFGPU_READ", "mapped").strip().lower() or "mapped"
    if mode not in _READ_MODES:
        raise ValueError(f"DIFFGPU_READ={mode!r}: use one of {', '.join(_READ_MODES)}")
    return mode


def _reads_direct(path):
    """Whether ``path`` is read with O_DIRECT (see :func:`read_mode`)."""
    return hasattr(os, "O_DIRECT") and read_mode() == "direct" and _DIRECT.get(path, True)


class _DirectReads:
    """O_DIRECT reads into reused aligned buffers, and a few threads to read in the
    background (:meth:`StoredFrames.each_words` reads the next step of a task while the
    task computes on the current one).

    A mapped region is read ahead by the kernel while the task decodes its first frames; a
    direct read is not, and tasks waiting for their own reads left the cores idle (virtual
    images at 16,800 frames/s against 27,700 mapped). Guessing the next region from the
    last one read did not help: dask runs a file's regions in no steady order. Buffers: at
    most ``keep`` free ones are kept, their sizes rounded up to whole MiB so that they fit
    again; a buffer that something still holds a view of is never reused.
    """

    def __init__(self, keep=8, threads=4):
        self.lock = threading.Lock()
        self.free = []
        self.keep, self.threads = keep, threads
        self.pool = None

    def _buffer(self, nbytes):
        with self.lock:
            for k, raw in enumerate(self.free):
                if raw.nbytes >= nbytes + _DIRECT_ALIGN:
                    return self.free.pop(k)
        return np.empty(-(-(nbytes + _DIRECT_ALIGN) // 2**20) * 2**20, np.uint8)

    def release(self, raw):
        """Give a buffer back (kept for reuse unless something still views it)."""
        # references: the caller's name, getrefcount's argument, this frame's name
        if sys.getrefcount(raw) <= 3:
            with self.lock:
                if len(self.free) < self.keep:
                    self.free.append(raw)

    def read(self, path, begin, end):
        """``(raw, words)``: bytes ``begin .. end`` of ``path`` (``words``, a view of the
        buffer ``raw`` to :meth:`release` after use)."""
        first = begin - begin % _DIRECT_ALIGN
        last = -(-end // _DIRECT_ALIGN) * _DIRECT_ALIGN
        raw = self._buffer(last - first)
        at = (-raw.ctypes.data) % _DIRECT_ALIGN
        buf = raw[at:at + last - first]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            view, done = memoryview(buf), 0
            while first + done < end:
                n = os.preadv(fd, [view[done:]], first + done)
                if n <= 0:
                    break
                done += n
            del view
        finally:
            os.close(fd)
        if first + done < end:
            raise OSError(f"short read of {path}: {done:,} of {end - first:,} bytes")
        return raw, buf[begin - first:end - first]

    def submit(self, path, begin, end):
        """:meth:`read` in a background thread: a future of its result."""
        with self.lock:
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="diffgpu-read")
        return self.pool.submit(self.read, path, begin, end)


_DIRECT_READS = _DirectReads()
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's read threads
    os.register_at_fork(after_in_child=_DIRECT_READS.__init__)
_DIRECT_STEP_BYTES = 16 * 2**20  # direct reads per step of a task
_DIRECT_DEPTH = 3  # reads a task keeps in flight (one queue-deep read did not keep the disk busy)


def _drop_read(fut):
    """A read ahead nobody takes (its task stopped early): its buffer back to the pool."""
    if not fut.cancelled() and fut.exception() is None:
        raw, words = fut.result()
        del words
        _DIRECT_READS.release(raw)


_REGISTRY: dict = {}
_MAX_ENTRIES = 256  # names of arrays a reader returned; tiny records, the oldest dropped


@dataclass(frozen=True)
class StoredFrames:
    """Where the frames of a scan lie in a file and how their pixels are stored.

    Frame ``i`` (flat scan order) is the record at byte ``offset + i * stride``; its pixels
    are ``frame_shape`` words of ``word`` dtype (with its byte order) after ``skip`` words
    of header, row by row, the last row first when ``flip_rows``. ``nav_chunks``: the
    scan regions operations read in place (the chunks a user asked the reader for; default
    about :data:`~diffgpu.chunking.STORED_CHUNK_BYTES` of the file each).

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from diffgpu.sources import StoredFrames
    >>> path = os.path.join(tempfile.mkdtemp(), "frames.raw")
    >>> np.arange(2 * 6, dtype=">u2").tofile(path)   # 2 frames: 2 header words + 2 x 2 pixels
    >>> stored = StoredFrames(path, 0, 12, 2, ">u2", (2, 2), (2,), flip_rows=False)
    >>> stored.with_words(1, 1, lambda w: (w.dtype, w.byteswap().tolist()))
    (dtype('uint16'), [[6, 7, 8, 9, 10, 11]])
    """

    path: str
    offset: int
    stride: int
    skip: int
    word: np.dtype
    frame_shape: tuple
    nav_shape: tuple
    flip_rows: bool = False
    file_bytes: int | None = None
    nav_chunks: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "word", np.dtype(self.word))
        object.__setattr__(self, "frame_shape", tuple(int(n) for n in self.frame_shape))
        object.__setattr__(self, "nav_shape", tuple(int(n) for n in self.nav_shape))
        if self.nav_chunks is not None:
            object.__setattr__(self, "nav_chunks", tuple(tuple(int(n) for n in c)
                                                         for c in self.nav_chunks))
        if self.stride % self.word.itemsize or self.offset % self.word.itemsize:
            raise ValueError("frame records must start at whole words")

    @property
    def swapped(self):
        """True when the stored words are in the other byte order than this machine's."""
        return not self.word.isnative and self.word.itemsize > 1

    @property
    def dtype(self):
        """dtype of a decoded frame's pixels: the stored one in this machine's byte order."""
        return self.word.newbyteorder("=")

    @property
    def frame_bytes(self):
        """Bytes of one decoded frame."""
        return int(np.prod(self.frame_shape)) * self.word.itemsize

    def decode(self, words, out=None):
        """Frames ``(n, rows, columns)`` (native byte order, row 0 at the top) from ``n``
        records as :meth:`with_words` gives them; into ``out`` when given."""
        from .kernels.decode import decode_records

        if out is None:
            out = np.empty((words.shape[0],) + self.frame_shape, dtype=self.dtype)
        return decode_records(words, out, self.skip, self.flip_rows, self.swapped)

    def read_step(self, frames, out_bytes=0):
        """Frames per read for a task that reads ``frames`` at a time when mapped and makes
        ``out_bytes`` of results per frame: fewer when the file is read direct and the
        results are small, so that :meth:`each_words` has steps to overlap. (Large results
        stay one step: copying each step's results into the task's block cost more than
        the overlap gained, 2D integration's CPU time +50%.)"""
        if _reads_direct(self.path) and out_bytes * 8 <= self.stride:
            return max(1, min(int(frames), _DIRECT_STEP_BYTES // self.stride))
        return int(frames)

    def _check_span(self, have, start, count):
        from .readers.errors import DetectorFileError

        end = self.offset + (start + count) * self.stride
        if end > have or (self.file_bytes is not None and have != self.file_bytes):
            raise DetectorFileError(self.path, f"changed since it was opened: now {have:,} "
                                               f"bytes, frames {start}-{start + count - 1} "
                                               f"need bytes up to {end:,}")

    def each_words(self, steps, func):
        """``func(words)`` on the records of each ``(start, count)`` of ``steps``, in order
        (a generator; ``words`` as :meth:`with_words` gives them).

        Read direct (:func:`read_mode`), the next step's records are read in a background
        thread while ``func`` runs on the current step's; mapped, the kernel reads each map
        ahead."""
        tune_allocator()  # once per process
        steps = [(int(a), int(n)) for a, n in steps]
        have = os.path.getsize(self.path)
        if not steps or not _reads_direct(self.path):
            for start, count in steps:
                yield self.with_words(start, count, func)
            return
        for start, count in steps:
            self._check_span(have, start, count)
        words_per = self.stride // self.word.itemsize

        def submit(k):
            if k >= len(steps):
                return None
            start, count = steps[k]
            begin = self.offset + start * self.stride
            return _DIRECT_READS.submit(self.path, begin, begin + count * self.stride)

        ahead = [submit(k) for k in range(_DIRECT_DEPTH)]
        try:
            for k, (start, count) in enumerate(steps):
                fut = ahead.pop(0)
                try:
                    raw, buf = fut.result()
                    fut = None  # (it holds the buffer too: released buffers are reused)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    _DIRECT[self.path] = False  # refused by this file system: mapped from now
                    for a, n in steps[k:]:
                        yield self.with_words(a, n, func)
                    return
                ahead.append(submit(k + _DIRECT_DEPTH))
                words = buf.view(self.dtype).reshape(count, words_per)
                del buf
                try:
                    yield func(words)
                finally:
                    del words
                    _DIRECT_READS.release(raw)
                    del raw
        finally:
            for fut in ahead:
                if fut is not None and not fut.cancel():
                    fut.add_done_callback(_drop_read)

    def with_words(self, start, count, func):
        """``func(words)`` on the stored records of frames ``start .. start + count``.

        ``words``: ``(count, stride / itemsize)`` words read as this machine's byte order, a
        read-only map of the file that is unmapped when ``func`` returns (or, if a view of it
        is still referenced, when the last view is freed: ``func`` should return new arrays,
        not views of ``words``)."""
        if _reads_direct(self.path):  # one step of each_words (its reads and fallback)
            steps = self.each_words([(start, count)], func)
            try:
                return next(steps)
            finally:
                steps.close()
        tune_allocator()  # once per process
        size = self.word.itemsize
        begin = self.offset + start * self.stride
        end = begin + count * self.stride
        fd = os.open(self.path, os.O_RDONLY)
        try:
            have = os.fstat(fd).st_size
            self._check_span(have, start, count)
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(fd, end - aligned, offset=aligned, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the map keeps its own reference to the file
        if hasattr(mmap, "MADV_WILLNEED"):
            # the whole region is read ahead in the background while the first frames are
            # decoded: reading and computing overlap where the file is not in the page cache
            try:
                m.madvise(mmap.MADV_WILLNEED)
            except OSError:
                pass
        raw = np.frombuffer(m, dtype=np.uint8)[begin - aligned:]
        words = raw.view(self.dtype).reshape(count, self.stride // size)
        try:
            return func(words)
        finally:
            del raw, words
            try:
                m.close()  # unmapped now: the mapped pages do not accumulate
            except BufferError:
                # a view is still referenced somewhere (a distributed worker's profiler holds
                # running frames, and their arrays, for a moment): the map is unmapped when
                # the last view goes
                pass


def register(array, stored):
    """Record that the dask ``array`` (as a reader returns it) holds the frames ``stored``
    describes; returns ``array``."""
    if len(_REGISTRY) >= _MAX_ENTRIES:
        _REGISTRY.pop(next(iter(_REGISTRY)))
    _REGISTRY[array.name] = stored
    return array


def stored_frames(data):
    """The :class:`StoredFrames` behind ``data`` when it is, untouched, the lazy array a
    reader returned; else None."""
    name = getattr(data, "name", None)
    stored = _REGISTRY.get(name) if isinstance(name, str) else None
    if stored is None or tuple(data.shape) != stored.nav_shape + stored.frame_shape:
        return None
    return stored


def block_runs(location, nav_shape):
    """Runs of frames contiguous in scan order for one block of a scan.

    ``location``: ``(start, stop)`` per navigation axis. Returns a list of
    ``(first flat frame, count)``, merged where one run follows another (whole scan rows).

    Examples
    --------
    >>> from diffgpu.sources import block_runs
    >>> block_runs([(1, 3), (0, 4)], (5, 4)), block_runs([(1, 3), (1, 3)], (5, 4))
    ([(4, 8)], [(5, 2), (9, 2)])
    """
    if len(nav_shape) == 0:
        return [(0, 1)]
    outer = [range(a, b) for a, b in location[:-1]]
    a_last, b_last = location[-1]
    count = b_last - a_last
    runs = []
    for index in np.ndindex(*[len(r) for r in outer]) if outer else [()]:
        pos = tuple(r[i] for r, i in zip(outer, index))
        flat = int(np.ravel_multi_index(pos + (a_last,), nav_shape))
        if runs and runs[-1][0] + runs[-1][1] == flat:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((flat, count))
    return runs
