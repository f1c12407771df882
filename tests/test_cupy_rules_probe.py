"""The strict CuPy stand-in (tests/_strict_cupy.py) held to what the installed CuPy refuses and
accepts, the kinds of device-path mistake it catches, and device paths compared with the host.

Every test using ``standin_gpu`` is marked ``cupy_rules``. Tests that compare with the real
package skip, saying why, where ``cupy`` is not installed (it imports without a GPU).
"""

import numpy as np
import pytest

import diffgpu
from conftest import TRANSFERS, _strict_cupy

pytestmark = pytest.mark.cupy_rules


def _real():
    real, reason = _strict_cupy.real_cupy_modules()
    if real is None:
        pytest.skip(reason)
    return real


# -- ufuncs: CuPy's methods, keywords and scatter dtypes ------------------------------------------

def test_ufunc_methods_cupy_lacks_are_refused(standin_gpu):
    cp = standin_gpu
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    for call in (lambda: np.maximum.reduce(x, axis=0), lambda: np.logical_or.reduce(x > 1),
                 lambda: np.minimum.accumulate(x, axis=1), lambda: cp.maximum.reduce(x),
                 lambda: np.multiply.reduceat(x, cp.asarray(np.array([0, 2])), axis=1)):
        with pytest.raises(NotImplementedError, match="is not supported yet"):
            call()
    # the ones CuPy has stay on the device
    for y in (np.add.reduce(x, axis=0), cp.multiply.accumulate(x, axis=1),
              np.add.reduceat(x, cp.asarray(np.array([0, 2])), axis=1), cp.add.outer(x[0], x[1])):
        assert isinstance(y, cp.ndarray)
    np.testing.assert_array_equal(cp.add.reduce(x, axis=1).get(), [3.0, 12.0])


def test_ufunc_keywords_cupy_lacks_are_refused(standin_gpu):
    cp = standin_gpu
    x = cp.asarray(np.arange(4.0))
    with pytest.raises(TypeError, match="Wrong arguments"):
        np.power(x, 0.5, out=x, where=x > 0)  # NumPy's masked ufunc: CuPy has none
    with pytest.raises(TypeError, match="Wrong arguments"):
        cp.add(x, 1, order="C")
    with pytest.raises(TypeError, match="does not take this call"):
        np.add.reduce(x, initial=1.0)
    out = cp.empty(4, dtype=np.float32)
    cp.multiply(x, 2, out=out, casting="same_kind")  # CuPy's own keywords
    np.testing.assert_array_equal(np.add(x, 1, dtype=np.float32).get(), [1, 2, 3, 4])
    np.testing.assert_array_equal(out.get(), [0, 2, 4, 6])


def test_ufunc_at_takes_the_dtypes_of_cuda_atomics(standin_gpu):
    cp = standin_gpu
    idx = cp.asarray(np.array([0, 2, 2]))
    with pytest.raises(TypeError, match="only supports"):
        cp.add.at(cp.zeros(3, dtype=np.int64), idx, 1)  # int64 counts: no atomicAdd on CUDA
    with pytest.raises(TypeError, match="only supports"):
        np.maximum.at(cp.zeros(3, dtype=np.float16), idx, 1)
    with pytest.raises(NotImplementedError):
        np.multiply.at(cp.ones(3), idx, 2)
    counts = cp.zeros(3, dtype=np.int32)
    TRANSFERS.reset()
    np.add.at(counts, np.array([0, 2, 2]), 1)  # host indices: CuPy moves them (counted)
    assert TRANSFERS.to_device == 1
    np.testing.assert_array_equal(counts.get(), [1, 0, 2])


def test_ndarray_method_keywords_are_checked_against_cupy(standin_gpu):
    _real()
    x = standin_gpu.asarray(np.arange(6.0))
    for call in (lambda: x.max(initial=0.0), lambda: x.sum(where=x > 1),
                 lambda: x.mean(where=x > 1), lambda: x.argsort(order="f"),
                 lambda: x.min(axis=0, initial=1.0)):
        with pytest.raises(TypeError, match="cupy.ndarray.* does not take this call"):
            call()
    assert float(x.sum(axis=0, dtype=np.float32, keepdims=True)[0]) == 15.0
    assert int(x.argmax(axis=0, keepdims=False)) == 5


# -- conversions and host operands CuPy accepts ---------------------------------------------------

def test_asarray_of_a_device_array_converts_on_the_device(standin_gpu):
    cp = standin_gpu
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    TRANSFERS.reset()
    y = cp.asarray(x, dtype=np.float32)  # NumPy 2's copy=False refused this: CuPy converts
    f = cp.asarray(x, order="F")
    assert y.dtype == np.float32 and f.flags.f_contiguous and cp.asarray(x) is not None
    assert TRANSFERS.log == []
    np.testing.assert_array_equal(y.get(), np.arange(6.0).reshape(2, 3))


