"""Device-layer figures: synthetic data generation, lazy graph overhead, host<->device transfers.

    python benchmarks/bench_device.py

The transfer rows need a GPU (CuPy); elsewhere they say why they were skipped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, median_time, print_table  # noqa: E402

import numpy as np  # noqa: E402

import diffgpu  # noqa: E402
from diffgpu.device import to_device_array, to_host_array  # noqa: E402


def main():
    print(f"machine: {machine()}; GPUs: {[str(d) for d in diffgpu.devices()] or 'none'}")
    rows = []

    s = diffgpu.data.synthetic_4dstem(nav_shape=(16, 16), sig_shape=(256, 256))
    t = median_time(lambda: s.data.compute(), repeat=3)
    rows.append(["synthetic_4dstem 256x256 uint16, 256 frames", "frames/s", 256 / t])

    t = median_time(lambda: diffgpu.data.synthetic_4dstem(nav_shape=(880, 880), sig_shape=(256, 256)),
                    repeat=5)
    rows.append(["building a 102 GB lazy dataset (no compute)", "ms", t * 1e3])

    if diffgpu.gpu_available():
        cp = diffgpu.device.require_gpu()
        sync = cp.cuda.Stream.null.synchronize
        host = np.ones((512, 256, 256), dtype="uint16")
        pinned = cp.cuda.alloc_pinned_memory(host.nbytes)
        phost = np.frombuffer(pinned, host.dtype, host.size).reshape(host.shape)
        phost[...] = host
        t = median_time(lambda: to_device_array(host), sync=sync)
        rows.append(["host->device, pageable, 64 MiB uint16", "GB/s", host.nbytes / t / 1e9])
        t = median_time(lambda: to_device_array(phost), sync=sync)
        rows.append(["host->device, pinned, 64 MiB uint16", "GB/s", host.nbytes / t / 1e9])
        dev = to_device_array(host)
        t = median_time(lambda: to_host_array(dev), sync=sync)
        rows.append(["device->host, 64 MiB uint16", "GB/s", host.nbytes / t / 1e9])
        lazy = diffgpu.data.synthetic_4dstem(nav_shape=(16, 32), sig_shape=(256, 256), noise=False)
        lazy.compute()
        lazy = lazy.as_lazy()
        lazy.rechunk(nav_chunks=(16, 32))  # one chunk of 512 frames
        lazy.to_device()
        t = median_time(lambda: lazy.data.compute(), sync=sync)
        rows.append(["lazy to_device() of an in-memory 64 MiB chunk", "GB/s", host.nbytes / t / 1e9])
    else:
        reason = diffgpu.device._probe()[2]
        rows.append(["host<->device transfers", "skipped", reason.split(".")[0]])

    print_table("Device layer", ["what", "unit", "value"], rows)


if __name__ == "__main__":
    main()
