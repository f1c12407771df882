"""A worker killed mid-computation does not lose the run: results equal an undisturbed run."""

import os
import signal
import time

import numpy as np
import pytest

import diffgpu


@pytest.mark.slow
def test_killed_worker_gives_identical_results():
    distributed = pytest.importorskip("distributed")
    s = diffgpu.data.synthetic_4dstem(nav_shape=(32, 16), sig_shape=(96, 96), chunks=(1, 16))
    polar = s.get_azimuthal_integral2d(npt=40, npt_azim=90)
    reference = polar.data.compute(scheduler="sync")

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", memory_limit="1GiB")
    client = distributed.Client(cluster)
    try:
        future = client.compute(polar.data)
        # wait until the run is under way, then kill one worker process outright
        deadline = time.time() + 60
        while time.time() < deadline:
            done = sum(len(v) for v in client.has_what().values())
            if done >= 2:
                break
            time.sleep(0.02)
        pids = client.run(os.getpid)
        victim_addr, victim_pid = next(iter(pids.items()))
        assert not future.done(), "the run finished before a worker could be killed"
        os.kill(victim_pid, signal.SIGKILL)
        result = future.result(timeout=120)
        assert not future.cancelled()
        np.testing.assert_array_equal(result, reference)
        # the nanny restarted it, or the other worker carried on: either way the run finished
        assert victim_pid not in client.run(os.getpid).values()
    finally:
        client.close()
        cluster.close()
