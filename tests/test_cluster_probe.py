"""Clusters, device handling and generic mapping as a cluster user meets them: results of
every size, device steps on fresh workers, the GPUs of a cluster's workers, masks held
lazily in metadata."""

import sys

import dask.array as da
import numpy as np
import pytest

import diffgpu
import diffgpu.device as dev
from diffgpu import mapping

distributed = pytest.importorskip("distributed")


def scan(lazy=True):
    return diffgpu.data.synthetic_4dstem(nav_shape=(4, 6), sig_shape=(16, 16), chunks=(2, 6),
                                         lazy=lazy)


# -- generic mapping ------------------------------------------------------------------------

@pytest.mark.parametrize("output_shape", [(0,), (0, 16), (3, 0)])
def test_lazy_map_frames_with_an_empty_result_per_frame(output_shape):
    """HyperSpy's default chunking of a lazy signal divides by the bytes of one signal: a
    zero-size result raised ZeroDivisionError lazily while it worked eagerly."""
    s = scan()
    eager = scan(lazy=False).map_frames(lambda f: np.zeros((len(f),) + output_shape, "float32"),
                                        output_shape=output_shape, dtype="float32")
    lazy = s.map_frames(lambda f: np.zeros((len(f),) + output_shape, "float32"),
                        output_shape=output_shape, dtype="float32")
    assert lazy._lazy and lazy.data.shape == eager.data.shape == (4, 6) + output_shape
    assert lazy.data.chunks[:2] == s.data.chunks[:2]  # the operation's chunks, kept
    lazy.compute(show_progressbar=False)
    assert lazy.data.shape == eager.data.shape and lazy.data.dtype == np.float32


# -- masks ------------------------------------------------------------------------------------

def test_virtual_images_with_a_lazy_mask_in_metadata():
    """A mask put in metadata as a dask array (``weights *= ~bad`` refused a dask array)."""
    import hyperspy.roi as roi

    s = scan()
    mask = np.zeros((16, 16), bool)
    mask[7:9, 7:9] = True
    expected_signal = scan()
    expected_signal.calibration.mask = mask
    expected = expected_signal.get_virtual_image(roi.CircleROI(8, 8, 4)).data.compute()
    s.metadata.set_item("Diffraction.mask", da.from_array(mask))
    got = s.get_virtual_image(roi.CircleROI(8, 8, 4)).data.compute()
    np.testing.assert_array_equal(got, expected)


# -- device steps on a fresh worker -----------------------------------------------------------

def _fresh_process(monkeypatch, cupy_module):
    """Make this process look like a dask worker that has not imported CuPy yet; importing
    it gives ``cupy_module``."""
    import importlib

    monkeypatch.setattr(dev, "_CUPY_IMPORT", None)
    monkeypatch.delitem(sys.modules, "cupy")
    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "cupy":
            sys.modules["cupy"] = cupy_module
            return cupy_module
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)


def test_transfer_steps_import_cupy_on_a_fresh_worker(standin_gpu, monkeypatch):
    """A worker process has not imported CuPy when its first transfer step runs (importing
    diffgpu never does, and the graph holds no CuPy object): the step failed with
    ``'NoneType' object has no attribute 'asarray'``."""
    s = scan()
    expected = s.data.compute(scheduler="sync")
    s.to_device()
    data = dev.to_host_array(s.data)
    _fresh_process(monkeypatch, standin_gpu)
    np.testing.assert_array_equal(data.compute(scheduler="sync"), expected)


