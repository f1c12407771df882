"""Applying a function to every frame of a signal, eagerly or lazily, on host or GPU.

The one place where frame-wise operations meet dask: :func:`map_frames` hands
a kernel stacks of frames ``(n, rows, columns)`` of whatever array type the
signal's blocks are, and builds the lazy graph with an explicit ``dtype`` and
``meta`` (NumPy or CuPy, from the input), so nothing is computed on the host
to find out what a GPU function returns.
"""

from __future__ import annotations

import copyreg
import math
import os
import threading
import uuid
import weakref
from functools import partial

import numpy as np

from .chunking import MIN_CHUNK_FRAMES, _distributed_client, _split
from .device import _is_dask, array_module, to_host_array
from .kernels.dtypes import check_dtype
from .sources import block_runs, stored_frames, tune_allocator

__all__ = ["compute_into", "compute_shared", "graph_constant", "map_frames", "map_stored",
           "map_weighted_sums", "with_new_data"]

# constant -> {client id: its node persisted on that client's cluster}; an entry (and the
# cluster's copy) goes when the constant does
_ON_WORKERS = weakref.WeakKeyDictionary()


def _computing_client():
    """The distributed client that ``compute()`` would use now, or None (threads, processes,
    an asynchronous client, or distributed not imported)."""
    import dask

    client = _distributed_client()
    if client is None or client.asynchronous or \
            getattr(dask.base.get_scheduler(), "__self__", None) is not client:
        return None
    _h5py_datasets_by_reference()
    return client


def _h5py_datasets_by_reference():
    """Let (cloud)pickle send an h5py dataset as its file's name and its path in the file, as
    distributed's own serialiser does. A graph with any function pickle cannot send by
    reference (diffgpu's operations, or the copy of a result's blocks into shared memory) is
    pickled whole with cloudpickle, which otherwise refused the datasets of a lazily loaded
    ``.hspy`` file: no operation on one could run on a cluster."""
    import sys

    h5py = sys.modules.get("h5py")
    if h5py is None or h5py.Dataset in copyreg.dispatch_table:
        return
    copyreg.pickle(h5py.Dataset, _reduce_h5py_dataset)


def _reduce_h5py_dataset(dataset):
    return _open_h5py_dataset, (dataset.file.filename, dataset.name)


def _open_h5py_dataset(filename, name):
    """The dataset ``name`` of the HDF5 file ``filename``, opened for reading."""
    import h5py

    return h5py.File(filename, "r")[name]


def graph_constant(value):
    """``value`` as one node of a lazy graph, for every block to depend on.

    With a distributed client in use, the node is also computed on the cluster once per
    constant and client (``client.persist``) and kept there while ``value`` lives: the
    scheduler finds its key in memory when a graph with the same constant (templates,
    integration matrix, detector weights) arrives, and workers fetch it from each other.
    What a worker derives from a :class:`~diffgpu.device.DeviceCache` (its device copies,
    the templates' search layout) is kept for the copies that reach it later. The node
    keeps the value itself, so the graph can be computed by any scheduler (the threaded
    one, or after the client is closed), and the scheduler can make it again if the workers
    holding it are lost.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.mapping import graph_constant
    >>> graph_constant(np.ones(3)).compute()
    array([1., 1., 1.])
    """
    import dask

    node = dask.delayed(value, pure=True)
    client = _computing_client()
    if client is None:
        return node
    try:
        held = _ON_WORKERS.setdefault(value, {})
    except TypeError:  # not weak-referenceable (a tuple, an int): in the graph
        return node
    kept = held.get(client.id)
    if kept is None or kept.dask[kept.key].status in ("cancelled", "lost", "error"):
        # (copies persisted through clients closed since are dropped: each kept its client)
        for cid in [c for c, f in held.items() if getattr(f.dask[f.key].client, "status", "") == "closed"]:
            del held[cid]
        held[client.id] = client.persist(node)
    # the node itself, not the future: any scheduler can compute the graph (the threaded one,
    # or after the client is closed); the cluster finds its key already in memory
    return node


