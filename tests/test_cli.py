"""The diffgpu command line, end to end on small files."""

import os
import shutil
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
    import warnings

    out = tmp_path / "vi.zspy"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # none of a library's own deprecations
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
    with pytest.raises(SystemExit) as exc:  # a bad number is a bad argument
        main(["integrate", str(scan_file), "-o", str(out), "--npt", "0"])
    assert exc.value.code == 2
    # a bad radial range is found by the integration itself: bad input
    assert main(["integrate", str(scan_file), "-o", str(out), "--radial-range", "5", "2"]) == 3
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


def test_an_output_that_appears_during_the_run_is_kept(scan_file, tmp_path, monkeypatch):
    """The output was checked only before the run, then replaced whatever was there at the
    end: another run's result, or a user's folder, was deleted without --overwrite."""
    import diffgpu.cli as cli

    out = tmp_path / "polar.zspy"
    real = cli._Figures

    def appear(*a, **kw):  # the moment the result is being written
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        return real(*a, **kw)

    monkeypatch.setattr(cli, "_Figures", appear)
    args = ["integrate", str(scan_file), "-o", str(out), "--npt", "8", "--npt-azim", "8",
            "--no-progress"]
    assert main(args) == 3
    assert (out / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    # --overwrite replaces a .zspy store, not a folder of the user's files
    assert main(args[:-1] + ["--overwrite", "--no-progress"]) == 3
    assert (out / "notes.txt").read_text() == "precious"


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
                 "--no-progress"]) == 3  # an existing figure needs --overwrite, as OUTPUT does
    assert "rel.png' exists" in capsys.readouterr().err and not refined.exists()
    assert main(["orientation", str(tmp_path / "si.zspy"), "-o", str(refined), "--phase", "Si",
                 "--resolution", "4", "--refine", "--n-best", "3", "--reliability", str(rel),
                 "--no-progress", "--overwrite"]) == 0
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


@pytest.fixture(scope="module")
def nbed_file(tmp_path_factory):
    from diffgpu.synthetic_nbed import synthetic_nbed

    path = tmp_path_factory.mktemp("nbed") / "nbed.zspy"
    synthetic_nbed(nav_shape=(4, 5), sig_shape=(64, 64), dose=2e6).save(path,
                                                                        show_progressbar=False)
    return path


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if "partial" in p)


def test_figure_paths_are_checked_before_the_run(scan_file, nbed_file, tmp_path, capsys):
    out = tmp_path / "s.zspy"
    strain = ["strain", str(nbed_file), "-o", str(out), "--radius", "4", "--no-progress"]
    assert main(strain + ["--png", str(tmp_path / "nodir" / "s.png")]) == 3
    assert "'" + str(tmp_path / "nodir") + "' does not exist" in capsys.readouterr().err
    assert main(strain + ["--png", str(tmp_path / "s.txt")]) == 3
    assert "must end with a figure format" in capsys.readouterr().err
    (tmp_path / "old.png").write_bytes(b"old")
    assert main(strain + ["--png", str(tmp_path / "old.png")]) == 3
    assert "old.png' exists (use --overwrite" in capsys.readouterr().err
    assert main(strain + ["--png", str(out)]) == 3  # the same file as OUTPUT
    capsys.readouterr()
    ori = ["orientation", str(scan_file), "-o", str(out), "--phase", "Si", "--n-best", "2"]
    assert main(ori + ["--ipf", str(tmp_path / "missingdir" / "ipf.png")]) == 3
    assert main(ori + ["--ipf", str(tmp_path / "ipf.txt")]) == 3
    assert main(ori + ["--reliability", str(tmp_path / "nodir" / "rel.png")]) == 3
    assert "--reliability" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["old.png"]  # nothing written, not even partly


