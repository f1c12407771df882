"""Device layer and to_device()/to_host() on signals (CPU, stand-in and real GPU)."""

import dask.array as da
import numpy as np
import pytest

import diffgpu
from diffgpu import device as dev
from conftest import StandInDeviceArray


def counting_lazy_signal(counter, shape=(4, 4, 16, 16)):
    """A lazy signal whose chunks count how often they are computed."""

    def make(block_info=None):
        counter.append(block_info[None]["chunk-location"])
        return np.ones(block_info[None]["chunk-shape"], dtype="uint16")

    data = da.map_blocks(make, chunks=((2, 2), (2, 2), (16,), (16,)), dtype="uint16",
                         meta=np.empty((0, 0, 0, 0), "uint16"))
    return diffgpu.LazyDiffractionPatterns(data)


# -- no GPU ---------------------------------------------------------------------------

def test_empty_cuda_visible_devices_means_cpu_only(no_gpu):
    assert diffgpu.gpu_available() is False
    assert diffgpu.devices() == []
    with pytest.raises(diffgpu.DeviceUnavailableError, match="CUDA_VISIBLE_DEVICES"):
        dev.require_gpu()


def test_missing_cupy_error_says_how_to_install(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(dev, "_CUPY_IMPORT", (None, "CuPy could not be imported (ImportError: x)"))
    assert not diffgpu.gpu_available()
    with pytest.raises(diffgpu.DeviceUnavailableError, match="pip install cupy-cuda12x"):
        dev.require_gpu()


def test_cupy_without_working_device(monkeypatch, standin_gpu):
    def broken():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setattr(standin_gpu.cuda.runtime, "getDeviceCount", broken)
    with pytest.raises(diffgpu.DeviceUnavailableError, match="no working CUDA device"):
        dev.require_gpu()


def test_error_is_an_exception_not_baseexception():
    assert issubclass(diffgpu.DeviceUnavailableError, Exception)


@pytest.mark.parametrize("lazy", [False, True])
def test_to_device_without_gpu_leaves_signal_unchanged(no_gpu, lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), lazy=lazy)
    before_data, before_cls = s.data, type(s)
    with pytest.raises(diffgpu.DeviceUnavailableError, match="No GPU available"):
        s.to_device()
    assert s.data is before_data and type(s) is before_cls and s.device == "cpu"


@pytest.mark.parametrize("lazy", [False, True])
def test_to_host_is_a_no_op_on_host(lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), lazy=lazy)
    data = s.data
    s.to_host()
    assert s.data is data and s.device == "cpu"


def test_array_module_and_device_of_on_host():
    x = np.zeros(3)
    assert dev.array_module(x) is np
    assert dev.array_module(da.zeros(3)) is np
    assert dev.device_of(x) == "cpu"
    assert dev.to_host_array(x) is x


# -- stand-in device: exercises the plumbing only ------------------------------------


def test_a_cupy_still_being_imported_is_not_loaded(monkeypatch):
    """On dask workers, dask imports CuPy in one thread while tasks run in others: a task
    that took the half-made module crashed (``module 'cupy' has no attribute 'ndarray'``).
    Until the import ends, CuPy counts as not loaded and arrays as host arrays."""
    import sys
    import types
    from importlib.machinery import ModuleSpec

    half = types.ModuleType("cupy")
    half.__spec__ = ModuleSpec("cupy", None)
    half.__spec__._initializing = True  # what importlib sets while the module runs
    monkeypatch.setitem(sys.modules, "cupy", half)
    monkeypatch.setattr(dev, "_CUPY_IMPORT", None)
    assert dev._loaded_cupy() is None
    assert not dev.is_device_array(np.zeros(3)) and dev.array_module(np.zeros(3)) is np
    half.ndarray = StandInDeviceArray  # the import done
    half.__spec__._initializing = False
    assert dev._loaded_cupy() is half


def test_standin_lazy_to_device_adds_steps_and_computes_nothing(standin_gpu):
    counter = []
    s = counting_lazy_signal(counter)
    n_layers = len(s.data.dask.layers)
    s.to_device()
    assert counter == []
    assert s.device == "gpu"
    assert isinstance(s.data._meta, StandInDeviceArray)
    assert s.data.dtype == np.uint16
    assert len(s.data.dask.layers) == n_layers + 1
    s.to_device()  # idempotent: no second transfer step
    assert len(s.data.dask.layers) == n_layers + 1
    s.to_host()
    assert counter == []
    assert s.device == "cpu"
    assert type(s.data._meta) is np.ndarray
    assert len(s.data.dask.layers) == n_layers + 2


