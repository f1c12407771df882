"""The example scripts run (small sizes) and write their figures."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_azimuthal_integration_example(tmp_path, monkeypatch, capsys):
    run_example("azimuthal_integration.py", "--output", str(tmp_path), "--nav", "2", "3",
                "--sig", "64", "64", monkeypatch=monkeypatch)
    assert (tmp_path / "azimuthal_integration.png").stat().st_size > 10_000
    assert "integrated 6 patterns" in capsys.readouterr().out


def test_beam_and_virtual_images_example(tmp_path, monkeypatch, capsys):
    run_example("beam_and_virtual_images.py", "--output", str(tmp_path), "--nav", "6", "8",
                "--sig", "64", "64", monkeypatch=monkeypatch)
    assert (tmp_path / "beam_and_virtual_images.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    rms = float(out.split("against the truth: ")[1].split(" px")[0])
    assert rms < 0.1


def test_orientation_mapping_example(tmp_path, monkeypatch, capsys):
    run_example("orientation_mapping.py", "--output", str(tmp_path), "--nav", "4", "5",
                "--resolution", "3", monkeypatch=monkeypatch)
    assert (tmp_path / "orientation_map.png").stat().st_size > 10_000
    assert "within 2 degrees of the truth" in capsys.readouterr().out


def test_reliability_map_example(tmp_path, monkeypatch, capsys):
    run_example("reliability_map.py", "--output", str(tmp_path), "--nav", "6", "6",
                "--resolution", "2", monkeypatch=monkeypatch)
    assert (tmp_path / "reliability_map.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "ambiguous (reliability 0)" in out and "<111> twin" in out


def test_batch_job_stops_when_its_cluster_does_not_start(tmp_path):
    """examples/batch_job.sh waited for the cluster's address until the job's walltime when
    the cluster's script had failed (here: dask-jobqueue not installed)."""
    import importlib.util
    import os
    import shutil
    import subprocess

    import pytest

    if importlib.util.find_spec("dask_jobqueue") is not None or shutil.which("bash") is None:
        pytest.skip("needs bash and no dask-jobqueue (its cluster must fail to start)")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", str(EXAMPLES / "batch_job.sh"), str(tmp_path / "scan.mib"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 1
    assert "did not start" in proc.stderr
