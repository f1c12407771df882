"""Starting a dask cluster that uses every visible GPU, or this machine's CPUs."""

from __future__ import annotations

import functools
import importlib.util
import numbers
import os
import warnings
import weakref

import numpy as np

from .device import DeviceUnavailableError, devices, require_gpu

__all__ = ["start_cluster"]

# the clusters start_cluster started, to warn before a second one is started beside them
_started = weakref.WeakSet()


@functools.lru_cache(maxsize=None)
def _client_class():
    """A :class:`distributed.Client` whose ``with`` block also closes the cluster that
    :func:`start_cluster` started for it (a plain Client closes only itself)."""
    from distributed import Client

    class ClusterClient(Client):
        """Client of a cluster started by :func:`diffgpu.start_cluster`; leaving a ``with``
        block closes the client and that cluster (its worker processes included)."""

        def __exit__(self, exc_type, exc_value, traceback):
            cluster = self.cluster
            try:
                super().__exit__(exc_type, exc_value, traceback)
            finally:
                if cluster is not None:
                    cluster.close()

    return ClusterClient


def _check_count(value, name):
    """None, or a positive integer (0 workers would leave every compute waiting forever)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer (or None for dask's choice); "
                         f"got {value!r}")


def _running(cluster):
    from distributed.core import Status

    return getattr(cluster, "status", None) == Status.running


def _parameters(*classes):
    """The names the ``__init__`` methods of ``classes`` (and their bases) take."""
    import inspect

    names = set()
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names.update(inspect.signature(init).parameters)
    return names


def _check_keywords(kwargs):
    """A TypeError for keywords no cluster, nanny or worker takes (LocalCluster passes the
    rest on to its workers, which then fail to start with a message about "Nanny failed to
    start" and leaked semaphores, far from the misspelt name)."""
    from distributed import LocalCluster, Nanny, Worker

    known = _CUDA_KEYWORDS | _parameters(LocalCluster, Nanny, Worker)
    try:  # (dask-cuda's own class is read too where it is installed)
        from dask_cuda import LocalCUDACluster

        known |= _parameters(LocalCUDACluster)
    except ImportError:
        pass
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hint = " (the device is chosen with device='gpu')" if "gpu" in unknown else ""
        raise TypeError(f"start_cluster() got unknown keyword(s) {', '.join(unknown)}{hint}: "
                        "neither the cluster nor its workers take them")


# dask-cuda's own keywords (LocalCUDACluster), which a CPU LocalCluster's workers refuse
_CUDA_KEYWORDS = frozenset({
    "device_memory_limit", "rmm_pool_size", "rmm_maximum_pool_size", "rmm_managed_memory",
    "rmm_async", "rmm_release_threshold", "rmm_log_directory", "rmm_track_allocations",
    "jit_unspill", "log_spilling", "enable_cudf_spill", "cudf_spill_stats",
    "CUDA_VISIBLE_DEVICES", "protocol", "interface", "enable_tcp_over_ucx", "enable_infiniband",
    "enable_nvlink", "enable_rdmacm", "pre_import", "worker_class"})


def _gpu_only_keywords(kwargs):
    """The keywords of ``kwargs`` that only a GPU cluster (dask-cuda) takes."""
    from distributed import LocalCluster, Nanny, Worker

    return sorted(set(kwargs) - _parameters(LocalCluster, Nanny, Worker))


def _check_memory_limit(value):
    """``"auto"``, None, or bytes (a number, or a size such as ``"4GB"``) of at least 0: a
    negative one made every worker fail to start ("Nanny failed to start", an OverflowError
    inside)."""
    import math

    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value) if isinstance(value, str) else value
    except (TypeError, ValueError):
        n = None
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 0:
        raise ValueError("memory_limit must be 'auto', a number of bytes per worker or a size "
                         "such as '4GB' (0 or None: no limit); got " + repr(value))


