"""Orientation mapping as a new user meets it: frames without a crystal, scans of any shape."""

import numpy as np
import pytest

import diffgpu
from diffgpu.templates import TemplateLibrary

pytest.importorskip("diffsims")
from orix.quaternion import Rotation  # noqa: E402


@pytest.fixture(scope="module")
def lib(si):
    """A 3-degree library (conftest's ``si``): these tests look at frames, not accuracy."""
    return TemplateLibrary.from_phase(si, resolution=3.0, reciprocal_radius=1.2)


def _polar(s):
    return s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28), mean=True)


def _with_blank_frames(si):
    """4 Si patterns, then vacuum (the direct beam on a flat background) and an amorphous
    ring: frames where some template still correlates above 0."""
    np.random.seed(0)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(6), sig_shape=(128, 128),
                                          calibration=0.02)
    rng = np.random.default_rng(1)
    r = np.hypot(*(np.indices((128, 128)) - 63.5))
    beam = 5000 * np.exp(-(r / 3) ** 2)
    s.data[4] = rng.poisson(beam + 3.0)
    s.data[5] = rng.poisson(beam + 50 * np.exp(-0.5 * ((r - 20) / 3) ** 2) + 2)
    return s


def test_refined_maps_do_not_index_frames_without_a_crystal(si, lib):
    """Vacuum and amorphous frames came out as indexed Si in to_crystal_map, get_phase_map
    and the IPF map after refinement, although get_reliability calls them "no crystal seen";
    they are not indexed now (-1), with the same threshold, which the caller can lower."""
    import matplotlib.pyplot as plt

    polar = _polar(_with_blank_frames(si))
    matches = polar.get_orientation(lib, n_best=5)
    assert np.all(matches.data[:, 0, 2] > 0)  # some template always matches
    refined = matches.refine(polar, lib)
    rel = refined.get_reliability()
    assert rel.metadata.Reliability.no_crystal == 2 and np.all(rel.data[4:] == 0)
    xmap = refined.to_crystal_map()
    assert xmap.phase_id.tolist() == [0, 0, 0, 0, -1, -1]
    assert xmap.is_indexed.sum() == 4
    phases = refined.get_phase_map()
    assert phases.data.tolist() == [0, 0, 0, 0, -1, -1]
    assert phases.metadata.Phases.not_indexed == pytest.approx(2 / 6)
    rgb = refined.plot_ipf_map().images[0].get_array()
    np.testing.assert_array_equal(rgb[0, 4:], 0)  # black, as nothing matched
    assert np.all(rgb[0, :4].max(axis=-1) > 0)
    plt.close("all")
    # the caller's threshold, as for get_reliability
    assert refined.to_crystal_map(min_significance=-np.inf).phase_id.tolist() == [0] * 6
    assert refined.get_phase_map(min_significance=-np.inf).data.tolist() == [0] * 6
    # slicing keeps the significance in step with the positions
    assert refined.inav[3:].to_crystal_map().phase_id.tolist() == [0, -1, -1]
    # before refinement there is no significance: matched frames are indexed, as documented
    assert matches.to_crystal_map().phase_id.tolist() == [0] * 6


def test_crystal_map_refuses_scans_of_three_dimensions(si):
    """A 1 x 2 x 3 scan gave a CrystalMap of shape () (every position on one point: x from the
    first axis only, no y); it is refused with a way out, and its 2D slices map."""
    lib = TemplateLibrary.from_phase(si, resolution=5.0, reciprocal_radius=1.0)
    np.random.seed(3)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(6), sig_shape=(96, 96),
                                          calibration=0.025, reciprocal_radius=1.0)
    p = s.get_azimuthal_integral2d(npt=32, npt_azim=180, radial_range=(0, 1.1))
    sig_axes = [ax.get_axis_dictionary() for ax in p.axes_manager.signal_axes[::-1]]
    p3 = diffgpu.PolarPatterns(p.data.reshape((1, 2, 3) + p.data.shape[1:]),
                               axes=[{"size": 1}, {"size": 2}, {"size": 3}] + sig_axes,
                               metadata=p.metadata.as_dictionary())
    matches = p3.get_orientation(lib, n_best=2)
    with pytest.raises(ValueError, match="line or a 2D scan.*inav"):
        matches.to_crystal_map()
    xmap = matches.inav[:, :, 0].to_crystal_map()
    assert xmap.shape == (2, 3)
    np.testing.assert_array_equal(xmap.prop["correlation"][:, 0],
                                  np.asarray(matches.data)[0, ..., 0, 2].ravel())


