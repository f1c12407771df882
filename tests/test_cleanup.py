"""Detector clean-up: bad pixels, dark and gain."""

import numpy as np
import pytest

import diffgpu


def test_find_and_correct_hot_and_dead_pixels():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 6), sig_shape=(64, 64), lazy=False)
    s.data[..., 10, 50] = 40000  # hot
    s.data[..., 40, 12] = 0  # dead
    bad = s.find_bad_pixels()
    assert bad[10, 50] and bad[40, 12]
    assert bad.sum() <= 5  # the rings and the beam are not flagged
    s.find_bad_pixels(set_mask=True)
    assert s.calibration.mask[10, 50]
    fixed = s.correct_bad_pixels()
    assert fixed.data.dtype == np.float32
    neighbours = s.data[..., 9:12, 49:52].astype(float).sum(axis=(-2, -1)) - s.data[..., 10, 50]
    np.testing.assert_allclose(fixed.data[..., 10, 50], neighbours / 8, rtol=1e-5)
    untouched = ~s.calibration.mask
    np.testing.assert_array_equal(fixed.data[..., untouched], s.data[..., untouched])
    lazy = s.as_lazy().correct_bad_pixels()
    np.testing.assert_allclose(lazy.data.compute(), fixed.data)


def test_correct_needs_a_mask():
    s = diffgpu.DiffractionPatterns(np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="no bad-pixel mask"):
        s.correct_bad_pixels()
    with pytest.raises(ValueError, match="mask shape"):
        s.correct_bad_pixels(mask=np.zeros((4, 4), bool))


