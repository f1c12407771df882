"""The diffgpu command line, end to end on small files."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import diffgpu
from diffgpu.cli import main


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "scan.zspy"
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(48, 48), chunks=(2, 6))
    s.save(path, show_progressbar=False)
    return path


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "diffgpu" in out and "CUDA devices" in out or "GPU 0" in out
    assert "dask-cuda" in out


def test_integrate_2d_and_1d(scan_file, tmp_path):
    out = tmp_path / "polar.zspy"
    assert main(["integrate", str(scan_file), "-o", str(out), "--npt", "20", "--npt-azim", "36",
                 "--mean", "--no-progress"]) == 0
    polar = diffgpu.load(out, lazy=False)
    assert isinstance(polar, diffgpu.PolarPatterns) and polar.data.shape == (4, 6, 20, 36)
    ref = diffgpu.load(scan_file).get_azimuthal_integral2d(npt=20, npt_azim=36, mean=True)
    ref.compute()
    np.testing.assert_allclose(polar.data, ref.data, rtol=1e-6)
    out1 = tmp_path / "profiles.zspy"
    assert main(["integrate", str(scan_file), "-o", str(out1), "--1d", "--npt", "16",
                 "--center", "24.0", "23.5", "--no-progress"]) == 0
    prof = diffgpu.load(out1, lazy=False)
    assert isinstance(prof, diffgpu.RadialProfiles) and prof.data.shape == (4, 6, 16)
    assert prof.metadata.Integration.center == [24.0, 23.5]
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_virtual(scan_file, tmp_path):
    out = tmp_path / "vi.zspy"
    assert main(["virtual", str(scan_file), "-o", str(out), "--disc", "3",
                 "--annulus", "8", "20", "--no-progress"]) == 0
    images = diffgpu.load(out, lazy=False)
    assert isinstance(images, diffgpu.VirtualImages) and images.data.shape == (2, 4, 6)


def test_errors_have_exit_codes_and_leave_no_output(scan_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.zspy"
    assert main(["integrate", str(tmp_path / "missing.mib"), "-o", str(out)]) == 3
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.hspy"
    bad.write_bytes(b"not a file format")
    assert main(["integrate", str(bad), "-o", str(out)]) == 3
    assert "could not read" in capsys.readouterr().err
    np.save(tmp_path / "mask.npy", np.zeros((5, 5), bool))
    assert main(["integrate", str(scan_file), "-o", str(out), "--mask",
                 str(tmp_path / "mask.npy")]) == 3
    assert "mask shape" in capsys.readouterr().err
    assert main(["integrate", str(scan_file), "-o", str(out), "--npt", "0"]) == 3
    assert main(["virtual", str(scan_file), "-o", str(out)]) == 3
    assert "no detector" in capsys.readouterr().err
    assert main(["integrate", str(scan_file), "-o", str(tmp_path / "x.h5")]) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["integrate", str(scan_file), "-o", str(out), "--device", "gpu"]) == 4
    assert "No GPU available" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["integrate"])
    assert exc.value.code == 2


def test_existing_output_needs_overwrite(scan_file, tmp_path):
    out = tmp_path / "polar.zspy"
    args = ["integrate", str(scan_file), "-o", str(out), "--npt", "8", "--npt-azim", "8",
            "--no-progress"]
    assert main(args) == 0
    assert main(args) == 3
    assert main(args + ["--overwrite"]) == 0


def test_interrupted_run_leaves_no_output(tmp_path):
    big = tmp_path / "big.zspy"
    diffgpu.data.synthetic_4dstem(nav_shape=(48, 48), sig_shape=(96, 96), noise=False,
                                  chunks=(2, 48)).save(big, show_progressbar=False)
    out = tmp_path / "out.zspy"
    proc = subprocess.Popen([sys.executable, "-m", "diffgpu", "integrate", str(big), "-o", str(out),
                             "--npt", "96", "--npt-azim", "720", "--no-progress"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any("partial" in p for p in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_demo(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--nav", "4", "6", "--sig", "48", "48",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "main_job.png").stat().st_size > 10_000
    assert "beam found" in capsys.readouterr().out


def test_local_cluster_scheduler(scan_file, tmp_path):
    out = tmp_path / "vi.zspy"
    assert main(["virtual", str(scan_file), "-o", str(out), "--disc", "4", "--device", "cpu",
                 "--scheduler", "local-cluster", "--no-progress"]) == 0
    assert diffgpu.load(out, lazy=False).data.shape == (1, 4, 6)


def test_orientation(tmp_path, capsys):
    from orix.quaternion import Rotation

    s = diffgpu.data.orientation_patterns(diffgpu.TemplateLibrary.silicon(), Rotation.random(4),
                                          sig_shape=(128, 128), calibration=0.02)
    s.data = s.data.reshape(2, 2, 128, 128)
    s = diffgpu.DiffractionPatterns(s.data, metadata=s.metadata.as_dictionary())
    s.calibration.center = (63.5, 63.5)
    s.calibration.scale = 0.02
    s.calibration.units = "1/Å"
    s.save(tmp_path / "si.zspy", show_progressbar=False)
    out, png, rel = tmp_path / "ori.zspy", tmp_path / "ipf.png", tmp_path / "rel.png"
    assert main(["orientation", str(tmp_path / "si.zspy"), "-o", str(out), "--phase", "Si",
                 "--resolution", "4", "--n-best", "2", "--ipf", str(png), "--reliability", str(rel),
                 "--no-progress"]) == 0
    m = diffgpu.load(out, lazy=False)
    assert isinstance(m, diffgpu.OrientationMatches) and m.data.shape == (2, 2, 2, 5)
    assert png.stat().st_size > 1000 and rel.stat().st_size > 1000
    refined = tmp_path / "refined.zspy"
    assert main(["orientation", str(tmp_path / "si.zspy"), "-o", str(refined), "--phase", "Si",
                 "--resolution", "4", "--refine", "--n-best", "3", "--reliability", str(rel),
                 "--no-progress"]) == 0
    assert "ambiguous:" in capsys.readouterr().out
    r = diffgpu.load(refined, lazy=False)
    assert np.asarray(r.metadata.Refined.rotations).shape == (2, 2, 4)
    # what get_reliability needs survives saving
    assert np.asarray(r.metadata.Refined.similarity).shape == (2, 2, 3)
    reliability = r.get_reliability()
    assert reliability.data.shape == (2, 2)
    assert np.all((reliability.data >= 0) & (reliability.data <= 1))
    assert reliability.metadata.Reliability.ambiguous == int((reliability.data == 0).sum())
    with pytest.raises(SystemExit) as exc:  # --reliability needs --n-best >= 2
        main(["orientation", str(tmp_path / "si.zspy"), "-o", str(tmp_path / "y.zspy"),
              "--phase", "Si", "--reliability", str(rel)])
    assert exc.value.code == 2
    assert not (tmp_path / "y.zspy").exists()
    assert main(["orientation", str(tmp_path / "si.zspy"), "-o", str(tmp_path / "x.zspy"),
                 "--phase", str(tmp_path / "missing.cif")]) == 3


def test_chunks_of_a_detector_file_keep_it_read_in_place(tmp_path, monkeypatch):
    from diffgpu import cli
    from diffgpu.readers.mib import write_mib
    from diffgpu.sources import stored_frames

    frames = np.random.default_rng(0).poisson(3, (4, 6, 32, 32)).astype("uint16")
    path = tmp_path / "scan.mib"
    write_mib(path, frames)
    seen = {}
    load = cli._load

    def spy(args):
        s = load(args)
        seen["stored"], seen["chunks"] = stored_frames(s.data), s.data.chunks
        return s

    monkeypatch.setattr(cli, "_load", spy)
    out = tmp_path / "vi.zspy"
    assert main(["virtual", str(path), "-o", str(out), "--disc", "3", "--chunks", "12",
                 "--no-progress"]) == 0
    assert seen["stored"] is not None  # not rechunked into a decoded copy
    assert seen["stored"].nav_chunks == ((2, 2), (6,))  # 12 frames: two scan rows
    whole = tmp_path / "vi_whole.zspy"
    assert main(["virtual", str(path), "-o", str(whole), "--disc", "3", "--no-progress"]) == 0
    np.testing.assert_allclose(diffgpu.load(out, lazy=False).data,
                               diffgpu.load(whole, lazy=False).data, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["blo", "hspy"])
def test_chunks_of_other_formats(tmp_path, fmt, monkeypatch):
    from diffgpu import cli

    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), lazy=False)
    s.data = s.data.astype("uint8") if fmt == "blo" else s.data
    for ax in s.axes_manager.navigation_axes:
        ax.units = "nm"  # what a blockfile records
    path = tmp_path / f"scan.{fmt}"
    s.save(path, show_progressbar=False)
    seen = {}
    load = cli._load

    def spy(args):
        seen["chunks"] = load(args).data.chunks[:2]
        return load(args)

    monkeypatch.setattr(cli, "_load", spy)
    out = tmp_path / "vi.zspy"
    assert main(["virtual", str(path), "-o", str(out), "--disc", "3", "--chunks", "12",
                 "--no-progress"]) == 0
    assert seen["chunks"] == ((2, 2), (6,))


def test_an_int_of_chunks_for_a_blockfile_keeps_frames_whole(tmp_path):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), lazy=False)
    s.data = s.data.astype("uint8")
    for ax in s.axes_manager.navigation_axes:
        ax.units = "nm"  # what a blockfile records
    path = tmp_path / "scan.blo"
    s.save(path, show_progressbar=False)
    loaded = diffgpu.load(path, chunks=12)
    assert loaded.data.chunks == ((2, 2), (6,), (32,), (32,))
