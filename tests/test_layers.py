"""The layers read one way: kernels -> operations -> signal classes -> command line and demo.

A static check of every import statement (module level and inside functions): operations and
kernels never import a signal class (they return :class:`diffgpu.results.OperationResult`),
and nothing below the command line imports it. A subprocess cannot check this at run time:
``import diffgpu.azimuthal`` runs ``diffgpu/__init__``, which imports the signals.
"""

import ast
from pathlib import Path

import pytest

import diffgpu

ROOT = Path(diffgpu.__file__).parent
OPERATIONS = ["azimuthal", "beam", "virtual", "orientation", "cleanup", "mapping", "results",
              "calibration", "geometry", "detectors", "templates", "device"]


def imported_modules(path):
    """Absolute names of every module ``path`` imports, anywhere in the file."""
    package = ".".join(("diffgpu",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)  # "from . import signals"
    return names


def _layer_files():
    files = [ROOT / f"{name}.py" for name in OPERATIONS]
    files += sorted((ROOT / "kernels").glob("*.py"))
    return [f for f in files if f.exists()]


@pytest.mark.parametrize("path", _layer_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_operations_and_kernels_do_not_import_signal_classes(path):
    bad = sorted(m for m in imported_modules(path)
                 if m == "diffgpu.signals" or m.startswith("diffgpu.signals.")
                 or m in ("diffgpu.cli", "diffgpu.demo"))
    assert not bad, f"{path.name} imports {bad}: return an OperationResult instead"


def test_kernels_import_no_operation():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        above = sorted(m for m in imported_modules(path)
                       if m.split(".")[:2] in [["diffgpu", op] for op in OPERATIONS
                                               if op not in ("device",)])
        assert not above, f"kernels/{path.name} imports {above}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = ROOT / "_layer_probe_tmp.py"
    probe.write_text("def f():\n    from .signals import PolarPatterns\n")
    try:
        assert "diffgpu.signals.PolarPatterns" in imported_modules(probe)
    finally:
        probe.unlink()


def test_signal_methods_wrap_operation_results():
    import numpy as np

    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(32, 32), lazy=False)
    from diffgpu.azimuthal import azimuthal_integral
    from diffgpu.results import OperationResult

    r = azimuthal_integral(s, 10)
    assert isinstance(r, OperationResult) and r.signal_type == "radial_profiles" and not r.lazy
    p = s.get_azimuthal_integral1d(npt=10)
    assert isinstance(p, diffgpu.RadialProfiles)
    np.testing.assert_array_equal(p.data, r.data)
    assert s.get_azimuthal_integral2d(npt=10, npt_azim=8, inplace=True) is None
    assert isinstance(s, diffgpu.PolarPatterns) and s.data.shape == (2, 3, 10, 8)
