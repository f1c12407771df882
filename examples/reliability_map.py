"""Which orientations a pattern can decide: reliability on a simulated Si polycrystal with twins.

Run it as::

    python examples/reliability_map.py --output demo-output

Nine Voronoi grains of silicon: two pairs of Sigma-3 twins looking exactly down a zone axis
(down <111>, the twin turned 60 degrees about the beam; down <112>, turned 180 degrees about
the in-plane <111>): each twin's kinematic pattern is its partner's, so no pattern can tell
them apart; a twin pair tilted 4 degrees off <111>, whose excitation errors differ, but too
little for spots 0.015 1/Å wide (their noiseless patterns still correlate at >= 0.995);
and three grains at random orientations, which the patterns decide.
The patterns (diffsims kinematics, Poisson noise) are matched against a 1-degree library
(``n_best=5``), refined, and mapped: the reliability after refinement is 0 where another
orientation predicts the same pattern (ambiguous) and near 1 where the pattern has decided
between the candidates (resolved).
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
from diffgpu.kernels.refine import model_similarity  # noqa: E402


TILT = 4.0  # degrees off <111> for a pair of twins


def grains():
    """Eight grain orientations: exact twins, tilted twins, random ones; and their labels."""
    down_111, down_112, tilted = (diffgpu.data.zone_axis_rotations(1, [d], tilt=t, seed=s)
                                  for d, t, s in (((1, 1, 1), 0.0, 1), ((1, 1, 2), 0.0, 2),
                                                  ((1, 1, 1), TILT, 3)))
    # crystal-frame turns act on the left (orix), laboratory-frame ones on the right
    about_beam_60 = Rotation.from_axes_angles([0, 0, 1], np.pi / 3)
    about_111 = Rotation.from_axes_angles([1, 1, 1], np.pi / 3)
    about_11m1 = Rotation.from_axes_angles([1, 1, -1], np.pi)  # in the (112) plane
    np.random.seed(1)
    rot = [down_111, down_111 * about_beam_60, down_112, about_11m1 * down_112,
           tilted, about_111 * tilted, *Rotation.random(3)]
    labels = ["<111>", "<111> twin", "<112>", "<112> twin", f"<111> +{TILT:g}°",
              f"<111> +{TILT:g}° twin",
              "random", "random", "random"]
    return Rotation(np.concatenate([r.data.reshape(-1, 4) for r in rot])), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--nav", type=int, nargs=2, default=(24, 24), metavar=("ROWS", "COLS"))
    parser.add_argument("--resolution", type=float, default=1.0, help="library spacing, degrees")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    si = diffgpu.TemplateLibrary.silicon()
    rot, labels = grains()
    s = diffgpu.data.grain_map(si, nav_shape=tuple(args.nav), n_grains=rot.size, orientations=rot,
                               sig_shape=(256, 256), calibration=0.01, seed=5)
    library = diffgpu.TemplateLibrary.from_phase(si, resolution=args.resolution,
                                                 reciprocal_radius=1.2)
    if diffgpu.gpu_available():
        s.to_device()
    polar = s.get_azimuthal_integral2d(npt=128, npt_azim=360, radial_range=(0, 1.28), mean=True)
    t0 = time.perf_counter()
    refined = polar.get_orientation(library, n_best=5).refine(polar, library)
    print(f"matched and refined {s.axes_manager.navigation_size} patterns in "
          f"{time.perf_counter() - t0:.2f} s")

    reliability = refined.get_reliability()
    rel = reliability.data
    par = refined.metadata.Refined.parameters
    print(f"spots {par['spot_width']:.4f} 1/Å wide, intensity exponent "
          f"{par['intensity_exponent']:.2f}")
    truth = Rotation(s.metadata.Synthetic.rotations)
    found = Rotation(refined.to_rotations().data[..., 0, :].reshape(-1, 4))  # best matches
    err = Orientation(truth, symmetry=si.point_group).angle_with(
        Orientation(found, symmetry=si.point_group), degrees=True).reshape(rel.shape)
    # right otherwise where the orientation found predicts the truth's pattern
    same = model_similarity((~found).to_matrix(), (~truth).to_matrix(),
                            library.kinematic_model(), 1.0, 0.01).reshape(rel.shape) >= 0.995
    grain = s.metadata.Synthetic.grains
    print(f"{'grain':>16} {'patterns':>8} {'within 2 deg':>12} {'same pattern':>12} "
          f"{'ambiguous':>9} {'median reliability':>18}")
    for g, name in enumerate(labels):
        at = grain == g
        if at.any():
            print(f"{name:>16} {at.sum():8d} {np.mean(err[at] < 2):12.2f} "
                  f"{np.mean((err[at] < 2) | same[at]):12.2f} {np.mean(rel[at] == 0):9.2f} "
                  f"{np.median(rel[at]):18.2f}")
    print(f"ambiguous (reliability 0): {reliability.metadata.Reliability.ambiguous} of {rel.size}; "
          f"wrong and not ambiguous: {int(np.sum((err >= 2) & (rel > 0)))}")

    # constrained layout: tight_layout cut the first two titles off at the top
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8), layout="constrained")
    im = axes[0].imshow(grain, cmap="tab10", vmin=-0.5, vmax=9.5)
    for g, name in enumerate(labels):
        r, c = np.argwhere(grain == g).mean(axis=0) if (grain == g).any() else (np.nan, np.nan)
        axes[0].text(c, r, name, ha="center", va="center", fontsize=8,
                     bbox=dict(facecolor="white", alpha=0.7, lw=0))
    axes[0].set_title("grains (true orientations)")
    refined.plot_ipf_map(ax=axes[1])
    axes[1].set_title("IPF-z of the refined best match")
    im = axes[2].imshow(rel, cmap="viridis", vmin=0, vmax=1)
    axes[2].contour(rel == 0, levels=[0.5], colors="red", linewidths=1.5)
    axes[2].set_title("reliability (red: 0, ambiguous)")
    fig.colorbar(im, ax=axes[2])
    im = axes[3].imshow(np.where(same & (err >= 2), -1, np.minimum(err, 5)), cmap="magma",
                        vmin=-1, vmax=5)
    axes[3].set_title("error, deg (-1: a twin, same pattern)")
    fig.colorbar(im, ax=axes[3])
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    path = os.path.join(args.output, "reliability_map.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