def test_a_failed_figure_leaves_no_output(nbed_file, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def refuse(self, *args, **kwargs):
        raise OSError("disk full")

    out, png = tmp_path / "s.zspy", tmp_path / "s.png"
    args = ["strain", str(nbed_file), "-o", str(out), "--radius", "4", "--png", str(png),
            "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", refuse)
        assert main(args) == 3
    assert "could not write --png" in capsys.readouterr().err
    assert not out.exists() and not png.exists() and _leftovers(tmp_path) == []
    assert main(args) == 0 and out.exists() and png.exists()
    before = diffgpu.load(out, lazy=False).data
    with monkeypatch.context() as m:  # --overwrite: the earlier output stays as it was
        m.setattr(matplotlib.figure.Figure, "savefig", refuse)
        assert main(args + ["--overwrite"]) == 3
    np.testing.assert_array_equal(diffgpu.load(out, lazy=False).data, before)
    assert _leftovers(tmp_path) == []


def test_missing_output_directory_is_an_error(scan_file, tmp_path, capsys):
    out = tmp_path / "missing_dir" / "x" / "a.zspy"
    assert main(["integrate", str(scan_file), "-o", str(out), "--npt", "8"]) == 3
    err = capsys.readouterr().err
    assert "'" + str(tmp_path / "missing_dir" / "x") + "' does not exist" in err
    assert not (tmp_path / "missing_dir").exists()


@pytest.mark.parametrize("chunks", ["0", "-5", "x"])
def test_chunks_must_be_a_positive_integer(scan_file, tmp_path, chunks):
    with pytest.raises(SystemExit) as exc:
        main(["integrate", str(scan_file), "-o", str(tmp_path / "a.zspy"), "--chunks", chunks])
    assert exc.value.code == 2


@pytest.mark.parametrize("chunks", [0, -5, 2.5, True])
def test_readers_refuse_chunks_that_are_not_positive(tmp_path, chunks):
    from diffgpu.chunking import chunks_of_frames
    from diffgpu.readers.mib import write_mib

    path = tmp_path / "scan.mib"
    write_mib(path, np.zeros((2, 3, 16, 16), "uint16"))
    with pytest.raises(ValueError, match="chunks must be a positive number of frames"):
        chunks_of_frames((2, 3), 512, chunks)
    # diffgpu.load checks a number of frames per chunk before any reader
    with pytest.raises(ValueError, match="chunks must be a positive number of frames"):
        diffgpu.load(path, chunks=chunks)


def test_center_mask_and_navigation_shape_are_checked(scan_file, tmp_path, capsys):
    out = tmp_path / "a.zspy"
    base = ["integrate", str(scan_file), "-o", str(out), "--npt", "8", "--npt-azim", "8",
            "--no-progress"]
    assert main(base + ["--center", "1e9", "1e9"]) == 3
    assert "lies outside the 48 x 48 detector" in capsys.readouterr().err
    assert main(base + ["--center", "50", "20"]) == 0  # just outside: a warning
    assert "warning: --center 50 20 lies outside" in capsys.readouterr().err
    shutil.rmtree(out)
    half = np.zeros((48, 48))
    half[0, 0] = 0.5
    np.save(tmp_path / "half.npy", half)
    assert main(base + ["--mask", str(tmp_path / "half.npy")]) == 3
    assert "values other than 0 and 1" in capsys.readouterr().err
    ones = np.zeros((48, 48))
    ones[:2] = 1.0  # floats that are 0 or 1: accepted, 1 = excluded
    np.save(tmp_path / "ones.npy", ones)
    assert main(base + ["--mask", str(tmp_path / "ones.npy")]) == 0
    assert main(base + ["--overwrite", "--navigation-shape", "3", "3"]) == 3
    err = capsys.readouterr().err
    assert "--navigation-shape applies only to" in err and "TypeError" not in err


def test_ring_spacings_need_rings(nbed_file, tmp_path, capsys):
    for extra in (["--d-spacings", "2.35", "2.04"], ["--ring-phase", "Si"]):
        with pytest.raises(SystemExit) as exc:
            main(["strain", str(nbed_file), "-o", str(tmp_path / "s.zspy"), "--radius", "4"]
                 + extra)
        assert exc.value.code == 2
        assert "give --rings FILE too" in capsys.readouterr().err


def test_orientation_radius_beyond_the_detector(tmp_path, capsys):
    s = diffgpu.DiffractionPatterns(np.zeros((2, 3, 64, 64), np.float32))
    s.calibration.center = (31.5, 31.5)
    s.calibration.scale = 0.04
    s.calibration.units = "1/Å"
    s.save(tmp_path / "ori.zspy", show_progressbar=False)
    out = tmp_path / "o.zspy"
    assert main(["orientation", str(tmp_path / "ori.zspy"), "-o", str(out), "--phase", "Si",
                 "--resolution", "5", "--reciprocal-radius", "3", "--no-progress"]) == 3
    assert "the data reach only 1.81 1/Å" in capsys.readouterr().err
    assert not out.exists()


def test_no_progress_means_no_progress_bar(tmp_path, capsys):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(32, 32), lazy=False)
    s.metadata.set_item("Extra.positions", np.arange(6.0).reshape(2, 3))  # an array in metadata
    s.save(tmp_path / "scan.hspy", show_progressbar=False)
    args = ["integrate", str(tmp_path / "scan.hspy"), "--npt", "8", "--npt-azim", "8"]
    assert main(args + ["-o", str(tmp_path / "a.zspy"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Completed" not in out and "integrated 6 patterns" in out
    assert main(args + ["-o", str(tmp_path / "b.zspy")]) == 0
    assert "Completed" in capsys.readouterr().out  # the bar, when asked for


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffgpu {diffgpu.__version__}"


def test_info_file_errors_are_clear(scan_file, tmp_path, capsys):
    from diffgpu.readers.mib import write_mib

    # a file that records its scan shape: the message the other subcommands give, exit 3
    assert main(["info", str(scan_file), "--navigation-shape", "4", "6"]) == 3
    err = capsys.readouterr().err
    assert "--navigation-shape applies only to" in err and "TypeError" not in err
    for shape in (["0", "12"], ["-4", "3"]):  # positive integers: a bad argument, exit 2
        with pytest.raises(SystemExit) as exc:
            main(["info", str(scan_file), "--navigation-shape", *shape])
        assert exc.value.code == 2
        assert "--navigation-shape: must be at least 1" in capsys.readouterr().err
    folder = tmp_path / "not_a_store"
    folder.mkdir()
    assert main(["info", str(folder)]) == 3
    assert "is a directory but not a .zspy store" in capsys.readouterr().err
    # one-byte words have no byte order
    write_mib(tmp_path / "u8.mib", np.zeros((2, 3, 16, 16), np.uint8), depth="U08")
    assert main(["info", str(tmp_path / "u8.mib")]) == 0
    out = capsys.readouterr().out
    assert "U08 (stored |u1: single bytes, no byte order)" in out and "big-endian" not in out


@pytest.mark.parametrize("radii, says", [
    (["--annulus", "10", "5"], "--annulus 10 5: R_IN must be smaller than R_OUT"),
    (["--annulus", "5", "5"], "--annulus 5 5: R_IN must be smaller than R_OUT"),
    (["--disc", "3", "--annulus", "-1", "5"], "--annulus -1 5: R_IN must be 0 or more"),
    (["--annulus", "2", "inf"], "--annulus 2 inf: R_IN and R_OUT must be finite numbers"),
    (["--disc", "inf"], "--disc: must be a finite positive number; got inf"),
    (["--disc", "nan"], "--disc: must be a finite positive number; got nan"),
    (["--disc", "0"], "--disc: must be a finite positive number; got 0"),
    (["--disc", "-2"], "--disc: must be a finite positive number; got -2"),
])
def test_virtual_radii_are_argument_errors(scan_file, tmp_path, capsys, radii, says):
    """An annulus with R_IN >= R_OUT was computed as a disc (HyperSpy drops such an r_inner),
    and --disc inf was blamed on a negative radius."""
    out = tmp_path / "v.zspy"
    with pytest.raises(SystemExit) as exc:
        main(["virtual", str(scan_file), "-o", str(out), "--no-progress"] + radii)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "HyperSpy" not in err
    assert not out.exists()


def test_virtual_of_scans_with_one_navigation_axis(tmp_path):
    """A .mib without .hdr, --navigation-shape N and a one-frame HDF5 stack: virtual images
    are VirtualProfiles, written as integrate writes its results (was a crash: HyperSpy's
    Signal1D.to_host refuses lazy data)."""
    import h5py
    import hyperspy.api as hs

    from diffgpu.readers.mib import write_mib

    frames = np.random.default_rng(3).integers(0, 50, (6, 24, 24)).astype("uint16")
    write_mib(tmp_path / "stack.mib", frames, hdr=False)  # no .hdr: a stack of 6 frames
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["a"] = frames[:1]
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=3), hs.roi.CircleROI(cx=0, cy=0, r=10, r_inner=4)]
    for k, (name, extra, n) in enumerate([("stack.mib", [], 6),
                                          ("stack.mib", ["--navigation-shape", "6"], 6),
                                          ("one.h5", [], 1)]):
        out = tmp_path / f"v{k}.zspy"
        assert main(["virtual", str(tmp_path / name), "-o", str(out), "--disc", "3",
                     "--annulus", "4", "10", "--no-progress"] + extra) == 0
        images = diffgpu.load(out, lazy=False)
        assert type(images) is diffgpu.VirtualProfiles and images.data.shape == (2, n)
        ref = diffgpu.load(tmp_path / name, lazy=False).get_virtual_image(rois)
        np.testing.assert_allclose(images.data, ref.data, rtol=1e-6)


def test_virtual_of_a_single_frame_and_of_a_3d_scan(tmp_path):
    """Scans of 0 and 3 navigation axes give HyperSpy's generic signals: written too."""
    import hyperspy.api as hs

    for nav in ((), (2, 2, 3)):
        path = tmp_path / f"nav{len(nav)}.zspy"
        diffgpu.DiffractionPatterns(np.ones(nav + (16, 16), np.float32)).save(
            path, show_progressbar=False)
        out = tmp_path / f"v{len(nav)}.zspy"
        assert main(["virtual", str(path), "-o", str(out), "--disc", "2", "--annulus", "3", "5",
                     "--no-progress"]) == 0
        assert hs.load(out).data.shape == (2,) + nav


def test_a_file_without_frames_is_bad_input(tmp_path, capsys):
    import h5py

    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros((0, 8, 8))
    out = tmp_path / "o.zspy"
    for command in (["virtual", str(path), "--disc", "3"], ["integrate", str(path), "--1d"]):
        assert main(command + ["-o", str(out), "--no-progress"]) == 3
        err = capsys.readouterr().err
        assert "'" + str(path) + "': the dataset 'a' holds no frames" in err, err
        assert not out.exists()
    assert main(["info", str(path)]) == 3
    assert "holds no frames" in capsys.readouterr().err


def test_info_of_a_result_says_what_read_it_and_its_axes(tmp_path, capsys):
    """`diffgpu info` of a result read the input's reader from the metadata the result
    inherited, and described every array as detector rows and columns."""
    from diffgpu.readers.mib import write_mib

    write_mib(tmp_path / "scan.mib", np.ones((2, 3, 16, 16), np.uint16))
    results = {"o1": ["--1d", "--npt", "8"], "o2": ["--npt", "8", "--npt-azim", "12"]}
    for name, extra in results.items():
        assert main(["integrate", str(tmp_path / "scan.mib"), "-o", str(tmp_path / f"{name}.zspy"),
                     "--no-progress"] + extra) == 0
    capsys.readouterr()
    expected = {"o1": "(2, 3, 8) (scan rows, scan columns, then radius)",
                "o2": "(2, 3, 8, 12) (scan rows, scan columns, then radius, azimuth)"}
    for name, array in expected.items():
        assert main(["info", str(tmp_path / f"{name}.zspy")]) == 0
        rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                    if line.startswith(("format", "array shape")))
        assert rows["format"].strip() == (".zspy read by rsciio.zspy (saved from data read by "
                                          "diffgpu.readers.mib)")
        assert rows["array"].split(None, 1)[1].strip() == array
    assert main(["info", str(tmp_path / "scan.mib")]) == 0
    out = capsys.readouterr().out
    assert "(2, 3, 16, 16) (scan rows, scan columns, then detector rows, columns)" in out


