"""Centre of mass, direct-beam position, plane fit, shifting and centring."""

import re

import numpy as np
import pytest

import diffgpu


@pytest.fixture(scope="module")
def drifting():
    return diffgpu.data.synthetic_4dstem(nav_shape=(8, 10), sig_shape=(96, 96), lazy=False)


def _position_error(s, shifts):
    pos = shifts.data + np.asarray(s.calibration.center)
    return pos - s.metadata.Synthetic.beam_centers


@pytest.mark.parametrize("kwargs", [
    dict(method="center_of_mass", mask="beam"),
    dict(method="blur", sigma=2.0, window=8.0),
    dict(method="cross_correlate", radius=2.88),
])
def test_beam_positions_match_the_truth(drifting, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "beam":
        cx, cy = drifting.calibration.center
        kwargs["mask"] = (cx, cy, 9.0)
    shifts = drifting.get_direct_beam_position(**kwargs)
    assert isinstance(shifts, diffgpu.DirectBeamShifts)
    assert shifts.data.shape == (8, 10, 2)
    err = _position_error(drifting, shifts)
    assert np.sqrt(np.mean(err**2)) <= 0.1


def test_center_of_mass_equals_a_direct_numpy_reference(drifting):
    region = np.zeros((96, 96))
    region[20:70, 30:80] = 1
    shifts = drifting.center_of_mass(mask=region, threshold=3.0)
    y, x = np.indices((96, 96))
    f = drifting.data.astype(float)
    f = np.where(f >= 3.0 * f.mean(axis=(-2, -1), keepdims=True), f, 0) * region
    tot = f.sum(axis=(-2, -1))
    ref = np.stack([(f * x).sum(axis=(-2, -1)) / tot, (f * y).sum(axis=(-2, -1)) / tot], -1)
    np.testing.assert_allclose(shifts.data + np.asarray(drifting.calibration.center), ref, atol=2e-3)


def test_lazy_beam_position_equals_eager(drifting):
    lazy = drifting.as_lazy()
    lazy.rechunk(nav_chunks=(4, 5))
    for method, kw in (("center_of_mass", {}), ("blur", {"sigma": 2.0}),
                       ("cross_correlate", {"radius": 2.88})):
        eager = drifting.get_direct_beam_position(method=method, **kw)
        lz = lazy.get_direct_beam_position(method=method, **kw)
        assert isinstance(lz, diffgpu.LazyDirectBeamShifts)
        np.testing.assert_allclose(lz.data.compute(), eager.data, atol=1e-4)


def test_fit_plane_recovers_a_linear_descan():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 7), sig_shape=(64, 64), wobble=0.0,
                                      drift=(3.0, -2.0), lazy=False)
    shifts = s.get_direct_beam_position(method="blur", sigma=2.0, window=6.0).fit_plane()
    err = shifts.data + np.asarray(s.calibration.center) - s.metadata.Synthetic.beam_centers
    assert np.abs(err).max() < 0.05
    with pytest.raises(ValueError, match="mask shape"):
        shifts.fit_plane(mask=np.zeros((2, 2), bool))


def test_centering_puts_the_beam_on_the_center_and_keeps_intensity(drifting):
    cx, cy = drifting.calibration.center
    shifts = drifting.get_direct_beam_position(method="blur", sigma=2.0, window=8.0)
    centred = drifting.center_direct_beam(shifts=shifts)
    after = centred.get_direct_beam_position(method="blur", sigma=2.0, window=8.0)
    assert np.abs(after.data).max() < 0.1
    # totals change only by what leaves the detector: small here (rings well inside)
    before_tot = drifting.data.sum(axis=(-2, -1), dtype=float)
    after_tot = centred.data.sum(axis=(-2, -1), dtype=float)
    np.testing.assert_allclose(after_tot, before_tot, rtol=5e-3)
    lazy = drifting.as_lazy().center_direct_beam(shifts=shifts)
    assert isinstance(lazy, diffgpu.LazyDiffractionPatterns)
    np.testing.assert_allclose(lazy.data.compute(), centred.data, rtol=1e-6, atol=1e-4)
    found = drifting.as_lazy().center_direct_beam(method="blur", sigma=2.0, window=8.0)
    np.testing.assert_allclose(found.data.compute(), centred.data, rtol=1e-5, atol=1e-3)