def test_transfer_steps_on_a_worker_without_a_gpu_say_so(standin_gpu, monkeypatch):
    s = scan()
    s.to_device()
    data = dev.to_host_array(s.data)
    _fresh_process(monkeypatch, standin_gpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(diffgpu.DeviceUnavailableError,
                       match="CUDA_VISIBLE_DEVICES is empty.*the transfer step: pid"):
        data.compute(scheduler="sync")


# -- the GPUs of a cluster's workers ---------------------------------------------------------

class FakeClient:
    """What to_device() asks of the distributed client in use: which workers see a GPU."""

    def __init__(self, seen):
        self.seen = seen

    def run(self, func, *args, **kwargs):
        assert func is diffgpu.gpu_available
        return self.seen


def test_to_device_checks_the_workers_gpus(standin_gpu, monkeypatch):
    """With a remote scheduler, the workers run the transfer steps: this process having a
    GPU said nothing about theirs."""
    monkeypatch.setattr(mapping, "_computing_client",
                        lambda: FakeClient({"tcp://a:1": True, "tcp://b:2": False}))
    s = scan()
    with pytest.raises(diffgpu.DeviceUnavailableError,
                       match=r"No GPU on 1 of the dask cluster's 2 worker\(s\) \(tcp://b:2\)"):
        s.to_device()
    assert s.device == "cpu"  # left as it was
    monkeypatch.setattr(mapping, "_computing_client",
                        lambda: FakeClient({"tcp://a:1": True, "tcp://b:2": True}))
    s.to_device()
    assert s.device == "gpu"


def test_to_device_without_a_gpu_here_but_on_the_workers(no_gpu, monkeypatch):
    monkeypatch.setattr(mapping, "_computing_client", lambda: FakeClient({"tcp://a:1": True}))
    s = scan()
    with pytest.raises(diffgpu.DeviceUnavailableError,
                       match="(?s)CUDA_VISIBLE_DEVICES is empty.*workers have GPUs.*this process"):
        s.to_device()
    assert s.device == "cpu"


def test_to_device_on_an_in_process_cluster(standin_gpu):
    with diffgpu.start_cluster(device="cpu", n_workers=1, threads_per_worker=1, processes=False,
                               dashboard_address=":0", quiet=True):
        s = scan()
        expected = s.data.compute(scheduler="sync")
        s.to_device()
        assert s.device == "gpu"
        s.to_host()
        s.compute(show_progressbar=False)
        np.testing.assert_array_equal(s.data, expected)


# -- start_cluster's arguments ----------------------------------------------------------------

CPU = dict(n_workers=1, threads_per_worker=1, processes=False, quiet=True, dashboard_address=":0")


@pytest.mark.parametrize("limit", ["-1GB", -5, "lots", float("nan"), True])
def test_a_bad_memory_limit_is_refused_before_the_workers_start(limit):
    """A negative limit started worker processes that failed ("Nanny failed to start", an
    OverflowError deep inside); in-process workers took it silently."""
    with pytest.raises(ValueError, match="memory_limit must be"):
        diffgpu.start_cluster(device="cpu", **{**CPU, "memory_limit": limit})


def test_processes_must_be_a_bool():
    with pytest.raises(ValueError, match="processes must be True or False; got 'no'"):
        diffgpu.start_cluster(device="cpu", **{**CPU, "processes": "no"})


def test_gpu_cluster_keywords_on_a_cpu_cluster(no_gpu):
    """``rmm_pool_size=`` and co. went to the CPU workers, which refused them with
    ``Server.__init__() got an unexpected keyword argument``."""
    with pytest.raises(TypeError, match="device='cpu'.*rmm_pool_size: only a GPU cluster"):
        diffgpu.start_cluster(device="cpu", rmm_pool_size="1GB", **CPU)
    # "auto" where no GPU cluster can start: the same script runs on the CPUs
    with pytest.warns(RuntimeWarning, match="device_memory_limit, rmm_pool_size are left out"):
        client = diffgpu.start_cluster(device="auto", rmm_pool_size="1GB",
                                       device_memory_limit="2GB", **CPU)
    with client:
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    """A dask_cuda whose LocalCUDACluster records its keywords and starts nothing."""
    import importlib.machinery
    import types

    class Started(Exception):
        pass

    class LocalCUDACluster:
        calls = []

        def __init__(self, CUDA_VISIBLE_DEVICES=None, n_workers=None, threads_per_worker=1,
                     memory_limit="auto", rmm_pool_size=None, **kwargs):
            self.calls.append(dict(CUDA_VISIBLE_DEVICES=CUDA_VISIBLE_DEVICES,
                                   threads_per_worker=threads_per_worker,
                                   rmm_pool_size=rmm_pool_size, **kwargs))
            raise Started

    module = types.ModuleType("dask_cuda")
    module.__spec__ = importlib.machinery.ModuleSpec("dask_cuda", None)
    module.LocalCUDACluster = LocalCUDACluster
    monkeypatch.setitem(sys.modules, "dask_cuda", module)
    return LocalCUDACluster, Started


def test_gpu_cluster_takes_threads_and_devices(standin_gpu, fake_dask_cuda, monkeypatch):
    """``threads_per_worker`` was dropped for a GPU cluster, and dask-cuda's own
    ``CUDA_VISIBLE_DEVICES=`` raised "got multiple values for keyword argument"."""
    cluster, started = fake_dask_cuda
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(started):
        diffgpu.start_cluster(device="gpu", threads_per_worker=4, rmm_pool_size="1GB", quiet=True)
    assert cluster.calls[-1] == dict(CUDA_VISIBLE_DEVICES="3", threads_per_worker=4,
                                     rmm_pool_size="1GB")
    with pytest.raises(started):
        diffgpu.start_cluster(device="gpu", CUDA_VISIBLE_DEVICES="5, 6", n_workers=1, quiet=True)
    assert cluster.calls[-1]["CUDA_VISIBLE_DEVICES"] == "5"


# -- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device")])
def test_a_visible_devices_value_that_hides_every_gpu_is_named(standin_gpu, monkeypatch, count):
    """CUDA_VISIBLE_DEVICES=abc (or an index past the last GPU) hides every GPU; CUDA's own
    words do not say why."""
    def device_count():
        if isinstance(count, Exception):
            raise count
        return count

    monkeypatch.setattr(standin_gpu.cuda.runtime, "getDeviceCount", device_count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "abc")
    assert not diffgpu.gpu_available() and diffgpu.devices() == []
    with pytest.raises(diffgpu.DeviceUnavailableError,
                       match="CUDA_VISIBLE_DEVICES is 'abc': only the devices it lists"):
        scan().to_device()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(diffgpu.DeviceUnavailableError) as err:
        scan().to_device()
    assert "CUDA_VISIBLE_DEVICES" not in str(err.value)


def test_a_lazy_result_saved_to_hspy_on_a_cluster(tmp_path):
    """HyperSpy's lazy HDF5 writer hands the cluster an open h5py dataset, which cannot be
    sent to workers (TypeError: Could not serialize object of type _HLGExprSequence): the
    result is computed into memory on the cluster first, then written."""
    from distributed import Client, LocalCluster
    from hyperspy.roi import CircleROI

    frames = np.random.default_rng(0).random((8, 8, 32, 32)).astype(np.float32)
    s = diffgpu.LazyDiffractionPatterns(da.from_array(frames, chunks=(4, 8, 32, 32)))
    expected = s.get_virtual_image([CircleROI(0, 0, 5)])
    expected.compute()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        v = s.get_virtual_image([CircleROI(0, 0, 5)])
        v.save(tmp_path / "v.hspy")
        assert v._lazy  # the signal saved stays lazy; a copy was computed
    back = diffgpu.load(tmp_path / "v.hspy", lazy=False)
    np.testing.assert_allclose(back.data, expected.data)