def _no_crystal_frames(seed):
    """Vacuum (the direct beam on a flat background), an amorphous ring, shot noise."""
    rng = np.random.default_rng(seed)
    r = np.hypot(*(np.indices((128, 128)) - 63.5))
    beam = 5000 * np.exp(-(r / 3) ** 2)
    return [rng.poisson(beam + 20), rng.poisson(beam + 200 * np.exp(-((r - 40) / 6) ** 2) + 20),
            rng.poisson(np.full((128, 128), 30.0)), rng.poisson(np.full((128, 128), 3.0))]


@pytest.mark.parametrize("ring_means", [False, True])
def test_significance_separates_frames_without_a_crystal_from_weak_crystals(si, lib, ring_means):
    """The significance was measured against 16 unrelated orientations, whose spread is too
    noisy a unit: frames without a crystal reached 5.3 deviations and weak crystal patterns
    fell to 3.3, on both sides of the threshold (4). Against 128, with the threshold at 5, none
    of these 16 frames without a crystal is indexed and all 16 crystal patterns are."""
    frames = sum((_no_crystal_frames(seed) for seed in range(4)), [])
    np.random.seed(11)
    for counts in (500, 2000):
        frames += list(diffgpu.data.orientation_patterns(
            si, Rotation.random(8), sig_shape=(128, 128), calibration=0.02, counts=counts,
            seed=counts).data)
    s = diffgpu.DiffractionPatterns(np.stack(frames).astype(np.float32))
    s.calibration.center, s.calibration.scale, s.calibration.units = (63.5, 63.5), 0.02, "1/Å"
    polar = _polar(s)
    refined = polar.get_orientation(lib, n_best=5, ring_means=ring_means).refine(polar, lib)
    z = np.asarray(refined.metadata.Refined.significance)
    rel = refined.get_reliability()
    assert rel.metadata.Reliability.no_crystal == 16, np.round(z, 2)
    assert np.all(z[16:] > 5.5), np.round(z, 2)
    assert refined.to_crystal_map().is_indexed.tolist() == [False] * 16 + [True] * 16


def _p21c(unique):
    """Monoclinic ZrO2 (P2_1/c), every atom of the cell, with b or c the unique axis."""
    from diffpy.structure import Atom, Lattice, Structure
    from diffpy.structure.spacegroups import GetSpaceGroup
    from orix.crystal_map import Phase

    atoms = []
    for element, xyz in (("Zr", [0.2754, 0.0395, 0.2083]), ("O", [0.0700, 0.3317, 0.3447]),
                         ("O", [0.4496, 0.7569, 0.4792])):
        images = []
        for op in GetSpaceGroup(14).iter_symops():  # b unique
            p = np.mod(op(np.array(xyz)), 1.0)
            if not any(np.allclose(np.mod(p - q + 0.5, 1) - 0.5, 0, atol=1e-4) for q in images):
                images.append(p)
        atoms += [Atom(element, p if unique == "b" else p[[2, 0, 1]]) for p in images]
    lattice = (Lattice(5.15, 5.21, 5.31, 90, 99.2, 90) if unique == "b"
               else Lattice(5.31, 5.15, 5.21, 90, 90, 99.2))  # (a, b, c) -> (c, a, b)
    return Phase(f"ZrO2-{unique}", space_group=14, structure=Structure(atoms=atoms, lattice=lattice))


