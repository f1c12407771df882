"""Calibration: centre, scale, units, mask, beam energy and the pixel convention."""

import numpy as np
import pytest

import diffgpu
from diffgpu.calibration import beam_energy_from_wavelength, electron_wavelength


@pytest.fixture
def s():
    return diffgpu.DiffractionPatterns(np.zeros((2, 40, 64), dtype="uint16"))


def test_center_default_middle_and_convention(s):
    s.calibration.center = None
    assert s.calibration.center == (31.5, 19.5)
    # the calibrated coordinate of pixel i is offset + i * scale; the centre is where it is 0
    ax_x, ax_y = s.axes_manager.signal_axes
    assert ax_x.index2value(0) == pytest.approx(-31.5)
    assert ax_y.index2value(0) == pytest.approx(-19.5)


def test_center_stays_in_pixels_when_scale_changes(s):
    s.calibration.center = (30.25, 18.5)
    s.calibration.scale = 0.02
    assert s.calibration.center == pytest.approx((30.25, 18.5))
    assert s.calibration.scale == (0.02, 0.02)
    s.calibration.scale = (0.02, 0.03)
    assert s.calibration.scale == (0.02, 0.03)
    assert s.calibration.center == pytest.approx((30.25, 18.5))


def test_center_follows_cropping_and_rebinning(s):
    s.calibration.center = (30.0, 18.0)
    crop = s.isig[10:, 4:]
    assert crop.calibration.center == pytest.approx((20.0, 14.0))
    binned = s.rebin(scale=(1, 2, 2))
    # pixel i of the binned frame covers pixels 2i and 2i+1: its centre is at 2i + 0.5
    assert binned.calibration.center == pytest.approx(((30.0 - 0.5) / 2, (18.0 - 0.5) / 2))


def test_units(s):
    s.calibration.units = "1/nm"
    assert s.calibration.units == "1/nm"
    s.axes_manager.signal_axes[1].units = "px"
    assert s.calibration.units == ("1/nm", "px")


def test_invalid_values(s):
    with pytest.raises(ValueError, match="scale must be positive"):
        s.calibration.scale = 0
    with pytest.raises(ValueError, match="center must be"):
        s.calibration.center = (1, 2, 3)
    with pytest.raises(ValueError, match="center must be"):
        s.calibration.center = (np.nan, 2)
    with pytest.raises(ValueError, match="center must be one finite number or a pair"):
        s.calibration.center = "ab"
    with pytest.raises(ValueError, match="beam_energy must be positive"):
        s.calibration.beam_energy = -200


def test_mask(s):
    assert s.calibration.mask is None
    m = np.zeros((40, 64), dtype=int)
    m[0, :] = 1
    s.calibration.mask = m
    assert s.calibration.mask.dtype == bool and s.calibration.mask.sum() == 64
    with pytest.raises(ValueError, match=r"mask shape \(64, 40\) does not match the detector shape "
                                         r"\(40, 64\)"):
        s.calibration.mask = m.T
    s.calibration.mask = None
    assert s.calibration.mask is None
    assert s.deepcopy().calibration.mask is None


def test_wavelength():
    # tabulated relativistic wavelengths (Å)
    assert electron_wavelength(100) == pytest.approx(0.037014, rel=1e-4)
    assert electron_wavelength(200) == pytest.approx(0.025079, rel=1e-4)
    assert electron_wavelength(300) == pytest.approx(0.019687, rel=1e-4)
    assert beam_energy_from_wavelength(electron_wavelength(80.0)) == pytest.approx(80.0)


def test_beam_energy_and_wavelength_on_signal(s):
    assert s.calibration.beam_energy is None and s.calibration.wavelength is None
    s.calibration.wavelength = 0.019687
    assert s.calibration.beam_energy == pytest.approx(300, rel=1e-3)
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(300, rel=1e-3)
    s.calibration.beam_energy = None
    assert s.calibration.beam_energy is None


def test_repr(s):
    s.calibration.center = None
    s.calibration.beam_energy = 200
    text = repr(s.calibration)
    assert "center=(31.5, 19.5)" in text and "200 keV" in text


def test_non_uniform_detector_axis_is_refused_clearly(s):
    import hyperspy.api as hs

    s.axes_manager.signal_axes[1].convert_to_non_uniform_axis()
    for op in (lambda: s.calibration.center, lambda: s.get_azimuthal_integral1d(npt=4),
               lambda: s.center_of_mass(), lambda: s.get_virtual_image(hs.roi.CircleROI(0, 0, 3))):
        with pytest.raises(ValueError, match=r"diffgpu needs uniform detector axes.*axis 1 \(y\)"):
            op()


def test_units_none_clears_and_pair_sets_each_axis(s):
    s.calibration.units = ("1/nm", "1/Å")
    assert s.calibration.units == ("1/nm", "1/Å")
    assert [ax.units for ax in s.axes_manager.signal_axes] == ["1/nm", "1/Å"]
    s.calibration.units = None
    assert s.calibration.units is None
    s.calibration.units = ["px", None]
    assert s.calibration.units == ("px", None)
    for bad in (5, ("1/nm",), ("a", "b", "c"), ("1/nm", 2)):
        with pytest.raises(TypeError, match="units must be a string"):
            s.calibration.units = bad
    assert s.calibration.units == ("px", None)  # unchanged by a refused value


def test_beam_energy_and_wavelength_setters_refuse_bad_values(s):
    for value in (np.inf, np.nan, 0):
        with pytest.raises(ValueError, match=r"beam_energy must be positive and finite \(keV\)"):
            s.calibration.beam_energy = value
        with pytest.raises(ValueError, match=r"wavelength must be positive and finite \(Å\)"):
            s.calibration.wavelength = value
    for value in ("200", True, [200]):
        with pytest.raises(TypeError, match="beam_energy must be a number"):
            s.calibration.beam_energy = value
    assert s.calibration.beam_energy is None
    s.calibration.beam_energy = np.int64(300)
    assert s.calibration.beam_energy == 300.0
    s.calibration.wavelength = None  # as beam_energy = None
    assert s.calibration.beam_energy is None and s.calibration.wavelength is None


def test_mask_must_be_bool_or_all_zero_or_one(s):
    for value, shown in ((np.full((40, 64), 0.5), "0.5"), (np.full((40, 64), np.nan), "nan"),
                         (np.full((40, 64), 2, dtype="uint8"), "2")):
        with pytest.raises(ValueError, match=rf"a mask must be bool .* all 0 or 1 .*\(e\.g\. "
                                             rf"{shown}\)"):
            s.calibration.mask = value
    with pytest.raises(ValueError, match="a mask must be bool"):
        s.calibration.mask = np.full((40, 64), "x")
    assert s.calibration.mask is None
    ones = np.zeros((40, 64))
    ones[0] = 1.0  # floats that are 0 or 1: 1 = excluded
    s.calibration.mask = ones
    assert s.calibration.mask.dtype == bool and s.calibration.mask.sum() == 64