def test_standin_lazy_compute_gives_eager_device_signal(standin_gpu):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 2), sig_shape=(16, 16))
    ref = s.data.compute()
    s.to_device()
    s.compute()
    assert type(s) is diffgpu.DiffractionPatterns
    assert isinstance(s.data, StandInDeviceArray) and s.device == "gpu"
    np.testing.assert_array_equal(s.data.get(), ref)
    s.to_host()
    assert type(s.data) is np.ndarray
    np.testing.assert_array_equal(s.data, ref)


def test_standin_eager_round_trip(standin_gpu):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), lazy=False)
    ref = s.data.copy()
    s.to_device()
    assert isinstance(s.data, StandInDeviceArray) and s.device == "gpu"
    assert dev.array_module(s.data) is standin_gpu
    s.to_device()
    s.to_host()
    assert type(s.data) is np.ndarray
    np.testing.assert_array_equal(s.data, ref)


def test_standin_devices_listed(standin_gpu):
    (d,) = diffgpu.devices()
    assert d.id == 0 and d.name == "Stand-in device" and d.total_memory == 2**30
    assert "Stand-in device" in str(d)


@pytest.mark.parametrize("lazy", [False, True])
def test_standin_save_writes_from_host(standin_gpu, tmp_path, lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), lazy=lazy)
    ref = np.asarray(s.data)
    s.to_device()
    s.save(tmp_path / "dev.zspy")
    assert s.device == "gpu"  # the signal itself stays on the device
    back = diffgpu.load(tmp_path / "dev.zspy", lazy=False)
    assert type(back) is diffgpu.DiffractionPatterns
    np.testing.assert_array_equal(back.data, ref)


@pytest.mark.parametrize("lazy", [False, True])
def test_standin_plot_shows_host_data(standin_gpu, lazy):
    import matplotlib.pyplot as plt

    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16), lazy=lazy)
    s.to_device()
    s.plot()
    shown = s._host_for_plot
    assert shown.device == "cpu"
    assert s.device == "gpu"
    plt.close("all")


# -- real GPU -------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_devices_listed(cupy):
    ds = diffgpu.devices()
    assert len(ds) == cupy.cuda.runtime.getDeviceCount() > 0
    assert all(d.total_memory > 0 and d.name for d in ds)


@pytest.mark.gpu
def test_gpu_lazy_to_device_meta_compute_round_trip(cupy):
    counter = []
    s = counting_lazy_signal(counter)
    s.to_device()
    assert counter == []
    assert isinstance(s.data._meta, cupy.ndarray) and s.device == "gpu"
    assert dev.array_module(s.data) is cupy
    total = s.sum(axis=s.axes_manager.signal_axes)  # HyperSpy reduction on CuPy blocks
    assert total.device == "gpu"
    s.compute()
    assert isinstance(s.data, cupy.ndarray) and type(s) is diffgpu.DiffractionPatterns
    s.to_host()
    np.testing.assert_array_equal(s.data, np.ones((4, 4, 16, 16), "uint16"))


@pytest.mark.gpu
def test_gpu_eager_round_trip_and_idempotence(cupy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 3), sig_shape=(32, 32), lazy=False)
    ref = s.data.copy()
    s.to_device()
    first = s.data
    s.to_device()
    assert s.data is first and isinstance(first, cupy.ndarray)
    s.to_host()
    s.to_host()
    np.testing.assert_array_equal(s.data, ref)


@pytest.mark.gpu
def test_gpu_save_and_plot(cupy, tmp_path):
    import matplotlib.pyplot as plt

    s = diffgpu.data.synthetic_4dstem(nav_shape=(2, 2), sig_shape=(16, 16))
    ref = s.data.compute()
    s.to_device()
    s.save(tmp_path / "gpu.zspy")
    np.testing.assert_array_equal(diffgpu.load(tmp_path / "gpu.zspy", lazy=False).data, ref)
    s.plot()
    plt.close("all")


# -- generic operations on device-resident signals ---------------------------------

def _log_scale(frames):
    xp = dev.array_module(frames)
    return xp.log1p(frames.astype(xp.float32))


