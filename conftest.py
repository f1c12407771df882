"""Root pytest configuration: the ``gpu`` marker and a CPU stand-in for CuPy.

Tests marked ``gpu`` run the real CuPy paths; they are skipped, with the reason,
wherever no CUDA device works (the device count is probed, not just the import).

The ``standin_gpu`` fixture installs a NumPy-subclass "device array" in place of
CuPy so the dispatch plumbing (meta types, lazy transfer steps, compute, plot,
save) is exercised on any machine. It proves nothing about real GPUs.
"""

import os
import types

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")


def pytest_collection_modifyitems(config, items):
    import diffgpu.device as dev

    _, n, reason = dev._probe()
    if n > 0:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class StandInDeviceArray(np.ndarray):
    """A host array that pretends to live on a device (for plumbing tests only)."""


def _standin_cupy():
    mod = types.ModuleType("standin_cupy")
    mod.ndarray = StandInDeviceArray
    mod.asarray = lambda a, dtype=None: np.array(a, dtype=dtype, copy=True).view(StandInDeviceArray)
    mod.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)
    mod.empty = lambda shape, dtype=float: np.empty(shape, dtype).view(StandInDeviceArray)
    props = {"name": b"Stand-in device", "totalGlobalMem": 2**30}
    mod.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props,
                                      getDevice=lambda: 0)
    )

    def passthrough(name):  # NumPy's functions, returning stand-in arrays as CuPy's would
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value

        def wrapped(*args, **kwargs):
            out = value(*args, **kwargs)
            return out.view(StandInDeviceArray) if type(out) is np.ndarray else out

        return wrapped

    mod.__getattr__ = passthrough
    return mod


@pytest.fixture
def standin_gpu(monkeypatch):
    """Make diffgpu believe a GPU exists, with NumPy-subclass 'device' arrays."""
    import diffgpu.device as dev

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = _standin_cupy()
    monkeypatch.setattr(dev, "_CUPY_IMPORT", (fake, None))
    return fake


@pytest.fixture
def no_gpu(monkeypatch):
    """Hide any GPU the way users do: CUDA_VISIBLE_DEVICES=''."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def cupy():
    """The real CuPy module (gpu tests only)."""
    import diffgpu.device as dev

    return dev.require_gpu()


@pytest.fixture(autouse=True)
def _quiet_progressbars():
    import hyperspy.api as hs

    old = hs.preferences.General.show_progressbar
    hs.preferences.General.show_progressbar = False
    yield
    hs.preferences.General.show_progressbar = old


def pytest_report_header(config):
    import diffgpu

    gpus = diffgpu.devices()
    where = ", ".join(str(d) for d in gpus) if gpus else "none (gpu tests will be skipped)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [f"diffgpu CUDA devices: {where}", f"CUDA_VISIBLE_DEVICES={visible!r}"]
