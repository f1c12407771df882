"""Signal classes, their registration with HyperSpy, conversion and loading."""

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import yaml

import hyperspy.api as hs
import diffgpu

OURS = {
    "DiffractionPatterns": ("diffraction_patterns", 2, False),
    "LazyDiffractionPatterns": ("diffraction_patterns", 2, True),
    "PolarPatterns": ("polar_patterns", 2, False),
    "LazyPolarPatterns": ("polar_patterns", 2, True),
    "RadialProfiles": ("radial_profiles", 1, False),
    "LazyRadialProfiles": ("radial_profiles", 1, True),
    "VirtualImages": ("virtual_images", 2, False),
    "LazyVirtualImages": ("virtual_images", 2, True),
    "VirtualProfiles": ("virtual_images", 1, False),
    "LazyVirtualProfiles": ("virtual_images", 1, True),
    "DirectBeamShifts": ("direct_beam_shifts", 1, False),
    "LazyDirectBeamShifts": ("direct_beam_shifts", 1, True),
    "OrientationMatches": ("orientation_matches", 2, False),
    "LazyOrientationMatches": ("orientation_matches", 2, True),
    "BraggVectors": ("bragg_vectors", 2, False),
    "LazyBraggVectors": ("bragg_vectors", 2, True),
    "StrainMap": ("strain_map", 1, False),
    "LazyStrainMap": ("strain_map", 1, True),
}
# Names pyxem registers: ours must never be among them.
PYXEM_NAMES = {"Diffraction2D", "LazyDiffraction2D", "PolarDiffraction2D", "LazyPolarDiffraction2D",
               "Diffraction1D", "LazyDiffraction1D", "OrientationMap", "LazyOrientationMap",
               "ElectronDiffraction2D", "LazyElectronDiffraction2D", "DiffractionVectors",
               "BeamShift", "LazyBeamShift", "VirtualDarkFieldImage", "LazyVirtualDarkFieldImage"}
PYXEM_TYPES = {"electron_diffraction", "diffraction", "polar_diffraction", "orientation_map",
               "electron_diffraction_1d", "diffraction_vectors", "beam_shift", "virtual_dark_field"}


def _registrations():
    """(package, class name, spec) for HyperSpy itself and every installed extension."""
    import hyperspy

    regs = []
    own = yaml.safe_load((Path(hyperspy.__file__).parent / "hyperspy_extension.yaml").read_text())
    regs += [("hyperspy", name, spec) for name, spec in own["signals"].items()]
    for ep in importlib.metadata.entry_points(group="hyperspy.extensions"):
        spec_path = Path(importlib.util.find_spec(ep.name).origin).parent / "hyperspy_extension.yaml"
        ext = yaml.safe_load(spec_path.read_text()) or {}
        regs += [(ep.name, name, spec) for name, spec in ext.get("signals", {}).items()]
    return regs


def test_our_classes_are_registered_as_ours():
    from hyperspy.extensions import ALL_EXTENSIONS

    for name, (stype, dim, lazy) in OURS.items():
        spec = ALL_EXTENSIONS["signals"][name]
        assert spec["module"].startswith("diffgpu.signals"), name
        assert (spec["signal_type"], spec["signal_dimension"], spec["lazy"]) == (stype, dim, lazy)


def test_no_class_name_or_signal_type_clash_with_any_other_extension():
    regs = _registrations()
    ours = [(n, s) for pkg, n, s in regs if pkg == "diffgpu"]
    others = [(pkg, n, s) for pkg, n, s in regs if pkg != "diffgpu"]
    assert {n for n, _ in ours} == set(OURS)
    other_names = {n for _, n, _ in others}
    assert not other_names & set(OURS), "a class name of ours is also registered elsewhere"
    our_types = {s["signal_type"] for _, s in ours}
    other_types = set()
    for _, _, s in others:
        other_types.add(s.get("signal_type", ""))
        other_types.update(s.get("signal_type_aliases", []) or [])
    assert not other_types & our_types
    assert not set(OURS) & PYXEM_NAMES and not our_types & PYXEM_TYPES