def test_shift_diffraction_moves_content_exactly():
    f = np.zeros((2, 3, 16, 16), dtype="float32")
    f[..., 8, 8] = 1.0
    s = diffgpu.DiffractionPatterns(f)
    moved = s.shift_diffraction(1.25, -2.5)
    assert moved.data.sum() == pytest.approx(6.0)
    y, x = np.indices((16, 16))
    cx = (moved.data * x).sum(axis=(-2, -1))
    cy = (moved.data * y).sum(axis=(-2, -1))
    np.testing.assert_allclose(cx, 9.25, atol=1e-6)
    np.testing.assert_allclose(cy, 5.5, atol=1e-6)


def test_compiled_shift_equals_the_array_formulation():
    """The host's compiled shift does the NumPy/CuPy formulation's float32 arithmetic in the
    same order: the same values, for whole, half and general shifts, shifts off the
    detector, unknown (NaN) shifts, and big-endian integer frames."""
    from diffgpu.kernels.shift import _shift_array, shift_frames

    rng = np.random.default_rng(3)
    frames = rng.poisson(5.0, (9, 20, 24)).astype(">u2")
    shifts = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 0.0], [0.0, -0.75], [2.3, -1.6],
                       [-7.9, 3.2], [30.0, 0.5], [np.nan, 1.0], [-0.25, 19.5]])
    got = shift_frames(frames, shifts)
    assert got.dtype == np.float32
    generic = np.empty(frames.shape, np.float32)
    _shift_array(frames, shifts, generic, np)  # the formulation the device runs, on NumPy
    np.testing.assert_array_equal(got, generic)


def test_bad_shift_and_method_inputs(drifting):
    with pytest.raises(ValueError, match=r"shifts must have the shape \(8, 10, 2\)"):
        drifting.center_direct_beam(shifts=np.zeros((8, 9, 2)))
    with pytest.raises(ValueError, match="method must be one of"):
        drifting.get_direct_beam_position(method="magic")
    with pytest.raises(ValueError, match="needs radius"):
        drifting.get_direct_beam_position(method="cross_correlate")
    with pytest.raises(ValueError, match="threshold must be a non-negative"):
        drifting.center_of_mass(threshold=-2)
    with pytest.raises(ValueError, match="mask shape"):
        drifting.center_of_mass(mask=np.ones((5, 5)))
    with pytest.raises(TypeError, match="only apply when"):
        drifting.center_direct_beam(shifts=np.zeros((8, 10, 2)), sigma=3)


def test_standin_device_beam_finding(standin_gpu, drifting):
    from conftest import StandInDeviceArray

    ref = drifting.center_of_mass()
    s = drifting.deepcopy()
    s.to_device()
    shifts = s.center_of_mass()
    assert isinstance(shifts.data, StandInDeviceArray)
    np.testing.assert_allclose(shifts.data.get(), ref.data, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method, kw", [("center_of_mass", {}), ("blur", {"sigma": 2.0}),
                                        ("cross_correlate", {"radius": 2.88})])
def test_gpu_beam_positions_and_centering_match_cpu(cupy, drifting, method, kw):
    cpu = drifting.get_direct_beam_position(method=method, **kw)
    s = drifting.as_lazy()
    s.to_device()
    gpu = s.get_direct_beam_position(method=method, **kw)
    assert isinstance(gpu.data._meta, cupy.ndarray)
    gpu.to_host()
    gpu.compute()
    np.testing.assert_allclose(gpu.data, cpu.data, atol=1e-3)
    centred_cpu = drifting.center_direct_beam(shifts=cpu)
    centred_gpu = s.center_direct_beam(shifts=cpu)
    centred_gpu.to_host()
    centred_gpu.compute()
    np.testing.assert_allclose(centred_gpu.data, centred_cpu.data, rtol=1e-5, atol=1e-3)


