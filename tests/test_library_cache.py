"""Libraries reused: a diffsims simulation passed to get_orientation is prepared once."""

import gc

import numpy as np
import pytest

import diffgpu
from diffgpu import templates
from diffgpu.templates import TemplateLibrary, library_for

pytest.importorskip("diffsims")


@pytest.fixture(scope="module")
def setup():
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.sampling import get_sample_reduced_fundamental

    si = TemplateLibrary.silicon()
    rots = get_sample_reduced_fundamental(resolution=6, point_group=si.point_group)
    make = lambda: SimulationGenerator(200, minimum_intensity=1e-10).calculate_diffraction2d(  # noqa
        si, rotation=rots, with_direct_beam=False, reciprocal_radius=1.2)
    s = diffgpu.data.orientation_patterns(si, rots[:6], sig_shape=(96, 96), calibration=0.025,
                                          noise=False)
    polar = s.get_azimuthal_integral2d(npt=48, npt_azim=180, radial_range=(0, 1.2), mean=True)
    return make, polar


def test_a_simulation_is_prepared_once(setup, monkeypatch):
    make, polar = setup
    sim = make()
    calls = []
    original = TemplateLibrary.render_polar

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TemplateLibrary, "render_polar", counting)
    first = polar.get_orientation(sim, n_best=2)
    assert calls, "the first call renders the templates"
    n = len(calls)
    second = polar.get_orientation(sim, n_best=2)
    assert len(calls) == n, "the second call reuses the rendered templates"
    np.testing.assert_array_equal(first.data, second.data)
    assert library_for(sim) is library_for(sim)
    # the same result as with a library made by hand
    by_hand = polar.get_orientation(TemplateLibrary.from_simulation(sim), n_best=2)
    np.testing.assert_array_equal(first.data, by_hand.data)


def test_a_changed_simulation_is_never_stale(setup):
    make, polar = setup
    sim = make()
    lib = library_for(sim)
    sim.coordinates[0].intensity[:] = 0  # changed in place
    changed = library_for(sim)
    assert changed is not lib
    assert np.all(changed.spots[0][2] == 0)
    from orix.quaternion import Rotation

    turned = Rotation.from_axes_angles([0, 0, 1], 5, degrees=True) * sim.rotations
    sim.rotations = turned  # other rotations: a new digest too
    again = library_for(sim)
    assert again is not changed
    np.testing.assert_allclose(again.rotations.data, turned.data)


def test_the_cache_goes_with_the_simulation(setup):
    make, _ = setup
    sim = make()
    library_for(sim)
    key = id(sim)
    assert key in templates._FROM_SIMULATION
    del sim
    gc.collect()
    assert key not in templates._FROM_SIMULATION