def test_hyperspy_lists_our_signal_types(capsys):
    hs.print_known_signal_types()
    out = capsys.readouterr().out
    for stype in ("diffraction_patterns", "polar_patterns", "radial_profiles"):
        assert stype in out


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("stype,shape,cls", [
    ("diffraction_patterns", (3, 8, 8), "DiffractionPatterns"),
    ("polar_patterns", (3, 10, 36), "PolarPatterns"),
    ("radial_profiles", (3, 10), "RadialProfiles"),
])
def test_set_signal_type_gives_our_classes(stype, shape, cls, lazy):
    s = (hs.signals.Signal1D if len(shape) == 2 else hs.signals.Signal2D)(np.zeros(shape))
    if lazy:
        s = s.as_lazy()
    s.set_signal_type(stype)
    assert type(s).__name__ == ("Lazy" if lazy else "") + cls
    assert type(s).__module__.startswith("diffgpu.signals")


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
@pytest.mark.parametrize("lazy", [False, True])
def test_save_and_load_back_keeps_our_class(tmp_path, ext, lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 3), sig_shape=(16, 16), lazy=False)
    s.calibration.scale = 0.05
    s.calibration.units = "1/nm"
    s.calibration.mask = np.eye(16, dtype=bool)
    s.calibration.beam_energy = 300
    path = tmp_path / f"scan.{ext}"
    s.save(path)
    for back in (hs.load(path, lazy=lazy), diffgpu.load(path, lazy=lazy),
                 hs.load(path, lazy=lazy, signal_type="diffraction_patterns")):
        assert type(back).__name__ == ("Lazy" if lazy else "") + "DiffractionPatterns"
        np.testing.assert_array_equal(np.asarray(back.data), s.data)
        assert back.calibration.center == pytest.approx(s.calibration.center)
        assert back.calibration.scale == (0.05, 0.05) and back.calibration.units == "1/nm"
        np.testing.assert_array_equal(back.calibration.mask, np.eye(16, dtype=bool))
        assert back.calibration.beam_energy == 300
        np.testing.assert_allclose(back.metadata.Synthetic.beam_centers,
                                   s.metadata.Synthetic.beam_centers)


@pytest.mark.parametrize("cls", [diffgpu.PolarPatterns, diffgpu.RadialProfiles])
def test_other_classes_round_trip(tmp_path, cls):
    shape = (2, 5, 12) if cls is diffgpu.PolarPatterns else (2, 5)
    s = cls(np.random.default_rng(0).random(shape).astype("float32"))
    s.save(tmp_path / "x.zspy")
    back = diffgpu.load(tmp_path / "x.zspy", lazy=True)
    assert type(back).__name__ == "Lazy" + cls.__name__
    np.testing.assert_array_equal(back.data.compute(), s.data)


def test_as_diffraction_patterns_keeps_data_axes_metadata():
    raw = hs.signals.Signal2D(np.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8))
    raw.axes_manager.signal_axes[0].scale = 0.1
    raw.axes_manager.signal_axes[1].offset = -0.4
    raw.axes_manager.navigation_axes[0].units = "nm"
    raw.metadata.General.title = "my scan"
    raw.original_metadata.set_item("Detector.gain", 3)
    s = diffgpu.as_diffraction_patterns(raw)
    assert type(s) is diffgpu.DiffractionPatterns
    assert s.data is raw.data
    assert s.axes_manager.signal_axes[0].scale == 0.1
    assert s.axes_manager.signal_axes[1].offset == -0.4
    assert s.axes_manager.navigation_axes[0].units == "nm"
    assert s.metadata.General.title == "my scan"
    assert s.original_metadata.Detector.gain == 3
    assert type(raw) is hs.signals.Signal2D  # the input is left as it was
    copy = diffgpu.as_diffraction_patterns(raw.as_lazy(), copy=True)
    assert type(copy) is diffgpu.LazyDiffractionPatterns


