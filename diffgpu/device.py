"""Device layer: the only module of diffgpu that knows about CuPy.

Everything else asks this module where an array lives and which array module
(NumPy or CuPy) to compute it with, so each kernel is written once::

    xp = array_module(frames)      # numpy or cupy, from the array itself
    out = xp.zeros(...)

CuPy is imported lazily, on the first call that needs it; importing diffgpu
never initialises CUDA.  ``CUDA_VISIBLE_DEVICES`` is honoured exactly as the
CUDA runtime does (CuPy only ever sees the listed devices); an empty value, or
``-1``, means *CPU only* and is checked before CuPy is even imported.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import os
import sys
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from .kernels.dtypes import native_byte_order  # a GPU has no non-native byte order

__all__ = [
    "DeviceUnavailableError",
    "DeviceInfo",
    "gpu_available",
    "devices",
    "array_module",
    "is_device_array",
    "to_device_array",
    "to_host_array",
    "device_of",
    "DeviceCache",
    "host_threads",
]

_INSTALL_HINT = (
    "Install CuPy for your CUDA version, e.g. `pip install cupy-cuda12x` (CUDA 12) "
    "or `pip install cupy-cuda13x` (CUDA 13), or `pip install diffgpu[gpu]`."
)

# Result of the one attempt to import CuPy: (module or None, reason or None).
_CUPY_IMPORT: tuple | None = None


class DeviceUnavailableError(RuntimeError):
    """No usable GPU: CuPy is missing, or no CUDA device is visible or working.

    The message says what is missing and how to fix it.

    Examples
    --------
    >>> import diffgpu
    >>> try:
    ...     diffgpu.device.require_gpu()
    ... except diffgpu.DeviceUnavailableError as err:
    ...     print("CPU only:", type(err).__name__)
    ... else:
    ...     print("GPU found")  # doctest: +SKIP
    CPU only: DeviceUnavailableError
    """


@dataclass(frozen=True)
class DeviceInfo:
    """One visible CUDA device.

    Attributes
    ----------
    id : int
        Device number as CuPy and dask-cuda see it (after ``CUDA_VISIBLE_DEVICES``).
    name : str
        Product name, e.g. ``"NVIDIA H100 80GB HBM3"``.
    total_memory : int
        Device memory in bytes.
    """

    id: int
    name: str
    total_memory: int

    def __str__(self):
        return f"GPU {self.id}: {self.name} ({self.total_memory / 2**30:.1f} GiB)"


def _hidden_by_environment() -> bool:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def _import_cupy():
    """Import CuPy once; return ``(module, None)`` or ``(None, reason)``."""
    global _CUPY_IMPORT
    if _CUPY_IMPORT is None:
        try:
            _CUPY_IMPORT = (importlib.import_module("cupy"), None)
        except Exception as err:  # ImportError, or a broken CUDA install
            _CUPY_IMPORT = (None, f"CuPy could not be imported ({type(err).__name__}: {err})")
    return _CUPY_IMPORT


def _loaded_cupy():
    """CuPy if something already imported it (we or the user), else None; never imports.

    A CuPy that another thread is still importing counts as not loaded (no CuPy array can
    exist before its import ends): on dask workers, dask imports CuPy lazily in the main
    thread while tasks run in others, and a task that took the half-made module crashed
    (``module 'cupy' has no attribute 'ndarray'``).
    """
    if _CUPY_IMPORT is not None and _CUPY_IMPORT[0] is not None:
        return _CUPY_IMPORT[0]
    mod = sys.modules.get("cupy")
    if mod is None or getattr(getattr(mod, "__spec__", None), "_initializing", False) \
            or getattr(mod, "ndarray", None) is None:
        return None
    return mod


def _probe():
    """Return ``(cupy, n_devices, reason)``; reason says why there is no GPU."""
    if _hidden_by_environment():
        return None, 0, "CUDA_VISIBLE_DEVICES is empty, which means: use the CPU only"
    cp, reason = _import_cupy()
    if cp is None:
        return None, 0, f"{reason}. {_INSTALL_HINT}"
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as err:  # no driver, no device, driver too old, ...
        return cp, 0, (
            f"CuPy is installed but found no working CUDA device ({type(err).__name__}: {err}). "
            "Check the NVIDIA driver (`nvidia-smi`) and that the CuPy wheel matches its CUDA "
            f"version.{_visible_devices_hint()}"
        )
    if n == 0:
        return cp, 0, f"CuPy is installed but no CUDA device is visible.{_visible_devices_hint()}"
    return cp, n, None


def _visible_devices_hint():
    """A word on ``CUDA_VISIBLE_DEVICES`` where it is set: a value that names no device (a
    typo, an index past the last GPU) hides every GPU, and CUDA's own error does not say so."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ""
    return (f" CUDA_VISIBLE_DEVICES is {value!r}: only the devices it lists are visible (indices "
            "from 0, or GPU-/MIG- UUIDs, separated by commas; CUDA ignores everything from the "
            "first entry that names no device on).")