def test_host_indices_are_moved_and_counted(standin_gpu):
    cp = standin_gpu
    x = cp.asarray(np.arange(6.0))
    TRANSFERS.reset()
    for got in (x.take(np.array([1, 4])), cp.take(x, np.array([1, 4])), x[[1, 4]],
                x[np.array([1, 4])]):
        np.testing.assert_array_equal(got.get(), [1.0, 4.0])
    assert TRANSFERS.to_device == 4 and TRANSFERS.to_host == 4
    x[[0, 1]] = [7.0, 8.0]  # host index and host values: two transfers
    assert TRANSFERS.to_device == 6
    assert f"{x[0]:.1f}" == "7.0" and TRANSFERS.scalar == 1  # CuPy formats through the host


# -- the stand-in's tables agree with the installed CuPy ------------------------------------------

def test_ufunc_tables_match_real_cupy():
    real = _real()
    cupy = real["cupy"]
    found = {m: set() for m in _strict_cupy.UFUNC_METHODS}
    for name in _strict_cupy.NUMPY_NAMES:
        f = getattr(np, name, None)
        if not isinstance(f, np.ufunc) or f.signature is not None or f.nin != 2:
            continue
        if f.__name__ != name:  # an alias (pow): its ufunc is checked under its own name
            continue
        cf = getattr(cupy, name)
        for method, args in (("reduce", (np.ones(3),)), ("accumulate", (np.ones(3),)),
                             ("reduceat", (np.ones(3), np.array([0, 1])))):
            try:
                getattr(cf, method)(*args)
            except NotImplementedError:
                continue
            except Exception:  # implemented (it then fails on host input or without a GPU)
                pass
            found[method].add(name)
        if getattr(cf, "_scatter_op", None) is not None:
            found["at"].add(name)
    assert found == {m: set(v) for m, v in _strict_cupy.UFUNC_METHODS.items()}
    for method, params in _strict_cupy.UFUNC_METHOD_PARAMETERS.items():
        doc = getattr(cupy.add, method).__doc__.strip().splitlines()[0]
        assert doc == f"ufunc.{method}(self, {params})", doc
    # __call__ takes out, dtype and casting only: anything else fails before any GPU work
    with pytest.raises(TypeError, match="Wrong arguments"):
        cupy.add(1, 2, where=True)
    for key, value in (("casting", "unsafe"), ("dtype", np.float32)):
        try:
            cupy.add(1, 2, **{key: value})
        except TypeError as err:
            pytest.fail(f"cupy.add refused {key}=: {err}")
        except Exception:  # no GPU here: the keyword was taken
            pass


def test_method_signatures_come_from_cupys_docstrings():
    _real()
    sig = _strict_cupy._real_method_signature("max")
    assert list(sig.parameters) == ["axis", "out", "keepdims"]
    assert list(_strict_cupy._real_method_signature("sort").parameters) == ["axis", "kind"]
    assert "copy" in _strict_cupy._real_method_signature("reshape").parameters
    for name in ("all any argmax argmin argsort clip cumsum max mean min nonzero prod ptp ravel "
                 "repeat round searchsorted sort squeeze std sum swapaxes take trace transpose "
                 "var").split():
        assert _strict_cupy._real_method_signature(name) is not None, name


# -- kinds of device-path mistake the suite catches (product code untouched) ---------------------

def _scan(lazy=False):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), lazy=True)
    s.data = s.data.rechunk((2, 3, -1, -1))
    if not lazy:
        s.compute()
    return s


def _on_device(s):
    d = s.deepcopy()
    d.to_device()
    TRANSFERS.reset()
    return d


def _virtual(s):
    import hyperspy.api as hs

    return s.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=4),
                                hs.roi.CircleROI(cx=0, cy=0, r=12, r_inner=6)])


def _product_with(mistake):
    """A replacement for kernels.reduce._product (the virtual images' matrix product) that
    makes ``mistake(block, weights, xp)`` first."""
    import diffgpu.kernels.reduce as reduce

    original = reduce._product

    def product(block, weights, xp):
        mistake(block, weights, xp)
        return original(block, weights, xp)

    return product