@pytest.mark.parametrize("lazy", [False, True])
def test_map_frames_on_host(lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(16, 16), lazy=lazy)
    ref = np.log1p(np.asarray(s.data).astype("float32")) if not lazy else None
    out = s.map_frames(_log_scale, dtype="float32")
    assert type(out).__name__ == ("Lazy" if lazy else "") + "DiffractionPatterns"
    maxima = s.map_frames(lambda f, offset: f.max(axis=(1, 2)) + offset, output_shape=(),
                          dtype="float64", offset=1)
    profile = s.map_frames(lambda f: f.sum(axis=1), output_shape=(16,), dtype="float64",
                           signal_type="radial_profiles")
    if lazy:
        data = s.data.compute()
        ref = np.log1p(data.astype("float32"))
        out.compute(), maxima.compute(), profile.compute()
    else:
        data = s.data
    np.testing.assert_allclose(out.data, ref, rtol=1e-6)
    np.testing.assert_allclose(maxima.data, data.max(axis=(-2, -1)) + 1)
    assert isinstance(profile, diffgpu.RadialProfiles)
    np.testing.assert_allclose(profile.data, data.sum(axis=-2))


def test_module_level_to_host_and_to_device_for_any_signal(standin_gpu):
    import hyperspy.api as hs

    s = hs.signals.Signal1D(np.arange(6.0).reshape(2, 3)).as_lazy()
    diffgpu.to_device(s)
    assert isinstance(s.data._meta, StandInDeviceArray)
    diffgpu.to_host(s)
    assert type(s.data._meta) is np.ndarray


def test_standin_map_frames_keeps_device_meta(standin_gpu):
    counter = []
    s = counting_lazy_signal(counter)
    s.to_device()
    out = s.map_frames(_log_scale, dtype="float32")
    assert isinstance(out.data._meta, StandInDeviceArray) and counter == []
    maxima = s.map_frames(lambda f: f.max(axis=(1, 2)), output_shape=())
    assert isinstance(maxima.data._meta, StandInDeviceArray) and counter == []


@pytest.mark.gpu
@pytest.mark.parametrize("lazy", [False, True])
def test_gpu_generic_operations_match_cpu(cupy, lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(32, 32), lazy=lazy)
    g = s.deepcopy()
    g.to_device()
    ops = {
        "arithmetic": lambda x: (x * 2 + 1) / 3,
        "sum signal": lambda x: x.sum(axis=x.axes_manager.signal_axes),
        "mean navigation": lambda x: x.mean(axis=x.axes_manager.navigation_axes),
        "max": lambda x: x.max(axis=x.axes_manager.signal_axes),
        "inav": lambda x: x.inav[1:3, ::2],
        "isig": lambda x: x.isig[4:20, 8:24],
        "rebin": lambda x: x.rebin(scale=(1, 1, 2, 2)),
        "map_frames": lambda x: x.map_frames(_log_scale, dtype="float32"),
    }
    for name, op in ops.items():
        cpu, gpu = op(s), op(g)
        assert type(gpu).__module__.startswith("diffgpu"), name
        assert isinstance(gpu.data._meta if lazy else gpu.data, cupy.ndarray), name
        if lazy:
            cpu.compute()
            gpu.compute()
        gpu.to_host()
        np.testing.assert_allclose(gpu.data, cpu.data, rtol=1e-5, err_msg=name)


def _blas_threads():
    from diffgpu.device import _blas_controller

    return [i["num_threads"] for i in _blas_controller().info() if i["user_api"] == "blas"]


@pytest.mark.parametrize("scheduler", [None, "synchronous"])
def test_lazy_compute_runs_blas_single_threaded_under_dask_threads(scheduler, monkeypatch):
    import dask.array as da

    monkeypatch.setattr(dev, "host_threads", lambda: 2)  # as on any multi-core machine
    before = _blas_threads()
    seen = []

    def record(block):
        if block.size:  # not dask's calls on empty arrays to learn the output type
            seen.append(_blas_threads())
        return block

    s = diffgpu.DiffractionPatterns(np.zeros((4, 8, 8), np.float32)).as_lazy()
    s.data = da.from_array(np.zeros((4, 8, 8), np.float32), chunks=(1, 8, 8)).map_blocks(
        record, dtype=np.float32)
    kwargs = {"scheduler": scheduler} if scheduler else {}
    s.compute(show_progressbar=False, **kwargs)
    assert not s._lazy and len(seen) == 4
    if scheduler is None:  # dask's threads: one BLAS thread each
        assert all(all(n == 1 for n in x) for x in seen)
    else:
        assert all(x == before for x in seen)
    assert _blas_threads() == before


