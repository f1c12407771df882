"""Root pytest configuration: the ``gpu`` marker and a CPU stand-in for CuPy.

Tests marked ``gpu`` run the real CuPy paths; they are skipped, with the reason,
wherever no CUDA device works (the device count is probed, not just the import).

The ``standin_gpu`` fixture installs a strict CPU stand-in for CuPy
(tests/_strict_cupy.py): device arrays that refuse NumPy conversion, dispatch only
to functions real CuPy has, and count every host<->device transfer. Tests using it
are marked ``cupy_rules`` (``pytest -m cupy_rules``). It checks the rules CuPy
enforces, not speed or CUDA itself.
"""

import os
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")


def pytest_collection_modifyitems(config, items):
    import diffgpu.device as dev

    for item in items:  # every test on the strict stand-in runs with `pytest -m cupy_rules`
        if "standin_gpu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cupy_rules)

    _, n, reason = dev._probe()
    if n > 0:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The strict stand-in lives in tests/_strict_cupy.py; imported once, under that one name.
sys.path.insert(0, str(Path(__file__).parent / "tests"))
import _strict_cupy  # noqa: E402

StandInDeviceArray = _strict_cupy.DeviceArray
TRANSFERS = _strict_cupy.TRANSFERS


@pytest.fixture
def standin_gpu(monkeypatch):
    """Make diffgpu believe a GPU exists, with strict stand-in CuPy arrays (see
    tests/_strict_cupy.py): returns the stand-in ``cupy`` module; ``standin_gpu.TRANSFERS``
    counts host<->device crossings (reset for each test)."""
    return _strict_cupy.install(monkeypatch)


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


@pytest.fixture(scope="module")
def si():
    """The Si phase of the orientation tests."""
    from diffgpu.templates import TemplateLibrary

    return TemplateLibrary.silicon()


@pytest.fixture(scope="module")
def lib(si):
    """A 2-degree Si library to 1.2 1/Å (a few hundred templates: quick to match)."""
    from diffgpu.templates import TemplateLibrary

    return TemplateLibrary.from_phase(si, resolution=2.0, reciprocal_radius=1.2)
