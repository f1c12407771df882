"""Orientation mapping's inputs: polar axes (offsets, units, q, pyxem's), the library given to
refine, parameter ranges, the phase map of blank frames, plot_match's units, docstrings."""

from pathlib import Path

import numpy as np
import pytest

import diffgpu
from diffgpu.templates import TemplateLibrary

pytest.importorskip("orix")
pytest.importorskip("diffsims")
from orix.quaternion import Orientation, Rotation  # noqa: E402


@pytest.fixture(scope="module")
def truth():
    # (orientations with no near-tie between twins, which settle either way on any axis)
    np.random.seed(2)
    return Rotation.random(8)


@pytest.fixture(scope="module")
def patterns(si, truth):
    return diffgpu.data.orientation_patterns(si, truth, sig_shape=(128, 128), calibration=0.02)


def _polar(s, radial_range=(0, 1.28), **kw):
    return s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=radial_range, mean=True,
                                      **kw)


@pytest.fixture(scope="module")
def polar(patterns):
    return _polar(patterns)


@pytest.fixture(scope="module")
def matches(polar, lib):
    return polar.get_orientation(lib, n_best=2)


def _angles(a, b, si):
    """Degrees between the best orientations of two matches, up to symmetry."""
    return Orientation(a.to_rotations().data[..., 0, :], symmetry=si.point_group).angle_with(
        Orientation(b.to_rotations().data[..., 0, :], symmetry=si.point_group), degrees=True)


def _with_axes(polar, azimuth=None, radius=None, metadata=True):
    """A copy of ``polar`` with some of its signal axes' attributes replaced."""
    axes = polar.axes_manager._get_signal_axes_dicts()  # (radius, azimuth): array order
    axes[0].update(radius or {})
    axes[1].update(azimuth or {})
    md = polar.metadata.as_dictionary() if metadata else {}
    nav = polar.axes_manager._get_navigation_axes_dicts()
    return diffgpu.PolarPatterns(np.asarray(polar.data), axes=nav + axes, metadata=md)


# 1. the azimuth axis may start anywhere

@pytest.mark.parametrize("kw", [dict(azimuth_range=(0, 360)), dict(azimuth_range=(-90, 270)),
                                dict(azimuth_range=(0, 2 * np.pi), azimuth_unit="rad"),
                                dict(azimuth_range=(-37.3, 322.7))])
def test_azimuth_offset_gives_the_same_orientations(si, lib, truth, patterns, polar, matches, kw):
    other = _polar(patterns, **kw)
    got = other.get_orientation(lib, n_best=2)
    assert set(np.unique(got.data[:, 0, 4])) == {-1.0, 1.0}  # direct and mirrored matches
    # the correlation is sampled every 360 / 126 degrees from the axis's start: within the
    # library's 2-degree grid of each other (the same where the offset is a multiple of it)
    assert (_angles(got, matches, si) < 3).all()
    if kw.get("azimuth_range", (0,))[0] == 0:
        assert (_angles(got, matches, si) < 1e-3).all()
    truth = Orientation(truth, symmetry=si.point_group)
    assert (truth.angle_with(got.to_orientations(), degrees=True) < 2).all()
    # refine() reads the axis as it is: the same refined orientations
    refined = got.refine(other, lib)
    assert (_angles(refined, matches.refine(polar, lib), si) < 0.3).all()
    assert (truth.angle_with(refined.to_orientations(), degrees=True) < 0.3).all()


def test_offset_of_the_default_axis_is_zero(polar):
    from diffgpu.orientation import _polar_calibration

    assert _polar_calibration(polar).offset == 0.0
    assert _polar_calibration(_with_axes(polar, azimuth=dict(offset=0.5))).offset == -180.0


# 2. q = 2 pi k

def test_q_radial_axis_is_converted(si, lib, patterns, matches):
    q = _polar(patterns, radial_unit="q", radial_range=(0, 1.28 * 2 * np.pi))
    assert q.axes_manager.signal_axes[1].name == "q"
    got = q.get_orientation(lib, n_best=2)
    np.testing.assert_array_equal(got.data[..., [0, 1, 4]], matches.data[..., [0, 1, 4]])
    assert (_angles(got, matches, si) < 1e-3).all()
    refined_q = got.refine(q, lib)
    refined_k = matches.refine(_polar(patterns), lib)
    assert (_angles(refined_q, refined_k, si) < 0.05).all()
    # name and metadata disagree: which of k and q is unclear
    renamed = _with_axes(q, radius=dict(name="radius"))
    with pytest.raises(ValueError, match="unclear whether it holds k or"):
        renamed.get_orientation(lib)
    # without metadata the axis name decides
    bare = _with_axes(q, metadata=False)
    np.testing.assert_array_equal(bare.get_orientation(lib, n_best=2).data[..., 0],
                                  matches.data[..., 0])