def _beam_frames():
    """Three 16 x 16 frames: a beam at (7.3, 8.6), the same beam, and nothing."""
    yy, xx = np.mgrid[:16, :16]
    beam = (100 * np.exp(-((xx - 7.3) ** 2 + (yy - 8.6) ** 2) / 4)).astype("float32")
    return np.stack([beam, beam, np.zeros_like(beam)])


def _with_bad_pixels(f, lazy):
    """Frames ``f`` with a NaN pixel in frame 0 and a hot pixel in frame 1 that
    ``calibration.mask`` leaves out; the centre at the detector's middle."""
    f = f.copy()
    f[0, 2, 3] = np.nan
    f[1, 13, 2] = 1e6  # hot, but masked
    s = diffgpu.DiffractionPatterns(f)
    s.calibration.center = None
    mask = np.zeros(f.shape[-2:], bool)
    mask[13, 2] = True
    s.calibration.mask = mask
    return s.as_lazy() if lazy else s


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("method, kw", [("blur", {}), ("cross_correlate", {"radius": 2})])
def test_blur_and_cross_correlation_leave_out_nan_and_masked_pixels(lazy, method, kw):
    """A NaN pixel and a masked hot pixel far from the beam change nothing; a dark frame has
    no beam (NaN), not one at the corner pixel."""
    f = _beam_frames()
    clean = diffgpu.DiffractionPatterns(f.copy())
    clean.calibration.center = None
    ref = clean.get_direct_beam_position(method=method, **kw).data[1]
    s = _with_bad_pixels(f, lazy)
    shifts = s.get_direct_beam_position(method=method, **kw)
    got = shifts.data.compute() if lazy else shifts.data
    np.testing.assert_allclose(got[:2], [ref, ref], atol=1e-5)
    if method == "blur":
        np.testing.assert_allclose(ref, [7.3 - 7.5, 8.6 - 7.5], atol=1e-3)
    assert np.isnan(got[2]).all()


def test_beam_finding_on_integer_frames_with_a_masked_pixel():
    f = (_beam_frames() * 10).astype("uint16")
    ref = diffgpu.DiffractionPatterns(f.copy()).get_direct_beam_position(method="blur").data
    f[:2, 0, 15] = 60000
    s = diffgpu.DiffractionPatterns(f)
    s.calibration.mask = np.pad(np.ones((1, 1), bool), ((0, 15), (15, 0)))  # pixel (0, 15)
    got = s.get_direct_beam_position(method="blur").data
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.isnan(got[2]).all()


def test_center_of_mass_leaves_out_masked_and_non_finite_pixels():
    """A NaN in a masked pixel does not spoil the centre of mass; an unmasked NaN or inf
    pixel counts as 0 (as in integration), with or without a threshold, lazily or not."""
    f = _beam_frames()
    zeroed = f.copy()
    zeroed[0, 2, 3] = 0
    zeroed[1, 12, 12] = 0
    ref_s = diffgpu.DiffractionPatterns(zeroed)
    f[0, 2, 3] = np.nan
    f[1, 12, 12] = np.inf
    s = diffgpu.DiffractionPatterns(f)
    for kw in ({}, {"threshold": 0.5}, {"mask": (7.5, 8.5, 6)}):
        ref = ref_s.center_of_mass(**kw).data
        np.testing.assert_allclose(s.center_of_mass(**kw).data, ref, atol=1e-5)
        np.testing.assert_allclose(s.as_lazy().center_of_mass(**kw).data.compute(), ref, atol=1e-5)
        assert np.isnan(ref[2]).all() and np.isfinite(ref[:2]).all()
    mask = np.zeros((16, 16), bool)
    mask[2, 3] = True
    s.calibration.mask = mask
    ref_s.calibration.mask = mask
    np.testing.assert_allclose(s.center_of_mass().data, ref_s.center_of_mass().data, atol=1e-5)
    # the frame whose only NaN is masked: the clean frame's centre with the same mask
    clean = diffgpu.DiffractionPatterns(_beam_frames())
    clean.calibration.mask = mask
    np.testing.assert_allclose(s.center_of_mass().data[0], clean.center_of_mass().data[0],
                               atol=1e-6)


