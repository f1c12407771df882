"""Orientation mapping of a simulated Si polycrystal: library, matching, IPF map, crystal map.

Run it as::

    python examples/orientation_mapping.py --output demo-output

A 2D scan over Voronoi grains of silicon at random orientations (diffsims kinematics,
Poisson noise) is integrated to polar patterns, matched against a 1-degree Si template
library (direct and mirrored templates, all in-plane rotations), refined below the
library's 1-degree grid, and turned into an IPF orientation map, a reliability map (0 where
another orientation predicts the same pattern; see ``reliability_map.py``), an orix
CrystalMap, and a figure
of the best template over one pattern.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from orix.quaternion import Orientation, Rotation  # noqa: E402

import diffgpu  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--nav", type=int, nargs=2, default=(20, 20), metavar=("ROWS", "COLS"))
    parser.add_argument("--resolution", type=float, default=1.0, help="library spacing, degrees")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    si = diffgpu.TemplateLibrary.silicon()
    s = diffgpu.data.grain_map(si, nav_shape=tuple(args.nav), n_grains=6)  # 128 x 128, 0.02 1/Å/px
    t0 = time.perf_counter()
    library = diffgpu.TemplateLibrary.from_phase(si, resolution=args.resolution,
                                                 reciprocal_radius=1.2)
    print(library, f"({time.perf_counter() - t0:.1f} s)")
    if diffgpu.gpu_available():
        s.to_device()

    polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28), mean=True)
    t0 = time.perf_counter()
    matches = polar.get_orientation(library, n_best=5)
    matches.to_host()
    print(f"matched {s.axes_manager.navigation_size} patterns in {time.perf_counter() - t0:.2f} s")

    truth = Orientation(Rotation(s.metadata.Synthetic.rotations), symmetry=si.point_group)

    def errors(m):
        found = m.to_orientations()
        return truth.angle_with(Orientation(found.data.reshape(-1, 4), symmetry=si.point_group),
                                degrees=True)  # (orix's flatten() is not row-major)

    err = errors(matches)
    print(f"within 2 degrees of the truth: {100 * np.mean(err < 2):.0f}% "
          f"(median error {np.median(err):.2f} degrees)")
    t0 = time.perf_counter()
    matches = matches.refine(polar, library)  # below the library's grid
    err = errors(matches)
    print(f"refined in {time.perf_counter() - t0:.2f} s: median error {np.median(err):.2f} degrees")
    xmap = matches.to_crystal_map()
    print(xmap)

    reliability = matches.get_reliability()  # after refine: 0 where another orientation
    print(f"ambiguous patterns (reliability 0): {100 * np.mean(reliability.data == 0):.0f}%")

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    axes[0].imshow(s.metadata.Synthetic.grains, cmap="tab10")
    axes[0].set_title("true grains")
    matches.plot_ipf_map(ax=axes[1])
    im = axes[2].imshow(reliability.data, cmap="gray", vmin=0)
    axes[2].set_title("reliability (0: ambiguous)")
    fig.colorbar(im, ax=axes[2])
    polar.to_host()
    matches.plot_match(polar, library, index=(0, 0), ax=axes[3])
    fig.tight_layout()
    path = os.path.join(args.output, "orientation_map.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
