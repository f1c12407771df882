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


@pytest.mark.parametrize("kw", [dict(n_workers=0), dict(n_workers=-1), dict(n_workers=1.5),
                                dict(n_workers=True), dict(threads_per_worker=0)])
def test_worker_counts_must_be_positive(kw):
    # 0 workers would start a cluster on which every compute waits forever
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        diffgpu.start_cluster(device="cpu", processes=False, quiet=True, dashboard_address=":0",
                              **kw)


def _cpu_cluster():
    return diffgpu.start_cluster(device="cpu", n_workers=1, threads_per_worker=1,
                                 processes=False, quiet=True, dashboard_address=":0")


def test_context_manager_closes_the_cluster_too():
    from distributed.core import Status

    with _cpu_cluster() as client:
        assert client.submit(sum, [1, 2]).result() == 3
        cluster = client.cluster
    assert client.status == "closed" and cluster.status == Status.closed


def test_second_cluster_warns_while_the_first_runs():
    import warnings

    first = _cpu_cluster()
    try:
        with pytest.warns(RuntimeWarning, match="a cluster it started is already running"):
            second = _cpu_cluster()
        second.close()
        second.cluster.close()
    finally:
        first.close()
        first.cluster.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # none running now: no warning
        with _cpu_cluster():
            pass


def test_a_misspelt_keyword_is_named():
    """Unknown keywords went on to the workers, which failed to start ("Nanny failed to
    start"), far from the name the user typed."""
    with pytest.raises(TypeError, match="gpu .*device='gpu'"):
        diffgpu.start_cluster(gpu=True)
    with pytest.raises(TypeError, match="n_worker"):
        diffgpu.start_cluster(device="cpu", n_worker=2)
