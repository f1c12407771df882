"""Interoperability with pyxem and HyperSpy as a pyxem user meets it: pyxem's files read by
diffgpu.load, and diffgpu's polar patterns handed to pyxem. pyxem itself is not needed: what
it writes (signal types, axes, units) is reproduced by hand."""

import math

import hyperspy.api as hs
import numpy as np
import pytest

import diffgpu


def _pyxem_file(path, data, signal_type, units=None, dims=2):
    """A file as pyxem saves a signal of ``signal_type`` (metadata.Signal.signal_type) with
    ``dims`` signal axes."""
    s = hs.signals.BaseSignal(data).transpose(signal_axes=dims)
    s.metadata.set_item("Signal.signal_type", signal_type)
    if units is not None:
        for ax in s.axes_manager.signal_axes:
            ax.units = units
    s.save(path, overwrite=True)
    return path


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
@pytest.mark.parametrize("signal_type, shape, dims", [
    ("beam_shift", (3, 4, 2), 1),                # pyxem's BeamShift (was read as RadialProfiles)
    ("virtual_dark_field", (2, 3, 4), 2),        # images of the scan (was DiffractionPatterns)
    ("polar_diffraction", (3, 16, 36), 2),       # pyxem's polar patterns (was DiffractionPatterns)
    ("EELS", (3, 50), 1),                        # a spectrum (was RadialProfiles)
])
def test_files_of_other_signal_types_are_not_read_as_patterns(tmp_path, ext, signal_type, shape,
                                                              dims):
    path = _pyxem_file(tmp_path / f"theirs.{ext}", np.ones(shape, "float32"), signal_type,
                       dims=dims)
    with pytest.raises(ValueError, match=f"signal type '{signal_type}', not diffraction patterns"):
        diffgpu.load(path)
    # asked for, the data are read as that
    forced = "diffraction_patterns" if dims == 2 else "radial_profiles"
    s = diffgpu.load(path, signal_type=forced)
    assert s.metadata.Signal.signal_type == forced


def test_pyxem_hints_name_what_to_do(tmp_path):
    path = _pyxem_file(tmp_path / "polar.hspy", np.ones((2, 8, 36), "float32"), "polar_diffraction")
    with pytest.raises(ValueError, match="azimuth runs the other way.*integrate the diffraction patterns"):
        diffgpu.load(path, lazy=False)
    path = _pyxem_file(tmp_path / "shift.hspy", np.ones((2, 3, 2), "float32"), "beam_shift", dims=1)
    with pytest.raises(ValueError, match=r"center_direct_beam\(shifts=...\)"):
        diffgpu.load(path)


@pytest.mark.parametrize("signal_type", ["polar_diffraction", "virtual_dark_field", "polar_patterns",
                                         "virtual_images"])
def test_as_diffraction_patterns_refuses_what_is_no_detector(signal_type):
    # pyxem's polar patterns or virtual images (or diffgpu's) were taken as detector frames
    s = hs.signals.Signal2D(np.ones((3, 16, 36), "float32"))
    s.metadata.Signal.signal_type = signal_type
    with pytest.raises(ValueError, match=f"this signal is of signal type '{signal_type}', not "
                                         r"diffraction patterns.*set_signal_type\(''\) first"):
        diffgpu.as_diffraction_patterns(s)
    s.set_signal_type("")
    assert type(diffgpu.as_diffraction_patterns(s)).__name__ == "DiffractionPatterns"


@pytest.mark.parametrize("signal_type", ["", "diffraction", "electron_diffraction",
                                         "insitu_diffraction", "diffraction_patterns"])
def test_as_diffraction_patterns_takes_patterns(signal_type):
    s = hs.signals.Signal2D(np.ones((3, 16, 16), "float32"))
    s.metadata.Signal.signal_type = signal_type
    out = diffgpu.as_diffraction_patterns(s.as_lazy())
    assert type(out).__name__ == "LazyDiffractionPatterns"


