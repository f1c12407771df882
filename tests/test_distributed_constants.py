"""Constants and allocator settings on a distributed cluster's worker processes."""

import gc
import os
import pickle
import platform
import signal
import time

import numpy as np
import pytest

import diffgpu  # noqa: F401
from diffgpu.device import DeviceCache
from diffgpu.mapping import graph_constant, map_frames

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    # worker processes started by a nanny, as users' clusters are (its environment included)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _seen_count(frames, const):
    """How many blocks in this worker have used this constant's derived state (as the
    templates' search layout is kept)."""
    seen = const.derived("seen", lambda host: [0])
    seen[0] += 1
    return np.full((frames.shape[0],), seen[0], np.float32)


def test_a_constant_is_sent_once_and_kept_on_the_workers(client):
    import dask.array as da

    frames = da.ones((4, 8, 8), chunks=(4, 8, 8))
    const = DeviceCache(np.zeros(1000, np.float32))
    first = map_frames(frames, _seen_count, (), np.float32, constants=(const,)).compute()
    second = map_frames(frames, _seen_count, (), np.float32, constants=(const,)).compute()
    # the second graph's block found the state the first one left
    assert first.tolist() == [1] * 4
    assert second.tolist() == [2] * 4
    node = graph_constant(const)
    assert node.key == graph_constant(const).key
    assert any(node.key in keys for keys in client.has_what().values())  # kept on the cluster
    # the workers drop it with the constant
    key = node.key
    del const, node
    gc.collect()
    deadline = time.time() + 10
    while any(key in keys for keys in client.has_what().values()):
        assert time.time() < deadline, "the constant stayed on the workers"
        time.sleep(0.05)


def test_copies_arriving_later_share_what_earlier_ones_derived():
    const = DeviceCache(np.arange(3.0))
    first = pickle.loads(pickle.dumps(const))
    made = first.derived("total", lambda host: [host.sum()])
    again = pickle.loads(pickle.dumps(const))  # the next graph's copy, in the same process
    assert again is not first
    assert again.derived("total", lambda host: None) is made
    # the constant's own process keeps its state on the object only
    assert const.derived("total", lambda host: ["own"]) == ["own"]


@pytest.mark.slow
def test_a_constant_lost_with_its_worker_is_made_again():
    import dask.array as da

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        const = DeviceCache(np.full(10, 2.0))
        frames = da.ones((4, 8, 8), chunks=(2, 8, 8))

        def total(f, k):
            return f.sum(axis=(1, 2)) * k.host[0]

        expected = map_frames(frames, total, (), np.float64, constants=(const,)).compute()
        key = graph_constant(const).key
        holders = c.who_has()[key]
        pids = c.run(os.getpid)
        for address in holders:  # every copy gone: only the scheduler can make it again
            os.kill(pids[address], signal.SIGKILL)
        again = map_frames(frames, total, (), np.float64, constants=(const,)).compute()
        np.testing.assert_array_equal(again, expected)
        assert expected.tolist() == [128.0] * 4


def test_without_a_client_a_constant_is_a_pure_graph_node():
    with __import__("dask").config.set(scheduler="threads"):
        const = DeviceCache(np.arange(3.0))
        node = graph_constant(const)
        assert node.key == graph_constant(const).key  # same token, one node
        assert node.compute() is const


def test_matching_on_the_cluster_equals_eager(client):
    from orix.quaternion import Rotation

    si = diffgpu.TemplateLibrary.silicon()
    lib = diffgpu.TemplateLibrary.from_phase(si, resolution=6.0, reciprocal_radius=1.2)
    np.random.seed(3)
    s = diffgpu.data.orientation_patterns(si, Rotation.random(4), sig_shape=(128, 128),
                                          calibration=0.02)
    polar = s.get_azimuthal_integral2d(npt=32, npt_azim=90, radial_range=(0, 1.25), mean=True)
    eager = polar.get_orientation(lib, n_best=2).data
    lazy = polar.as_lazy()
    lazy.data = lazy.data.rechunk((2,) + lazy.data.shape[1:])
    for _ in range(2):  # the second run on the templates the workers kept
        np.testing.assert_array_equal(lazy.get_orientation(lib, n_best=2).data.compute(), eager)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_workers_allocator_is_tuned_over_the_nannys_default(client):
    import dask.array as da

    map_frames(da.ones((2, 4, 4), chunks=(1, 4, 4)), lambda f: f.sum(axis=(1, 2)), (),
               np.float64).compute()

    def probe():
        from diffgpu.sources import _TUNED  # set by the blocks computed above

        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), list(_TUNED)

    trim, tuned = client.submit(probe, pure=False).result()
    # the nanny fixed glibc's thresholds (64 KiB): every larger temporary a task makes would
    # be fresh pages from the system (matching ran at half speed)
    assert trim == str(__import__("dask").config.get(
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"))
    assert tuned == [True]


def test_a_graph_built_with_a_client_computes_without_it():
    import dask.array as da

    frames = da.ones((4, 8, 8), chunks=(2, 8, 8))
    const = DeviceCache(np.full(3, 2.0))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        lazy = map_frames(frames, lambda f, k: f.sum(axis=(1, 2)) * k.host[0], (), np.float64,
                          constants=(const,))
        assert lazy.compute().tolist() == [128.0] * 4
        assert lazy.compute(scheduler="threads").tolist() == [128.0] * 4
        assert any(graph_constant(const).key in keys for keys in c.has_what().values())
    assert lazy.compute().tolist() == [128.0] * 4  # the client is gone


def test_a_process_keeps_the_state_of_few_and_small_received_constants(monkeypatch):
    from diffgpu import device

    monkeypatch.setattr(device, "_SHARED", __import__("collections").OrderedDict())
    monkeypatch.setattr(device, "SHARED_BYTES", 3000)
    consts = [DeviceCache(np.zeros(n)) for n in (100, 100, 200, 50)]  # 800, 800, 1600, 400 B
    for c in consts:
        pickle.loads(pickle.dumps(c))
    # newest first while they fit in 3000 bytes: 400 + 1600 + 800; the oldest is dropped
    assert list(device._SHARED) == [c._token for c in consts[1:]]
    big = DeviceCache(np.zeros(10_000))
    pickle.loads(pickle.dumps(big))  # larger than the limit on its own: kept, alone
    assert list(device._SHARED) == [big._token]
    monkeypatch.setattr(device, "SHARED_BYTES", 1 << 30)
    for c in consts:
        pickle.loads(pickle.dumps(c))
    assert len(device._SHARED) == device.SHARED_CONSTANTS