MISTAKES = {
    # a NumPy ufunc method CuPy lacks (cupy.max is the way)
    "ufunc method": (lambda b, w, xp: np.maximum.reduce(b, axis=0), NotImplementedError),
    # NumPy keywords CuPy lacks
    "reduction keyword": (lambda b, w, xp: b.max(axis=1, initial=0), TypeError),
    "ufunc where=": (lambda b, w, xp: np.log(b, where=b > 0), TypeError),
    # a scatter into int64 counts
    "int64 add.at": (lambda b, w, xp: xp.add.at(xp.zeros(4, dtype=xp.int64),
                                                xp.zeros(3, dtype=xp.int32), 1), TypeError),
    # SciPy's FFT on device data
    "scipy.fft": (lambda b, w, xp: __import__("scipy.fft").fft.rfft(b), TypeError),
    # the host copy of a constant (DeviceCache.host, not .get(xp)) in device arithmetic
    "host constant": (lambda b, w, xp: b @ np.ones_like(w.get()), TypeError),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_device_path_mistakes_fail(standin_gpu, monkeypatch, mistake):
    import diffgpu.kernels.reduce as reduce

    func, error = MISTAKES[mistake]
    if mistake in ("reduction keyword",):
        _real()  # method keywords are checked against the installed CuPy
    s = _on_device(_scan())
    monkeypatch.setattr(reduce, "_product", _product_with(func))
    with pytest.raises(error):
        _virtual(s)
    monkeypatch.undo()
    _virtual(_scan())  # the same mistake passes on the host: only the stand-in catches it


def test_a_hidden_round_trip_shows_in_the_transfer_counts(standin_gpu, monkeypatch):
    """A kernel that computes through the host gives the right numbers: its extra transfers
    (what the suite's one-in, one-out per chunk checks count) are what gives it away."""
    import diffgpu.kernels.reduce as reduce

    s = _scan(lazy=True)
    ref = _virtual(s).data.compute()
    monkeypatch.setattr(reduce, "_product", lambda b, w, xp: xp.asarray(xp.asnumpy(b) @ w.get()))
    out = _virtual(_on_device(s))
    out.to_host()
    np.testing.assert_allclose(out.data.compute(), ref, rtol=1e-5)
    assert TRANSFERS.to_host > 4 and TRANSFERS.count("to_device", (2, 3, 32, 32)) == 4


# -- device paths compared with the host ----------------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True])
def test_thresholded_centre_of_mass_of_float_frames_with_nan(standin_gpu, lazy):
    """The thresholded weighted sums of float frames (non-finite pixels zeroed, then the sums
    that weight them made NaN) on the device, against the host."""
    s = _scan()
    s.data = s.data.astype(np.float32)
    s.data[0, 1, 16, 16] = np.nan  # non-finite pixels: zeroed before the frame's mean
    s.data[1, 2, 0, 0] = np.inf
    if lazy:
        s = s.as_lazy()
        s.data = s.data.rechunk((2, 3, -1, -1))
    ref = s.center_of_mass(threshold=0.5)
    ref = np.asarray(ref.data.compute() if lazy else ref.data)
    out = _on_device(s).center_of_mass(threshold=0.5)
    out.to_host()
    got = out.data.compute() if lazy else out.data
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.isfinite(got).all()
    n = 4 if lazy else 1
    assert TRANSFERS.to_host == n, TRANSFERS.log
    assert TRANSFERS.to_device <= (n if lazy else 0) + 1, TRANSFERS.log


def test_shifts_unknown_for_some_frames_leave_them_on_the_device(standin_gpu):
    s = _scan()
    shifts = np.full((4, 6, 2), 0.75, np.float32)
    shifts[1, 2] = np.nan  # no beam found there: the frame is left as it is
    ref = s.shift_diffraction(shifts[..., 0], shifts[..., 1])
    out = _on_device(s).shift_diffraction(shifts[..., 0], shifts[..., 1])
    out.to_host()
    np.testing.assert_allclose(out.data, ref.data, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(out.data[1, 2], s.data[1, 2])
    assert TRANSFERS.to_host == 1 and TRANSFERS.count("to_host", (4, 6, 32, 32)) == 1


def test_strain_with_a_host_reference_and_rotated_on_the_device(standin_gpu):
    from diffgpu.strain import rotate_strain, strain_from_lattice

    cp = standin_gpu
    rng = np.random.default_rng(4)
    g0 = np.array([[10.0, 0.5], [-0.3, 9.0]])
    fits = np.zeros((3, 5, 8))
    fits[..., 2:6] = (g0.T.ravel() * (1 + rng.normal(0, 0.01, (3, 5, 4))))
    host = rotate_strain(strain_from_lattice(fits, g0), 30.0)
    TRANSFERS.reset()
    dev = rotate_strain(strain_from_lattice(cp.asarray(fits), g0), 30.0)
    assert isinstance(dev, cp.ndarray)
    assert TRANSFERS.count("to_device", (2, 2)) == 1  # the host reference moved once
    np.testing.assert_allclose(dev.get(), host, rtol=1e-12, atol=1e-12)


def test_phase_correlated_disks_on_the_device(standin_gpu):
    from diffgpu.synthetic_nbed import synthetic_nbed

    s = synthetic_nbed(nav_shape=(2, 2), sig_shape=(64, 64), disk_radius=3.0, dose=5e7, seed=1)
    host = s.find_bragg_disks(radius=3.0, max_disks=30, correlation_power=0.5)
    dev = s.deepcopy()
    dev.to_device()
    TRANSFERS.reset()
    out = dev.find_bragg_disks(radius=3.0, max_disks=30, correlation_power=0.5)
    assert out.device == "gpu"
    out.to_host()
    # the constants (template spectrum, allowed pixels, neighbour offsets) in once, the
    # disks out once; a block's only reads are of two counts
    assert TRANSFERS.to_host == 1 and TRANSFERS.to_device <= 4, TRANSFERS.log
    assert TRANSFERS.scalar <= 2, TRANSFERS.log
    np.testing.assert_array_equal(np.isfinite(out.data), np.isfinite(host.data))
    np.testing.assert_allclose(out.data, host.data, atol=2e-3, rtol=2e-4)