def _tiny_chunks(data):
    """Whether a dask array of frames has many chunks of much less than diffgpu's smallest
    (a quarter of :data:`~diffgpu.chunking.MIN_CHUNK_BYTES` on average)."""
    from .chunking import MIN_CHUNK_BYTES

    n = data.npartitions
    return n > 16 and data.nbytes / n < MIN_CHUNK_BYTES / 4


def map_frames(data, func, out_shape, dtype, eager_func=None, constants=(), per_frame=(),
               into=None):
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
        In a lazy graph each becomes one node that every block depends on
        (:func:`graph_constant`): with a distributed client, a copy each worker keeps
        for later graphs too.
    per_frame : tuple of arrays
        Inputs with one row per frame, shaped ``navigation + (m,)`` (e.g. a shift per
        pattern); each block of frames gets its own rows.
    into : callable, optional
        ``into(frames, *per_frame, *constants, out=out)``: ``func`` writing into ``out``
        (``(n, *out_shape)``, C-contiguous). With it, a lazy result of host blocks can be
        computed straight into one array (:func:`compute_into`), without each block's
        result being copied into it afterwards.

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
        tune_allocator()  # once per process (e.g. each dask worker)
        rows = [r.reshape(-1, r.shape[-1]) for r in args[:n_rows]]
        out = f(block.reshape((-1,) + frame_shape), *rows, *args[n_rows:])
        return out.reshape(block.shape[:-2] + out_shape)

    if not _is_dask(data):
        return apply(data, *per_frame, *constants, f=eager_func or func)

    import dask.array as da

    stored = stored_frames(data) if not per_frame else None
    if stored is not None:
        # a reader's frames, untouched: each task decodes a few frames at a time where the
        # file stores them and applies func while they are in cache
        return map_stored(stored, partial(_decoded, func=func, into=into, out_shape=out_shape,
                                          dtype=dtype), out_shape, dtype, constants)
    if len(data.chunks[-1]) > 1 or len(data.chunks[-2]) > 1 or _tiny_chunks(data):
        from .chunking import whole_frame_chunks

        # frames split by a reader, or a frame or a few per chunk (dask's per-task cost, ~0.1-1
        # ms, then outweighs the work: 64 x 64 frames of 64 x 64, one a chunk, integrated 200
        # times slower than in memory): diffgpu's chunks of whole frames
        data = whole_frame_chunks(data)
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
    consts = [graph_constant(c) for c in constants]

    def apply_padded(block, *args):
        out = apply(block, *args)
        return out.reshape(out.shape + pad)

    out = da.map_blocks(apply_padded if pad else apply, data, *aligned, *consts, dtype=dtype,
                        meta=meta, chunks=chunks, **kwargs)
    if into is not None and not pad and array_module(data) is np:
        if len(_INTO) >= 64:
            _INTO.pop(next(iter(_INTO)))
        _INTO[out.name] = (data, aligned, consts, into, out_shape, n_rows)
    return out[(Ellipsis,) + (0,) * len(pad)] if pad else out


# names of map_frames results that can be computed straight into an array -> how
_INTO: dict = {}