def start_cluster(device="auto", n_workers=None, threads_per_worker=None, memory_limit="auto",
                  processes=True, quiet=False, **kwargs):
    """Start a local dask cluster and return a connected :class:`distributed.Client`.

    * ``device="gpu"`` (or ``"auto"`` when dask-cuda and a GPU are present): a
      ``dask_cuda.LocalCUDACluster`` with one worker per visible GPU (honouring
      ``CUDA_VISIBLE_DEVICES``), each worker pinned to its own device, so the
      transfer steps that :meth:`to_device` put in the graph run on that
      worker's GPU.
    * otherwise a ``distributed.LocalCluster`` sized to this machine.

    The dashboard link is printed (unless ``quiet``); in Jupyter the returned
    client also shows it. Close with ``client.close(); client.cluster.close()``
    or use it as a context manager: leaving the ``with`` block closes the client
    and the cluster (its worker processes too).

    Each call starts a new cluster. If one started by an earlier call is still
    running, a :class:`RuntimeWarning` says so (two clusters share this machine's
    CPUs, GPUs and memory, and the newest client becomes dask's default): close the
    earlier one first.

    Parameters
    ----------
    device : {"auto", "gpu", "cpu"}
        Which kind of cluster.
    n_workers, threads_per_worker : int, optional
        Cluster sizing, positive integers (default: dask's choice for this
        machine). For a GPU cluster ``n_workers`` is the number of visible GPUs
        and cannot be more (default: all of them), and ``threads_per_worker``
        dask-cuda's default of 1 unless given.
    memory_limit : str or int
        Host memory limit per worker (``"auto"``, ``"4GB"``, a number of bytes;
        0 or None: no limit).
    processes : bool
        CPU cluster only: worker processes (default) or threads in this process.
    quiet : bool
        Do not print the dashboard link.
    **kwargs
        Passed to the cluster class (e.g. ``device_memory_limit``, ``rmm_pool_size``
        for dask-cuda, ``dashboard_address`` for both).

    Returns
    -------
    distributed.Client
        A subclass whose ``with`` block also closes the cluster.

    Raises
    ------
    DeviceUnavailableError
        ``device="gpu"`` without a usable GPU or without dask-cuda.
    ValueError
        An unknown ``device``, ``n_workers`` / ``threads_per_worker`` not a
        positive integer, a negative or unreadable ``memory_limit``, or
        ``processes`` not a bool.
    TypeError
        A keyword that neither cluster takes, or with ``device="cpu"`` one that only
        the GPU cluster takes (``rmm_pool_size``, ``device_memory_limit``, ...).

    Warns
    -----
    RuntimeWarning
        A cluster started by an earlier call is still running; or with
        ``device="auto"``, no GPU cluster could be started and the GPU cluster's
        keywords were left out of the CPU cluster.

    Examples
    --------
    >>> import diffgpu
    >>> client = diffgpu.start_cluster(device="cpu", n_workers=1, processes=False,
    ...                                quiet=True, dashboard_address=":0")
    >>> client.submit(sum, [1, 2, 3]).result()
    6
    >>> client.close(); client.cluster.close()
    >>> with diffgpu.start_cluster(device="cpu", n_workers=1, processes=False,
    ...                            quiet=True, dashboard_address=":0") as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    >>> client.cluster.status.name
    'closed'
    """
    from distributed import LocalCluster

    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu'; got {device!r}")
    _check_keywords(kwargs)
    _check_count(n_workers, "n_workers")
    _check_count(threads_per_worker, "threads_per_worker")
    _check_memory_limit(memory_limit)
    if not isinstance(processes, (bool, np.bool_)):  # (a string such as "no" is true)
        raise ValueError(f"processes must be True or False; got {processes!r}")
    running = [c for c in list(_started) if _running(c)]
    if running:
        warnings.warn(f"diffgpu.start_cluster: a cluster it started is already running "
                      f"({running[0]!r}, scheduler {running[0].scheduler_address}); starting a "
                      "second one beside it. Close the first with client.close(); "
                      "client.cluster.close() (or start it with `with`), or keep using its "
                      "client", RuntimeWarning, stacklevel=2)
    has_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    use_gpu = False
    if device == "gpu":
        require_gpu()
        if not has_dask_cuda:
            raise DeviceUnavailableError(
                "A GPU cluster needs dask-cuda: `pip install diffgpu[cuda-cluster]` "
                "(or `pip install dask-cuda`)."
            )
        use_gpu = True
    elif device == "auto":
        use_gpu = has_dask_cuda and len(devices()) > 0
    gpu_only = [] if use_gpu else _gpu_only_keywords(kwargs)
    if gpu_only and device == "cpu":
        raise TypeError(f"start_cluster(device='cpu') got {', '.join(gpu_only)}: only a GPU "
                        "cluster (dask-cuda's LocalCUDACluster) takes them")
    if gpu_only:  # "auto" on a machine without GPUs (or dask-cuda): the same script runs
        warnings.warn(f"diffgpu.start_cluster: no GPU cluster here ("
                      f"{'no GPU visible' if has_dask_cuda else 'dask-cuda is not installed'}),"
                      f" so the GPU cluster's keyword(s) {', '.join(gpu_only)} are left out of "
                      "this CPU LocalCluster", RuntimeWarning, stacklevel=2)
        kwargs = {k: v for k, v in kwargs.items() if k not in gpu_only}

    if use_gpu:
        from dask_cuda import LocalCUDACluster

        chosen = kwargs.pop("CUDA_VISIBLE_DEVICES", None)  # dask-cuda's own way to choose
        if chosen is not None:
            visible = [str(d).strip() for d in (chosen.split(",") if isinstance(chosen, str)
                                                else chosen)]
        else:
            visible = [str(d.id) for d in devices()]
            parent = os.environ.get("CUDA_VISIBLE_DEVICES")
            if parent:  # map our ids back to the physical ones the parent listed
                physical = [p.strip() for p in parent.split(",")]
                visible = [physical[int(i)] for i in visible]
        if n_workers is not None:
            if n_workers > len(visible):
                raise ValueError(f"n_workers={n_workers} but only {len(visible)} GPUs are visible")
            visible = visible[:n_workers]
        if threads_per_worker is not None:
            kwargs["threads_per_worker"] = threads_per_worker
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(visible),
                                   memory_limit=memory_limit, **kwargs)
        kind = f"LocalCUDACluster with {len(visible)} GPU worker(s)"
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               memory_limit=memory_limit, processes=processes, **kwargs)
        kind = f"LocalCluster with {len(cluster.workers)} CPU worker(s)"
    _started.add(cluster)
    client = _client_class()(cluster)
    if not quiet:
        print(f"diffgpu: started a {kind}; dashboard: {client.dashboard_link}")
    return client
