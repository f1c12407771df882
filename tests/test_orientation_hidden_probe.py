"""Orientation mapping on cases beyond the usual ones: an uncalibrated centre, other materials."""

import numpy as np
import pytest

import diffgpu
from diffgpu.templates import TemplateLibrary

pytest.importorskip("diffsims")
from orix.quaternion import Orientation, Rotation  # noqa: E402


@pytest.fixture(scope="module")
def si_library():
    return TemplateLibrary.from_phase(TemplateLibrary.silicon(), resolution=2.0, reciprocal_radius=1.2)


def _polar(frames, scale, center, bins=64):
    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = center
    s.calibration.scale = scale
    s.calibration.units = "1/Å"
    return s.get_azimuthal_integral2d(npt=bins, npt_azim=360, radial_range=(0, 1.28), mean=True)


def _errors(matches, truth, phase):
    found = Rotation(matches.to_rotations().data[..., 0, :].reshape(-1, 4))
    return Orientation(truth, symmetry=phase.point_group).angle_with(
        Orientation(found, symmetry=phase.point_group), degrees=True)


def test_refine_fits_a_centre_one_pixel_off(si_library):
    # the calibrated centre one pixel right of and one above the beam (128 x 128, 0.02 1/Å
    # per pixel): without fitting it the refined errors doubled
    si = TemplateLibrary.silicon()
    np.random.seed(3)
    truth = Rotation.random(16)
    s = diffgpu.data.orientation_patterns(si, truth, sig_shape=(128, 128), calibration=0.02, seed=3)
    polar = _polar(s.data ** np.float32(0.5), 0.02, (63.5 + 1, 63.5 - 1))
    matches = polar.get_orientation(si_library, n_best=3)
    fitted = matches.refine(polar, si_library)
    err = _errors(fitted, truth, si)
    ok = err < 2
    assert ok.mean() >= 0.9
    assert np.median(err[ok]) <= 0.12, np.median(err[ok])  # (0.20 with the centre as given)
    params = fitted.metadata.Refined.parameters
    # the beam lies at (-1, +1) pixels from the given centre
    np.testing.assert_allclose(params["center_offset"], [-0.02, 0.02], atol=0.004)
    as_given = matches.refine(polar, si_library, fit_center=False)
    assert params["recentred"] and not as_given.metadata.Refined.parameters["recentred"]
    assert np.median(err[ok]) < 0.75 * np.median(_errors(as_given, truth, si)[ok])
    # a calibrated centre is left as it is
    polar = _polar(s.data ** np.float32(0.5), 0.02, (63.5, 63.5))
    refined = polar.get_orientation(si_library, n_best=3).refine(polar, si_library)
    assert not refined.metadata.Refined.parameters["recentred"]
    assert np.hypot(*refined.metadata.Refined.parameters["center_offset"]) < 0.005


