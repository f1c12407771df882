"""The command line on every file format diffgpu reads, as a facility user runs it: each run's
result equals the Python API's on the same file, the outputs keep the file's calibration, and
bad files or arguments give the documented exit codes with nothing written."""

import os

import h5py
import hyperspy.api as hs
import numpy as np
import pytest
from _dm4 import write_dm4

import diffgpu
from diffgpu import templates
from diffgpu.cli import main
from diffgpu.readers.mib import write_mib

hdf5plugin = pytest.importorskip("hdf5plugin")


def _frames(nav, sig, dtype="uint16", seed=0):
    """A direct beam and a ring with Poisson noise."""
    ny, nx = sig
    y, x = np.mgrid[:ny, :nx]
    r = np.hypot(x - (nx - 1) / 2, y - (ny - 1) / 2)
    lam = 100 * (r < 0.12 * nx) + 10 * (np.abs(r - 0.3 * nx) < 1.5) + 1.0
    return np.random.default_rng(seed).poisson(lam, nav + sig).astype(dtype)


def write_arina(folder, frames, scan=None, name="scan"):
    """An ARINA master file and its bitshuffle-LZ4 data file, with the scan system's
    ``<name>.h5`` (``STEM Metadata``) where ``scan = (columns, rows, step_nm)``."""
    master = os.path.join(folder, f"{name}_master.h5")
    with h5py.File(master, "w") as m:
        det = m.create_group("entry/instrument/detector")
        det["description"] = b"Dectris ARINA CZT"
        det["x_pixel_size"], det["y_pixel_size"] = 1e-4, 1e-4
        det["detector_distance"] = 0.0
        spec = det.create_group("detectorSpecific")
        spec["nimages"], spec["ntrigger"] = np.uint64(1), np.uint64(len(frames))
        spec["photon_energy"] = 300000.0
        data = f"{name}_data_000001.h5"
        with h5py.File(os.path.join(folder, data), "w") as f:
            f.create_dataset("entry/data/data", data=frames, chunks=(1,) + frames.shape[1:],
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        m["entry/data/data_000001"] = h5py.ExternalLink(data, "entry/data/data")
    if scan is not None:
        with h5py.File(os.path.join(folder, f"{name}.h5"), "w") as f:
            group = f.create_group("STEM Metadata")
            group.attrs["NumPixelsX"], group.attrs["NumPixelsY"] = np.int64(scan[0]), np.int64(scan[1])
            group.attrs["Pixel Size"] = np.array([scan[2]])
            group.attrs["High Tension"] = np.array([300000.0])
    return master


EMPAD_XML = """<root name="scan"><raw_file filename="{raw}"/><scan_parameters mode="acquire">\
<scan_size>0.6</scan_size><scan_resolution_y>{ny}</scan_resolution_y><scan_resolution_x>{nx}\
</scan_resolution_x></scan_parameters><iom_measurements><full_scan_field_of_view>\
<scale_factor>0.72</scale_factor><x>1.44e-07</x><y>1.44e-07</y></full_scan_field_of_view>\
<nominal_camera_length>0.369</nominal_camera_length><high_voltage>300000.0</high_voltage>\
</iom_measurements></root>"""


def write_empad(folder, counts):
    ny, nx = counts.shape[:2]
    raw = f"scan_x{nx}_y{ny}.raw"
    frames = np.zeros((ny * nx, 130, 128), "<f4")
    frames[:, :128] = counts.reshape(-1, 128, 128)
    frames.tofile(os.path.join(folder, raw))
    xml = os.path.join(folder, "scan.xml")
    with open(xml, "w") as f:
        f.write(EMPAD_XML.format(raw=raw, nx=nx, ny=ny))
    return xml


def _hyperspy_signal(counts, units="1/nm"):
    s = hs.signals.Signal2D(counts)
    for ax in s.axes_manager.navigation_axes:
        ax.scale, ax.units = 2.0, "nm"
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.units, ax.offset = 0.05, units, -(ax.size - 1) / 2 * 0.05
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", 200.0)
    return s


def write_format(fmt, folder):
    """A small file of format ``fmt`` in ``folder``: its path and its scan step (nm)."""
    counts = _frames((4, 6), (32, 32))
    path = os.path.join(folder, f"scan.{fmt}")
    if fmt == "mib":
        write_mib(path, counts)
        return path, 1.0
    if fmt == "arina":
        return write_arina(folder, counts.reshape(24, 32, 32), scan=(6, 4, 0.139)), 0.139
    if fmt == "empad":
        return write_empad(folder, _frames((2, 3), (128, 128), "<f4")), 1.44e-7 / 0.72 / 3 * 1e9
    if fmt == "dm4":
        write_dm4(path, counts, signal_scale=0.05, signal_units="1/nm", signal_origin=(16, 16),
                  nav_scale=2.0, nav_units="nm", voltage=200000.0)
        return path, 2.0
    if fmt == "blo":
        _hyperspy_signal(counts.astype("uint8"), units="cm").save(
            path, intensity_scaling=None, show_progressbar=False)
        return path, 2.0
    _hyperspy_signal(counts).save(path, show_progressbar=False)
    return path, 2.0


FORMATS = ["mib", "arina", "empad", "dm4", "blo", "hspy", "zspy"]


def _nav(s):
    return [(round(ax.scale, 9), ax.units) for ax in s.axes_manager.navigation_axes]


@pytest.mark.parametrize("fmt", FORMATS)
def test_integrate_and_virtual_equal_the_api_on_every_format(fmt, tmp_path):
    path, step = write_format(fmt, tmp_path)
    s = diffgpu.load(path)
    cx, cy = (n / 2 for n in s.calibration.detector_shape[::-1])
    r = 3 * s.calibration.scale[0]
    polar = tmp_path / "polar.zspy"
    assert main(["integrate", path, "-o", str(polar), "--npt", "8", "--npt-azim", "12",
                 "--center", str(cx), str(cy), "--chunks", "5", "--no-progress"]) == 0
    s.calibration.center = (cx, cy)
    ref = s.get_azimuthal_integral2d(npt=8, npt_azim=12)
    ref.compute(show_progressbar=False)
    got = diffgpu.load(polar, lazy=False)
    np.testing.assert_allclose(got.data, ref.data, rtol=1e-6)
    assert _nav(got) == _nav(ref) and got.axes_manager.navigation_axes[0].scale == pytest.approx(step)
    assert got.axes_manager.signal_axes[0].units == ref.axes_manager.signal_axes[0].units
    assert got.metadata.get_item("Acquisition_instrument.TEM.beam_energy") == s.calibration.beam_energy
    profiles = tmp_path / "profiles.zspy"
    assert main(["integrate", path, "-o", str(profiles), "--1d", "--npt", "8", "--no-progress",
                 "--center", str(cx), str(cy)]) == 0
    ref = s.get_azimuthal_integral1d(npt=8)
    ref.compute(show_progressbar=False)
    np.testing.assert_allclose(diffgpu.load(profiles, lazy=False).data, ref.data, rtol=1e-6)
    images = tmp_path / "vi.zspy"
    assert main(["virtual", path, "-o", str(images), "--disc", str(r), "--annulus", str(r),
                 str(4 * r), "--center", str(cx), str(cy), "--no-progress"]) == 0
    ref = s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=r),
                               hs.roi.CircleROI(cx=0, cy=0, r=4 * r, r_inner=r)])
    ref.compute(show_progressbar=False)
    got = diffgpu.load(images, lazy=False)
    np.testing.assert_allclose(got.data, ref.data, rtol=1e-6)
    assert _nav(got) == _nav(ref)
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_strain_of_an_arina_scan_equals_the_api(tmp_path):
    from diffgpu.synthetic_nbed import synthetic_nbed

    s = synthetic_nbed(nav_shape=(4, 6), sig_shape=(48, 48), g1=(10.0, 1.0), g2=(-2.0, 9.0),
                       disk_radius=2.5)
    frames = np.asarray(s.data, "float32").astype("uint16").reshape(24, 48, 48)
    master = write_arina(tmp_path, frames, scan=(6, 4, 0.5))
    out = tmp_path / "strain.zspy"
    assert main(["strain", master, "-o", str(out), "--radius", "2.5", "--no-progress"]) == 0
    ref = diffgpu.load(master).find_bragg_disks(radius=2.5).get_strain_map()
    ref.compute(show_progressbar=False)
    got = diffgpu.load(out, lazy=False)
    np.testing.assert_allclose(got.data, ref.data, equal_nan=True)
    assert _nav(got) == [(0.5, "nm"), (0.5, "nm")]


