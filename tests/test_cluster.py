"""The cluster helper."""

import numpy as np
import pytest

import diffgpu


def test_cpu_cluster_computes_a_lazy_signal(capsys):
    client = diffgpu.start_cluster(device="cpu", n_workers=1, threads_per_worker=2,
                                   processes=False, dashboard_address=":0")
    try:
        assert "LocalCluster with 1 CPU worker(s)" in capsys.readouterr().out
        s = diffgpu.data.synthetic_4dstem(nav_shape=(4, 4), sig_shape=(16, 16), chunks=(2, 2))
        total = s.sum(axis=s.axes_manager.signal_axes)
        total.compute()  # runs on the cluster: it is the default scheduler now
        ref = s.data.compute(scheduler="sync").sum(axis=(-2, -1))
        np.testing.assert_array_equal(np.asarray(total.data), ref)
    finally:
        client.close()
        client.cluster.close()


def test_gpu_cluster_without_gpu_raises(no_gpu):
    with pytest.raises(diffgpu.DeviceUnavailableError, match="No GPU available"):
        diffgpu.start_cluster(device="gpu")


def test_bad_device_name():
    with pytest.raises(ValueError, match="device must be"):
        diffgpu.start_cluster(device="tpu")


@pytest.mark.gpu
def test_gpu_cluster_one_worker_per_gpu(cupy):
    pytest.importorskip("dask_cuda")
    client = diffgpu.start_cluster(device="gpu", quiet=True, dashboard_address=":0")
    try:
        assert len(client.scheduler_info()["workers"]) == len(diffgpu.devices())
        s = diffgpu.data.synthetic_4dstem(nav_shape=(8, 8), sig_shape=(32, 32), chunks=(2, 8))
        ref = s.data.compute(scheduler="sync").sum(axis=(-2, -1))
        s.to_device()
        total = s.sum(axis=s.axes_manager.signal_axes)
        total.to_host()
        total.compute()
        np.testing.assert_array_equal(total.data, ref)
    finally:
        client.close()
        client.cluster.close()