def gpu_available() -> bool:
    """Whether at least one CUDA device is visible and CuPy works with it.

    Honours ``CUDA_VISIBLE_DEVICES``; probes the device count, not just the import.

    Examples
    --------
    >>> import diffgpu
    >>> isinstance(diffgpu.gpu_available(), bool)
    True
    """
    return _probe()[1] > 0


def require_gpu():
    """Return the CuPy module, or raise :class:`DeviceUnavailableError` saying why not.

    Examples
    --------
    >>> import diffgpu
    >>> if diffgpu.gpu_available():
    ...     cp = diffgpu.device.require_gpu()
    """
    cp, n, reason = _probe()
    if n == 0:
        raise DeviceUnavailableError(f"No GPU available: {reason}")
    return cp


def devices() -> list[DeviceInfo]:
    """The visible CUDA devices (an empty list on a CPU-only machine).

    Returns
    -------
    list of DeviceInfo
        Id, name and memory of each device CuPy can see.

    Examples
    --------
    >>> import diffgpu
    >>> for d in diffgpu.devices():
    ...     print(d)  # doctest: +SKIP
    GPU 0: NVIDIA H100 80GB HBM3 (79.1 GiB)
    """
    cp, n, _ = _probe()
    out = []
    for i in range(n):
        props = cp.cuda.runtime.getDeviceProperties(i)
        name = props["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        out.append(DeviceInfo(id=i, name=str(name), total_memory=int(props["totalGlobalMem"])))
    return out


def is_device_array(x) -> bool:
    """Whether ``x`` is a CuPy array (never imports CuPy to find out).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import is_device_array
    >>> is_device_array(np.zeros(3))
    False
    """
    cp = _loaded_cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def _meta_of(x):
    """The block type of a dask array, or the array itself."""
    return getattr(x, "_meta", x)


def array_module(x):
    """The array module (``numpy`` or ``cupy``) that computes on ``x``.

    Works on NumPy and CuPy arrays and on dask arrays (from their ``meta``), so a
    kernel written as ``xp = array_module(x)`` runs unchanged on CPU and GPU.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import array_module
    >>> array_module(np.ones(3)) is np
    True
    """
    if is_device_array(_meta_of(x)):
        return _loaded_cupy()
    return np


def device_of(x) -> str:
    """``"gpu"`` if the (dask) array's blocks are CuPy arrays, else ``"cpu"``.

    Examples
    --------
    >>> import dask.array as da
    >>> from diffgpu.device import device_of
    >>> device_of(da.zeros((4, 4), chunks=2))
    'cpu'
    """
    return "gpu" if is_device_array(_meta_of(x)) else "cpu"


def _block_to_host(block):
    return _loaded_cupy().asnumpy(block) if is_device_array(block) else np.asarray(block)


def _block_to_device(block):
    # a fresh dask worker process has not imported CuPy yet (importing diffgpu never does,
    # and the graph holds no CuPy object): import it here, or say why there is no GPU
    cp = _loaded_cupy()
    if cp is None:
        try:
            cp = require_gpu()
        except DeviceUnavailableError as err:  # say where: it may be a worker on another node
            import socket

            raise DeviceUnavailableError(f"{err} (in the process running the transfer step: "
                                         f"pid {os.getpid()} on {socket.gethostname()})") from None
    return cp.asarray(native_byte_order(block))


def _is_dask(x) -> bool:
    return type(x).__module__.startswith("dask.")


def to_device_array(x):
    """Move an array to the current GPU; a dask array gets a lazy transfer step.

    NumPy arrays are copied to the device now; dask arrays get one
    ``map_blocks`` step with an explicit ``dtype`` and CuPy ``meta`` and compute
    nothing. Device arrays are returned unchanged.

    Raises
    ------
    DeviceUnavailableError
        Without CuPy or without a working CUDA device; for a dask array, also when a
        worker of the distributed client in use has none (the steps would fail there).

    Examples
    --------
    >>> import numpy as np, diffgpu
    >>> from diffgpu.device import to_device_array
    >>> if diffgpu.gpu_available():
    ...     x = to_device_array(np.ones((2, 2)))
    """
    if _is_dask(x):
        if is_device_array(x._meta):
            return x
        cp = _require_gpu_for_graph()
        dtype = x.dtype.newbyteorder("=")  # big-endian chunks (Merlin) swap bytes as they move
        meta = cp.empty((0,) * x.ndim, dtype=dtype)
        return x.map_blocks(_block_to_device, dtype=dtype, meta=meta)
    cp = require_gpu()
    if is_device_array(x):
        return x
    return cp.asarray(native_byte_order(x))


def _cluster_gpus(client=None):
    """``(workers with a GPU, workers without)`` of ``client`` (by default the distributed
    client that would compute a graph now), or None without one (or where its workers
    cannot be asked)."""
    from .mapping import _computing_client

    client = client or _computing_client()
    if client is None:
        return None
    try:
        seen = client.run(gpu_available, on_error="return")
    except Exception:  # workers cannot be asked now: computing will say what is wrong
        return None
    with_gpu = sorted(w for w, ok in seen.items() if ok is True)
    return with_gpu, sorted(w for w, ok in seen.items() if ok is False)


def _require_gpu_for_graph():
    """CuPy for a lazy transfer step, checked where the step will run: on the workers of the
    distributed client in use (this process may have a GPU that they lack, or none of
    their GPUs), and here, where the graph's CuPy ``meta`` is made."""
    found = _cluster_gpus()
    if found is not None and found[1]:
        missing = found[1]
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DeviceUnavailableError(
            f"No GPU on {len(missing)} of the dask cluster's {sum(map(len, found))} worker(s) "
            f"({names}), where the transfer steps would run: start the workers on GPU nodes "
            "(one per GPU, e.g. dask-cuda's LocalCUDACluster or `dask cuda worker`), or compute "
            "on the host (no to_device()).")
    try:
        return require_gpu()
    except DeviceUnavailableError as err:
        if found is None or not found[0]:
            raise
        raise DeviceUnavailableError(
            f"{err} The dask cluster's workers have GPUs, but a lazy graph of device blocks is "
            "described by an empty CuPy array made in this process, so it needs CuPy and a "
            "working GPU too (build the graph on a GPU node).") from None


def to_host_array(x):
    """Move an array to host memory (NumPy); a dask array gets a lazy transfer step.

    Host arrays are returned unchanged, so the call is idempotent. Needs no GPU.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import to_host_array
    >>> to_host_array(np.arange(3))
    array([0, 1, 2])
    """
    if _is_dask(x):
        if not is_device_array(x._meta):
            return x
        meta = np.empty((0,) * x.ndim, dtype=x.dtype)
        return x.map_blocks(_block_to_host, dtype=x.dtype, meta=meta)
    return _block_to_host(x)


def _asarray(cp, value):
    return cp.asarray(value)


class DeviceCache:
    """A host constant (matrix, detector weights, templates) with one copy per GPU, made once.

    Kernels ask for the constant in the array module of their data: the host
    value for NumPy blocks, or this device's copy for CuPy blocks (moved on
    first use, then reused by every later block on that device).

    Parameters
    ----------
    host : object
        The host value (NumPy array, SciPy sparse matrix, ...).
    to_device : callable, optional
        ``to_device(cupy, host) -> device value``; default ``cupy.asarray``.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import DeviceCache
    >>> weights = DeviceCache(np.ones((4, 2), "float32"))
    >>> weights.get(np) is weights.host
    True
    """

    def __init__(self, host, to_device=None, token=None):
        self.host = host
        self._to_device = to_device or _asarray
        self._copies = {}
        self._derived = {}
        self._lock = threading.RLock()  # a build may ask for another derived value
        self._token = token or uuid.uuid4().hex

    def __dask_tokenize__(self):
        # one token per constant, made once: dask would otherwise pickle and hash the whole
        # host value (hundreds of MB of templates: ~70 ms) every time a graph is built
        return ("DeviceCache", self._token)

    def get(self, xp):
        """The value for computing with array module ``xp`` (numpy or cupy)."""
        if xp is np:
            return self.host
        # per device, and per array module: copies made by one CuPy (e.g. the tests' CPU
        # stand-in) are never handed to another
        key = (id(xp), xp.cuda.runtime.getDevice())
        with self._lock:
            if key not in self._copies:
                self._copies[key] = self._to_device(xp, self.host)
            return self._copies[key]

    def derived(self, name, build):
        """``build(host)``, made once per process for this constant and kept with it (e.g. the
        templates' search layout on the host).

        On a dask worker, copies of the constant that arrive with later graphs share what
        earlier copies derived (and their device copies): see :data:`SHARED_CONSTANTS`
        and :data:`SHARED_BYTES`.

        Examples
        --------
        >>> import numpy as np
        >>> from diffgpu.device import DeviceCache
        >>> c = DeviceCache(np.arange(4.0))
        >>> c.derived("total", lambda host: host.sum())
        np.float64(6.0)
        >>> c.derived("total", lambda host: 0.0)  # made once
        np.float64(6.0)
        """
        with self._lock:
            if name not in self._derived:
                self._derived[name] = build(self.host)
            return self._derived[name]

    def __getstate__(self):  # pickled to dask workers: device copies stay behind
        return {"host": self.host, "_to_device": self._to_device, "_token": self._token}

    def __setstate__(self, state):
        self.__init__(state["host"], state["_to_device"], state.get("_token"))
        # a copy from another process (a worker receiving a graph): share the device copies
        # and derived values of the last copies of this constant that arrived here, so that
        # they are made once per worker, not once per compute()
        with _SHARED_LOCK:
            shared = _SHARED.pop(self._token, None) or (
                self._copies, self._derived, self._lock, _nbytes(self.host))
            _SHARED[self._token] = shared
            # the most recent first, up to SHARED_CONSTANTS of them and SHARED_BYTES of host
            # values (their device copies and derived values are of their size, or smaller)
            total = 0
            for i, token in enumerate(reversed(list(_SHARED))):
                total += _SHARED[token][3]
                if i and (i >= SHARED_CONSTANTS or total > SHARED_BYTES):
                    del _SHARED[token]
        self._copies, self._derived, self._lock = shared[:3]


#: Constants received from other processes whose device copies and derived values a
#: process keeps for later copies of them: the most recent ones, at most this many and at
#: most :data:`SHARED_BYTES` of host values (the latest is always kept).
SHARED_CONSTANTS = 4
SHARED_BYTES = 1 << 30
_SHARED = collections.OrderedDict()
_SHARED_LOCK = threading.Lock()


def _nbytes(value):
    """Bytes of the arrays in ``value`` (arrays, SciPy sparse matrices, tuples, lists)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    parts = [getattr(value, name, None) for name in ("data", "indices", "indptr")]
    return sum(p.nbytes for p in parts if isinstance(p, np.ndarray))


def host_threads():
    """Host threads to use for in-memory work: the CPUs this process may run on.

    Examples
    --------
    >>> from diffgpu.device import host_threads
    >>> host_threads() >= 1
    True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (finding them takes milliseconds)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with BLAS (OpenBLAS, MKL) limited to one thread per caller.

    For in-memory work that diffgpu spreads over :func:`host_threads` threads itself:
    BLAS's own threads on top of those compete for the same cores (template matching
    ran 1.6x faster with them off). The limit is process-wide: enter it from the thread
    that starts the pool, while no other thread is inside BLAS (OpenBLAS ignored every
    later limit after one was set from dask's threads while another ran a product).

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.device import one_blas_thread
    >>> with one_blas_thread():
    ...     x = np.ones((4, 4)) @ np.ones((4, 4))
    >>> float(x[0, 0])
    4.0
    """
    limiter = _blas_controller().limit(limits=1, user_api="blas")
    try:
        yield
    finally:
        limiter.restore_original_limits()


@contextlib.contextmanager
def blas_for_dask(collection=None, scheduler=None):
    """One BLAS thread while dask's local threaded scheduler runs a computation.

    dask's threaded scheduler already runs one task per core; BLAS's own threads inside
    each task compete with the other tasks (lazy template matching: 1,020 patterns/s as is,
    1,500 with one BLAS thread, 2 cores). Enter it in the thread that starts the
    computation, before it starts (see :func:`one_blas_thread`); with a distributed
    client, the synchronous scheduler or one core it does nothing (dask's worker
    processes already run BLAS single-threaded).

    Examples
    --------
    >>> import dask.array as da
    >>> from diffgpu.device import blas_for_dask
    >>> x = da.ones((4, 4), chunks=2)
    >>> with blas_for_dask(x):
    ...     float((x @ x).sum().compute())
    64.0
    """
    import dask.threaded
    from dask.base import get_scheduler

    collections = [collection] if collection is not None else None
    threaded = get_scheduler(scheduler=scheduler, collections=collections) is dask.threaded.get
    if threaded and host_threads() > 1:
        with one_blas_thread():
            yield
    else:
        yield
