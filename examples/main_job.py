"""The main job on built-in synthetic data: load, move to the GPU if any, reduce lazily, plot.

Run it as::

    python examples/main_job.py --output demo-output

It builds a synthetic 4D-STEM scan (ring patterns with a drifting direct beam,
Poisson noise, uint16 like a counting detector), moves it to the GPU when one
is there, reduces it lazily (mean diffraction pattern, a total-intensity image and
the azimuthally integrated radial profile of every pattern), and writes
``main_job.png`` into the output folder.  Nothing is
computed until ``compute()``; the same lines run on CPU and GPU.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import diffgpu  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for the figures")
    parser.add_argument("--nav", type=int, nargs=2, default=(32, 32), metavar=("ROWS", "COLS"))
    parser.add_argument("--sig", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"))
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    # 1. a lazy dataset: nothing is generated yet
    s = diffgpu.data.synthetic_4dstem(nav_shape=args.nav, sig_shape=args.sig)
    print(s, f"({s.data.nbytes / 2**20:.0f} MiB, {s.data.npartitions} chunks)")

    # 2. move it to the GPU if there is one: this only adds transfer steps to the graph
    use_gpu = args.device == "gpu" or (args.device == "auto" and diffgpu.gpu_available())
    if use_gpu:
        s.to_device()
    print("computing on", s.device, *(str(d) for d in diffgpu.devices()) if use_gpu else "")

    # 3. lazy reductions (HyperSpy's own and diffgpu's, running on NumPy or CuPy blocks)
    mean_pattern = s.mean(axis=s.axes_manager.navigation_axes)
    total_image = s.sum(axis=s.axes_manager.signal_axes)
    profiles = s.get_azimuthal_integral1d(npt=100, mean=True)  # exact pixel splitting

    # 4. compute, bring the results back to the host, plot
    t0 = time.perf_counter()
    for result in (mean_pattern, total_image, profiles):
        result.compute(show_progressbar=False)
        result.to_host()
    elapsed = time.perf_counter() - t0
    n = s.axes_manager.navigation_size
    print(f"reduced {n} frames in {elapsed:.2f} s ({n / elapsed:,.0f} frames/s)")

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.imshow(mean_pattern.data, norm=matplotlib.colors.LogNorm(vmin=0.1))
    cx, cy = s.calibration.center
    a.plot(cx, cy, "r+", markersize=12)
    a.set_title("mean diffraction pattern (log)")
    b.imshow(total_image.data)
    b.set_title("total intensity per scan position")
    radius = profiles.axes_manager.signal_axes[0].axis
    c.plot(radius, profiles.data.mean(axis=(0, 1)))
    for r in s.metadata.Synthetic.ring_radii:
        c.axvline(r, color="r", ls=":", lw=1)
    c.set(yscale="log", xlabel="radius (px)", ylabel="mean counts per pixel",
          title="mean radial profile (red: true rings)")
    fig.tight_layout()
    path = os.path.join(args.output, "main_job.png")
    fig.savefig(path, dpi=100)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