def test_device_constants_are_tokenized_without_reading_them():
    """Graphs name a constant by a token made once, not by hashing its (large) host value
    every time a graph is built; a copy sent to a worker (cloudpickle, as distributed
    sends it) keeps the token."""
    import cloudpickle
    from dask.base import tokenize

    from diffgpu.device import DeviceCache

    class Unhashable(np.ndarray):  # tokenizing by content would have to read this
        def __reduce__(self):
            raise AssertionError("the host value was pickled to make a token")

    c = DeviceCache(np.zeros(10, np.float32).view(Unhashable))
    assert tokenize(c) == tokenize(c)
    assert tokenize(c) != tokenize(DeviceCache(np.zeros(10, np.float32)))
    plain = DeviceCache(np.arange(4))
    assert tokenize(cloudpickle.loads(cloudpickle.dumps(plain))) == tokenize(plain)


@pytest.mark.parametrize("lazy", [False, True])
def test_map_frames_names_a_wrong_result(lazy):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(16, 16), lazy=lazy)

    def run(out):
        if lazy:
            out.compute()
        return out

    with pytest.raises(ValueError, match=r"returned shape \(\d+,\) .*set output_shape="):
        run(s.map_frames(lambda f: f.max(axis=(1, 2))))  # one number per frame, not declared
    with pytest.raises(TypeError, match="returned list, not an array"):
        run(s.map_frames(lambda f: [0] * len(f), output_shape=()))
    # a result in another dtype than declared is converted, not passed off as the declared one
    out = run(s.map_frames(lambda f: f.sum(axis=(1, 2)), output_shape=(), dtype="float32"))
    assert out.data.dtype == np.float32


def test_map_frames_names_a_result_off_the_frames_device(standin_gpu):
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(16, 16), lazy=True)
    s.to_device()
    with pytest.raises(TypeError, match=r"numpy.ndarray for frames on the GPU"):
        s.map_frames(lambda f: f.get().max(axis=(1, 2)), output_shape=()).compute()


@pytest.mark.parametrize("lazy", [False, True])
def test_map_frames_never_wraps_into_the_default_dtype(lazy):
    """The default dtype (the signal's, uint16 here) takes only results it holds exactly: the
    frame sums (uint64) would wrap and halves (float64) truncate; a declared dtype is used."""
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(16, 16), lazy=lazy)
    frames = np.asarray(s.data.compute() if lazy else s.data)

    def run(out):
        return out.data.compute() if lazy else out.data

    for func, shape in ((lambda f: f.sum(axis=(1, 2)), ()), (lambda f: f * 0.5, None)):
        with pytest.raises(TypeError, match="default dtype uint16 .* cannot hold"):
            run(s.map_frames(func, output_shape=shape))
    sums = run(s.map_frames(lambda f: f.sum(axis=(1, 2)), output_shape=(), dtype="int64"))
    np.testing.assert_array_equal(sums, frames.sum(axis=(-2, -1)))
    maxima = run(s.map_frames(lambda f: f.max(axis=(1, 2)), output_shape=()))
    np.testing.assert_array_equal(maxima, frames.max(axis=(-2, -1)))  # uint16: as it is
    with pytest.raises(TypeError, match="imaginary part"):
        run(s.map_frames(lambda f: f * 1j, dtype="float32"))
    with pytest.raises(TypeError, match="dtype must be a number"):
        s.map_frames(lambda f: f, dtype="U3")
    with pytest.raises(ValueError, match="must not be negative"):
        s.map_frames(lambda f: f, output_shape=(-3,))
    pairs = run(s.map_frames(lambda f: f[:, 0, :3], output_shape=3))  # an int: one axis
    np.testing.assert_array_equal(pairs, frames[..., 0, :3])


def test_map_frames_result_is_the_same_kind_eager_and_lazy():
    s = diffgpu.data.synthetic_4dstem(nav_shape=(3, 4), sig_shape=(16, 16), lazy=False)
    eager = s.map_frames(lambda f: f[:, 0, :3], output_shape=(3,))
    lazy = s.as_lazy().map_frames(lambda f: f[:, 0, :3], output_shape=(3,))
    assert type(eager).__name__ == "Signal1D" and type(lazy).__name__ == "LazySignal1D"
