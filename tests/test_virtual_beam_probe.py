"""Virtual imaging, beam finding, centring and clean-up as users coming from pyxem and
LiberTEM meet them: their conventions, real detector dtypes and lazy data as readers give it."""

import dask.array as da
import hyperspy.api as hs
import numpy as np
import pytest

import diffgpu


@pytest.fixture(scope="module")
def beam64():
    return diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(64, 64), lazy=False)


def _pyxem_beam_shift(s):
    """What pyxem 0.21's ``get_direct_beam_position`` returns for the true beams of ``s``:
    the detector's middle ``(columns / 2, rows / 2)`` minus the beam, signal type
    ``beam_shift`` (as a file written by pyxem reads back without pyxem)."""
    ny, nx = s.calibration.detector_shape
    beams = np.asarray(s.metadata.Synthetic.beam_centers, dtype=np.float32)
    out = hs.signals.Signal1D(np.array([nx / 2, ny / 2], np.float32) - beams)
    out.metadata.Signal.signal_type = "beam_shift"
    return out


@pytest.mark.parametrize("lazy", [False, True])
def test_center_direct_beam_takes_a_pyxem_beam_shift_its_way(beam64, lazy):
    s = beam64.as_lazy() if lazy else beam64
    shifts = _pyxem_beam_shift(beam64)
    if lazy:
        shifts = shifts.as_lazy()
    centred = s.center_direct_beam(shifts=shifts)
    assert centred._lazy == lazy
    cx, cy = s.calibration.center
    left = centred.center_of_mass(mask=(cx, cy, 6.0))
    if lazy:
        left.compute()
    # every beam now on calibration.center (the shifts taken as diffgpu's moved them ~2 px on)
    assert np.abs(left.data).max() < 0.15


def test_find_bad_pixels_of_lazy_float16_data_does_not_overflow(beam64):
    # a bright beam summed over frames in float16 went to inf: the whole beam was "bad"
    frames = beam64.data.astype("float16")
    lazy = diffgpu.LazyDiffractionPatterns(da.from_array(frames, chunks=(1, 2, 64, 64)))
    eager = diffgpu.DiffractionPatterns(frames)
    bad = lazy.find_bad_pixels()
    assert not bad[28:32, 30:34].any()
    np.testing.assert_array_equal(bad, eager.find_bad_pixels())


def test_find_bad_pixels_leaves_the_masked_gap_out_of_the_medians():
    # a Merlin quad frame: four chips of counts, a 2-pixel cross of zeros between them,
    # masked (as the .mib reader masks it); the pixels at the gap's corners had 5 gap zeros
    # among their 8 neighbours, a median of 0, and were flagged hot
    frames = np.full((2, 3, 66, 66), 2, dtype=">u2")
    frames[..., 32:34, :] = 0
    frames[..., :, 32:34] = 0
    frames[..., 31, 40] = 900  # a real hot pixel next to the gap
    s = diffgpu.DiffractionPatterns(frames)
    gap = np.zeros((66, 66), bool)
    gap[32:34] = gap[:, 32:34] = True
    s.calibration.mask = gap
    bad = s.find_bad_pixels()
    assert np.argwhere(bad).tolist() == [[31, 40]]
    # the lazy signal, as a reader hands it over, agrees
    s.calibration.mask = gap
    assert np.argwhere(s.as_lazy().find_bad_pixels()).tolist() == [[31, 40]]


def test_rectangle_on_an_axis_of_negative_scale():
    # the same detector described with ky falling down the rows: a RectangularROI covers the
    # same calibrated region (it raised "rectangle needs left < right and top < bottom")
    frame = np.random.default_rng(3).uniform(0, 10, (40, 50)).astype(np.float32)
    up = diffgpu.DiffractionPatterns(frame[None].copy())
    down = diffgpu.DiffractionPatterns(frame[None, ::-1].copy())
    for s, scale, offset in ((up, 0.03, -0.6), (down, -0.03, -0.6 + 39 * 0.03)):
        kx, ky = s.axes_manager.signal_axes
        kx.scale, kx.offset = 0.02, -0.5
        ky.scale, ky.offset = scale, offset
    rois = [hs.roi.RectangularROI(left=-0.11, top=-0.23, right=0.13, bottom=0.31),
            hs.roi.CircleROI(cx=0.05, cy=0.1, r=0.2)]
    expected = up.get_virtual_image(rois).data
    assert expected[0, 0] > 0
    np.testing.assert_allclose(down.get_virtual_image(rois).data, expected, rtol=1e-5)


def test_fit_plane_is_not_tilted_by_a_few_lost_beams():
    rows, cols = np.indices((12, 16))
    plane = np.stack([0.08 * cols - 0.05 * rows + 1.5, 0.03 * cols + 0.1 * rows - 2.0], axis=-1)
    noisy = plane + np.random.default_rng(5).normal(0, 0.05, plane.shape)
    # three frames whose beam finder locked onto a Bragg spot ~40 px away
    noisy[0, 0] = [40.0, 3.0]
    noisy[11, 15] = [-35.0, 20.0]
    noisy[5, 7] = [2.0, -38.0]
    shifts = diffgpu.DirectBeamShifts(noisy.astype(np.float32))
    fitted = shifts.fit_plane()
    assert np.abs(fitted.data - plane).max() < 0.05  # plain least squares: ~5 px off
    assert fitted.metadata.BeamShifts.plane_outliers == 3
    plain = shifts.fit_plane(robust=False)
    assert np.abs(plain.data - plane).max() > 1


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_center_of_mass_takes_a_circle_roi_in_calibrated_units(beam64, scale):
    s = beam64.deepcopy()
    for ax in s.axes_manager.signal_axes:
        ax.scale, ax.offset = scale, ax.offset * scale
    cx, cy = s.calibration.center
    by_pixels = s.center_of_mass(mask=(cx, cy, 8.0)).data
    by_roi = s.center_of_mass(mask=hs.roi.CircleROI(cx=0, cy=0, r=8.0 * scale)).data
    np.testing.assert_allclose(by_roi, by_pixels, atol=1e-4)
    annulus = s.get_direct_beam_position(mask=hs.roi.CircleROI(cx=0, cy=0, r=8.0 * scale,
                                                               r_inner=4.0 * scale)).data
    assert np.isfinite(annulus).all()