def test_flat_field_and_dark():
    rng = np.random.default_rng(0)
    data = rng.integers(100, 200, (3, 4, 16, 16)).astype("uint16")
    gain = rng.uniform(0.8, 1.2, (16, 16))
    dark = rng.uniform(0, 20, (16, 16))
    s = diffgpu.DiffractionPatterns(data)
    out = s.flat_field(gain=gain, dark=dark)
    np.testing.assert_allclose(out.data, (data - dark) * gain, rtol=1e-5)
    lazy = s.as_lazy().flat_field(gain=gain)
    np.testing.assert_allclose(lazy.data.compute(), data * gain, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a gain"):
        s.flat_field()
    with pytest.raises(ValueError, match=r"gain shape \(8, 8\) does not match"):
        s.flat_field(gain=np.ones((8, 8)))
    with pytest.raises(ValueError, match="dark contains NaN"):
        s.flat_field(dark=np.full((16, 16), np.nan))


@pytest.mark.gpu
def test_gpu_cleanup_matches_cpu(cupy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(32, 32), lazy=False)
    bad = np.zeros((32, 32), bool)
    bad[5, 7] = True
    gain = np.linspace(0.9, 1.1, 32 * 32).reshape(32, 32)
    cpu = s.correct_bad_pixels(mask=bad).flat_field(gain=gain)
    s.to_device()
    gpu = s.correct_bad_pixels(mask=bad).flat_field(gain=gain)
    assert gpu.device == "gpu"
    gpu.to_host()
    np.testing.assert_allclose(gpu.data, cpu.data, rtol=1e-5)


@pytest.mark.parametrize("dtype, out", [("float16", "float32"), ("float32", "float32"),
                                        ("float64", "float64"), (">f8", "float64"),
                                        (">f4", "float32"), ("uint16", "float32"), (">u2", "float32")])
def test_correct_bad_pixels_lazy_dtype_is_what_it_computes(dtype, out):
    data = np.arange(2 * 8 * 8).reshape(2, 8, 8).astype(dtype)
    bad = np.zeros((8, 8), bool)
    bad[2, 2] = True
    eager = diffgpu.DiffractionPatterns(data).correct_bad_pixels(mask=bad)
    lazy = diffgpu.DiffractionPatterns(data).as_lazy().correct_bad_pixels(mask=bad)
    assert eager.data.dtype == np.dtype(out)
    assert lazy.data.dtype == np.dtype(out)
    computed = lazy.data.compute()
    assert computed.dtype == np.dtype(out)
    np.testing.assert_allclose(computed, eager.data)
    np.testing.assert_allclose(eager.data[:, 2, 2], data[:, 1:4, 1:4].astype(float).sum(axis=(1, 2)) / 8
                               - data[:, 2, 2].astype(float) / 8, rtol=1e-3)


def _nan_and_hot_neighbours():
    data = np.ones((2, 8, 8), "float32")
    data[:, 3, 3] = np.nan
    data[:, 3, 4] = 1000.0
    data[1, 3, 3] = -np.inf
    data[1, 4, 4] = np.inf
    bad = np.zeros((8, 8), bool)
    bad[3, 3] = bad[3, 4] = bad[4, 4] = True
    return diffgpu.DiffractionPatterns(data), bad


@pytest.mark.parametrize("lazy", [False, True])
def test_a_non_finite_bad_pixel_does_not_spoil_its_bad_neighbours(lazy):
    s, bad = _nan_and_hot_neighbours()
    s = s.as_lazy() if lazy else s
    out = s.correct_bad_pixels(mask=bad)
    data = out.data.compute() if lazy else out.data
    np.testing.assert_array_equal(data, np.ones((2, 8, 8), "float32"))


@pytest.mark.parametrize("lazy", [False, True])
def test_a_non_finite_bad_pixel_does_not_spoil_its_bad_neighbours_on_a_device(standin_gpu, lazy):
    s, bad = _nan_and_hot_neighbours()
    s = s.as_lazy() if lazy else s
    s.to_device()
    out = s.correct_bad_pixels(mask=bad)
    assert out.device == "gpu"
    out.to_host()
    if lazy:
        out.compute()
    np.testing.assert_array_equal(out.data, np.ones((2, 8, 8), "float32"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lazy", [False, True])
def test_non_finite_pixels_are_bad_and_their_neighbours_judged_on_finite_values(value, lazy):
    rng = np.random.default_rng(3)
    data = (rng.random((2, 33, 41)) * 100).astype("float32")
    data[0, 10, 12] = value  # in one frame only
    data[1, 0, 0] = value  # at the corner
    s = diffgpu.DiffractionPatterns(data)
    s = s.as_lazy() if lazy else s
    np.testing.assert_array_equal(np.argwhere(s.find_bad_pixels()), [[0, 0], [10, 12]])


def test_a_hot_pixel_next_to_a_nan_is_still_found():
    rng = np.random.default_rng(4)
    data = (rng.random((3, 32, 32)) * 100).astype("float32")
    data[:, 10, 12] = np.nan
    data[:, 10, 13] = 5000.0
    data[:, 11, 12] = 0.0  # dead
    bad = diffgpu.DiffractionPatterns(data).find_bad_pixels()
    np.testing.assert_array_equal(np.argwhere(bad), [[10, 12], [10, 13], [11, 12]])


def test_neighbour_median_of_finite_values_ranks_as_scipy():
    import scipy.ndimage as ndi

    from diffgpu.cleanup import _neighbour_median

    rng = np.random.default_rng(5)
    pattern = rng.random((9, 11))
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    np.testing.assert_array_equal(_neighbour_median(pattern),
                                  ndi.median_filter(pattern, footprint=footprint, mode="nearest"))
    pattern[2, 3] = np.nan
    pattern[0, 0] = -np.inf

    def upper_median_of_finite(values):
        values = np.sort(values[np.isfinite(values)])
        return values[values.size // 2] if values.size else np.nan

    ref = ndi.generic_filter(pattern, upper_median_of_finite, footprint=footprint, mode="nearest")
    np.testing.assert_array_equal(_neighbour_median(pattern), ref)
    assert np.isnan(_neighbour_median(np.full((3, 3), np.nan))).all()
