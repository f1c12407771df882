"""Device behaviour shared by every diffgpu signal: ``to_device``/``to_host``/``device``.

Two small mixins rather than one: HyperSpy's ``LazySignal`` overrides ``plot``
and ``save`` paths, so the lazy classes need their own mixin placed *before*
``LazySignal`` in the method resolution order.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..device import blas_for_dask, device_of, to_device_array, to_host_array
from ..mapping import _available_memory, _computing_client, compute_into, compute_shared


def to_device(signal):
    """Move any HyperSpy signal's data to the GPU, in place (lazy: a graph step).

    For signals that are not diffgpu's (e.g. HyperSpy's own results); diffgpu
    signals have the method :meth:`~diffgpu.signals._device.DeviceMixin.to_device`.

    Examples
    --------
    >>> import numpy as np, hyperspy.api as hs, diffgpu
    >>> s = hs.signals.Signal1D(np.arange(4.0))
    >>> if diffgpu.gpu_available():
    ...     diffgpu.to_device(s)
    """
    signal.data = to_device_array(signal.data)


def to_host(signal):
    """Move any HyperSpy signal's data to host memory, in place (lazy: a graph step).

    Examples
    --------
    >>> import numpy as np, hyperspy.api as hs, diffgpu
    >>> s = hs.signals.Signal1D(np.arange(4.0))
    >>> diffgpu.to_host(s)
    >>> type(s.data).__name__
    'ndarray'
    """
    signal.data = to_host_array(signal.data)


class DeviceMixin:
    """Moves a signal's data between host and GPU, in place, eager or lazy."""

    @property
    def device(self):
        """Where the data (or, lazily, its blocks) live: ``"cpu"`` or ``"gpu"``."""
        return device_of(self.data)

    def to_device(self):
        """Move the data to the GPU, in place (like HyperSpy's own methods).

        Lazy signals get a transfer step in their dask graph (explicit ``dtype``
        and CuPy ``meta``) and nothing is computed; eager signals are copied to
        the current device now. Calling it again does nothing.

        Raises
        ------
        DeviceUnavailableError
            Without CuPy or a working CUDA device; the signal is left unchanged.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32))
        >>> if diffgpu.gpu_available():
        ...     s.to_device()
        ...     assert s.device == "gpu"
        """
        to_device(self)  # raises before anything is assigned, so failure changes nothing

    def to_host(self):
        """Move the data to host memory (NumPy), in place; idempotent, needs no GPU.

        Examples
        --------
        >>> import diffgpu
        >>> s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32))
        >>> s.to_host()
        >>> s.device
        'cpu'
        """
        to_host(self)

    def _on_host(self):
        """This signal if its data is on the host, else a host copy (lazy stays lazy)."""
        if self.device == "cpu":
            return self
        return self._deepcopy_with_new_data(to_host_array(self.data), copy_variance=True)

    def plot(self, *args, **kwargs):
        """Plot as HyperSpy does; device-resident data is moved to the host to be shown.

        For device-resident signals the plot belongs to a host copy (a lazy copy
        for lazy signals, which fetches only what is displayed).
        """
        return _via_host(self, "plot", super().plot, args, kwargs)

    def save(self, *args, **kwargs):
        """Save as HyperSpy does; device-resident data is written from a host copy."""
        return _via_host(self, "save", super().save, args, kwargs)