@pytest.mark.parametrize("lazy", [False, True])
def test_centring_does_not_move_a_masked_hot_pixel_out_from_under_the_mask(beam64, lazy):
    frames = beam64.data.astype(">u2")  # as a Merlin file stores them
    frames[..., 10, 50] = 60000
    s = diffgpu.DiffractionPatterns(frames, axes=beam64.axes_manager._get_axes_dicts())
    s = s.as_lazy() if lazy else s
    s.calibration.mask = s.find_bad_pixels()
    assert s.calibration.mask[10, 50]
    centred = s.center_direct_beam(method="blur")
    if lazy:
        centred.compute()
    # the hot counts went with the shift to pixels around (10, 50) that the mask (which stays
    # where it is) does not cover: ~60,000 counts in an annular dark-field image
    left = np.where(centred.calibration.mask, 0, centred.data).max(axis=(0, 1))
    assert left[6:15, 46:55].max() < 50


@pytest.mark.parametrize("lazy", [False, True])
def test_masked_and_pyxem_centring_on_the_device_match_the_host(standin_gpu, beam64, lazy):
    s = beam64.deepcopy()
    bad = np.zeros((64, 64), bool)
    bad[10, 50] = bad[40, 3] = True
    s.calibration.mask = bad
    s = s.as_lazy() if lazy else s
    shifts = _pyxem_beam_shift(beam64)
    ref = s.center_direct_beam(shifts=shifts)
    dev = s.deepcopy()
    dev.to_device()
    got = dev.center_direct_beam(shifts=shifts)
    assert got.device == "gpu"
    for out in (ref, got):
        out.to_host()
        if lazy:
            out.compute()
    np.testing.assert_allclose(got.data, ref.data, rtol=1e-5, atol=1e-3)


def test_shift_frames_keep_reads_masked_pixels_as_zero_on_both_paths():
    from diffgpu.kernels.shift import _shift_array, shift_frames

    rng = np.random.default_rng(7)
    frames = rng.uniform(0, 100, (4, 12, 15)).astype(">u2")
    frames[:, 3, 4] = 60000
    frames[1, 6, 6] = 0
    keep = np.ones((12, 15), bool)
    keep[3, 4] = False
    shifts = np.array([[0.4, -1.3], [2.0, 0.0], [np.nan, 1.0], [-0.75, 0.25]])
    got = shift_frames(frames, shifts, keep=keep)
    expected = shift_frames(np.where(keep, frames.astype(np.float32), 0), shifts)
    np.testing.assert_array_equal(got, expected)
    generic = np.empty(frames.shape, np.float32)
    _shift_array(frames, shifts, generic, np, keep)  # the device's formulation, on NumPy
    np.testing.assert_allclose(got, generic, rtol=1e-6)
    assert got.max() < 200


def test_an_roi_placed_in_pixels_off_the_detector_is_told_the_calibrated_extent():
    # an ROI at pixel (100, 100) from the corner, as on an uncalibrated pyxem signal, is
    # 100 px from calibration.center here: off a 128 x 128 detector
    s = diffgpu.DiffractionPatterns(np.ones((2, 128, 128), np.uint16))
    s.calibration.center = (64, 64)
    with pytest.raises(ValueError, match=r"calibrated units.*calibration\.center at \(0, 0\).*"
                                         r"spans x -64\.5 to 63\.5 and y -64\.5 to 63\.5"):
        s.get_virtual_image(hs.roi.CircleROI(cx=100, cy=100, r=5))


@pytest.mark.parametrize("inplace", [False, True])
def test_filled_pixels_leave_calibration_mask_so_the_beam_over_the_gap_is_found(inplace):
    # a quad detector's beam sits on the gap between the chips; masked, the gap biased every
    # beam finder by ~0.4 px, and correct_bad_pixels left it masked: no better after filling
    s = diffgpu.data.synthetic_4dstem(nav_shape=(1, 2), sig_shape=(130, 130), lazy=False,
                                      center=(66.5, 67.0), beam_radius=8, drift=(0, 0), wobble=0,
                                      beam_counts=1e6)
    truth = np.asarray(s.metadata.Synthetic.beam_centers) - s.calibration.center
    gap = np.zeros((130, 130), bool)
    gap[64:66] = gap[:, 64:66] = True
    s.data[..., gap] = 0
    s.calibration.mask = gap
    fixed = s.correct_bad_pixels(inplace=inplace)
    fixed = s if inplace else fixed
    assert fixed.calibration.mask is None
    shifts = fixed.center_of_mass(mask=(66.5, 67.0, 16.0)).data
    assert np.abs(shifts - truth).max() < 0.05
    # masked pixels not passed as mask= (not filled) stay masked
    other = np.zeros((130, 130), bool)
    other[3, 3] = True
    s.calibration.mask = gap | other
    partly = s.correct_bad_pixels(mask=other)
    np.testing.assert_array_equal(partly.calibration.mask, gap)