def test_two_theta_radial_axis_is_refused(patterns, lib, polar):
    tth = _with_axes(polar, radius=dict(name="two_theta", units="deg"))
    with pytest.raises(ValueError, match="scattering angles"):
        tth.get_orientation(lib)


# 3. refine checks the library

def test_refine_refuses_another_library(si, lib, polar, matches):
    ge = TemplateLibrary.silicon(5.658)
    ge.name = "Ge"
    ge_lib = TemplateLibrary.from_phase(ge, resolution=2.0, reciprocal_radius=1.2)
    assert len(ge_lib) == len(lib)
    with pytest.raises(ValueError, match=r"its phases are \['Ge'\], the matches' library's \['Si'\]"):
        matches.refine(polar, ge_lib)
    turned = TemplateLibrary(lib.spots, Rotation(lib.rotations.data[::-1]), lib.phase_index,
                             lib.phases, lib.reciprocal_radius)
    with pytest.raises(ValueError, match="templates have other rotations"):
        matches.refine(polar, turned)
    fewer = TemplateLibrary(lib.spots[:-1], Rotation(lib.rotations.data[:-1]),
                            lib.phase_index[:-1], lib.phases, lib.reciprocal_radius)
    with pytest.raises(ValueError, match="templates, the matches' library"):
        matches.refine(polar, fewer)


# 4. plot_match draws in the axes' units

def _spots(ax):
    return np.asarray(ax.collections[0].get_offsets())


def test_plot_match_in_the_axes_units(patterns, lib):
    import matplotlib.pyplot as plt

    base = _polar(patterns)
    m = base.get_orientation(lib)
    ref = _spots(m.plot_match(base, lib, index=0))
    # radians, over (0, 2 pi)
    rad = _polar(patterns, azimuth_range=(0, 2 * np.pi), azimuth_unit="rad")
    ax = rad.get_orientation(lib).plot_match(rad, lib, index=0)
    xy = _spots(ax)
    assert "rad" in ax.get_xlabel()
    assert ((xy[:, 0] >= 0) & (xy[:, 0] < 2 * np.pi)).all()
    np.testing.assert_allclose(np.sort(np.round(np.rad2deg(xy[:, 0]) % 360, 3)),
                               np.sort(np.round(ref[:, 0] % 360, 3)), atol=0.01)
    # the radius in nm^-1, however spelled
    nm = patterns.deepcopy()
    nm.calibration.scale, nm.calibration.units = 0.2, "nm^-1"
    nm_polar = _polar(nm, radial_range=(0, 12.8))
    xy = _spots(nm_polar.get_orientation(lib).plot_match(nm_polar, lib, index=0))
    np.testing.assert_allclose(np.sort(xy[:, 1]), np.sort(ref[:, 1] * 10), rtol=1e-6)
    plt.close("all")


# 5. parameter ranges

@pytest.mark.parametrize("kw, match", [
    (dict(max_frequency=500), "max_frequency must be an integer from 2 to 181"),
    (dict(max_frequency=1), "max_frequency must be an integer from 2 to 181"),
    (dict(max_frequency=0), "max_frequency must be an integer from 2 to 181"),
    (dict(max_frequency=2.5), "max_frequency must be an integer"),
    (dict(template_sigma=0), "template_sigma .* must be a positive number"),
    (dict(template_sigma=-0.01), "template_sigma .* must be a positive number"),
    (dict(template_sigma=float("nan")), "template_sigma .* must be a positive number"),
])
def test_matching_parameter_ranges(polar, lib, kw, match):
    with pytest.raises(ValueError, match=match):
        polar.get_orientation(lib, **kw)


def test_max_frequency_limits_are_usable(polar, lib):
    for k in (2, 181):
        assert polar.get_orientation(lib, max_frequency=k).metadata.Matching.max_frequency == k


@pytest.mark.parametrize("kw, match", [
    (dict(step=0), "step must be a positive number"),
    (dict(step=-0.5), "step must be a positive number"),
    (dict(min_step=0), "min_step must be a positive number"),
    (dict(min_step=-0.01), "min_step must be a positive number"),
    (dict(step=0.1, min_step=0.2), "min_step .* must not exceed step"),
    (dict(max_excitation_error=0), "max_excitation_error must be a positive number"),
    (dict(max_excitation_error=-0.05), "max_excitation_error must be a positive number"),
    (dict(accelerating_voltage=0), "accelerating_voltage must be a positive number"),
    (dict(accelerating_voltage=-200), "accelerating_voltage must be a positive number"),
])
def test_refine_parameter_ranges(polar, lib, matches, kw, match):
    with pytest.raises(ValueError, match=match):
        matches.refine(polar, lib, **kw)


