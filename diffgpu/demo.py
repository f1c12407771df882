"""The main job on built-in synthetic data: what ``diffgpu demo`` runs.

It makes a synthetic 4D-STEM scan (ring patterns, a drifting direct beam, a
"sample" that changes the scattering, Poisson noise, uint16 like a counting
detector), moves it to the GPU if there is one, and then, lazily:

1. finds the direct beam in every pattern and centres it (plane fit of the descan);
2. integrates every centred pattern azimuthally (a polar transform and a radial profile);
3. makes bright-field and annular dark-field images in one pass;
4. maps the orientations of a simulated silicon polycrystal (spot patterns of Voronoi
   grains) by template matching against a diffsims/orix library, refined below the
   library's grid;

and writes ``main_job.png`` (mean pattern, a polar transform, the mean radial profile,
the two virtual images) and ``orientation_map.png`` (true grains, IPF map, best template
over a pattern). The same lines run on CPU and GPU.
"""

from __future__ import annotations

import os
import time

__all__ = ["main_job"]


def main_job(output="demo-output", nav_shape=(32, 32), sig_shape=(128, 128), device="auto",
             verbose=True):
    """Run the main job and write ``main_job.png`` and ``orientation_map.png`` into ``output``.

    Parameters
    ----------
    output : str
        Folder for the figures (made if needed).
    nav_shape, sig_shape : tuple of int
        Scan and detector shapes of the synthetic dataset (the orientation map's
        polycrystal is always 12 x 12 patterns of 128 x 128).
    device : {"auto", "cpu", "gpu"}
        ``"auto"`` uses a GPU when one works.
    verbose : bool
        Print what is done, the timings and the errors against the truth.

    Returns
    -------
    str
        The path of ``main_job.png``.

    Examples
    --------
    >>> import tempfile, diffgpu.demo
    >>> path = diffgpu.demo.main_job(tempfile.mkdtemp(), (4, 4), (48, 48), "cpu", verbose=False)
    >>> path.endswith("main_job.png")
    True
    """
    import hyperspy.api as hs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import diffgpu

    say = print if verbose else (lambda *a, **k: None)
    os.makedirs(output, exist_ok=True)
    s = diffgpu.data.synthetic_4dstem(nav_shape=nav_shape, sig_shape=sig_shape)  # lazy
    say(s, f"({s.data.nbytes / 2**20:.0f} MiB, {s.data.npartitions} chunks)")
    if device == "gpu" or (device == "auto" and diffgpu.gpu_available()):
        s.to_device()  # only adds transfer steps to the dask graph
    say("computing on", s.device, *[str(d) for d in diffgpu.devices()] if s.device == "gpu" else "")
    t0 = time.perf_counter()

    # 1. beam finding (one pass), then centring as a lazy step of what follows
    r_beam = s.metadata.Synthetic.beam_radius
    shifts = s.get_direct_beam_position(method="blur", sigma=2.0, window=r_beam + 3)
    shifts.to_host()
    shifts.compute(show_progressbar=False)
    # a plane (the descan) needs 3 scan positions: a smaller scan is centred on its own shifts
    n = s.axes_manager.navigation_size
    centred = s.center_direct_beam(shifts=shifts.fit_plane() if n >= 3 else shifts)

    # 2. and 3. integration and virtual images of the centred patterns
    r_max = min(sig_shape) / 2
    polar = centred.get_azimuthal_integral2d(npt=64, npt_azim=180, radial_range=(0, r_max),
                                             mean=True)
    profiles = centred.get_azimuthal_integral1d(npt=128, radial_range=(0, r_max), mean=True)
    images = centred.get_virtual_image([hs.roi.CircleROI(cx=0, cy=0, r=r_beam + 1),
                                        hs.roi.CircleROI(cx=0, cy=0, r=0.9 * r_max,
                                                         r_inner=2 * r_beam)])
    mean_pattern = centred.mean(axis=centred.axes_manager.navigation_axes)
    results = [polar, profiles, images, mean_pattern]
    for r in results:
        r.to_host()
    import dask

    computed = dask.compute(*[r.data for r in results])  # one pass for all four
    for r, data in zip(results, computed):
        r.data = data
    elapsed = time.perf_counter() - t0
    truth = s.metadata.Synthetic.beam_centers - np.asarray(s.calibration.center)
    rms = float(np.sqrt(np.mean((shifts.data - truth) ** 2)))
    say(f"{n} patterns: beam found (error {rms:.3f} px RMS), centred, integrated and imaged "
        f"in {elapsed:.2f} s ({n / elapsed:,.0f} patterns/s, the synthetic frames made in each "
        f"of the two passes included)")

    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    axes[0].imshow(np.asarray(mean_pattern.data), norm=matplotlib.colors.LogNorm(vmin=0.1))
    axes[0].set_title("mean centred pattern (log)")
    az, rad = polar.axes_manager.signal_axes
    axes[1].imshow(polar.data[0, 0], aspect="auto", origin="lower",
                   norm=matplotlib.colors.LogNorm(vmin=0.3),
                   extent=[az.low_value - az.scale / 2, az.high_value + az.scale / 2,  # bin edges
                           rad.low_value - rad.scale / 2, rad.high_value + rad.scale / 2])
    axes[1].set(title="polar transform, pattern (0, 0)", xlabel="azimuth (deg)", ylabel="radius (px)")
    radius = profiles.axes_manager.signal_axes[0].axis
    axes[2].plot(radius, np.nanmean(profiles.data, axis=(0, 1)))
    for r in s.metadata.Synthetic.ring_radii:
        axes[2].axvline(r, color="r", ls=":", lw=1)
    axes[2].set(yscale="log", xlabel="radius (px)", title="mean radial profile (red: true rings)")
    axes[3].imshow(images.data[0], cmap="gray")
    axes[3].set_title("bright field")
    axes[4].imshow(images.data[1], cmap="gray")
    axes[4].set_title("annular dark field")
    fig.tight_layout()
    path = os.path.join(output, "main_job.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    say("wrote", path)

    # 4. orientation mapping of a simulated Si polycrystal
    from orix.quaternion import Orientation, Rotation

    si = diffgpu.TemplateLibrary.silicon()
    grains = diffgpu.data.grain_map(si, nav_shape=(12, 12), n_grains=5)  # 0.02 1/Å per pixel
    library = diffgpu.TemplateLibrary.from_phase(si, resolution=2.0, reciprocal_radius=1.2)
    if s.device == "gpu":
        grains.to_device()
    t0 = time.perf_counter()
    polar = grains.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28),
                                            mean=True)
    matches = polar.get_orientation(library, n_best=1)
    matches = matches.refine(polar, library)  # below the library's 2-degree grid
    polar.to_host()
    truth = Orientation(Rotation(grains.metadata.Synthetic.rotations), symmetry=si.point_group)
    found = matches.to_orientations()
    err = truth.angle_with(Orientation(found.data.reshape(-1, 4), symmetry=si.point_group),
                           degrees=True)
    say(f"orientation map: {grains.axes_manager.navigation_size} patterns against "
        f"{len(library)} templates, refined, in {time.perf_counter() - t0:.2f} s; "
        f"{100 * np.mean(err < 3):.0f}% within 3 degrees of the truth (2-degree library), "
        f"median error {np.median(err):.2f} degrees")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].imshow(grains.metadata.Synthetic.grains, cmap="tab10")
    axes[0].set_title("true grains")
    matches.plot_ipf_map(ax=axes[1])
    matches.plot_match(polar, library, index=(0, 0), ax=axes[2])
    fig.tight_layout()
    omap = os.path.join(output, "orientation_map.png")
    fig.savefig(omap, dpi=70)
    plt.close(fig)
    say("wrote", omap)
    return path
