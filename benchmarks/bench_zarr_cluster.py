"""A dataset on disk, larger than the workers' memory: integration on a memory-capped cluster.

    python benchmarks/bench_zarr_cluster.py --size-gb 20 [--keep]

1. Writes a synthetic scan of 256 x 256 uint16 frames to a chunked ``.zspy`` (zarr, uncompressed,
   chunks of 16 x 16 frames) under ``--dir`` (default ``/tmp/diffgpu-bench``), unless it is
   there already (``--keep`` leaves it for the next run).
2. Starts a ``LocalCluster`` of 2 single-threaded worker processes with 2 GiB each (4 GiB in
   all) through :func:`diffgpu.start_cluster`.
3. Times a plain read of every chunk (a sum per chunk) and the 1D azimuthal integration
   (100 bins) written to a ``.zspy``, alternately, twice each, on that cluster, and reports
   MB/s of input (best of two) and the peak resident memory of each worker process and of
   the client.

The files come from the page cache when they fit in it (this machine: 24 GiB of RAM), so the
"read" figure is the speed of decompressing and handing over the chunks.
"""

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table  # noqa: E402


def _maxrss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/diffgpu-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import dask
    import numcodecs
    import numpy as np

    import diffgpu

    os.makedirs(args.dir, exist_ok=True)
    side = int(np.sqrt(args.size_gb * 1e9 / (256 * 256 * 2)))
    path = os.path.join(args.dir, f"scan-{side}.zspy")
    print(f"machine: {machine()}")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        s = diffgpu.data.synthetic_4dstem(nav_shape=(side, side), sig_shape=(256, 256),
                                          noise=False, chunks=(16, 16))
        with dask.config.set(scheduler="threads"):
            s.save(path, chunks=(16, 16, 256, 256), show_progressbar=False,
                   compressor=numcodecs.Blosc("lz4", 0))  # stored as is, like a raw detector dump
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    client = diffgpu.start_cluster(device="cpu", n_workers=2, threads_per_worker=1,
                                   memory_limit="2GiB", dashboard_address=":0")
    try:
        s = diffgpu.load(path, lazy=True)
        nbytes = s.data.nbytes
        print(f"dataset: {s} {nbytes / 1e9:.1f} GB in memory, {on_disk / 1e9:.1f} GB on disk, "
              f"chunks {s.data.chunksize}")

        def read():
            t0 = time.perf_counter()
            s.data.map_blocks(lambda b: b.sum(axis=(-2, -1), dtype="uint64"), drop_axis=(2, 3),
                              dtype="uint64").compute()
            return time.perf_counter() - t0

        out = os.path.join(args.dir, "profiles.zspy")

        def integrate():
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            s.get_azimuthal_integral1d(npt=100).save(out, show_progressbar=False, overwrite=True)
            return time.perf_counter() - t0

        # alternate, so that neither is favoured by what the page cache holds
        reads, ints = [read()], [integrate()]
        reads.append(read())
        ints.append(integrate())
        t_read, t_int = min(reads), min(ints)
        workers = client.run(_maxrss_gib)
        rows = [
            ["plain read of every chunk (best of 2)", f"{t_read:.0f} s ({reads[0]:.0f}, {reads[1]:.0f})",
             f"{nbytes / t_read / 1e6:,.0f}"],
            ["1D integration, written to .zspy (best of 2)", f"{t_int:.0f} s ({ints[0]:.0f}, {ints[1]:.0f})",
             f"{nbytes / t_int / 1e6:,.0f}"],
            ["integration / read speed", f"{100 * t_read / t_int:.0f}%", ""],
            ["peak RSS per worker (limit 2 GiB each)",
             ", ".join(f"{v:.2f} GiB" for v in workers.values()), ""],
            ["peak RSS of the client process", f"{_maxrss_gib():.2f} GiB", ""],
        ]
        print_table(f"{nbytes / 1e9:.0f} GB on disk, LocalCluster 2 x 2 GiB",
                    ["step", "time / value", "MB/s (uncompressed)"], rows)
    finally:
        client.close()
        client.cluster.close()
        shutil.rmtree(os.path.join(args.dir, "profiles.zspy"), ignore_errors=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
