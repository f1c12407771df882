"""benchmarks/gpu_acceptance.py: without a GPU it changes nothing and says why; its GPU stages
keep to CuPy's rules (run small on the strict stand-in); its results go in RESULTS.md."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_it_says_why_lists_the_stages_and_exits_0(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No GPU: CUDA_VISIBLE_DEVICES is empty" in proc.stdout
    for what in ("pytest -m gpu", "integration", "virtual images", "25,651", "dask-cuda"):
        assert what in proc.stdout
    assert results.read_text() == "# Benchmark results\n"
    assert not (tmp_path / "out").exists()


def test_results_go_above_the_earlier_sections(acceptance, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nHow to.\n\n## 2026-11-25, older\n\nold\n")
    figures = {"integration": {"integration 2D, device-resident (frames/s)": 2.0e6,
                               "pipeline / host->device bandwidth": 0.4},
               "cluster": {"skipped": "1 GPU: one worker per GPU needs several"}}
    section = acceptance.results_table("NVIDIA H200", figures, 321.0)
    acceptance.add_to_results(section, path)
    text = path.read_text()
    assert text.index("GPU acceptance on NVIDIA H200") < text.index("## 2026-11-25, older")
    assert text.startswith("# Benchmark results\n\nHow to.\n\n## ")
    assert ("| integration | integration 2D, device-resident (frames/s) | 2,000,000 | "
            ">= 1,000,000 | yes |") in text
    assert "| integration | pipeline / host->device bandwidth | 0.40 | >= 0.50 | **no** |" in text
    assert "in 321 s" in text


@pytest.mark.parametrize("stage", ["integration", "virtual", "matching"])
def test_gpu_stages_keep_to_cupys_rules(acceptance, standin_gpu, monkeypatch, stage):
    """The GPU stages, small, on the strict stand-in: no NumPy-only call on device data."""
    monkeypatch.setattr(acceptance, "N_FRAMES", 512)
    monkeypatch.setattr(acceptance, "N_PATTERNS", 4)
    monkeypatch.setattr(acceptance, "LIBRARIES", ((6.0, "small", 1),))
    monkeypatch.setattr(acceptance, "SHAPE", (128, 128))
    monkeypatch.setattr(acceptance, "CENTER", (64.3, 60.7))
    monkeypatch.setattr(acceptance, "R_MAX", 1.28 * 128 / 256 * 2)
    monkeypatch.setattr(acceptance, "median_time", lambda f, repeat=1, warmup=0, sync=None:
                        (f(), sync and sync(), 1.0)[-1])
    out = {}
    acceptance.STAGE_FUNCS[stage](out)
    json.dumps(out)  # what a stage process prints
    assert out and "error" not in out
    assert all(isinstance(v, (float, int, str)) for v in out.values())
    if stage == "matching":  # refinement on the device too
        assert "refinement small: median error (deg)" in out, out
