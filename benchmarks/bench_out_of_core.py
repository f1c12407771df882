"""A dataset larger than memory: beam finding, centring and virtual images with bounded memory.

    python benchmarks/bench_out_of_core.py --size-gb 40      # ~10 min on 2 cores

A synthetic 4D-STEM scan of 256 x 256 uint16 frames is generated lazily, chunk by chunk
(nothing is on disk or in memory beforehand), then:

1. ``get_direct_beam_position(method="center_of_mass", mask=disc)``: one pass;
2. ``fit_plane()`` of the shifts;
3. ``center_direct_beam(shifts=plane)`` feeding ``get_virtual_image([bf, adf])``: a second pass.

It prints the wall time of each pass, the frames/s, and the peak resident memory of the
process (``ru_maxrss``), which includes Python, NumPy, dask and HyperSpy themselves.
By default the patterns are noise-free expected counts (``--noise`` draws Poisson noise,
about 3x slower to generate); generation, not diffgpu, dominates the time.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table  # noqa: E402

import numpy as np  # noqa: E402


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--noise", action="store_true")
    args = ap.parse_args()

    import dask
    import hyperspy.api as hs

    import diffgpu

    frame_bytes = 256 * 256 * 2
    side = int(np.sqrt(args.size_gb * 1e9 / frame_bytes))
    s = diffgpu.data.synthetic_4dstem(nav_shape=(side, side), sig_shape=(256, 256),
                                      noise=args.noise)
    n = side * side
    print(f"machine: {machine()}; memory: {_mem_total_gib():.0f} GiB")
    print(f"dataset: {side} x {side} scan of 256 x 256 uint16 = {s.data.nbytes / 1e9:.1f} GB, "
          f"lazy, chunks {s.data.chunksize} ({s.data.npartitions} chunks); "
          f"noise={'Poisson' if args.noise else 'none'}")
    rss0 = peak_rss_gib()
    cx, cy = s.calibration.center
    radius = s.metadata.Synthetic.beam_radius

    with dask.config.set(scheduler="threads"):
        t0 = time.perf_counter()
        shifts = s.get_direct_beam_position(method="center_of_mass", mask=(cx, cy, radius + 4))
        shifts.compute(show_progressbar=False)
        t1 = time.perf_counter()
        plane = shifts.fit_plane()
        centred = s.center_direct_beam(shifts=plane)
        images = centred.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=radius + 1),
                                            hs.roi.CircleROI(cx=0, cy=0, r=110, r_inner=2 * radius)])
        images.compute(show_progressbar=False)
        t2 = time.perf_counter()

    truth = s.metadata.Synthetic.beam_centers - np.asarray(s.calibration.center)
    rms = float(np.sqrt(np.nanmean((shifts.data - truth) ** 2)))
    rows = [
        ["pass 1: beam finding (centre of mass in a disc)", f"{t1 - t0:.0f} s", f"{n / (t1 - t0):,.0f}"],
        ["pass 2: plane fit + centring + 2 virtual images", f"{t2 - t1:.0f} s", f"{n / (t2 - t1):,.0f}"],
        ["peak resident memory of the process", f"{peak_rss_gib():.2f} GiB",
         f"(after imports: {rss0:.2f} GiB)"],
        ["beam position error against the truth", f"{rms:.3f} px RMS", ""],
    ]
    print_table(f"Out of core, {s.data.nbytes / 1e9:.0f} GB", ["step", "time / value", "frames/s"], rows)


def _mem_total_gib():
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


if __name__ == "__main__":
    main()