def test_messages_name_the_problem(tmp_path, capsys):
    import h5py

    from diffgpu.readers.mib import write_mib

    out = str(tmp_path / "o.zspy")
    with h5py.File(tmp_path / "stack.h5", "w") as f:
        f["a"] = np.ones((6, 8, 8))
    # a navigation shape that does not fit: plain numbers, not np.int64(7)
    assert main(["integrate", str(tmp_path / "stack.h5"), "-o", out, "--navigation-shape", "7",
                 "4"]) == 3
    err = capsys.readouterr().err
    assert "navigation_shape=(7, 4) needs 28" in err and "np." not in err
    # a .mib file renamed .zspy
    write_mib(tmp_path / "scan.mib", np.ones((2, 3, 16, 16), np.uint16))
    shutil.copy(tmp_path / "scan.mib", tmp_path / "renamed.zspy")
    assert main(["integrate", str(tmp_path / "renamed.zspy"), "-o", out]) == 3
    err = capsys.readouterr().err
    assert "is a file, not a .zspy store" in err and "a Merlin .mib file" in err, err
    assert "FSPathExistNotDir" not in err
    # a directory named like a data file
    (tmp_path / "folder.mib").mkdir()
    assert main(["integrate", str(tmp_path / "folder.mib"), "-o", out]) == 3
    assert "is a directory" in capsys.readouterr().err
    # a text file as the mask
    (tmp_path / "mask.txt").write_text("1 0 1\n")
    assert main(["integrate", str(tmp_path / "scan.mib"), "-o", out, "--mask",
                 str(tmp_path / "mask.txt")]) == 3
    err = capsys.readouterr().err
    assert "mask '" + str(tmp_path / "mask.txt") + "' is not a .npy file" in err, err
    assert "pickled" not in err
    assert not os.path.exists(out)