def test_a_point_group_that_is_not_the_structures_symmetry_is_refused():
    """orix gives P2_1/c the point group 2/m with its two-fold along c (z); a structure with
    b the unique axis has it along y. The library sampled the fundamental zone of the wrong
    group and orientations were reduced by it: a third of 24 simulated patterns came out
    180 degrees off, some with reliability 1. Such a phase is refused now, with a way out;
    the same crystal with c unique is accepted and indexed."""
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.quaternion import Orientation

    b_unique = _p21c("b")
    with pytest.raises(ValueError, match="ZrO2-b.*2/m.*not a symmetry of its structure.*unique "
                                         "axis is c"):
        TemplateLibrary.from_phase(b_unique, resolution=10.0, reciprocal_radius=1.0)
    sim = SimulationGenerator(200).calculate_diffraction2d(
        b_unique, rotation=Rotation.identity(2), reciprocal_radius=1.0, with_direct_beam=False)
    with pytest.raises(ValueError, match="not a symmetry of its structure"):
        TemplateLibrary.from_simulation(sim)
    c_unique = _p21c("c")
    lib = TemplateLibrary.from_phase(c_unique, resolution=6.0, reciprocal_radius=1.0)
    np.random.seed(2)
    s = diffgpu.data.orientation_patterns(c_unique, Rotation.random(8), sig_shape=(128, 128),
                                          calibration=0.02, reciprocal_radius=1.0)
    polar = _polar(s)
    refined = polar.get_orientation(lib, n_best=5).refine(polar, lib)
    truth = Orientation(s.metadata.Synthetic.rotations, symmetry=c_unique.point_group)
    error = truth.angle_with(refined.to_orientations(), degrees=True)
    reliability = refined.get_reliability().data
    # right, or flagged as not decided by the pattern
    assert np.all((error < 2) | (reliability < 0.5)), (error.round(1), reliability.round(2))
    assert np.mean(error < 2) >= 0.75


def test_symmetry_check_accepts_the_usual_phases():
    from diffgpu.templates import check_symmetry
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    hcp = [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]
    ti = Phase("Ti", space_group=194, structure=Structure(
        atoms=[Atom("Ti", p) for p in hcp], lattice=Lattice(2.95, 2.95, 4.68, 90, 90, 120)))
    for phase in (TemplateLibrary.silicon(), ti):
        for radius in (1.0, 1.5):  # (a search by d-spacing cut hexagonal shells short at 1.5)
            check_symmetry(phase, radius)


def test_templates_of_extinct_reflections_only_are_left_empty():
    """Where an orientation excites no allowed reflection, diffsims keeps the extinct ones
    at rounding-level intensities (1e-19 of an allowed one; its minimum_intensity is relative
    to each pattern's strongest). Normalised for matching, such a template of fcc Cu was as
    strong as any; its spots are left out now, and matching reads it as empty."""
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    cu = Phase("Cu", space_group=225, structure=Structure(
        atoms=[Atom("Cu", p) for p in fcc], lattice=Lattice(3.615, 3.615, 3.615, 90, 90, 90)))
    lib = TemplateLibrary.from_phase(cu, resolution=2.0, reciprocal_radius=1.2)
    strongest = np.array([s[2].max() if s.shape[1] else 0.0 for s in lib.spots])
    top = strongest.max()
    assert len(lib) == 300 and np.sum(strongest == 0) >= 1
    assert all(np.all(s[2] >= 1e-8 * top) for s in lib.spots)
    empty = int(np.flatnonzero(strongest == 0)[0])
    drawn = lib.render_polar(np.linspace(0, 1.28, 64), 360, 0.02, templates=[empty])
    assert not drawn.any()


@pytest.mark.parametrize("smooth", [-1.0, np.nan, np.inf, "1", None])
def test_refine_checks_the_smoothing(si, smooth):
    """``smooth=-1`` was taken silently as no smoothing (and recorded as -1), ``nan`` failed
    with "cannot convert float NaN to integer" from the kernel's taps."""
    lib = TemplateLibrary.from_phase(si, resolution=10.0, reciprocal_radius=1.0)
    np.random.seed(3)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(2), sig_shape=(64, 64),
                                          calibration=0.04, reciprocal_radius=1.0)
    polar = s.get_azimuthal_integral2d(npt=32, npt_azim=180, radial_range=(0, 1.28))
    matches = polar.get_orientation(lib, n_best=2)
    with pytest.raises(ValueError, match=r"smooth .* must be a number >= 0 \(0: none\)"):
        matches.refine(polar, lib, smooth=smooth)
    assert matches.refine(polar, lib, smooth=0).metadata.Refined.parameters.smooth == 0