@pytest.mark.parametrize("voltage, expected", [([], 300.0), (["--voltage", "120"], 120.0)])
def test_orientation_templates_at_the_files_beam_energy(tmp_path, monkeypatch, voltage, expected):
    """A 300 keV EMPAD scan's templates are cut from a 300 keV Ewald sphere, not 200 kV's."""
    path, _ = write_format("empad", tmp_path)
    seen = {}

    def from_phase(phase, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(templates.TemplateLibrary, "from_phase", staticmethod(from_phase))
    with pytest.raises(RuntimeError, match="stop here"):
        main(["orientation", path, "-o", str(tmp_path / "o.zspy"), "--phase", "Si",
              "--no-progress"] + voltage)
    assert seen["accelerating_voltage"] == expected


def test_orientation_small(tmp_path):
    path, _ = write_format("dm4", tmp_path)
    out = tmp_path / "o.zspy"
    assert main(["orientation", path, "-o", str(out), "--phase", "Si", "--resolution", "8",
                 "--scale", "0.05", "--units", "1/Å", "--reciprocal-radius", "1.0",
                 "--no-progress"]) == 0
    got = diffgpu.load(out, lazy=False)
    assert isinstance(got, diffgpu.OrientationMatches) and _nav(got) == [(2.0, "nm")] * 2
    assert got.metadata.Acquisition_instrument.TEM.beam_energy == 200.0


def test_info_and_errors_speak_the_command_lines_words(tmp_path, capsys):
    stack = str(tmp_path / "stack.mib")
    write_mib(stack, _frames((24,), (16, 16)), hdr=False)
    assert main(["info", stack]) == 0
    out = capsys.readouterr().out
    assert "--navigation-shape" in out and "navigation_shape=" not in out
    assert main(["info", stack, "--navigation-shape", "6", "4"]) == 0
    out = capsys.readouterr().out
    assert "(6, 4|16, 16)" in out and "navigation_shape=" not in out
    master = write_arina(tmp_path, _frames((24,), (16, 16)))
    out = tmp_path / "x.zspy"
    assert main(["integrate", master, "-o", str(out), "--navigation-shape", "5", "4"]) == 3
    err = capsys.readouterr().err
    assert "needs 20" in err
    assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if "partial" not in p]
    assert not out.exists()


@pytest.mark.parametrize("value", ["bogus", "tcp://host"])
def test_a_scheduler_that_is_no_address_is_a_bad_argument(tmp_path, capsys, value):
    path, _ = write_format("hspy", tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["integrate", path, "-o", str(tmp_path / "x.zspy"), "--scheduler", value])
    assert exit_.value.code == 2
    assert "--scheduler" in capsys.readouterr().err


def test_info_says_what_a_run_takes_from_the_files_metadata(tmp_path, capsys):
    master = write_arina(tmp_path, _frames((24,), (16, 16)), scan=(6, 4, 0.139))
    assert main(["info", master]) == 0
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["shape"] == "(6, 4|16, 16)"
    assert rows["scan step"] == "0.139 nm, 0.139 nm (x, y)"
    assert rows["beam energy"] == "300 keV"
    assert rows["detector scale"].startswith("not recorded") and "--scale" in rows["detector scale"]
    assert rows["beam centre"].startswith("(7.5, 7.5) pixels")
    path, _ = write_format("dm4", tmp_path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "0.05 x 0.05 1/nm per pixel" in out and "200 keV" in out and "2 nm, 2 nm" in out