def test_ipf_direction_is_checked(matches):
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError, match="direction must be one of 'x', 'y' or 'z'"):
        matches.plot_ipf_map(direction="a")
    matches.plot_ipf_map(direction="x")
    plt.close("all")


# 6. blank frames are not indexed in the phase map either

def test_phase_map_marks_blank_frames_not_indexed(si, lib, patterns):
    import matplotlib.pyplot as plt

    data = np.asarray(patterns.data).copy()
    data[1] = 0
    data[2] = np.nan
    s = diffgpu.DiffractionPatterns(data, metadata=patterns.metadata.as_dictionary())
    s.calibration.center, s.calibration.scale, s.calibration.units = (63.5, 63.5), 0.02, "1/Å"
    m = _polar(s).get_orientation(lib, n_best=2)
    phases = m.get_phase_map()
    xmap = m.to_crystal_map()
    np.testing.assert_array_equal(phases.data.ravel(), xmap.phase_id)
    assert phases.data[1] == phases.data[2] == -1 and (np.delete(phases.data, [1, 2]) == 0).all()
    assert phases.metadata.Phases.fractions == [0.75]
    assert phases.metadata.Phases.not_indexed == 0.25
    m.plot_phase_map()
    plt.close("all")


# 7. pyxem's polar patterns

def test_pyxem_polar_patterns_are_refused(polar, lib, matches):
    pyxem_like = _with_axes(polar, metadata=False,
                            azimuth=dict(name="Radians", units="Rad", scale=2 * np.pi / 360,
                                         offset=-np.pi),
                            radius=dict(name="Radius", units="k_A^-1"))
    with pytest.raises(ValueError, match="pyxem's .* runs the other way.*as_diffraction_patterns"):
        pyxem_like.get_orientation(lib)
    with pytest.raises(ValueError, match="pyxem's"):
        matches.refine(pyxem_like, lib)
    # pyxem's axes on a hyperspy-style radial unit
    with pytest.raises(ValueError, match="pyxem's"):
        _with_axes(pyxem_like, radius=dict(units="1/nm"), metadata=False).get_orientation(lib)


def test_diffgpu_integral_of_pyxem_calibrated_patterns(patterns, lib, matches):
    s = patterns.deepcopy()
    s.calibration.units = "k_A^-1"  # as pyxem calibrates, integrated by diffgpu
    got = _polar(s).get_orientation(lib, n_best=2)
    np.testing.assert_array_equal(got.data, matches.data)


# 8. unit spellings and scales

@pytest.mark.parametrize("units", ["°", "degrees", "deg ", "Degree", " DEG"])
def test_degree_spellings(polar, lib, matches, units):
    got = _with_axes(polar, azimuth=dict(units=units)).get_orientation(lib, n_best=2)
    np.testing.assert_array_equal(got.data, matches.data)


@pytest.mark.parametrize("units", ["rad", "Radians", "RAD "])
def test_radian_spellings(polar, lib, matches, units):
    got = _with_axes(polar, azimuth=dict(units=units, scale=2 * np.pi / 360,
                                         offset=np.deg2rad(-179.5))).get_orientation(lib, n_best=2)
    np.testing.assert_array_equal(got.data[..., [0, 1, 4]], matches.data[..., [0, 1, 4]])


def test_unknown_units_and_reversed_axes_are_refused(polar, lib):
    with pytest.raises(ValueError, match="degrees .* or radians .*'furlongs'"):
        _with_axes(polar, azimuth=dict(units="furlongs")).get_orientation(lib)
    with pytest.raises(ValueError, match="degrees .* or radians .*None"):
        _with_axes(polar, azimuth=dict(units=None)).get_orientation(lib)
    rad = polar.axes_manager.signal_axes[1]
    flipped = _with_axes(polar, radius=dict(scale=-rad.scale, offset=rad.high_value))
    with pytest.raises(ValueError, match="radial axis must increase"):
        flipped.get_orientation(lib)
    with pytest.raises(ValueError, match="azimuthal axis must increase"):
        _with_axes(polar, azimuth=dict(scale=-1.0, offset=179.5)).get_orientation(lib)
    # radial units with spaces
    got = _with_axes(polar, radius=dict(units="1 / Å"))
    assert got.get_orientation(lib).data.shape[-1] == 5


# 9. docstrings

def test_docstrings():
    from diffgpu.orientation import _probe_alternative

    doc = diffgpu.PolarPatterns.get_orientation.__doc__
    assert "        Returns\n        -------\n" in doc
    assert "\n\n        -------" not in doc  # (a heading without its name)
    rst = (Path(__file__).parents[1] / "docs" / "orientation_mapping.rst").read_text()
    assert "5.5-16 deviations" in rst
    for doc in (diffgpu.OrientationMatches.get_reliability.__doc__, _probe_alternative.__doc__):
        assert "5.5-16 deviations" in doc and "8-16" not in doc
