"""Azimuthal integration as users coming from pyxem / pyFAI call it: detector units, radial units
and their limits, parameter checks, titles."""

import math

import numpy as np
import pytest

import diffgpu


def patterns(units="1/Å", scale=0.05, beam_energy=200.0, title=None):
    """Two smooth 48 x 50 frames (rings and a gradient), centre off the middle."""
    y, x = np.indices((48, 50), dtype=float)
    r = np.hypot(x - 23.3, y - 25.1)
    frame = 100 + 50 * np.cos(r / 3.0) + 0.2 * x
    s = diffgpu.DiffractionPatterns(np.stack([frame, 2 * frame]).astype("float32"))
    s.calibration.center = (23.3, 25.1)
    s.calibration.scale = scale
    s.calibration.units = units
    if beam_energy is not None:
        s.calibration.beam_energy = beam_energy
    if title is not None:
        s.metadata.General.title = title
    return s


@pytest.mark.parametrize("units", ["px", "mrad", None])
def test_q_needs_a_reciprocal_length(units):
    # q = 2 pi k of a detector in pixels or mrad would be labelled "q" with no meaning
    s = patterns(units=units, scale=1.0, beam_energy=None)
    with pytest.raises(ValueError, match="radial_unit='q' .* reciprocal length"):
        s.get_azimuthal_integral1d(npt=8, radial_unit="q")


@pytest.mark.parametrize("units", ["k_A^-1", "Å⁻¹", "1/a", "A^-1"])
def test_other_spellings_of_inverse_angstrom_give_the_same_angles(units):
    ref = patterns().get_azimuthal_integral1d(npt=12, radial_unit="2theta_deg", curved_ewald=True)
    got = patterns(units=units).get_azimuthal_integral1d(
        npt=12, radial_unit="2theta_deg", curved_ewald=True)
    np.testing.assert_allclose(got.data, ref.data, rtol=1e-6)
    ax, ax_ref = got.axes_manager.signal_axes[0], ref.axes_manager.signal_axes[0]
    assert (ax.units, ax.offset, ax.scale) == (ax_ref.units, ax_ref.offset, ax_ref.scale)


def test_pyxem_q_units_are_q_not_k():
    # pyxem's q_A^-1 measures q = 2 pi k: the same detector with a 2 pi larger scale
    k = patterns(scale=0.05)
    q = patterns(units="q_A^-1", scale=0.05 * 2 * math.pi)
    for kw in (dict(radial_unit="2theta_deg"), dict(radial_unit="2theta_rad", curved_ewald=True)):
        np.testing.assert_allclose(q.get_azimuthal_integral1d(npt=12, **kw).data,
                                   k.get_azimuthal_integral1d(npt=12, **kw).data, rtol=1e-5)
    # curved, in the detector's own unit: q on the sphere, 2 pi times k on the sphere
    qc = q.get_azimuthal_integral1d(npt=12, curved_ewald=True).axes_manager.signal_axes[0]
    kc = k.get_azimuthal_integral1d(npt=12, curved_ewald=True).axes_manager.signal_axes[0]
    assert qc.scale == pytest.approx(2 * math.pi * kc.scale, rel=1e-9)
    with pytest.raises(ValueError, match="already in q"):
        q.get_azimuthal_integral1d(npt=12, radial_unit="q")


def test_q_axis_of_pyxem_k_units_is_named_in_q():
    ax = patterns(units="k_nm^-1").get_azimuthal_integral1d(npt=8, radial_unit="q") \
        .axes_manager.signal_axes[0]
    assert (ax.name, ax.units) == ("q", "q_nm^-1")
    ax = patterns(units="1/nm").get_azimuthal_integral1d(npt=8, radial_unit="q") \
        .axes_manager.signal_axes[0]
    assert (ax.name, ax.units) == ("q", "1/nm")


@pytest.mark.parametrize("kw", [dict(radial_unit="2theta_deg", radial_range=(0.0, 100.0)),
                                dict(radial_unit="2theta_rad", radial_range=(0.1, 2.0)),
                                dict(curved_ewald=True, radial_range=(0.0, 60.0)),
                                dict(curved_ewald=True, radial_unit="q", radial_range=(0.0, 360.0))])
def test_radial_range_past_90_degrees_is_refused(kw):
    # 200 kV: 2theta = 90 degrees is k = sqrt(2) / lambda = 56.4 1/Å on the Ewald sphere; beyond
    # it the last bin silently took every pixel past the range's 90 degree point
    with pytest.raises(ValueError, match="past a scattering angle 2theta of 90 degrees"):
        patterns().get_azimuthal_integral1d(npt=5, **kw)


def test_radial_range_up_to_90_degrees_is_fine():
    s = patterns(scale=20.0)  # the detector reaches about 87 degrees
    p = s.get_azimuthal_integral1d(npt=3, radial_unit="2theta_deg", radial_range=(0.0, 90.0))
    assert np.isclose(p.data.sum(), s.data.sum(), rtol=1e-5)
    flat = s.get_azimuthal_integral1d(npt=3, radial_range=(0.0, 1e6))  # flat k: no limit
    assert np.isclose(flat.data.sum(), s.data.sum(), rtol=1e-5)