def compute_into(result, target, show_progressbar=None, **kwargs):
    """Compute the lazy ``result`` into the array ``target``, each task writing its part.

    For a :func:`map_frames` result made with ``into=``, each task computes its frames'
    results straight into its part of ``target``; for any other graph each task copies its
    block there. Unlike ``dask.array.store``, the target is not hashed into the graph's
    name (a 210 MB result cost tens of milliseconds to hash at every compute).

    Parameters
    ----------
    result : dask array
        Host (NumPy) blocks.
    target : numpy.ndarray or SharedResult
        Of ``result``'s shape and dtype (a :class:`SharedResult` for workers in other
        processes on this machine).
    show_progressbar : bool, optional
        A progress bar (HyperSpy's preference by default).
    **kwargs
        For ``dask.compute`` (``scheduler``, ``num_workers``, ...).

    Returns
    -------
    bool
        Whether the operation wrote its results in place (else each block was copied).

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> from diffgpu.mapping import compute_into, map_frames
    >>> def doubled(f, out):
    ...     np.multiply(f, 2, out=out)
    >>> lazy = map_frames(da.ones((4, 3, 5, 6), chunks=(2, 3, 5, 6)),
    ...                   lambda f: f * 2, (5, 6), "float64", into=doubled)
    >>> target = np.empty(lazy.shape)
    >>> compute_into(lazy, target, show_progressbar=False), float(target.sum())
    (True, 720.0)
    >>> compute_into(lazy + 1, target, show_progressbar=False), float(target.sum())
    (False, 1080.0)
    """
    import dask.array as da
    from hyperspy.misc import dask_utils

    if target.shape != result.shape or target.dtype != result.dtype:
        raise ValueError(f"target must be {result.shape} {result.dtype}; got "
                         f"{target.shape} {target.dtype}")
    shared = isinstance(target, SharedResult)  # written by other processes on this machine
    recipe = _INTO.get(getattr(result, "name", None))
    name = f"into-{result.name}-{uuid.uuid4().hex}"  # not tokenized: that would hash the target

    def run(write, first, *args):
        """Compute ``write`` on the blocks of ``first`` (and ``args``): one byte per block."""
        done = da.map_blocks(write, first, *args, dtype=np.int8,
                             meta=np.empty((0,) * first.ndim, np.int8),
                             chunks=tuple((1,) * len(c) for c in first.chunks), name=name)
        dask_utils._compute(done, show_progressbar=show_progressbar, **kwargs)

    if recipe is None:
        run(partial(_put_block, target), result)
        return False

    data, aligned, consts, into, out_shape, n_rows = recipe
    nav = data.ndim - 2
    frame_shape = data.shape[-2:]

    def write(block, *args, block_info=None):
        tune_allocator()
        where = tuple(slice(a, b) for a, b in block_info[0]["array-location"][:nav])
        n = int(np.prod(block.shape[:-2]))
        rows = [r.reshape(-1, r.shape[-1]) for r in args[:n_rows]]
        frames = block.reshape((n,) + frame_shape)
        if shared:  # into this thread's warm buffer, then copied into the shared file
            out = _scratch((n,) + out_shape, target.dtype)
            into(frames, *rows, *args[n_rows:], out=out)
            target.put(where, out.reshape(block.shape[:-2] + out_shape))
            return np.zeros((1,) * block.ndim, np.int8)
        part = target[where]
        if part.flags.c_contiguous:  # a run of whole scan rows: written in place
            into(frames, *rows, *args[n_rows:], out=part.reshape((n,) + out_shape))
        else:
            out = np.empty((n,) + out_shape, target.dtype)
            into(frames, *rows, *args[n_rows:], out=out)
            part[...] = out.reshape(part.shape)
        return np.zeros((1,) * block.ndim, np.int8)

    run(write, data, *aligned, *consts)
    return True


# results at least this large are written by a cluster's local workers into shared memory
MIN_SHARED_BYTES = 8 * 2**20
# a block's region written by more separate runs than this goes through a mapping instead
MAX_RUNS = 4096
# per-thread buffers kept for the next block up to this size (larger ones are freed)
MAX_SCRATCH_BYTES = 64 * 2**20


