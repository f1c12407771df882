"""Azimuthal integration of a 4D-STEM scan: polar transforms and radial profiles.

Run it as::

    python examples/azimuthal_integration.py --output demo-output

It makes a synthetic scan (rings around a drifting beam), calibrates it in 1/Å,
integrates every pattern to a polar transform (100 radii x 360 azimuths) and a
radial profile (200 radii), lazily, on the GPU if there is one, and plots one
pattern, its polar transform and the mean radial profile with the true ring radii.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import diffgpu  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--nav", type=int, nargs=2, default=(16, 16), metavar=("ROWS", "COLS"))
    parser.add_argument("--sig", type=int, nargs=2, default=(256, 256), metavar=("ROWS", "COLS"))
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    s = diffgpu.data.synthetic_4dstem(nav_shape=args.nav, sig_shape=args.sig)
    # calibration: 0.01 1/Å per pixel, a 200 kV beam; the centre is known for synthetic data
    s.calibration.scale = 0.01
    s.calibration.units = "1/Å"
    s.calibration.beam_energy = 200
    mask = np.zeros(args.sig, dtype=bool)
    mask[:, :3] = True  # e.g. a dead edge of the detector
    s.calibration.mask = mask
    if diffgpu.gpu_available():
        s.to_device()

    # both are lazy: nothing is computed until compute()
    # the largest circle about the centre inside the detector (the centre is off the middle)
    (cx, cy), (rows, cols) = s.calibration.center, args.sig
    k_max = 0.01 * min(cx + 0.5, cols - 0.5 - cx, cy + 0.5, rows - 0.5 - cy)
    polar = s.get_azimuthal_integral2d(npt=100, npt_azim=360, mean=True, radial_range=(0, k_max))
    profile = s.get_azimuthal_integral1d(npt=200, mean=True, radial_range=(0, k_max))
    t0 = time.perf_counter()
    for result in (polar, profile):
        result.to_host()
        result.compute(show_progressbar=False)
    n = s.axes_manager.navigation_size
    print(f"integrated {n} patterns (2D and 1D) on {s.device} in {time.perf_counter() - t0:.2f} s")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    frame = s.inav[0, 0]
    frame.to_host()
    frame.compute(show_progressbar=False)
    # imshow's extent is the pixels' outer edges; an axis' values are their centres
    ext = [ax.low_value - ax.scale / 2 for ax in frame.axes_manager.signal_axes]
    hi = [ax.high_value + ax.scale / 2 for ax in frame.axes_manager.signal_axes]
    axes[0].imshow(frame.data, extent=[ext[0], hi[0], hi[1], ext[1]],
                   norm=matplotlib.colors.LogNorm(vmin=1))
    axes[0].set(title="pattern (0, 0)", xlabel="kx (1/Å)", ylabel="ky (1/Å)")
    az, rad = polar.axes_manager.signal_axes
    axes[1].imshow(polar.data[0, 0], aspect="auto", origin="lower",
                   norm=matplotlib.colors.LogNorm(vmin=0.3),
                   extent=[az.low_value - az.scale / 2, az.high_value + az.scale / 2,
                           rad.low_value - rad.scale / 2, rad.high_value + rad.scale / 2])
    axes[1].set(title="polar transform (log; the beam's wave is its drift)",
                xlabel="azimuth (deg)", ylabel="k (1/Å)")
    r_ax = profile.axes_manager.signal_axes[0]
    axes[2].plot(r_ax.axis, np.nanmean(profile.data, axis=(0, 1)))
    for r in s.metadata.Synthetic.ring_radii:
        axes[2].axvline(r * 0.01, color="r", ls=":", lw=1)
    axes[2].set(yscale="log", title="mean radial profile (red: true ring radii)",
                xlabel="k (1/Å)", ylabel="mean counts per pixel")
    fig.tight_layout()
    path = os.path.join(args.output, "azimuthal_integration.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