def test_errors_name_what_was_asked():
    s = patterns(units="px", scale=1.0)
    with pytest.raises(ValueError, match=r"^curved_ewald=True: angles need the detector scale in 1/Å"):
        s.get_azimuthal_integral1d(npt=5, curved_ewald=True)
    with pytest.raises(ValueError, match=r"^radial_unit='2theta_rad': angles need the beam energy"):
        patterns(beam_energy=None).get_azimuthal_integral1d(npt=5, radial_unit="2theta_rad")


@pytest.mark.parametrize("kw", [dict(mean="False"), dict(mean=None), dict(curved_ewald="no"),
                                dict(mean=2)])
def test_flags_must_be_booleans(kw):
    # the string "False" is truthy: it gave means where sums were asked for
    with pytest.raises(TypeError, match="must be True or False"):
        patterns().get_azimuthal_integral2d(npt=5, npt_azim=4, **kw)


def test_flags_take_numpy_booleans_and_0_1():
    s = patterns()
    a = s.get_azimuthal_integral1d(npt=5, mean=np.True_).data
    np.testing.assert_array_equal(a, s.get_azimuthal_integral1d(npt=5, mean=1).data)
    np.testing.assert_array_equal(a, s.get_azimuthal_integral1d(npt=5, mean=True).data)


@pytest.mark.parametrize("title, expected", [("", "Azimuthal integral"),
                                             ("scan 3", "Azimuthal integral of scan 3")])
def test_title(title, expected):
    s = patterns(title=title)
    assert s.get_azimuthal_integral1d(npt=5).metadata.General.title == expected
    assert s.get_azimuthal_integral2d(npt=5, npt_azim=3).metadata.General.title == expected


@pytest.mark.parametrize("kw", [dict(radial_range=(0.0, np.inf)), dict(radial_range=(np.nan, 1.0)),
                                dict(azimuth_range=(-np.inf, 0.0))])
def test_non_finite_ranges_are_named_as_such(kw):
    # (0, inf) for "to the end" was called "an empty or inverted range"
    with pytest.raises(ValueError, match="must be two finite numbers"):
        patterns().get_azimuthal_integral1d(npt=5, **kw)


def dead_pixel_frames(dtype="float32"):
    """12 frames 40 x 44: dead pixels flagged NaN in every frame (one under the mask), a hot
    inf pixel in two, a NaN patch covering the centre in one, a frame all NaN."""
    rng = np.random.default_rng(3)
    frames = (rng.random((12, 40, 44)) * 50 + 10).astype(dtype)
    frames[:, 7, 30] = np.nan
    frames[:, 20, 3] = np.nan
    frames[:, 0, 0] = np.nan  # masked below
    frames[[2, 9], 33, 12] = np.inf
    frames[5, 15:26, 16:28] = np.nan
    frames[11] = np.nan
    mask = np.zeros((40, 44), bool)
    mask[0, :5] = True
    return frames, mask


@pytest.mark.parametrize("dtype, out_dtype", [("float32", "float32"), (">f4", "float64"),
                                              ("float64", "float32")])
@pytest.mark.parametrize("lazy", [False, True])
def test_means_of_frames_with_dead_pixels_are_over_their_finite_pixels(dtype, out_dtype, lazy):
    frames, mask = dead_pixel_frames(dtype)
    s = diffgpu.DiffractionPatterns(frames.reshape(3, 4, 40, 44))
    s.calibration.center = (21.7, 19.2)
    s.calibration.mask = mask
    if lazy:
        s = s.as_lazy()
    got = s.get_azimuthal_integral2d(npt=6, npt_azim=8, radial_range=(0.0, 25.0), mean=True,
                                     dtype=out_dtype)
    if lazy:
        got.compute()
    got = got.data.reshape(12, 6, 8)
    assert got.dtype == out_dtype
    for i, frame in enumerate(frames):
        one = diffgpu.DiffractionPatterns(np.nan_to_num(frame.astype("float64"), nan=0.0, posinf=0.0))
        one.calibration.center = (21.7, 19.2)
        ref = one.get_azimuthal_integral2d(npt=6, npt_azim=8, radial_range=(0.0, 25.0), mean=True,
                                           mask=mask | ~np.isfinite(frame), dtype="float64").data
        np.testing.assert_array_equal(np.isnan(got[i]), np.isnan(ref))
        np.testing.assert_allclose(got[i], ref, rtol=2e-6, atol=0)
    assert np.isnan(got[5]).any() and np.isnan(got[11]).all()


def test_frames_with_dead_pixels_are_integrated_once(monkeypatch):
    # each frame's validity image was integrated again (a second pass over all the frames, as
    # much memory as them): 6x the time of the integral with a NaN dead pixel in every frame
    from diffgpu.kernels import integration

    frames, mask = dead_pixel_frames()
    s = diffgpu.DiffractionPatterns(frames[:11])
    s.calibration.center = (21.7, 19.2)
    s.get_azimuthal_integral1d(npt=10, mean=True)  # the engine, built
    passes = []
    kernel = integration._integrate_tiles

    def counted(frames, *args):
        passes.append(frames.shape[0])
        return kernel(frames, *args)

    monkeypatch.setattr(integration, "_integrate_tiles", counted)
    monkeypatch.setattr(integration, "CONVERT_BLOCK", 64)
    monkeypatch.setattr("diffgpu.azimuthal.host_threads", lambda: 1)
    s.get_azimuthal_integral1d(npt=10, mean=True)
    assert sum(passes) == 11