@pytest.mark.parametrize("signal_type", ["", "diffraction", "electron_diffraction"])
def test_pyxem_patterns_and_profiles_are_still_read(tmp_path, signal_type):
    path = _pyxem_file(tmp_path / "ed.hspy", np.ones((2, 3, 16, 16), "float32"), signal_type,
                       units="k_A^-1")
    s = diffgpu.load(path)
    assert type(s).__name__ == "LazyDiffractionPatterns"
    assert s.calibration.units == "1/Å"
    path = _pyxem_file(tmp_path / "ed1d.hspy", np.ones((2, 3, 16), "float32"), signal_type, dims=1)
    assert type(diffgpu.load(path, lazy=False)).__name__ == "RadialProfiles"


def _spot_patterns():
    """Two patterns of one bright pixel each, at known angles from the detector's middle."""
    data = np.zeros((2, 64, 64), "float32")
    data[0, 40, 48] = 1.0   # dx = +16.5, dy = +8.5 (down): diffgpu's azimuth +27.3 degrees
    data[1, 20, 50] = 1.0   # dx = +18.5, dy = -11.5 (up): -31.9 degrees
    s = diffgpu.DiffractionPatterns(data)
    s.calibration.center = None
    s.calibration.scale = 0.01
    s.calibration.units = "1/Å"
    s.calibration.beam_energy = 200
    s.metadata.General.title = "spots"
    return s, [(16.5, 8.5), (18.5, -11.5)]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("azimuth", [dict(), dict(azimuth_range=(0, 360)),
                                     dict(azimuth_range=(0, 2 * math.pi), azimuth_unit="rad")])
def test_polar_patterns_to_pyxem_conventions(lazy, azimuth):
    s, spots = _spot_patterns()
    if lazy:
        s = s.as_lazy()
    p = s.get_azimuthal_integral2d(npt=32, npt_azim=90, radial_range=(0, 0.32), **azimuth)
    q = p.to_pyxem()
    assert q._lazy == lazy and q is not p
    assert q.metadata.Signal.signal_type == "polar_diffraction"
    assert q.metadata.General.title == p.metadata.General.title
    assert q.metadata.Acquisition_instrument.TEM.beam_energy == 200
    az, rad = q.axes_manager.signal_axes
    assert (az.name, az.units, rad.name, rad.units) == ("Radians", "Rad", "Radius", "k_A^-1")
    assert az.scale == pytest.approx(2 * math.pi / 90) and rad.offset == pytest.approx(0)
    data = np.asarray(q.data)
    np.testing.assert_array_equal(data, np.asarray(p.data)[..., ::-1])
    for frame, (dx, dy) in zip(data, spots):
        row, col = np.unravel_index(np.argmax(frame), frame.shape)
        # pyxem's azimuth is -atan2(dy, dx), its axes give the bins' lower edges
        phi = -math.atan2(dy, dx)
        phi = (phi - az.offset) % (2 * math.pi) + az.offset
        assert az.axis[col] <= phi < az.axis[col] + az.scale
        assert rad.axis[row] <= 0.01 * math.hypot(dx, dy) < rad.axis[row] + rad.scale
    # diffgpu's own signal is left as it was
    assert p.axes_manager.signal_axes[0].units == azimuth.get("azimuth_unit", "deg")


def test_polar_patterns_to_pyxem_in_nm_and_refused_azimuth():
    s, _ = _spot_patterns()
    s.calibration.scale = 0.1
    s.calibration.units = "1/nm"
    q = s.get_azimuthal_integral2d(npt=8, npt_azim=36).to_pyxem()
    assert q.axes_manager.signal_axes[1].units == "k_nm^-1"
    bad = diffgpu.PolarPatterns(np.zeros((4, 36), "float32"))
    with pytest.raises(ValueError, match="azimuth axis must increase in degrees"):
        bad.to_pyxem()