def test_mask_and_threshold_are_for_center_of_mass_only(drifting):
    for method, kw in (("blur", {}), ("cross_correlate", {"radius": 2.88})):
        with pytest.raises(TypeError, match="mask= are for method='center_of_mass' only"):
            drifting.get_direct_beam_position(method=method, mask=(40, 40, 5), **kw)
        with pytest.raises(TypeError, match="threshold= are for method='center_of_mass'"):
            drifting.get_direct_beam_position(method=method, threshold=0.5, **kw)
        with pytest.raises(TypeError, match="mask= and threshold="):
            drifting.center_direct_beam(method=method, mask=(40, 40, 5), threshold=1, **kw)
    s = diffgpu.DiffractionPatterns(_beam_frames())
    s.calibration.mask = np.ones((16, 16), bool)
    with pytest.raises(ValueError, match="covers every pixel"):
        s.get_direct_beam_position(method="blur")
    # the other methods' options are refused too, never silently ignored
    for method, kw, stray in (("center_of_mass", {"sigma": 3}, "sigma="),
                              ("center_of_mass", {"radius": 2, "window": 4}, "radius=, window="),
                              ("blur", {"radius": 2}, "radius="),
                              ("cross_correlate", {"radius": 2, "sigma": 1}, "sigma=")):
        with pytest.raises(TypeError, match=f"{stray} do"):
            drifting.get_direct_beam_position(method=method, **kw)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("method, kw", [("center_of_mass", {}), ("blur", {}),
                                        ("cross_correlate", {"radius": 2})])
def test_standin_device_beam_finding_with_nan_and_masked_pixels(standin_gpu, lazy, method, kw):
    s = _with_bad_pixels(_beam_frames(), lazy)
    ref = s.get_direct_beam_position(method=method, **kw)
    ref = ref.data.compute() if lazy else ref.data
    dev = s.deepcopy()
    dev.to_device()
    got = dev.get_direct_beam_position(method=method, **kw)
    got.to_host()
    if lazy:
        got.compute()
    np.testing.assert_allclose(got.data, ref, atol=1e-5)
    assert np.isfinite(ref[:2]).all() and np.isnan(ref[2]).all()


def _flat_discs(centers, radius, shape=(64, 64), noise=False):
    """Frames each holding one flat, saturated disc (a bright-field disc) at its centre."""
    from diffgpu.detectors import disc_weights

    f = np.stack([100 * disc_weights(shape, c, radius) for c in centers]).astype("float32")
    if noise:
        f = np.random.default_rng(0).poisson(f / 2).astype("float32")
    s = diffgpu.DiffractionPatterns(f)
    s.calibration.center = (0, 0)
    return s


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("radius, noise", [(20, False), (20, True), (7, False), (12, False)])
def test_blur_finds_a_beam_larger_than_its_window(lazy, radius, noise):
    """A flat disc blurred has no single maximum (a plateau wider than the default window
    of 4 sigma): the beam's centre is still found."""
    centers = [(35.3, 29.6), (29.8, 33.1), (31.5, 31.5)]
    s = _flat_discs(centers, radius, noise=noise)
    s = s.as_lazy() if lazy else s
    got = s.get_direct_beam_position("blur").data
    got = got.compute() if lazy else got
    np.testing.assert_allclose(got, centers, atol=0.1 if noise else 0.02)