def test_a_scheduler_that_does_not_answer(scan_file, tmp_path, capsys, monkeypatch):
    """An unreachable --scheduler gave a raw OSError traceback and exit 1."""
    import dask

    monkeypatch.setitem(dask.config.config, "distributed", {**dask.config.config.get(
        "distributed", {}), "comm": {**dask.config.get("distributed.comm"),
                                     "timeouts": {"connect": "1s", "tcp": "1s"}}})
    out = tmp_path / "v.zspy"
    assert main(["virtual", str(scan_file), "-o", str(out), "--disc", "3",
                 "--scheduler", "tcp://127.0.0.1:1", "--no-progress"]) == 3
    assert "could not connect" in capsys.readouterr().err
    assert not out.exists()


def test_a_killed_run_s_partial_output_is_removed_by_the_next_run(tmp_path, scan_file, capsys):
    """A run killed by SIGKILL cannot clean up: its hidden partial output (as large as the
    result) stayed next to the output for good. The next run for that output removes the
    partials of processes that are gone on this host, and leaves a live run's alone."""
    import socket

    out = tmp_path / "polar.zspy"
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".polar.zspy.{host}-{dead.pid}-0123abcd.partial.zspy"
    live = tmp_path / f".polar.zspy.{host}-{os.getpid()}-4567abcd.partial.zspy"
    other = tmp_path / f".polar.zspy.elsewhere-{dead.pid}-89abcdef.partial.zspy"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "chunk").write_bytes(b"0" * 64)
    args = ["integrate", str(scan_file), "-o", str(out), "--npt", "8", "--npt-azim", "8",
            "--no-progress"]
    assert main(args) == 0
    assert out.is_dir() and not stale.exists()
    assert live.exists() and other.exists()  # a run still going; another host's disk
    assert f"process {dead.pid}" in capsys.readouterr().err