def _ring_frames(n, shape, scale, seed):
    """Frames without a crystal: the direct beam on an amorphous halo of two rings."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape)
    k = np.hypot(x - (shape[1] - 1) / 2, y - (shape[0] - 1) / 2) * scale  # 1/Å
    mean = (2e4 * np.exp(-0.5 * (k / (1.5 * scale)) ** 2) / (2 * np.pi * 1.5 ** 2)
            + 20 * np.exp(-0.5 * ((k - 0.35) / 0.06) ** 2) + 8 * np.exp(-0.5 * ((k - 0.65) / 0.08) ** 2)
            + 0.5)
    return rng.poisson(np.broadcast_to(mean, (n,) + shape)).astype(np.float32)


def test_refine_estimates_from_the_frames_that_show_a_crystal(si_library):
    # a scan mostly of amorphous support: the spots' width and the intensity exponent are
    # estimated from the sampled frames where a crystal is seen (the halo frames' "spots"
    # made the width NaN)
    si = TemplateLibrary.silicon()
    np.random.seed(7)
    truth = Rotation.random(8)
    crystal = diffgpu.data.orientation_patterns(si, truth, sig_shape=(128, 128), calibration=0.02,
                                                seed=7).data
    is_crystal = np.arange(24) % 3 == 0  # one frame in three, spread over the scan
    frames = np.empty((24, 128, 128), np.float32)
    frames[is_crystal] = crystal
    frames[~is_crystal] = _ring_frames(16, (128, 128), 0.02, 7)
    polar = _polar(frames ** np.float32(0.5), 0.02, (63.5, 63.5))
    only = _polar(crystal ** np.float32(0.5), 0.02, (63.5, 63.5))
    mixed = polar.get_orientation(si_library, n_best=3).refine(polar, si_library)
    alone = only.get_orientation(si_library, n_best=3).refine(only, si_library)
    got, want = mixed.metadata.Refined.parameters, alone.metadata.Refined.parameters
    assert np.isfinite(got["spot_width"])
    assert got["spot_width"] == pytest.approx(want["spot_width"], rel=0.1)
    assert got["intensity_exponent"] == pytest.approx(want["intensity_exponent"], abs=0.05)
    assert not got["recentred"]
    # the halo frames are not indexed, the crystals are
    phase = mixed.get_phase_map().data.ravel()
    np.testing.assert_array_equal(phase == 0, is_crystal)


def test_crystal_map_keeps_the_library_phases_no_position_has():
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    si = TemplateLibrary.silicon()
    ge = Phase("Ge", space_group=227, structure=Structure(
        atoms=[Atom("Ge", a.xyz) for a in si.structure], lattice=Lattice(5.658, 5.658, 5.658, 90, 90, 90)))
    lib = TemplateLibrary.from_phase([si, ge], resolution=6.0, reciprocal_radius=1.0)
    np.random.seed(2)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(6), sig_shape=(128, 128), calibration=0.02,
                                          reciprocal_radius=1.0, seed=2)
    frames = np.concatenate([s.data, _ring_frames(2, (128, 128), 0.02, 2)]).reshape(2, 4, 128, 128)
    polar = _polar(frames, 0.02, (63.5, 63.5))
    matches = polar.get_orientation(lib, n_best=2).refine(polar, lib)
    xmap = matches.to_crystal_map()
    # every library phase, Ge included though no position is Ge, and orix's not_indexed
    assert [xmap.phases[i].name for i in (0, 1)] == ["Si", "Ge"]
    assert xmap.phases[-1].name == "not_indexed"
    assert set(xmap.phases_in_data.names) == {"not_indexed", "Si"}
    np.testing.assert_array_equal(xmap.phase_id, matches.get_phase_map().data.ravel())
    assert set(np.unique(xmap.phase_id)) == {-1, 0}
    # the rotations are the refined ones, position by position (row-major)
    q = np.asarray(matches.metadata.Refined.rotations).reshape(-1, 4)
    np.testing.assert_allclose(np.abs(np.sum(xmap.rotations.data[:, 0] * q, axis=1)), 1, atol=1e-6)


def test_refine_leaves_out_the_spots_past_the_detector_edge(si_library):
    # a 96 x 128 detector integrated out to the long side's radius (1.28 1/Å): past 0.96 on
    # the short side the polar bins are NaN; spots there read 0, and refinement tilted the
    # crystals to take the excitation off them (median 0.30 degrees, 0.13 without them)
    si = TemplateLibrary.silicon()
    np.random.seed(3)
    truth = Rotation.random(16)
    s = diffgpu.data.orientation_patterns(si, truth, sig_shape=(96, 128), calibration=0.02, seed=3)
    polar = _polar(s.data ** np.float32(0.5), 0.02, (63.5, 47.5))
    assert np.isnan(polar.data[:, -1]).any()
    refined = polar.get_orientation(si_library, n_best=3).refine(polar, si_library)
    err = _errors(refined, truth, si)
    ok = err < 2
    assert ok.mean() >= 0.9
    assert np.median(err[ok]) <= 0.2, np.median(err[ok])
    assert 0.9 <= refined.metadata.Refined.parameters["radius"] < 1.0


def test_recentring_and_the_edge_cut_on_device_patterns(standin_gpu, si_library):
    # device-resident patterns are resampled where they are (strict CuPy stand-in), with the
    # host's result
    si = TemplateLibrary.silicon()
    np.random.seed(5)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(6), sig_shape=(96, 128),
                                          calibration=0.02, seed=5)
    polar = _polar(s.data ** np.float32(0.5), 0.02, (63.5 - 1, 47.5))
    matches = polar.get_orientation(si_library, n_best=2)
    ref = matches.refine(polar, si_library)
    dev = polar.deepcopy()
    dev.to_device()
    out = matches.refine(dev, si_library)
    assert ref.metadata.Refined.parameters["recentred"]
    for key in ("center_offset", "radius", "spot_width", "intensity_exponent"):
        assert out.metadata.Refined.parameters[key] == ref.metadata.Refined.parameters[key], key
    np.testing.assert_allclose(out.metadata.Refined.rotations, ref.metadata.Refined.rotations,
                               atol=1e-5)
    np.testing.assert_array_equal(out.data, ref.data)


def test_centre_offset_of_patterns_without_spots_is_zero():
    # every offset scores alike (or NaN) on a flat pattern: the centre stays where it is,
    # not at a corner of the search grid
    from diffgpu.kernels.refine import estimate_center_offset, prepare_patterns

    g = np.array([[0.5, 0, 0], [0, 0.5, 0], [-0.5, 0, 0], [0, -0.5, 0]])
    model = (g, np.ones(4), 39.87, 0.05, 1.0)
    for flat in (np.zeros((1, 100, 360), np.float32), np.ones((1, 100, 360), np.float32)):
        d = estimate_center_offset(prepare_patterns(flat, 1.0), np.eye(3)[None], model, 1.0,
                                   (0.005, 0.01), (-179.5, 1.0))
        np.testing.assert_array_equal(d, [0.0, 0.0])
