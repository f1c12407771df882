"""Every dtype and byte order detectors write, in every operation, eager and lazy.

Each operation on frames of a given dtype must equal the same operation on the same values
in float64 (1e-4 relative; float16 to its own precision): conversions happen inside the
kernels or per chunk, and dtypes without an intensity meaning raise our own error.
"""

import re
import warnings

import dask.array as da
import numpy as np
import pytest

import diffgpu
from diffgpu.mapping import map_frames
from diffgpu.kernels.dtypes import UnsupportedDtypeError, kernel_ready, needs_conversion

hs = pytest.importorskip("hyperspy.api")

DTYPES = ["u1", "<u2", ">u2", "<u4", ">u4", "<u8", ">u8", "i1", "<i2", ">i2", "<i4", ">i4",
          "<i8", ">i8", "<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "bool"]


@pytest.fixture(scope="module")
def values():
    """Counts 0-100: exact in every dtype above (float16 included), bool as counts > 3."""
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 5), sig_shape=(32, 32), lazy=False,
                                      beam_counts=2000, background=1.0, seed=4)
    return np.minimum(s.data, 100).astype(np.float64), tuple(s.calibration.center)


def _signal(vals, center, dtype, lazy):
    data = vals > 3 if dtype == "bool" else vals.astype(dtype)
    assert data.dtype == np.dtype(dtype)
    s = diffgpu.DiffractionPatterns(data)
    s.calibration.center = center
    if lazy:
        s = s.as_lazy()
        s.rechunk(nav_chunks=(2, 3))  # several blocks, a short last one
    return s


def _reference_values(vals, dtype):
    return (vals > 3).astype(np.float64) if dtype == "bool" else vals


def _data(result):
    d = result if isinstance(result, np.ndarray) else result.data
    return np.asarray(d.compute() if hasattr(d, "compute") else d, dtype=np.float64)


OPERATIONS = {
    "integral1d": lambda s: s.get_azimuthal_integral1d(npt=10),
    "integral1d_mean": lambda s: s.get_azimuthal_integral1d(npt=10, mean=True),
    "integral2d": lambda s: s.get_azimuthal_integral2d(npt=10, npt_azim=12),
    "integral2d_float64": lambda s: s.get_azimuthal_integral2d(npt=8, npt_azim=6, dtype="float64"),
    "virtual": lambda s: s.get_virtual_image([hs.roi.CircleROI(16, 16, 5),
                                              hs.roi.CircleROI(16, 16, 12, 6)]),
    "center_of_mass": lambda s: s.center_of_mass(),
    "center_of_mass_threshold": lambda s: s.center_of_mass(threshold=1.0),
    "beam_blur": lambda s: s.get_direct_beam_position(method="blur", sigma=2.0),
    "beam_xcorr": lambda s: s.get_direct_beam_position(method="cross_correlate", radius=3.0),
    "shift": lambda s: s.shift_diffraction(0.5, -1.25),
    "center": lambda s: s.center_direct_beam(),
    "find_bad_pixels": lambda s: s.find_bad_pixels(),
    "correct_bad_pixels": lambda s: s.correct_bad_pixels(mask=np.eye(32, dtype=bool)),
    "flat_field": lambda s: s.flat_field(gain=np.full((32, 32), 2.0), dark=np.ones((32, 32))),
    "map_frames": lambda s: s.map_frames(lambda f: f.astype(np.float64).sum(axis=(1, 2)),
                                         output_shape=(), dtype="float64"),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_operation_equals_float64(values, dtype, lazy):
    vals, center = values
    ref_vals = _reference_values(vals, dtype)
    tol = 2e-3 if "f2" in dtype else 1e-4
    failures = []
    for name, op in OPERATIONS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = _data(op(_signal(vals, center, dtype, lazy)))
            want = _data(op(_signal(ref_vals, center, "<f8", False)))
        if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=tol * 1e-2,
                                                      equal_nan=True):
            failures.append(name)
    assert not failures, f"{dtype} ({'lazy' if lazy else 'eager'}) differs from float64 in {failures}"


def test_a_numba_frame_function_takes_big_endian_frames(values):
    numba = pytest.importorskip("numba")

    @numba.njit
    def total(frames):
        out = np.zeros(frames.shape[0])
        for i in range(frames.shape[0]):
            out[i] = frames[i].sum()
        return out

    vals, center = values
    for lazy in (False, True):
        s = _signal(vals, center, ">u2", lazy)
        got = _data(s.map_frames(total, output_shape=(), dtype="float64"))
        np.testing.assert_array_equal(got, vals.sum(axis=(-2, -1)))