def test_as_diffraction_patterns_rejects_wrong_input():
    with pytest.raises(ValueError, match="2 signal dimensions"):
        diffgpu.as_diffraction_patterns(hs.signals.Signal1D(np.zeros((3, 10))))
    with pytest.raises(TypeError, match="HyperSpy signal"):
        diffgpu.as_diffraction_patterns(np.zeros((3, 8, 8)))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        diffgpu.load(tmp_path / "missing.mib")
    bad = tmp_path / "garbage.hspy"
    bad.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(OSError, match="could not read"):
        diffgpu.load(bad)
    hs.signals.Signal1D(np.zeros((2, 5))).save(tmp_path / "spec.hspy")
    with pytest.raises(ValueError, match="cannot be 'polar_patterns'"):
        diffgpu.load(tmp_path / "spec.hspy", signal_type="polar_patterns")
    hs.signals.BaseSignal(np.zeros((2, 3, 4))).transpose(signal_axes=3).save(tmp_path / "3d.hspy")
    with pytest.raises(ValueError, match="3 signal dimensions"):
        diffgpu.load(tmp_path / "3d.hspy")


def test_load_generic_signal2d_becomes_ours(tmp_path):
    hs.signals.Signal2D(np.ones((2, 8, 8), dtype="uint16")).save(tmp_path / "raw.hspy")
    s = diffgpu.load(tmp_path / "raw.hspy")
    assert type(s) is diffgpu.LazyDiffractionPatterns


def test_hyperspy_operations_keep_our_classes():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(16, 16))
    assert type(s.inav[1:3]) is diffgpu.LazyDiffractionPatterns
    assert type(s.isig[2:10, 2:10]) is diffgpu.LazyDiffractionPatterns
    assert type(s * 2) is diffgpu.LazyDiffractionPatterns
    assert type(s.sum(axis=s.axes_manager.navigation_axes)) is diffgpu.LazyDiffractionPatterns
    s.compute()
    assert type(s.rebin(scale=(1, 1, 2, 2))) is diffgpu.DiffractionPatterns


def test_loader_knows_every_signal_type_we_register():
    from hyperspy.extensions import ALL_EXTENSIONS

    from diffgpu.io import _OURS

    ours = {spec["signal_type"] for spec in ALL_EXTENSIONS["signals"].values()
            if spec["module"].startswith("diffgpu.")}
    assert ours == set(_OURS)


def test_as_lazy_gives_diffgpus_chunks_of_whole_frames():
    from diffgpu.chunking import frame_chunks

    frames = np.zeros((32, 32, 96, 96), np.float32)
    lazy = diffgpu.DiffractionPatterns(frames).as_lazy()
    # (dask alone chose ~128 MiB blocks: 1,024 frames of 192 x 192 float32 in 2 chunks)
    assert lazy.data.chunks == frame_chunks((32, 32), 96 * 96 * 4) + ((96,), (96,))
    assert lazy.data.npartitions >= 4
    # chunks a user gives are kept
    given = diffgpu.DiffractionPatterns(frames).as_lazy(chunks=(8, 32, 96, 96))
    assert given.data.chunks[0] == (8,) * 4


@pytest.mark.parametrize("lazy", [False, True])
def test_fit_plane_needs_an_x_y_signal_axis(lazy):
    shifts = diffgpu.DirectBeamShifts(np.zeros((3, 4, 3)))
    if lazy:
        shifts = shifts.as_lazy()
    with pytest.raises(ValueError, match=r"signal axis to hold the shift \(x, y\), 2 values; "
                                         r"this signal's signal shape is \(3,\)"):
        shifts.fit_plane()


def test_strain_to_frame_angle_must_be_finite():
    m = diffgpu.StrainMap(np.array([[0.01, 0.0, 0.0, 0.0]]))
    for angle in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="angle must be a finite number of degrees"):
            m.to_frame(angle)
    for angle in (None, [90], True, "x"):
        with pytest.raises(ValueError, match="angle must be a number of degrees or 'g1'"):
            m.to_frame(angle)
    assert m.to_frame(np.float32(90)).data.round(6).tolist() == [[0.0, 0.01, -0.0, 0.0]]