def test_device_gpu_is_checked_on_the_scheduler_s_workers(scan_file, tmp_path, capsys):
    """--device gpu with --scheduler: the GPUs are looked for where the transfer steps run,
    the cluster's workers (the client was connected only after to_device() had checked
    this machine, a login node without a GPU under a cluster of GPU nodes)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        code = main(["integrate", str(scan_file), "-o", str(tmp_path / "p.zspy"), "--npt", "8",
                     "--npt-azim", "8", "--device", "gpu", "--scheduler", cluster.scheduler_address,
                     "--no-progress"])
    assert code == 4
    assert "worker" in capsys.readouterr().err
    assert not (tmp_path / "p.zspy").exists()


def test_auto_device_asks_every_worker():
    from diffgpu import cli

    class Client:
        def __init__(self, seen):
            self.seen = seen

        def run(self, func, **kwargs):
            return self.seen

    assert not cli._gpus_where_computed(Client({"a": True, "b": False}))
    assert not cli._gpus_where_computed(Client({}))


def test_strain_output_records_its_failed_positions(nbed_file, tmp_path):
    """docs/strain_mapping.rst: the count of NaN positions is in metadata.Strain.n_failed; a
    lazy map saved as it was had none."""
    out = tmp_path / "s.zspy"
    assert main(["strain", str(nbed_file), "-o", str(out), "--radius", "4", "--no-progress"]) == 0
    done = diffgpu.load(out, lazy=False)
    assert done.metadata.Strain.n_failed == done.n_failed == 0


@pytest.mark.parametrize("args, message", [
    (["integrate", "--npt", "0"], "--npt: must be at least 1"),
    (["integrate", "--npt-azim", "-3"], "--npt-azim: must be at least 1"),
    (["integrate", "--radial-range", "0", "inf"], "--radial-range: must be a finite number"),
    (["integrate", "--center", "nan", "3"], "--center: must be a finite number"),
    (["integrate", "--scale", "0"], "--scale: must be a finite positive number"),
    (["orientation", "--phase", "Si", "--voltage", "nan"], "--voltage: must be a finite positive"),
    (["orientation", "--phase", "Si", "--n-best", "0"], "--n-best: must be at least 1"),
    (["orientation", "--phase", "Si", "--resolution", "-1"], "--resolution: must be a finite positive"),
    (["strain", "--radius", "0"], "--radius: must be a finite positive"),
    (["strain", "--radius", "4", "--relative-threshold", "1.5"], "--relative-threshold: must be from 0"),
    (["strain", "--radius", "4", "--max-disks", "0"], "--max-disks: must be at least 1"),
    (["strain", "--radius", "4", "--basis", "1", "0", "0", "inf"], "--basis: must be a finite number"),
])
def test_bad_numbers_are_argument_errors(args, message, tmp_path, capsys):
    # every number the command line takes is checked as an argument (exit 2) before any file is read
    with pytest.raises(SystemExit) as exc:
        main([args[0], str(tmp_path / "absent.mib"), "-o", str(tmp_path / "out.zspy"), *args[1:]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.zspy").exists()
