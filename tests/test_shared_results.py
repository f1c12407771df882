"""Results that a cluster's workers on this machine write into shared memory."""

import glob
import os
import pickle

import numpy as np
import pytest

import diffgpu
from diffgpu import mapping
from diffgpu.mapping import SharedResult, _contiguous_span, compute_shared

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.skipif(not os.path.isdir(mapping.SHARED_DIRECTORY),
                                reason="no shared-memory directory on this machine")


def _left_over():
    return glob.glob(os.path.join(mapping.SHARED_DIRECTORY, "diffgpu-result-*"))


@pytest.mark.parametrize("where, expected", [
    ((slice(1, 3),), 30),                   # whole rows
    ((slice(1, 2), slice(2, 4)), 42),       # part of one row
    ((slice(1, 3), slice(2, 4)), None),     # parts of two rows: not one run
    ((slice(0, 4), slice(0, 5)), 0),        # everything
    ((slice(2, 2),), None),                 # empty
    ((slice(3, 4), slice(4, 5), slice(5, 6)), 119),  # the last element
])
def test_contiguous_span(where, expected):
    assert _contiguous_span((4, 5, 6), where) == expected
    if expected is not None:  # the run is the region, element for element
        a = np.arange(120).reshape(4, 5, 6)
        region = a[where].ravel()
        np.testing.assert_array_equal(region, np.arange(expected, expected + region.size))


def test_shared_result_written_in_runs_and_regions_then_claimed():
    target = SharedResult((4, 5, 6), np.float32)
    try:
        copy = pickle.loads(pickle.dumps(target))  # as a worker receives it: no descriptor
        assert "_fd" not in copy.__dict__ and copy.path == target.path
        expected = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
        copy.put((slice(0, 2),), expected[:2])                          # one run: pwrite
        copy.put((slice(2, 4), slice(0, 3)), expected[2:, :3])          # not one run: mapped
        copy.put((slice(2, 4), slice(3, 5)), expected[2:, 3:].astype(np.float64))  # cast
        got = target.claim()
        assert not os.path.exists(target.path)  # the name is gone, the memory is the array's
        np.testing.assert_array_equal(got, expected)
        got[0, 0, 0] = -1  # writable, as a computed result is
        assert got[0, 0, 0] == -1
    finally:
        target.close()
    target.close()  # idempotent


def test_workers_that_cannot_see_the_file_mean_no_shared_result():
    class Elsewhere:
        def run(self, func, *args):
            return {"tcp://a": True, "tcp://b": False}

    class Failing:
        def run(self, func, *args):
            raise OSError("worker lost")

    target = SharedResult((8,), np.int16)
    try:
        assert not target.seen_by_workers(Elsewhere())
        assert not target.seen_by_workers(Failing())
        assert mapping._same_file(target.path, target.identity)
        assert not mapping._same_file(target.path + "-not-there", target.identity)
    finally:
        target.close()
    assert not mapping._same_file(target.path, target.identity)


def test_without_a_client_nothing_is_computed_in_shared_memory():
    import dask.array as da

    assert compute_shared(da.ones((64, 2**16), chunks=(8, 2**16))) is None


@pytest.fixture(scope="module")
def cluster_client():
    # worker processes on this machine, as a LocalCluster starts them
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", memory_limit="1GiB") as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.mark.slow
def test_cluster_results_arrive_through_shared_memory(cluster_client, monkeypatch):
    monkeypatch.setattr(mapping, "MIN_SHARED_BYTES", 1)
    claimed = []
    claim = SharedResult.claim

    def spy(self):
        claimed.append(self.shape)
        return claim(self)

    monkeypatch.setattr(SharedResult, "claim", spy)
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 5), sig_shape=(48, 48), chunks=(2, 5))
    expected = s.get_azimuthal_integral2d(npt=20, npt_azim=36).data.compute(scheduler="sync")
    polar = s.get_azimuthal_integral2d(npt=20, npt_azim=36)
    polar.compute()  # computed in place by each worker (the operation's own path)
    np.testing.assert_array_equal(polar.data, expected)
    assert claimed == [expected.shape] and not polar._lazy

    # any other graph: each block copied into its region; blocks that split the frames
    # are regions that are not one run of the file
    lazy = s.deepcopy()
    lazy.data = (s.data.rechunk((3, 5, 24, 48)) * 2).astype(np.float32)
    lazy.compute()
    np.testing.assert_array_equal(lazy.data, s.data.compute().astype(np.float32) * 2)
    assert len(claimed) == 2
    assert not _left_over()


@pytest.mark.slow
def test_a_failed_cluster_run_leaves_no_shared_file(cluster_client, monkeypatch):
    import dask.array as da

    monkeypatch.setattr(mapping, "MIN_SHARED_BYTES", 1)

    def fails(block):
        if block[0, 0] > 10:
            raise ValueError("a bad block")
        return block

    data = da.arange(64.0, chunks=8).reshape(4, 16).map_blocks(fails, dtype=np.float64)
    with pytest.raises(ValueError, match="a bad block"):
        compute_shared(data)
    assert not _left_over()
    # where the shared directory has too little room, the network layer it is
    monkeypatch.setattr(mapping, "SHARED_DIRECTORY", "/nonexistent-diffgpu")
    assert compute_shared(da.ones((4, 16), chunks=(1, 16))) is None