@pytest.mark.parametrize("dtype", ["<u2", ">u2", ">f4", "<f2", ">f8", "bool"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_polar_patterns_of_any_dtype_match_and_refine_as_float64(dtype, lazy):
    pytest.importorskip("diffsims")
    from diffgpu.templates import TemplateLibrary

    si = TemplateLibrary.silicon()
    lib = TemplateLibrary.from_phase(si, resolution=4.0, reciprocal_radius=1.0)
    from orix.quaternion import Rotation

    truth = Rotation.from_axes_angles([[1, 2, 3], [0, 1, 1], [1, 0, 0], [3, 1, 1]], [30, 15, 5, 50],
                                      degrees=True)
    s = diffgpu.data.orientation_patterns(si, truth, sig_shape=(96, 96), calibration=0.025,
                                          noise=False)
    polar = s.get_azimuthal_integral2d(npt=32, npt_azim=180, radial_range=(0, 1.1), mean=True)
    p = np.nan_to_num(polar.data)
    p = p / p.max() * 1000  # counts-like, within float16's range
    values = (p > 20) if dtype == "bool" else np.round(p).astype(dtype)
    ref = polar._deepcopy_with_new_data(values.astype(np.float64))
    test = polar._deepcopy_with_new_data(values)
    if lazy:
        test = test.as_lazy()
    want = ref.get_orientation(lib, n_best=2)
    got = test.get_orientation(lib, n_best=2)
    np.testing.assert_allclose(_data(got), _data(want), rtol=1e-4, atol=1e-4)
    want_r = want.refine(ref, lib)
    got_r = got.refine(test, lib)
    np.testing.assert_allclose(_data(got_r), _data(want_r), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "object", "U4", "datetime64[s]"])
def test_dtypes_without_intensities_raise_our_error_naming_the_dtype(dtype):
    s = diffgpu.DiffractionPatterns(np.zeros((2, 8, 8), dtype=dtype))
    s.calibration.center = (3.5, 3.5)
    for op in (lambda: s.get_azimuthal_integral1d(npt=4),
               lambda: s.get_azimuthal_integral2d(npt=4, npt_azim=8),
               lambda: s.center_of_mass(),
               lambda: s.get_virtual_image([hs.roi.CircleROI(4, 4, 2)]),
               lambda: map_frames(da.zeros((2, 8, 8), dtype=dtype, chunks=1), _sum, (), "f8")):
        with pytest.raises(UnsupportedDtypeError, match=re.escape(str(np.dtype(dtype)))):
            op()


def _sum(frames):
    return frames.sum(axis=(1, 2))


def test_kernel_ready_converts_only_what_numba_cannot_read():
    assert not needs_conversion("<u2") and not needs_conversion("float32")
    big = np.arange(5, dtype=">u4")
    assert kernel_ready(big).dtype.isnative and kernel_ready(big).tolist() == [0, 1, 2, 3, 4]
    half = np.array([1.5, 2.0], dtype="float16")
    assert kernel_ready(half).dtype == np.float32
    flags = np.array([True, False])
    assert kernel_ready(flags).dtype == np.uint8
    assert np.shares_memory(kernel_ready(flags), flags)  # a view, not a copy
    native = np.ones(3, "uint16")
    assert kernel_ready(native) is native


def test_big_endian_integration_converts_block_by_block(monkeypatch):
    """The integration kernel never converts more than CONVERT_BLOCK frames at a time."""
    import diffgpu.kernels.integration as integ

    seen = []
    original = integ.kernel_ready

    def spy(block):
        seen.append(block.shape[0])
        return original(block)

    monkeypatch.setattr(integ, "kernel_ready", spy)
    s = diffgpu.DiffractionPatterns(np.ones((300, 16, 16), dtype=">u2"))
    s.calibration.center = (7.5, 7.5)
    out = s.get_azimuthal_integral1d(npt=4, mean=True)
    np.testing.assert_allclose(out.data, 1.0, rtol=1e-6)
    assert seen and max(seen) <= integ.CONVERT_BLOCK and sum(seen) == 300


@pytest.mark.parametrize("order", ["<", ">"])
def test_float16_converts_exactly_by_table(order):
    """float16 is converted by a table of its 65,536 bit patterns (NumPy's own conversion ran
    at a tenth of its uint16 rate): every pattern, NaN, inf and subnormals included, either
    byte order, a non-contiguous view, gives what NumPy gives."""
    from diffgpu.kernels.dtypes import as_float32, kernel_ready

    every = np.arange(65536, dtype=np.uint16).view(np.float16).astype(order + "f2")
    expected = every.astype(np.float32)
    got = as_float32(every)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32)[np.isfinite(expected)],
                                  expected.view(np.uint32)[np.isfinite(expected)])
    np.testing.assert_array_equal(got, expected)  # NaN where NaN, inf where inf
    frames = every.reshape(16, 64, 64)[:, ::2, 1::3]
    np.testing.assert_array_equal(kernel_ready(frames), frames.astype(np.float32))


@pytest.mark.parametrize("dtype", [">u2", ">i2", ">u4", ">i4", "<i2", ">u1"])
def test_weighted_sums_read_big_endian_counts_in_place(dtype):
    """Big-endian integers (Merlin's) are summed by the in-place kernel, their bytes swapped
    as they are read (they were converted to float32 first, 2.8x slower): same sums, signed
    values included, on contiguous and strided frames."""
    from diffgpu.kernels.reduce import weighted_sums

    rng = np.random.default_rng(3)
    info = np.iinfo(np.dtype(dtype))
    frames = rng.integers(max(info.min, -30000), min(info.max, 60000), (12, 48 * 32),
                          endpoint=True).astype(dtype)
    weights = rng.random((48 * 32, 3)).astype(np.float32)
    for f in (frames, frames[::2]):
        expected = f.astype(np.float64) @ weights.astype(np.float64)
        np.testing.assert_allclose(weighted_sums(f, weights), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())
