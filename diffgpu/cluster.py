"""Starting a dask cluster that uses every visible GPU, or this machine's CPUs."""

from __future__ import annotations

import functools
import importlib.util
import numbers
import os
import warnings
import weakref

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


def _check_keywords(kwargs):
    """A TypeError for keywords no cluster, nanny or worker takes (LocalCluster passes the
    rest on to its workers, which then fail to start with a message about "Nanny failed to
    start" and leaked semaphores, far from the misspelt name)."""
    import inspect

    from distributed import LocalCluster, Nanny, Worker

    # dask-cuda's own (its LocalCUDACluster is read too where it is installed)
    known = {"device_memory_limit", "rmm_pool_size", "rmm_maximum_pool_size",
             "rmm_managed_memory", "rmm_async", "rmm_release_threshold", "rmm_log_directory",
             "rmm_track_allocations", "jit_unspill", "log_spilling", "enable_cudf_spill",
             "cudf_spill_stats", "CUDA_VISIBLE_DEVICES", "protocol", "interface",
             "enable_tcp_over_ucx", "enable_infiniband", "enable_nvlink", "enable_rdmacm",
             "pre_import", "worker_class"}
    classes = [LocalCluster, Nanny, Worker]
    try:
        from dask_cuda import LocalCUDACluster

        classes.append(LocalCUDACluster)
    except ImportError:
        pass
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                known.update(inspect.signature(init).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hint = " (the device is chosen with device='gpu')" if "gpu" in unknown else ""
        raise TypeError(f"start_cluster() got unknown keyword(s) {', '.join(unknown)}{hint}: "
                        "neither the cluster nor its workers take them")


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
        CPU cluster sizing, positive integers (default: dask's choice for this
        machine). For a GPU cluster ``n_workers`` is the number of visible GPUs
        and cannot be more.
    memory_limit : str or int
        Host memory limit per worker (``"auto"``, ``"4GB"``, ...).
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
        An unknown ``device``, or ``n_workers`` / ``threads_per_worker`` not a
        positive integer.

    Warns
    -----
    RuntimeWarning
        A cluster started by an earlier call is still running.

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

    if use_gpu:
        from dask_cuda import LocalCUDACluster

        visible = [str(d.id) for d in devices()]
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
        if parent:  # map our ids back to the physical ones the parent listed
            physical = [p.strip() for p in parent.split(",")]
            visible = [physical[int(i)] for i in visible]
        if n_workers is not None:
            if n_workers > len(visible):
                raise ValueError(f"n_workers={n_workers} but only {len(visible)} GPUs are visible")
            visible = visible[:n_workers]
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