def test_blur_on_large_and_small_beams_in_one_block():
    """Each frame is judged on its own: a small beam's result is what it is alone."""
    large = _flat_discs([(35.3, 29.6)], 20)
    small = diffgpu.DiffractionPatterns(np.pad(_beam_frames()[:1], ((0, 0), (20, 28), (10, 38))))
    small.calibration.center = (0, 0)
    both = diffgpu.DiffractionPatterns(np.concatenate([large.data, small.data]))
    both.calibration.center = (0, 0)
    got = both.get_direct_beam_position("blur").data
    np.testing.assert_allclose(got[0], [35.3, 29.6], atol=0.02)
    np.testing.assert_array_equal(got[1], small.get_direct_beam_position("blur").data[0])
    np.testing.assert_allclose(got[1], [17.3, 28.6], atol=1e-3)


@pytest.mark.parametrize("lazy", [False, True])
def test_standin_device_blur_on_a_large_beam(standin_gpu, lazy):
    s = _flat_discs([(35.3, 29.6), (29.8, 33.1)], 20, noise=True)
    s = s.as_lazy() if lazy else s
    ref = s.get_direct_beam_position("blur").data
    ref = ref.compute() if lazy else ref
    dev = s.deepcopy()
    dev.to_device()
    got = dev.get_direct_beam_position("blur")
    got.to_host()
    if lazy:
        got.compute()
    np.testing.assert_allclose(got.data, ref, atol=1e-4)


def test_cross_correlate_radius_must_be_positive_and_fit_on_the_detector():
    s = _flat_discs([(35.3, 29.6)], 20)
    with pytest.raises(ValueError, match=r"radius must be positive .*; got 0"):
        s.get_direct_beam_position("cross_correlate", radius=0)
    with pytest.raises(ValueError, match=r"radius=100.*64 x 64"):
        s.get_direct_beam_position("cross_correlate", radius=100)
    with pytest.raises(ValueError, match=r"radius=33"):
        s.get_direct_beam_position("cross_correlate", radius=33)
    np.testing.assert_allclose(s.get_direct_beam_position("cross_correlate", radius=32).data[0],
                               [35.3, 29.6], atol=1)


@pytest.mark.parametrize("shift_x, shift_y", [(np.zeros(4), np.zeros(4)), (0.5, np.zeros((2, 3))),
                                              (np.zeros((3, 1)), 0.0)])
def test_shift_diffraction_names_the_shapes_that_do_not_fit(shift_x, shift_y):
    s = diffgpu.DiffractionPatterns(np.zeros((3, 8, 8), "float32"))
    bad = np.shape(shift_x) if np.ndim(shift_x) else np.shape(shift_y)
    name = "shift_x" if np.ndim(shift_x) else "shift_y"
    with pytest.raises(ValueError, match=rf"{name} of shape {re.escape(str(bad))}.*scan shape \(3,\)"):
        s.shift_diffraction(shift_x, shift_y)


@pytest.mark.parametrize("shifts", [np.zeros((2, 2)), np.zeros((3, 3)), np.zeros(3)])
def test_shift_frames_wants_one_shift_per_frame(shifts):
    from diffgpu.kernels.shift import shift_frames

    with pytest.raises(ValueError, match=rf"shape \(3, 2\).*got {re.escape(str(shifts.shape))}"):
        shift_frames(np.ones((3, 4, 4)), shifts)


@pytest.mark.parametrize("shape,sigma", [((3, 40, 57), 2.0), ((2, 5, 7), 3.0), ((4, 64, 64), 0.7),
                                         ((2, 33, 20), 5.5), ((1, 3, 3), 4.0)])
def test_host_blur_is_scipy_s_gaussian_filter(shape, sigma):
    """The blur beam finder's numba blur (4x SciPy's) gives SciPy's result: same kernel,
    same edges (zeros beyond), to float32 rounding; detectors smaller than the kernel too."""
    import scipy.ndimage as ndi

    from diffgpu.kernels.blur import gaussian_blur

    f = (np.random.default_rng(0).random(shape) * 100).astype(np.float32)
    expected = ndi.gaussian_filter(f, (0, sigma, sigma), mode="constant")
    np.testing.assert_allclose(gaussian_blur(f, sigma), expected, rtol=0, atol=1e-6 * expected.max())
