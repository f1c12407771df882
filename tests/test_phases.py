"""Multi-phase orientation mapping: phase assignment on simulated mixtures, phase maps."""

import numpy as np
import pytest

import diffgpu
from diffgpu.templates import TemplateLibrary

pytest.importorskip("diffsims")
from diffpy.structure import Atom, Lattice, Structure  # noqa: E402
from orix.crystal_map import Phase  # noqa: E402
from orix.quaternion import Rotation  # noqa: E402


def _cubic(name, group, a, sites):
    return Phase(name, space_group=group, structure=Structure(
        atoms=[Atom(name, p) for p in sites], lattice=Lattice(a, a, a, 90, 90, 90)))


FCC = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
DIAMOND = FCC + [[0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]]
PAIRS = {
    # the same structure, lattice parameters 4% apart: only the ring radii tell them apart
    "Si-Ge": (_cubic("Si", 227, 5.431, DIAMOND), _cubic("Ge", 227, 5.658, DIAMOND)),
    # an fcc and a bcc metal
    "Cu-Fe": (_cubic("Cu", 225, 3.615, FCC), _cubic("Fe", 229, 2.866, [[0, 0, 0], [0.5] * 3])),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_phase_assignment_on_a_simulated_mixture(pair):
    phases = PAIRS[pair]
    lib = TemplateLibrary.from_phase(list(phases), resolution=2.0, reciprocal_radius=1.2)
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 48)  # a 6 x 8 scan, each position one phase
    np.random.seed(4)
    frames = np.empty((48, 192, 192), np.float32)
    seen = np.ones(48, bool)
    for i, phase in enumerate(phases):
        at = np.flatnonzero(truth == i)
        s = diffgpu.data.orientation_patterns(phase, Rotation.random(at.size), sig_shape=(192, 192),
                                              calibration=0.0133, seed=i)
        frames[at] = s.data
        seen[at] = s.metadata.Synthetic.n_spots > 0
    # a pattern whose orientation excites no reflection shows no crystal: not indexed (-1)
    truth = np.where(seen, truth, -1)
    s = diffgpu.DiffractionPatterns(frames.reshape(6, 8, 192, 192))
    s.calibration.center = (95.5, 95.5)
    s.calibration.scale = 0.0133
    s.calibration.units = "1/Å"
    polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28), mean=True)
    matches = polar.get_orientation(lib, n_best=3).refine(polar, lib)  # close calls settled
    phase_map = matches.get_phase_map()
    assert phase_map.data.shape == (6, 8)
    assert phase_map.metadata.Phases.names == [p.name for p in phases]
    right = np.mean(phase_map.data.ravel() == truth)
    assert right >= 0.98, f"{pair}: {right:.0%} of positions got the right phase"
    np.testing.assert_allclose(phase_map.metadata.Phases.fractions,
                               [np.mean(phase_map.data == i) for i in range(2)])
    xmap = matches.to_crystal_map()  # the phases travel with the orientations
    # (orix adds its "not_indexed" phase where a position shows no crystal)
    assert [n for n in xmap.phases.names if n != "not_indexed"] == [p.name for p in phases]
    np.testing.assert_array_equal(xmap.phase_id, phase_map.data.ravel())
    # lazily, the same
    lazy = polar.as_lazy()
    lazy_matches = lazy.get_orientation(lib, n_best=3).refine(lazy, lib)
    np.testing.assert_array_equal(lazy_matches.get_phase_map().data, phase_map.data)


def test_phase_and_ipf_maps_of_several_phases_plot():
    import matplotlib.pyplot as plt

    si, ge = PAIRS["Si-Ge"]
    lib = TemplateLibrary.from_phase([si, ge], resolution=6.0, reciprocal_radius=1.0)
    np.random.seed(1)
    a = diffgpu.data.orientation_patterns(si, Rotation.random(3), sig_shape=(128, 128),
                                          calibration=0.02, reciprocal_radius=1.0)
    b = diffgpu.data.orientation_patterns(ge, Rotation.random(3), sig_shape=(128, 128),
                                          calibration=0.02, reciprocal_radius=1.0)
    s = diffgpu.DiffractionPatterns(np.concatenate([a.data, b.data]).reshape(2, 3, 128, 128))
    s.calibration.center = a.calibration.center
    s.calibration.scale = 0.02
    s.calibration.units = "1/Å"
    m = s.get_azimuthal_integral2d(npt=48, npt_azim=180, radial_range=(0, 1.1),
                                   mean=True).get_orientation(lib)
    ax = m.plot_phase_map()
    assert [t.get_text().split(" ")[0] for t in ax.get_legend().get_texts()] == ["Si", "Ge"]
    ax = m.plot_ipf_map()  # one colour key per phase, no error for a mixture
    assert ax.get_images()[0].get_array().shape == (2, 3, 3)
    plt.close("all")
