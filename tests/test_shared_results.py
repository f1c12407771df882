"""Results that a cluster's workers on this machine write into shared memory."""

import os
import pickle

import numpy as np
import pytest

import diffgpu
from diffgpu import mapping
from diffgpu.mapping import SharedResult, compute_shared

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"),
                                reason="no memfd_create on this system")


@pytest.mark.parametrize("where", [
    (slice(1, 3),),                         # whole rows: one run
    (slice(1, 2), slice(2, 4)),             # part of one row: one run
    (slice(1, 3), slice(2, 4)),             # parts of two rows: two runs
    (slice(0, 4), slice(0, 5)),             # everything
    (slice(1, 3), slice(1, 4), slice(2, 5)),  # six runs of three
    (slice(3, 4), slice(4, 5), slice(5, 6)),  # the last element
])
@pytest.mark.parametrize("max_runs", [4096, 1])  # (1: regions of several runs go mapped)
def test_shared_result_regions_written_and_claimed(where, max_runs, monkeypatch):
    monkeypatch.setattr(mapping, "MAX_RUNS", max_runs)
    target = SharedResult((4, 5, 6), np.float32)
    try:
        copy = pickle.loads(pickle.dumps(target))  # as a worker receives it: no descriptor
        assert "_fd" not in copy.__dict__ and copy.path == target.path
        expected = np.zeros((4, 5, 6), np.float32)
        expected[where] = np.arange(expected[where].size).reshape(expected[where].shape) + 1
        copy.put(where, expected[where].astype(np.float64))  # cast to the result's dtype
        got = target.claim()
        np.testing.assert_array_equal(got, expected)
        got[0, 0, 0] = -1  # writable, as a computed result is
        assert got[0, 0, 0] == -1
        assert not os.path.exists(target.path)  # the descriptor is gone, the memory is the array's
    finally:
        target.close()
    target.close()  # idempotent


def test_a_block_that_does_not_fit_its_place_is_refused():
    target = SharedResult((4, 5), np.int16)
    try:
        with pytest.raises(ValueError, match=r"block of shape \(1, 5\) does not fit.*\(2, 5\)"):
            target.put((slice(0, 2),), np.ones((1, 5)))
        target.put((slice(4, 4),), np.ones((0, 5)))  # an empty block: nothing to write
    finally:
        target.close()


def test_workers_that_cannot_open_the_memory_mean_no_shared_result():
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
        assert mapping._opens_same(target.path, target.identity)
        assert not mapping._opens_same(target.path + "0", target.identity)
    finally:
        target.close()
    assert not mapping._opens_same(target.path, target.identity)  # closed: gone


def test_without_a_client_nothing_is_computed_in_shared_memory():
    import dask.array as da

    assert compute_shared(da.ones((64, 2**16), chunks=(8, 2**16))) is None


def test_results_of_unknown_shape_are_computed_as_dask_does():
    """A boolean index makes the scan's length unknown (NaN) until computed: no result array
    can be made for it beforehand (it raised a TypeError on the threaded scheduler)."""
    import dask.array as da

    s = diffgpu.data.synthetic_4dstem(nav_shape=(8, 4), sig_shape=(16, 16), chunks=(2, 4))
    lazy = s.deepcopy()
    lazy.data = s.data[da.from_array(np.arange(8) % 2 == 0, chunks=2)]
    assert np.isnan(lazy.data.shape[0])
    lazy.compute()
    np.testing.assert_array_equal(lazy.data, s.data.compute()[::2])


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
    # blocks that are not the chunks the graph declares: an error, not a silent hole
    bad = s.deepcopy()
    bad.data = s.data.map_blocks(lambda b: b[:-1], dtype=s.data.dtype)
    with pytest.raises(ValueError, match="does not fit its place"):
        bad.compute()
    # a scan of unknown length: computed as dask does, not in shared memory
    import dask.array as da

    unknown = s.deepcopy()
    unknown.data = s.data[da.from_array(np.arange(6) % 2 == 0, chunks=2)]
    unknown.compute()
    assert len(claimed) == 2 and unknown.data.shape == (3, 5, 48, 48)


@pytest.mark.slow
def test_operations_on_a_lazily_loaded_hspy_file_run_on_the_cluster(cluster_client, tmp_path,
                                                                    monkeypatch):
    """The datasets of a lazily loaded HDF5 file go to the workers as references (file name
    and path): cloudpickle, which sends graphs with diffgpu's functions, refused them."""
    import copyreg

    import h5py

    monkeypatch.setattr(mapping, "MIN_SHARED_BYTES", 1)
    s = diffgpu.data.synthetic_4dstem(nav_shape=(6, 5), sig_shape=(32, 32), lazy=False)
    s.save(tmp_path / "scan.hspy")
    lazy = diffgpu.load(str(tmp_path / "scan.hspy"), lazy=True)
    lazy.calibration.center = (15.5, 15.5)
    profiles = lazy.get_azimuthal_integral1d(npt=12)
    expected = profiles.data.compute(scheduler="sync")
    profiles.compute()
    np.testing.assert_allclose(profiles.data, expected)
    raw = lazy.deepcopy()
    raw.compute()  # a plain compute: blocks copied into shared memory
    np.testing.assert_array_equal(raw.data, s.data)
    assert h5py.Dataset in copyreg.dispatch_table


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
    # where the memory would not hold the result, the network layer it is
    monkeypatch.setattr(mapping, "_available_memory", lambda: 2**20)
    assert compute_shared(da.ones((4, 16), chunks=(1, 16))) is None