class LazyDeviceMixin:
    """Puts the host routing of ``plot``/``save`` before HyperSpy's ``LazySignal``, and runs
    computations with one BLAS thread per dask thread (:func:`~diffgpu.device.blas_for_dask`)."""

    def compute(self, close_file=False, show_progressbar=None, **kwargs):
        """Compute as HyperSpy does (``close_file``, ``show_progressbar``, dask's keywords).

        With dask's local threaded scheduler, BLAS runs single-threaded meanwhile: dask
        already keeps every core busy, and BLAS threads on top of its threads slow it down.
        Host results of several chunks are written by the worker threads straight into
        the result array (:func:`~diffgpu.mapping.compute_into`) instead of being joined at
        the end on one thread: 2D integration to 256 x 720 bins, 196 -> 548 frames/s on 2
        cores (the join copied every result once more, into memory touched for the first
        time); an operation that can (2D integration) computes its results there in
        place, and the result array is not hashed as ``dask.array.store`` hashes it.
        """
        import dask.array as da
        import dask.threaded
        from dask.base import get_scheduler

        data = self.data
        with blas_for_dask(data, kwargs.get("scheduler")):
            threaded = get_scheduler(scheduler=kwargs.get("scheduler"),
                                     collections=[data]) is dask.threaded.get
            result = None
            if not threaded and "scheduler" not in kwargs:
                # distributed workers on this machine write into shared memory
                result = compute_shared(data, show_progressbar=show_progressbar, **kwargs)
            if result is None:
                if not (threaded and isinstance(data, da.Array) and data.npartitions > 1
                        and type(data._meta) is np.ndarray
                        and not any(math.isnan(n) for n in data.shape)):
                    return super().compute(close_file=close_file,
                                           show_progressbar=show_progressbar, **kwargs)
                result = np.empty(data.shape, data.dtype)
                # each block written into the result by the thread that made it, and by an
                # operation that can, computed there in place (2D integration: polar
                # patterns are larger than the frames)
                compute_into(data, result, show_progressbar=show_progressbar, **kwargs)
        self.data = result
        if close_file:
            self.close_file()
        self._lazy = False
        self._assign_subclass()

    def plot(self, *args, **kwargs):
        return _via_host(self, "plot", super().plot, args, kwargs)

    plot.__doc__ = DeviceMixin.plot.__doc__

    def save(self, *args, **kwargs):
        filename = args[0] if args else kwargs.get("filename")
        if _hdf5_file(filename) and _computing_client() is not None:
            return self._save_computed(args, kwargs)
        with blas_for_dask(self.data, kwargs.get("scheduler")):
            return _via_host(self, "save", super().save, args, kwargs)

    save.__doc__ = DeviceMixin.save.__doc__ + """
        With a distributed client in use, an HDF5 file (``.hspy``, ``.h5``, ``.emd``, ...)
        is written from the result computed into memory first (HyperSpy's lazy writer hands
        the cluster an open h5py dataset, which cannot be sent to its workers: a
        ``TypeError`` about ``_HLGExprSequence``); a result larger than half the memory
        available raises a ``MemoryError`` that asks for ``.zspy``, which the workers write
        chunk by chunk.
        """

    def _save_computed(self, args, kwargs):
        """Compute a copy (on the cluster, into shared memory) and save that."""
        available = _available_memory()
        if available is not None and self.data.nbytes > available / 2:
            raise MemoryError(
                f"saving this lazy result ({self.data.nbytes / 2**30:.1f} GiB) to an HDF5 file "
                f"with a distributed client means computing it into memory first (HyperSpy's "
                f"lazy HDF5 writer cannot run on a cluster), and only "
                f"{available / 2**30:.1f} GiB are available: save it as .zspy instead, which "
                "the workers write chunk by chunk")
        copy = self._on_host()
        copy = copy.deepcopy() if copy is self else copy
        copy.compute(show_progressbar=kwargs.get("show_progressbar"))
        return copy.save(*args, **kwargs)


_HDF5 = {"", ".hspy", ".h5", ".hdf5", ".hdf", ".emd", ".nxs", ".nx"}


def _hdf5_file(filename):
    """Whether HyperSpy writes ``filename`` through h5py (no extension: .hspy)."""
    if filename is None:
        return False
    return os.path.splitext(os.fspath(filename))[1].lower() in _HDF5


def _via_host(signal, name, parent_method, args, kwargs):
    """Call ``parent_method`` on host data, or the same method of a host copy."""
    host = signal._on_host()
    if host is signal:
        return parent_method(*args, **kwargs)
    if name == "plot":
        signal._host_for_plot = host  # keep it alive as long as the figure may need it
        if (signal._lazy and not args and kwargs.get("navigator", "auto") == "auto"
                and getattr(signal, "navigator", None) is None
                and 1 <= signal.axes_manager.navigation_dimension <= 2):
            # HyperSpy would sum the host copy's frames for its navigator, moving every frame
            # off the device: sum them where they are and move only the sums
            nav = signal.sum(axis=signal.axes_manager.signal_axes)
            to_host(nav)  # a HyperSpy signal: its own to_host() refuses lazy data
            nav.compute()
            kwargs["navigator"] = nav.T
    return getattr(host, name)(*args, **kwargs)
