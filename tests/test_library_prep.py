"""Libraries prepared for matching: the same templates however they are made, and a diffsims
simulation passed as the library never stale."""

import numpy as np
import pytest

import diffgpu
from diffgpu.kernels.matching import pack_templates, prepare_templates
from diffgpu.orientation import _render_packed
from diffgpu.templates import TemplateLibrary, library_for

pytest.importorskip("diffsims")


@pytest.fixture(scope="module")
def make():
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.sampling import get_sample_reduced_fundamental

    si = TemplateLibrary.silicon()
    rots = get_sample_reduced_fundamental(resolution=6, point_group=si.point_group)
    return lambda: SimulationGenerator(200, minimum_intensity=1e-10).calculate_diffraction2d(
        si, rotation=rots, with_direct_beam=False, reciprocal_radius=1.2)


@pytest.fixture(scope="module")
def polar():
    si = TemplateLibrary.silicon()
    from orix.sampling import get_sample_reduced_fundamental

    rots = get_sample_reduced_fundamental(resolution=6, point_group=si.point_group)
    s = diffgpu.data.orientation_patterns(si, rots[:4], sig_shape=(96, 96), calibration=0.025,
                                          noise=False)
    return s.get_azimuthal_integral2d(npt=48, npt_azim=180, radial_range=(0, 1.2), mean=True)


def test_spot_weights_follow_gamma(make):
    """The spots' ``intensity ** gamma`` is kept per library: asking for another gamma
    draws with that gamma, as a fresh library does."""
    sim = make()
    lib, fresh = TemplateLibrary.from_simulation(sim), TemplateLibrary.from_simulation(sim)
    radii = np.linspace(0.0125, 1.1875, 48)
    lib.render_polar(radii, 180, 0.025, gamma=0.5)
    again = lib.render_polar(radii, 180, 0.025, gamma=0.3, templates=slice(3, 40))
    np.testing.assert_array_equal(again, fresh.render_polar(radii, 180, 0.025, gamma=0.3,
                                                            templates=slice(3, 40)))


@pytest.mark.parametrize("K", [8, 40])
def test_threaded_preparation_is_the_serial_one(make, monkeypatch, K):
    """Slices drawn and packed on several threads give the very same packed spectra as the
    whole library drawn, transformed and packed at once."""
    from diffgpu import orientation

    lib = TemplateLibrary.from_simulation(make())
    radii = np.linspace(0.0125, 1.1875, 48)
    monkeypatch.setattr(orientation, "host_threads", lambda: 3)
    assert len(lib) > 2 * 16
    packed = _render_packed(lib, radii, 180, 0.025, 0.3, True, K, slice_bytes=1)  # slices of 16
    whole = lib.render_polar(radii, 180, 0.025, 0.3, True)
    ref, n_t = pack_templates(*prepare_templates(whole, K))
    assert n_t == len(lib)
    np.testing.assert_array_equal(packed, ref)


def test_prepared_once_and_the_same_matches(make, polar):
    sim = make()
    lib = library_for(sim)
    first = polar.get_orientation(sim, n_best=3)
    assert len(lib._render_cache) == 1
    cached = next(iter(lib._render_cache.values()))
    second = polar.get_orientation(sim, n_best=3)
    assert library_for(sim) is lib and next(iter(lib._render_cache.values())) is cached
    np.testing.assert_array_equal(first.data, second.data)
    by_hand = polar.get_orientation(TemplateLibrary.from_simulation(sim), n_best=3)
    np.testing.assert_array_equal(first.data, by_hand.data)


def _changes():
    """Ways to change a simulation after its library was made: each must give a new library."""
    def spot_moved_in_place(sim):
        sim.coordinates[2].data[0, 0] += 0.01  # (orix's data: a view of the stored array)

    def one_spot_weaker(sim):
        sim.coordinates[5].intensity[1] *= 0.5

    def intensity_replaced(sim):
        v = sim.coordinates[7]
        v._intensity = v.intensity * 2.0

    def vector_replaced(sim):
        sim.coordinates[3] = sim.coordinates[4]

    def rotation_in_place(sim):
        sim.rotations.data[0] = sim.rotations.data[1]

    def coordinates_replaced(sim):
        sim.coordinates = sim.coordinates[::-1].copy()

    return [spot_moved_in_place, one_spot_weaker, intensity_replaced, vector_replaced,
            rotation_in_place, coordinates_replaced]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_changed_simulation_gets_a_new_library(make, change):
    sim = make()
    lib = library_for(sim)
    assert library_for(sim) is lib
    change(sim)
    changed = library_for(sim)
    assert changed is not lib
    fresh = TemplateLibrary.from_simulation(sim)
    for a, b in zip(changed.spots, fresh.spots):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(changed.rotations.data, fresh.rotations.data)
    assert library_for(sim) is changed  # and kept again
