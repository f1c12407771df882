"""Constants and allocator settings on a distributed cluster's worker processes."""

import os
import platform

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
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _seen_count(frames, const):
    """How many blocks have used this very constant object (state kept on it, as the
    templates keep their search layout)."""
    const.seen = getattr(const, "seen", 0) + 1
    return np.full((frames.shape[0],), const.seen + 0 * const.host[0], np.float32)


def test_a_constant_is_sent_once_and_kept_on_the_workers(client):
    import dask.array as da

    frames = da.ones((4, 8, 8), chunks=(4, 8, 8))
    const = DeviceCache(np.zeros(1000, np.float32))
    first = map_frames(frames, _seen_count, (), np.float32, constants=(const,)).compute()
    second = map_frames(frames, _seen_count, (), np.float32, constants=(const,)).compute()
    # the second graph's block found the object the first one left its state on
    assert first.tolist() == [1] * 4
    assert second.tolist() == [2] * 4
    key = graph_constant(const).key
    assert key == graph_constant(const).key
    assert key in client.has_what()[next(iter(client.has_what()))]
    # the workers drop it with the constant
    del const
    import gc

    gc.collect()
    deadline = __import__("time").time() + 10
    while any(key in keys for keys in client.has_what().values()):
        assert __import__("time").time() < deadline, "the constant stayed on the workers"
        __import__("time").sleep(0.05)


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
