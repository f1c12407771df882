"""Template matching over the parameters users choose: diffgpu against pyxem, same data, same run.

    python benchmarks/bench_matching_matrix.py [--patterns 256] [--pyxem-patterns 128] [--large]
                                               [--only-large]

Data: Si spot patterns at random orientations (``bench_orientation.make_data``: 256 x 256
pixels, 0.01 1/Å per pixel, Poisson noise). Matrix: radial bins 32, 64, 96, 128, 200, 256
(360 azimuthal bins); patterns as they are or ``** 0.5``; ``n_best`` 1 and 5. Library: the
1-degree Si simulation (1,081 templates), passed to ``get_orientation`` as a diffsims
simulation, the call pyxem users make (``get_orientation(simulation, n_best=...)``); diffgpu
prepares it on the first call and reuses it (the first call's extra cost is reported). Each
tool runs in its own process. Lazy rows: the same patterns in dask chunks of 64 on the
threaded scheduler (``compute()``), and on a 2-worker distributed ``LocalCluster`` (the
patterns 8 times over, held by the workers, beside the eager call on the same 2,048).
``--large`` adds the 0.2-degree library (25,651 templates) at 64 bins for diffgpu: the diffsims
simulation passed as the library and the ``TemplateLibrary`` made from it, 128 and 256 patterns
a call, n_best 1 and 5 (``--only-large``: that table alone). ``--only-prep``: what preparing a
library costs (1,081, 4,186 and 25,651 templates; 64 and 128 radial bins, 25,651 at 64 only):
the first call's extra time over later ones and the fixed cost of a one-pattern call, with a
``TemplateLibrary`` and with the diffsims simulation passed as the library (wall and CPU time).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, median_time, print_table, ratio, run_tool, tool_process  # noqa: E402

import numpy as np  # noqa: E402

RADIAL_BINS = (32, 64, 96, 128, 200, 256)
SCALES = ("as is", "** 0.5")
N_BEST = (1, 5)
R_MAX = 1.28
RECIPROCAL_RADIUS = 1.2


def _simulation(resolution):
    import diffgpu
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.sampling import get_sample_reduced_fundamental

    si = diffgpu.TemplateLibrary.silicon()
    rots = get_sample_reduced_fundamental(resolution=resolution, point_group=si.point_group)
    return SimulationGenerator(200, minimum_intensity=1e-10).calculate_diffraction2d(
        si, rotation=rots, reciprocal_radius=RECIPROCAL_RADIUS, max_excitation_error=0.05,
        with_direct_beam=False)


def _polar(frames, npt, scale):
    import diffgpu

    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = ((frames.shape[-1] - 1) / 2, (frames.shape[-2] - 1) / 2)
    s.calibration.scale = 0.01
    s.calibration.units = "1/Å"
    polar = s.get_azimuthal_integral2d(npt=npt, npt_azim=360, radial_range=(0, R_MAX), mean=True)
    if scale == "** 0.5":
        polar.data = np.sqrt(np.maximum(np.nan_to_num(polar.data), 0))
    return polar


def tool_diffgpu(path, n, large, out):
    from bench_orientation import _accuracy

    frames = np.load(f"{path}_random.npy")[:n]
    true_q = np.load(f"{path}_random_rot.npy")[:n]
    sim = _simulation(1.0)
    for npt in RADIAL_BINS:
        for scale in SCALES:
            polar = _polar(frames, npt, scale)
            t0 = time.perf_counter()
            polar.get_orientation(sim, n_best=1)  # prepares the templates for this geometry
            first = time.perf_counter() - t0
            for n_best in N_BEST:
                key = f"{npt}|{scale}|{n_best}"
                t = median_time(lambda: polar.get_orientation(sim, n_best=n_best), 3, warmup=1)
                m = polar.get_orientation(sim, n_best=n_best)
                acc, _ = _accuracy(m.to_orientations(), true_q)
                row = {"eager": n / t, "within 2 deg": acc}
                if n_best == 1:
                    row["first call extra (s)"] = first - t
                    one = polar.inav[:1]  # fixed cost of a call: one pattern
                    row["fixed overhead (ms)"] = 1e3 * median_time(
                        lambda: one.get_orientation(sim, n_best=1), 5, warmup=1)
                    lazy = polar.as_lazy()
                    lazy.data = lazy.data.rechunk((64,) + lazy.data.shape[1:])

                    def run_lazy():
                        lazy.get_orientation(sim, n_best=n_best).compute(show_progressbar=False)

                    row["lazy"] = n / median_time(run_lazy, 3, warmup=1)
                out[key] = row
    out["cluster"] = _cluster_rows(frames, sim)
    if large:
        out["large"] = _large_rows(frames)


def _large_rows(frames):
    """The 0.2-degree library (25,651 templates), 64 radial bins, patterns as they are: the
    diffsims simulation passed as the library (pyxem's way: checked for changes at every
    call) and the TemplateLibrary made from it once; 128 and 256 patterns a call."""
    import diffgpu

    big = _simulation(0.2)
    lib = diffgpu.TemplateLibrary.from_simulation(big)
    rows = {"templates": int(big.rotations.size)}
    for n in (128, 256):
        polar = _polar(frames[:n], 64, "as is")
        for name, library in (("simulation", big), ("TemplateLibrary", lib)):
            t0 = time.perf_counter()
            polar.get_orientation(library)
            first = time.perf_counter() - t0
            for n_best in N_BEST:
                t = median_time(lambda: polar.get_orientation(library, n_best=n_best), 3,
                                warmup=0)
                rows[f"{name}|{n}|{n_best}"] = {"eager": n / t, "first call (s)": first}
    return rows


def _prep_rows(frames):
    """First-call extra cost and fixed cost per call, per library size and radial bins (64
    patterns a call; wall and CPU seconds, medians of 3 for later calls, of 5 for one-pattern
    calls)."""
    import diffgpu

    def timed(f):
        w, c = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - w, time.process_time() - c

    def median_of(f, n):
        return tuple(np.median([timed(f) for _ in range(n)], axis=0))

    rows = {}
    for resolution, bins in ((1.0, 64), (1.0, 128), (0.5, 64), (0.5, 128), (0.2, 64)):
        sim = _simulation(resolution)
        polar = _polar(frames[:64], bins, "as is")
        one = polar.inav[:1]
        lib = diffgpu.TemplateLibrary.from_simulation(sim)
        first = timed(lambda: polar.get_orientation(lib))
        later = median_of(lambda: polar.get_orientation(lib), 3)
        row = {"templates": len(lib), "bins": bins,
               "first extra": tuple(a - b for a, b in zip(first, later)),
               "fixed": median_of(lambda: one.get_orientation(lib), 5)}
        row["simulation first (1 pattern)"] = timed(lambda: one.get_orientation(sim))
        row["simulation fixed"] = median_of(lambda: one.get_orientation(sim), 5)
        rows[f"{resolution}|{bins}"] = row
    return rows


def _print_prep(rows):
    print_table("Library preparation: 64 patterns a call, Si; seconds (first call) and ms (one-"
                "pattern calls), wall / CPU",
                ["templates", "radial bins", "first call extra (s)", "fixed, TemplateLibrary (ms)",
                 "simulation: first one-pattern call (s)", "simulation: fixed (ms)"],
                [[r["templates"], r["bins"], "%.2f / %.2f" % tuple(r["first extra"]),
                  "%.0f / %.0f" % tuple(1e3 * x for x in r["fixed"]),
                  "%.2f / %.2f" % tuple(r["simulation first (1 pattern)"]),
                  "%.0f / %.0f" % tuple(1e3 * x for x in r["simulation fixed"])]
                 for r in rows.values()])


CLUSTER_COPIES = 8  # the cluster rows match the patterns 8 times over: 2,048 by default
CLUSTER_CHUNK = 256


def _cluster_rows(frames, sim):
    """Lazy matching on a 2-worker LocalCluster at 64 and 128 radial bins, with the eager call
    on the same patterns: the patterns repeated ``CLUSTER_COPIES`` times (a scan of 256
    patterns takes ~0.1 s eager, less than a cluster's per-run cost), in chunks of
    ``CLUSTER_CHUNK`` held by the workers already (``persist``), as data read there would be.
    """
    from distributed import Client, LocalCluster, wait

    frames = np.concatenate([frames] * CLUSTER_COPIES)
    n = len(frames)
    rows = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster, Client(cluster):
        for npt in (64, 128):
            polar = _polar(frames, npt, "as is")
            lazy = polar.as_lazy()
            lazy.data = lazy.data.rechunk((CLUSTER_CHUNK,) + lazy.data.shape[1:]).persist()
            wait(lazy.data)
            eager = n / median_time(lambda: polar.get_orientation(sim, n_best=1), 3, warmup=1)
            rows[npt] = {"patterns": n, "eager": eager, "cluster": n / median_time(
                lambda: lazy.get_orientation(sim, n_best=1).compute(show_progressbar=False),
                3, warmup=1)}
    return rows


def tool_pyxem(path, n, out):
    import pyxem
    from bench_orientation import pyxem_polar

    out["version"] = pyxem.__version__
    frames = np.load(f"{path}_random.npy")[:n]
    sim = _simulation(1.0)
    for npt in RADIAL_BINS:
        polar = pyxem_polar(frames, npt)  # in pyxem's own detector frame (same work)
        for scale in SCALES:
            p = polar ** 0.5 if scale == "** 0.5" else polar
            for n_best in N_BEST:
                def run():
                    m = p.get_orientation(sim, n_best=n_best, frac_keep=1.0,
                                          show_progressbar=False)
                    if getattr(m, "_lazy", False):
                        m.compute(show_progressbar=False)

                out[f"{npt}|{scale}|{n_best}"] = n / median_time(run, 1, warmup=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", type=int, default=256)
    ap.add_argument("--pyxem-patterns", type=int, default=128)
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--only-large", action="store_true", help="the large library only (no "
                    "matrix, no pyxem)")
    ap.add_argument("--only-prep", action="store_true", help="the library preparation table "
                    "alone (diffgpu only)")
    ap.add_argument("--tool")
    ap.add_argument("--data")
    args = ap.parse_args()
    if args.tool == "diffgpu" and args.only_prep:
        return tool_process(lambda o: o.update(
            prep=_prep_rows(np.load(f"{args.data}_random.npy"))))
    if args.tool == "diffgpu" and args.only_large:
        return tool_process(lambda o: o.update(
            large=_large_rows(np.load(f"{args.data}_random.npy")[:args.patterns])))
    if args.tool == "diffgpu":
        return tool_process(lambda o: tool_diffgpu(args.data, args.patterns, args.large, o))
    if args.tool == "pyxem":
        return tool_process(lambda o: tool_pyxem(args.data, args.pyxem_patterns, o))

    from bench_orientation import make_data

    print(f"# Template matching matrix, {time.strftime('%Y-%m-%d')}, {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "si")
        make_data(path, max(args.patterns, args.pyxem_patterns), 1)
        common = ["--data", path, "--patterns", args.patterns, "--pyxem-patterns",
                  args.pyxem_patterns] + (["--large"] if args.large else []) \
            + (["--only-large"] if args.only_large else []) \
            + (["--only-prep"] if args.only_prep else [])
        ours = run_tool(__file__, "diffgpu", common)
        peer = {} if args.only_large or args.only_prep else run_tool(__file__, "pyxem", common)
    if "error" in ours:
        print("diffgpu failed:", ours["error"])
        return 1
    if args.only_prep:
        _print_prep(ours["prep"])
        return 0
    if args.only_large:
        args.large = True
        _print_large(ours)
        return 0
    rows = []
    for npt in RADIAL_BINS:
        for scale in SCALES:
            for n_best in N_BEST:
                key = f"{npt}|{scale}|{n_best}"
                d = ours[key]
                p = peer.get(key)
                rows.append([npt, scale, n_best, d["eager"], p if p is not None else "n/a",
                             ratio(d["eager"], p), d.get("lazy", ""),
                             f"{d['lazy'] / d['eager']:.0%}" if "lazy" in d else "",
                             f"{d['within 2 deg']:.0%}", d.get("first call extra (s)", ""),
                             d.get("fixed overhead (ms)", "")])
    print_table("Matching, 1,081 templates (Si, 1 degree), 360 azimuthal bins; patterns/s",
                ["radial bins", "patterns", "n_best", "diffgpu", f"pyxem {peer.get('version', '')}",
                 "ratio", "diffgpu lazy", "lazy/eager", "within 2 deg",
                 "first call extra (s)", "fixed overhead per call (ms)"], rows)
    if "error" in peer:
        print("pyxem:", peer["error"])
    print_table("Lazy matching on a 2-worker LocalCluster (1 thread each; patterns held by the "
                "workers, chunks of 256), n_best 1, patterns as they are; patterns/s",
                ["radial bins", "patterns", "LocalCluster", "eager, same patterns", "of eager"],
                [[int(k), v["patterns"], v["cluster"], v["eager"], f"{v['cluster'] / v['eager']:.0%}"]
                 for k, v in ours["cluster"].items()])
    _print_large(ours)
    return 0


def _print_large(ours):
    if "large" in ours:
        big = ours.pop("large")
        rows = [k.split("|") + [v["eager"], v["first call (s)"]] for k, v in big.items()
                if k != "templates"]
        print_table(f"Large library ({big['templates']:,} templates), 64 radial bins, patterns "
                    "as they are", ["library passed", "patterns a call", "n_best", "patterns/s",
                                    "first call of that kind (s)"], rows)


if __name__ == "__main__":
    sys.exit(main())