class SharedResult:
    """An array in anonymous shared memory (``memfd_create``) that processes on this machine
    open through ``/proc/<pid>/fd/<n>`` and write in place; pickled, it is that path, the
    shape and the dtype.

    Distributed workers on the client's machine write their blocks of a result here, so the
    blocks do not travel to the client through the network layer (every byte serialised,
    sent, received and joined once more). The memory has no name in any file system: it goes
    when the last descriptor and mapping of it do, also if the client process is killed; only
    processes of the same user and machine (and process namespace) can open it.
    """

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        fd = os.memfd_create("diffgpu-result", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.nbytes)  # sparse: pages come as they are written
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.identity = fd, (st.st_dev, st.st_ino)
        self.path = f"/proc/{os.getpid()}/fd/{fd}"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def put(self, where, block):
        """Write ``block`` into the region ``where`` (slices of the leading axes): one
        ``pwrite`` per contiguous run of the region, or through a mapping where the runs
        would be very many."""
        where = tuple(where) + (slice(None),) * (len(self.shape) - len(where))
        ranges = [sl.indices(n)[:2] for sl, n in zip(where, self.shape)]
        region = tuple(max(0, b - a) for a, b in ranges)
        block = np.asarray(block)
        if block.shape != region:  # (a graph whose blocks are not the chunks it declared)
            raise ValueError(f"a block of shape {block.shape} does not fit its place in the "
                             f"result, {region}: the graph's chunks are not those of its blocks")
        if 0 in region:
            return
        block = np.ascontiguousarray(block, self.dtype)
        # axes from `k` on are whole: each index of the axes before it starts one run
        k = len(self.shape)
        while k > 0 and ranges[k - 1] == (0, self.shape[k - 1]):
            k -= 1
        k = max(k - 1, 0)  # the last partial axis is part of each run
        lead = region[:k]
        n_runs = int(np.prod(lead)) if lead else 1
        if n_runs > MAX_RUNS:
            mapped = np.memmap(self.path, self.dtype, "r+", shape=self.shape)
            mapped[where] = block
            del mapped
            return
        # a copy by the kernel into the memory's pages: about twice as fast here as stores
        # through a mapping, which fault each 4 KiB page in
        fd = os.open(self.path, os.O_WRONLY)
        try:
            runs = block.reshape((n_runs,) + block.shape[k:])
            for i, index in enumerate(np.ndindex(*lead) if lead else [()]):
                start = [a + j for (a, _), j in zip(ranges, index)] + [a for a, _ in ranges[k:]]
                view = memoryview(runs[i]).cast("B")
                offset = int(np.ravel_multi_index(start, self.shape)) * self.dtype.itemsize
                while view.nbytes:
                    done = os.pwrite(fd, view, offset)
                    view, offset = view[done:], offset + done
        finally:
            os.close(fd)

    def seen_by_workers(self, client):
        """Whether every worker of ``client`` opens this very memory for writing (same
        machine, user and process namespace)."""
        try:
            seen = client.run(_opens_same, self.path, self.identity)
        except Exception:  # a worker gone or failing: the network layer it is
            return False
        return bool(seen) and all(seen.values())

    def claim(self):
        """The array as this process's own, mapped (shared: a child forked later and writing
        to it writes to this array too); the descriptor goes, the memory stays with the
        mapping and is freed with the array."""
        import mmap

        buf = mmap.mmap(self._fd, self.nbytes) if self.nbytes else bytearray()
        self.close()
        return np.frombuffer(buf, self.dtype).reshape(self.shape)

    def close(self):
        """Close this process's descriptor (idempotent); a claimed array keeps its memory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _opens_same(path, identity):
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # another machine, user or process namespace
        return False
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino) == tuple(identity)


def _put_block(target, block, block_info=None):
    """Copy ``block`` into its place in ``target`` (an array or :class:`SharedResult`);
    module-level (pickled by reference) so that graphs holding objects only distributed's own
    serialisers know, such as h5py datasets, can still be sent."""
    where = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    if isinstance(target, SharedResult):
        target.put(where, block)
    else:
        target[where] = block
    return np.zeros((1,) * block.ndim, np.int8)


_SCRATCH = threading.local()


def _scratch(shape, dtype):
    """This thread's reusable buffer of ``shape`` and ``dtype`` (its pages already touched
    after the first use; kept for the next block up to ``MAX_SCRATCH_BYTES``)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes > MAX_SCRATCH_BYTES:
        return np.empty(shape, dtype)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _SCRATCH.buf = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _available_memory():
    """Bytes of memory available to new allocations (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def compute_shared(result, show_progressbar=None, **kwargs):
    """Compute ``result`` on the current distributed client into shared memory, when its
    workers run on this machine: the array, or None where that cannot be done (no client,
    workers elsewhere or of another user, a small result or one of unknown shape, device
    blocks, too little memory, no ``memfd_create``).

    Each worker writes its blocks straight into the result (:func:`compute_into` on a
    :class:`SharedResult`) instead of sending them to the client: 2D integration to 256 x
    720 bins on a 2-worker ``LocalCluster``, see ``benchmarks/NOTES.md``.

    Examples
    --------
    >>> import dask.array as da
    >>> from diffgpu.mapping import compute_shared
    >>> compute_shared(da.ones((4, 4), chunks=2)) is None  # no distributed client in use
    True
    """
    import dask.array as da

    client = _computing_client()
    if (client is None or not isinstance(result, da.Array) or type(result._meta) is not np.ndarray
            or not hasattr(os, "memfd_create") or any(math.isnan(n) for n in result.shape)
            or result.npartitions < 2 or result.nbytes < MIN_SHARED_BYTES):
        return None
    free = _available_memory()
    if free is None or free < 1.1 * result.nbytes + 256 * 2**20:
        return None
    target = SharedResult(result.shape, result.dtype)
    try:
        if not target.seen_by_workers(client):
            return None
        compute_into(result, target, show_progressbar=show_progressbar, **kwargs)
        return target.claim()
    finally:
        target.close()


def map_stored(stored, func, out_shape, dtype, constants=()):
    """:func:`map_frames` on frames read where a file stores them, lazily.

    Each block of the result maps its frames' records and applies ``func`` to the stored
    words: one pass over the file's bytes, no decoded copy of the frames.

    Parameters
    ----------
    stored : diffgpu.sources.StoredFrames
        The frames' layout (from :func:`diffgpu.sources.stored_frames`).
    func : callable
        ``func(words, stored, *constants) -> out`` of shape ``(n, *out_shape)``, with
        ``words`` as :meth:`~diffgpu.sources.StoredFrames.with_words` gives them (it must
        return new arrays, not views of ``words``).
    out_shape, dtype, constants
        As for :func:`map_frames`.

    Returns
    -------
    dask array of shape ``stored.nav_shape + out_shape`` (NumPy blocks): one chunk per
    region of about :data:`diffgpu.chunking.STORED_CHUNK_BYTES` of stored frames, or
    several when the results of a region would exceed :data:`OUT_BYTES` (e.g. polar
    patterns), so memory stays bounded.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from diffgpu.sources import StoredFrames
    >>> from diffgpu.mapping import map_stored
    >>> path = os.path.join(tempfile.mkdtemp(), "frames.raw")
    >>> np.arange(3 * 4, dtype="<u2").tofile(path)           # 3 frames of 2 x 2
    >>> stored = StoredFrames(path, 0, 8, 0, "<u2", (2, 2), (3,))
    >>> map_stored(stored, lambda w, st: w.sum(axis=1), (), "int64").compute()
    array([ 6, 22, 38])
    """
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    out_shape = tuple(int(n) for n in out_shape)
    dtype = np.dtype(dtype)
    nav = len(stored.nav_shape)
    regions, nav_chunks = stored_regions(stored)
    consts = [graph_constant(c) for c in constants]
    token = dask.base.tokenize(stored, func, constants, out_shape, dtype)
    name = f"stored-{_func_name(func)}-{token}"
    step = max(1, MAP_BYTES // stored.stride)
    const_keys = [c.key for c in consts]
    tail = (0,) * len(out_shape)
    # results larger than the frames' records (polar patterns, shifted frames): each region
    # in several tasks, all hanging off the region's root
    out_bytes = int(np.prod(out_shape)) * dtype.itemsize
    largest = max(int(np.prod([max(c) for c in nav_chunks])), 1) if nav else 1
    pieces, parent = _split_regions(nav_chunks, -(-largest * out_bytes // OUT_BYTES))
    bounds = [np.cumsum((0,) + tuple(c)) for c in pieces]
    # one layer: the regions' root tasks, the constants and this operation's tasks
    layer = _region_tasks(regions, nav_chunks)
    for c in consts:
        layer.update(c.__dask_graph__())
    for index in np.ndindex(*[len(c) for c in pieces]):
        loc = [(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, index)]
        root = (regions,) + tuple(p[i] for p, i in zip(parent, index))
        layer[(name,) + index + tail] = (_run_stored, root, tuple(b - a for a, b in loc),
                                         block_runs(loc, stored.nav_shape), stored, func,
                                         out_shape, dtype, step, *const_keys)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[])
    return da.Array(graph, name, tuple(pieces) + tuple((n,) for n in out_shape),
                    meta=np.empty((0,) * (nav + len(out_shape)), dtype=dtype))


def _split_regions(nav_chunks, parts):
    """Navigation chunks with each region cut into about ``parts`` pieces (outer axes first,
    so pieces stay runs of whole scan rows where they can), and for each axis the region
    index of every piece."""
    chunks, parent = [], []
    for c in nav_chunks:
        per = max(1, min(int(parts), max(c)))
        cut = [_split(n, per) for n in c]
        chunks.append(tuple(x for piece in cut for x in piece))
        parent.append(tuple(i for i, piece in enumerate(cut) for _ in piece))
        parts = -(-parts // per)
    return tuple(chunks), tuple(parent)


# file bytes mapped at a time inside a task: bounds the pages mapped into the process (8 MiB
# maps ran 44,000 frames/s of virtual imaging from a .mib in the page cache, 64 MiB maps
# 55,000: fewer maps and unmaps)
MAP_BYTES = 64 * 2**20


def _func_name(func):
    name = getattr(getattr(func, "func", func), "__name__", "func")  # partial: its function
    return name.strip("<>_").replace("lambda", "f")


def stored_regions(stored):
    """The name of the per-region root tasks of ``stored`` and the regions' navigation
    chunks (about :data:`~diffgpu.chunking.STORED_CHUNK_BYTES` of the file each)."""
    import dask

    from .chunking import STORED_CHUNK_BYTES, frame_chunks

    nav_chunks = stored.nav_chunks or frame_chunks(stored.nav_shape, stored.stride,
                                                   target_bytes=STORED_CHUNK_BYTES)
    return "stored-region-" + dask.base.tokenize(stored, nav_chunks), nav_chunks


def _region_tasks(name, nav_chunks):
    # one trivial root task per region: every operation that reads this file in place hangs
    # off the same roots, so dask runs the operations of one region together and a file
    # read from disk is read once for all of them (the others find its pages in the page
    # cache)
    return {(name,) + index: (_anchor, index) for index in np.ndindex(*[len(c) for c in nav_chunks])}


def _anchor(index):
    return index  # a task (not a literal) for dask to order its dependents by


# results of one task at most (a region's polar patterns are cut into pieces of this size):
# memory stays bounded; below 32 MiB, more tasks and maps cost more than they saved (2D
# integration from a .mib: 10,000 frames/s with 8 MiB pieces, 12,800 with 32 MiB)
OUT_BYTES = 32 * 2**20
DECODE_BYTES = 2 * 2**20  # decoded frames handed to a function at a time (stay in cache)


def _decoded(words, stored, *consts, func, into=None, out_shape=None, dtype=None):
    # frames decoded a cache-sized group at a time, each group through func, the results
    # gathered in one array (no list of parts concatenated: for outputs as large as the
    # frames, e.g. polar patterns, every extra copy is a pass over fresh pages); with
    # `into`, each group's results are written where they belong, not copied there
    step = max(MIN_CHUNK_FRAMES, DECODE_BYTES // stored.frame_bytes)
    n = words.shape[0]
    if n <= step:
        return func(stored.decode(words), *consts)
    groups = _even_steps(0, n, step)
    if into is not None:
        out = np.empty((n,) + tuple(out_shape), dtype)
        for i, m in groups:
            into(stored.decode(words[i:i + m]), *consts, out=out[i:i + m])
        return out
    out = None
    for i, m in groups:
        part = func(stored.decode(words[i:i + m]), *consts)
        if out is None:
            out = np.empty((n,) + part.shape[1:], part.dtype)
        out[i:i + m] = part
    return out


def _even_steps(start, count, step):
    """``(first, count)`` of frames ``start .. start + count`` in as few steps of at most
    ``step`` frames as can be, of near-equal size: a lone last frame (``count % step == 1``)
    would go to the operation by itself, and BLAS's matrix-vector product for one frame sums
    in float32 with about ten times the error of the matrix product for several (a centre of
    mass with threshold 4e-4 px off the same frame in memory, 384 x 384 pixels).

    Examples
    --------
    >>> from diffgpu.mapping import _even_steps
    >>> _even_steps(10, 9, 8), _even_steps(0, 16, 8)
    ([(10, 4), (14, 5)], [(0, 8), (8, 8)])
    """
    parts = max(1, -(-count // step))
    bounds = [start + count * k // parts for k in range(parts + 1)]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _run_stored(root, shape, runs, stored, func, out_shape, dtype, step, *consts):
    def call(words):
        return func(words, stored, *consts)

    step = stored.read_step(step, int(np.prod(out_shape)) * np.dtype(dtype).itemsize)
    if len(runs) == 1 and runs[0][1] <= step:  # func's result is the block
        start, count = runs[0]
        out = stored.with_words(start, count, call)
        return np.asarray(out, dtype=dtype).reshape(shape + out_shape)
    steps = [piece for start, count in runs for piece in _even_steps(start, count, step)]
    out = np.empty((int(np.prod(shape)),) + out_shape, dtype=dtype)
    i = 0
    for (_, n), part in zip(steps, stored.each_words(steps, call)):
        out[i:i + n] = part
        i += n
    return out.reshape(shape + out_shape)


def map_weighted_sums(data, weights, k, finish=None, out_shape=None, threshold=None,
                      nonfinite="weighted", masked=None):
    """Weighted sums of every frame (virtual detectors, centre-of-mass moments), read in place
    from a detector file where it can be.

    Parameters
    ----------
    data : numpy, cupy or dask array
        Navigation axes first, the detector's two axes last.
    weights : diffgpu.device.DeviceCache
        ``(pixels, k)`` float32 weights.
    k : int
        Number of weighted sums per frame.
    finish : callable, optional
        ``finish(sums, xp) -> out`` applied to each block's ``(n, k)`` sums (e.g. moments into
        a centre of mass); ``out_shape`` is then the shape of its result per frame.
    threshold : float, optional
        Passed to :func:`diffgpu.kernels.reduce.weighted_sums`; frames are then decoded first.
    nonfinite : {"weighted", "zero"}
        What a NaN or inf pixel of float frames does (:func:`~diffgpu.kernels.reduce.weighted_sums`):
        NaN in the sums that weight it, or counted as 0. A pixel of zero weight never
        contributes.
    masked : numpy.ndarray, optional
        Detector-shaped bool, True for pixels left out of each frame's mean for
        ``threshold`` (:func:`~diffgpu.kernels.reduce.weighted_sums`); their weights must be
        0 already.

    Returns
    -------
    array ``data.shape[:-2] + out_shape`` float32 (``(k,)`` without ``finish``).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import DeviceCache
    >>> from diffgpu.mapping import map_weighted_sums
    >>> frames = np.arange(2 * 3 * 2 * 2, dtype="uint16").reshape(2, 3, 2, 2)
    >>> map_weighted_sums(frames, DeviceCache(np.ones((4, 1), "float32")), 1)[..., 0]
    array([[ 6., 22., 38.],
           [54., 70., 86.]], dtype=float32)
    """
    from .device import DeviceCache
    from .kernels.reduce import (BLOCK, IN_PLACE_MAX_SUMS, NONFINITE, stored_words_supported,
                                 weighted_sums, weighted_sums_stored)

    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}")

    n_pix = data.shape[-1] * data.shape[-2]
    out_shape = (k,) if finish is None else tuple(out_shape)
    stored = stored_frames(data) if threshold is None else None
    if stored is not None and stored_words_supported(stored.word) and k <= IN_PLACE_MAX_SUMS:
        # a detector file's integer frames, untouched: weighted sums of the words where they
        # lie, with the weights laid out as that kernel reads them (once, for all blocks;
        # many sums are faster decoded and multiplied by BLAS, below)
        host = weights.host
        weights_t = np.ascontiguousarray(host.T, dtype=np.float32).reshape(
            (host.shape[1],) + stored.frame_shape)

        def stored_func(words, stored, weights_t):
            sums = weighted_sums_stored(words, weights_t, stored.skip, stored.flip_rows,
                                        stored.swapped)
            return sums if finish is None else finish(sums, np)

        return map_stored(stored, stored_func, out_shape, np.float32, constants=(weights_t,))

    consts = (weights,) if masked is None else (
        weights, DeviceCache(np.ascontiguousarray(np.asarray(masked, bool).ravel())))

    def frames_func(frames, w, m=None):
        xp = array_module(frames)
        sums = weighted_sums(frames.reshape(-1, n_pix), w.get(xp), threshold, nonfinite,
                             masked=None if m is None else m.get(xp))
        return sums if finish is None else finish(sums, xp)

    # in memory: the frames shared out over the host's threads, a block of BLAS's at least
    return map_frames(data, frames_func, out_shape, np.float32, constants=consts,
                      eager_func=over_host_threads(frames_func, min_frames=BLOCK))


def over_host_threads(func, threads=None, min_frames=8):
    """``func(frames, *args)`` for frames in memory, with the frames shared out over the host's
    threads (for :func:`map_frames`'s ``eager_func``: a lazy graph's tasks already run one per
    core, an eager call ran on one), BLAS on one thread each (its own threads on top of
    these, on a machine with any other load, ran products of 17-64 weighted sums 6-40x
    slower). ``func`` must release the GIL for most of its time (NumPy, numba ``nogil``) and
    give one result row per frame; device frames, or fewer than ``2 * min_frames``, go to
    ``func`` as they are. (Not for frame-to-frame operations: on this VM, writing fresh
    result memory from two threads at once was no faster.)

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.mapping import over_host_threads
    >>> totals = over_host_threads(lambda f: f.sum(axis=(1, 2)), threads=2)
    >>> totals(np.ones((40, 3, 3))).tolist()[:3]
    [9.0, 9.0, 9.0]
    """
    from concurrent.futures import ThreadPoolExecutor

    from .device import host_threads, one_blas_thread

    def run(frames, *args):
        n = frames.shape[0]
        parts = min(threads or host_threads(), n // min_frames)
        if parts < 2 or array_module(frames) is not np:
            return func(frames, *args)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        with one_blas_thread(), ThreadPoolExecutor(parts) as pool:
            done = [pool.submit(func, frames[lo:hi], *args) for lo, hi in zip(bounds[:-1], bounds[1:])]
            return np.concatenate([d.result() for d in done])

    return run


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
