"""Azimuthal integration over a matrix of detectors, bins, dtypes and masks: diffgpu vs pyFAI.

    python benchmarks/bench_integration_matrix.py [--quick] [--seconds 0.5] [--repeat 5]
                                                  [--points 1,7,15] [--figure PATH]

For every point of :data:`POINTS` (detector, dtype, mask, radial x azimuthal bins; 1D when
``npt_azim`` is 1), in the same run and on the same frames:

* **diffgpu eager**: ``get_azimuthal_integral2d`` (or ``1d``) on an in-memory signal, both
  host threads;
* **diffgpu lazy**: the same call on the lazy signal (diffgpu's chunks of whole frames),
  computed with dask's threaded scheduler, and on a 2-worker distributed ``LocalCluster``
  (1 thread each) holding the frames already (``persist``): ``compute()`` (results brought
  to the client: through shared memory, the workers being on this machine) and
  ``persist()`` (results kept on the workers), on the same frames repeated to at least
  ``--cluster-seconds`` of eager work (the compute of one chunk, the fixed cost, reported
  apart);
* **pyFAI**: ``integrate2d_ng`` / ``integrate1d_ng`` with ``method=("full", "csr", "cython")``
  (exact pixel splitting, CSR), frame by frame as pyFAI users call it, set up as in
  ``bench_integration.py``;
* **roofline**: the frames/s a streaming NumPy pass would reach moving the same bytes
  (each frame read once, its result written once), measured as the rate of ``np.copyto``
  between preallocated buffers, split over 2 threads, interleaved with diffgpu's timings.

Each tool runs in its own process (``run_tool``); the frames come from the same seeded
generator in each. Frames per point are chosen so that one timing takes about
``--seconds`` (within memory limits); rates are medians of ``--repeat`` timings. The
first call (geometry and integration matrix built, kernel loaded) is reported on its own.
Prints Markdown tables, writes ``benchmarks/_out/integration_matrix.json`` and a PNG of
the roofline fractions and of the ratios to pyFAI (``--figure`` for another path).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_tool, tool_process  # noqa: E402

import numpy as np  # noqa: E402

OUT = Path(__file__).parent / "_out"
PIX_M = 1e-3  # pyFAI pixel size: 1 mm pixels make its "r_mm" unit equal to pixels
THREADS = 2

# (rows, columns), dtype, mask, npt, npt_azim (1 = 1D). Every value of every parameter
# appears, with the hard corners: many bins on a small detector, large detectors.
POINTS = [
    ((128, 128), "uint16", False, 32, 90),
    ((128, 128), "float32", True, 64, 180),
    ((128, 128), "uint32", False, 64, 1),
    ((192, 192), "uint16", True, 96, 360),
    ((192, 192), "float32", False, 200, 1),
    ((256, 256), "uint16", False, 100, 360),
    ((256, 256), "float32", False, 256, 720),
    ((256, 256), "uint32", True, 128, 1440),
    ((256, 320), "uint16", True, 160, 180),
    ((256, 320), "float32", False, 100, 1),
    ((512, 512), "uint16", False, 200, 360),
    ((512, 512), "uint32", True, 250, 720),
    ((512, 512), "float32", False, 1000, 1),
    ((1024, 1024), "uint16", False, 500, 360),
    ((1024, 1024), "uint32", True, 500, 90),
    ((1024, 1024), "float32", False, 1000, 1440),
]
QUICK = [0, 6, 10, 13]


def center(shape):
    ny, nx = shape
    return (nx / 2 + 2.3, ny / 2 - 1.7)  # (x, y), off the detector middle


def radial_max(shape):
    return min(shape) / 2 - 4.0


def make_mask(shape):
    ny, nx = shape
    m = np.zeros(shape, bool)
    m[:, nx // 4:nx // 4 + 3] = True  # a dead column band
    m[ny // 2 - 2:ny // 2 + 2, nx // 2 + 10:] = True  # a beam-stop arm
    return m


def make_frames(shape, dtype, n, seed=0, distinct=8):
    """``n`` frames (rings, a direct beam, Poisson noise) cycling over ``distinct`` ones."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    cx, cy = center(shape)
    yy, xx = np.indices(shape)
    r = np.hypot(xx - cx, yy - cy)
    base = 2000 * np.exp(-(r / 4) ** 2) + 20
    for k, r0 in enumerate(np.linspace(0.15, 0.9, 5) * radial_max(shape)):
        base += 200 / (k + 1) * np.exp(-((r - r0) / 1.5) ** 2)
    stack = rng.poisson(base, size=(distinct,) + shape).astype(dtype)
    reps = -(-n // distinct)
    return np.tile(stack, (reps, 1, 1))[:n]


def frame_bytes(point):
    shape, dtype, _, npt, naz = point
    return shape[0] * shape[1] * np.dtype(dtype).itemsize, npt * naz * 4


def frames_for(rate, seconds, point, cap_bytes=384 * 2**20, lo=16):
    """Frames for one timing of about ``seconds`` at ``rate``, within ``cap_bytes`` of data."""
    fin, fout = frame_bytes(point)
    n = int(rate * seconds)
    n = min(n, cap_bytes // (fin + fout))
    return max(lo, n // 8 * 8)


def timed(func, repeat):
    import gc

    times = []
    for _ in range(repeat):
        # the results of the timing before are freed first: a HyperSpy signal is a reference
        # cycle, freed only by the cyclic collector, and on this VM memory the guest has not
        # touched before comes 4-7x slower (benchmarks/NOTES.md, 2026-12-07 evening)
        gc.collect()
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return times


def copy_rate(total_bytes, repeat, threads=THREADS):
    """Bytes/s of a streaming read + write pass (np.copyto, preallocated, ``threads`` threads)."""
    half = max(1, int(total_bytes) // 2 // 8)  # reads `half` words and writes `half` words
    src = np.ones(half, np.float64)
    dst = np.empty_like(src)
    dst[:] = 0
    cuts = np.linspace(0, half, threads + 1).astype(int)

    def one():
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a, b: np.copyto(dst[a:b], src[a:b]), cuts[:-1], cuts[1:]))

    one()
    return [2 * src.nbytes / t for t in timed(one, repeat)]


# -- one tool per process ----------------------------------------------------------

def _signal(frames, point, lazy=False):
    import diffgpu
    from diffgpu.chunking import frame_chunks

    shape = point[0]
    if lazy:
        import dask.array as da

        fin, _ = frame_bytes(point)
        chunks = frame_chunks((frames.shape[0],), fin) + ((shape[0],), (shape[1],))
        s = diffgpu.DiffractionPatterns(da.from_array(frames, chunks=chunks)).as_lazy()
    else:
        s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = center(shape)
    return s


def _integrate(s, point):
    shape, _, masked, npt, naz = point
    kw = dict(radial_range=(0.0, radial_max(shape)), mask=make_mask(shape) if masked else None)
    if naz == 1:
        return s.get_azimuthal_integral1d(npt=npt, **kw)
    return s.get_azimuthal_integral2d(npt=npt, npt_azim=naz, **kw)


def tool_diffgpu(point, args, out):
    shape = point[0]
    # first call: geometry, integration matrix and kernel, on 8 frames
    few = make_frames(shape, point[1], 8)
    t0 = time.perf_counter()
    _integrate(_signal(few, point), point)
    out["first call (s)"] = time.perf_counter() - t0
    # calibrate the number of frames, then time eager and lazy interleaved
    probe = make_frames(shape, point[1], 64)
    s = _signal(probe, point)
    rate = len(probe) / min(timed(lambda: _integrate(s, point), 2))
    n = frames_for(rate, args.seconds, point)
    frames = make_frames(shape, point[1], n)
    # 64 frames may be too few to see the rate past the per-call cost: once more with n
    s = _signal(frames, point)
    rate = n / min(timed(lambda: _integrate(s, point), 2))
    if frames_for(rate, args.seconds, point) > 1.5 * n:
        n = frames_for(rate, args.seconds, point)
        frames = make_frames(shape, point[1], n)
    s = None  # the probe signal goes before the timed ones are made
    out["frames"] = n
    eager = _signal(frames, point)
    lazy = _signal(frames, point, lazy=True)
    out["lazy chunks"] = str(lazy.data.chunks[0][:1])
    fin, fout = frame_bytes(point)
    jobs = {"eager": lambda: _integrate(eager, point),
            "lazy": lambda: _integrate(lazy, point).compute(show_progressbar=False)}
    for job in jobs.values():
        job()
    times = {k: [] for k in jobs}
    roof = []
    for _ in range(args.repeat):  # A, B, roofline, A, B, ... so that load hits all alike
        for k, job in jobs.items():
            times[k] += timed(job, 1)
        roof += copy_rate(n * (fin + fout), 1)
    for k, v in times.items():
        out[k] = n / float(np.median(v))
    out["roofline"] = float(np.median(roof)) / (fin + fout)
    out["copy GB/s"] = float(np.median(roof)) / 1e9


def tool_cluster(point, args, out):
    from distributed import Client, LocalCluster, wait

    import diffgpu  # noqa: F401

    import dask.array as da

    shape = point[0]
    n = args.frames
    frames = make_frames(shape, point[1], n)
    # at least --cluster-seconds of eager work per timing: the held frames repeated (no
    # more input memory), so that the fixed cost of a distributed compute (reported on
    # its own) does not stand in for its throughput
    reps = max(1, int(np.ceil(args.cluster_seconds * args.rate / n))) if args.rate else 1
    # results within 1 GiB: kept on the workers (4 GiB each), they must not spill to disk
    reps = max(1, min(reps, 2**30 // (n * frame_bytes(point)[1])))
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="4GiB",
                      dashboard_address=None) as cluster, Client(cluster):
        lazy = _signal(frames, point, lazy=True)
        held = lazy.data.persist()
        wait(held)
        small = lazy.deepcopy()
        small.data = held[:held.chunks[0][0]]
        lazy.data = da.concatenate([held] * reps) if reps > 1 else held
        n *= reps

        def gathered():  # compute(): every result sent back to this process
            _integrate(lazy, point).compute(show_progressbar=False)

        def kept():  # results left on the workers (as when they are saved or reduced there)
            res = _integrate(lazy, point).data.persist()
            wait(res)
            del res

        def one_chunk():  # the fixed cost: a compute of one chunk
            _integrate(small, point).compute(show_progressbar=False)

        gathered()
        kept()
        one_chunk()
        times = {"distributed": [], "distributed kept": []}
        fixed = []
        for _ in range(args.repeat):
            times["distributed"] += timed(gathered, 1)
            times["distributed kept"] += timed(kept, 1)
            fixed += timed(one_chunk, 1)
        for k, v in times.items():
            out[k] = n / float(np.median(v))
        out["frames"] = n
        out["one chunk (ms)"] = 1e3 * float(np.median(fixed))


def tool_pyfai(point, args, out):
    import pyFAI
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    shape, dtype, masked, npt, naz = point
    out["version"] = pyFAI.version
    cx, cy = center(shape)
    det = Detector(pixel1=PIX_M, pixel2=PIX_M, max_shape=shape)
    ai = AzimuthalIntegrator(dist=1.0, poni1=(cy + 0.5) * PIX_M, poni2=(cx + 0.5) * PIX_M,
                             detector=det)
    kw = dict(unit="r_mm", method=("full", "csr", "cython"), correctSolidAngle=False,
              polarization_factor=None, radial_range=(0, radial_max(shape)),
              azimuth_range=(-180, 180), mask=make_mask(shape) if masked else None)
    if naz == 1:
        def one(f):
            return ai.integrate1d_ng(f, npt, **kw)
    else:
        def one(f):
            return ai.integrate2d_ng(f, npt, naz, **kw)
    few = make_frames(shape, dtype, 8)
    t0 = time.perf_counter()
    one(few[0])
    out["first call (s)"] = time.perf_counter() - t0
    rate = len(few) / min(timed(lambda: [one(f) for f in few], 2))
    n = frames_for(rate, args.seconds, point, lo=8)
    frames = make_frames(shape, dtype, n)
    out["frames"] = n
    out["pyfai"] = n / float(np.median(timed(lambda: [one(f) for f in frames], args.repeat)))


TOOLS = {"diffgpu": tool_diffgpu, "cluster": tool_cluster, "pyfai": tool_pyfai}


def label(point):
    shape, dtype, masked, npt, naz = point
    det = f"{shape[0]}^2" if shape[0] == shape[1] else f"{shape[0]}x{shape[1]}"
    bins = f"{npt}" if naz == 1 else f"{npt} x {naz}"
    return f"{det} {dtype} -> {bins}{' masked' if masked else ''}"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["label"] for r in results]
    frac = [100 * r.get("roof_frac", np.nan) for r in results]
    vs = [r.get("vs_pyfai", np.nan) for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.38 * len(names) + 1.6), sharey=True)
    y = np.arange(len(names))
    axes[0].barh(y, frac, color="tab:blue")
    axes[0].axvline(40, color="k", ls="--", lw=1, label="target 40%")
    axes[0].set_xlabel("diffgpu eager, % of the memory roofline")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].barh(y, vs, color="tab:orange")
    axes[1].axvline(8, color="k", ls="--", lw=1, label="target 8x")
    axes[1].set_xlabel("diffgpu eager / pyFAI CSR full split (frames/s ratio)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Azimuthal integration on the host, 2 cores: roofline fraction and speed-up",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nfigure: {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"only points {QUICK}")
    ap.add_argument("--points", help="comma-separated point numbers (0-based)")
    ap.add_argument("--seconds", type=float, default=0.5, help="target time of one timing")
    ap.add_argument("--cluster-seconds", type=float, default=1.0,
                    help="least eager-time worth of frames in one LocalCluster timing")
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--figure", help="PNG path (default benchmarks/_out/integration_roofline.png)")
    ap.add_argument("--tool")
    ap.add_argument("--point", type=int)
    ap.add_argument("--frames", type=int)
    args = ap.parse_args()
    if args.tool:
        return tool_process(lambda out: TOOLS[args.tool](POINTS[args.point], args, out), gib=2)

    chosen = (QUICK if args.quick else
              [int(p) for p in args.points.split(",")] if args.points else range(len(POINTS)))
    print(f"machine: {machine()}; load average at start: {os.getloadavg()[0]:.1f}")
    print(f"medians of {args.repeat} timings of ~{args.seconds} s; roofline: np.copyto rate on "
          f"{THREADS} threads, interleaved with diffgpu's timings")
    common = ["--seconds", args.seconds, "--repeat", args.repeat]
    results = []
    for i in chosen:
        point = POINTS[i]
        t0 = time.perf_counter()
        ours = run_tool(__file__, "diffgpu", ["--point", i] + common)
        fai = run_tool(__file__, "pyfai", ["--point", i] + common)
        clus = {}
        if not args.no_cluster and "frames" in ours:
            # the frames of the eager timing (~--seconds of eager work; a quarter until
            # 2026-12-07, when a run's fixed cost on the cluster swamped 0.1 s of work)
            n_clus = ours["frames"]
            clus = run_tool(__file__, "cluster", ["--point", i, "--frames", n_clus, "--rate",
                                                  ours.get("eager", 0),
                                                  "--cluster-seconds", args.cluster_seconds] + common)
        r = {"point": i, "label": label(point), **{f"diffgpu {k}": v for k, v in ours.items()},
             **{f"pyfai {k}": v for k, v in fai.items()}, **{f"cluster {k}": v for k, v in clus.items()}}
        e = ours.get("eager")
        if isinstance(e, float):
            r["roof_frac"] = e / ours["roofline"]
            if isinstance(fai.get("pyfai"), float):
                r["vs_pyfai"] = e / fai["pyfai"]
        results.append(r)
        print(f"  [{i}] {label(point)}: {time.perf_counter() - t0:.0f} s "
              f"{'; '.join(str(d['error']) for d in (ours, fai, clus) if 'error' in d)}", flush=True)

    def num(v, fmt="{:,.0f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a" if v is None else str(v)

    rows = []
    for r in results:
        e = r.get("diffgpu eager")
        lazy, dist, kept = (r.get("diffgpu lazy"), r.get("cluster distributed"),
                            r.get("cluster distributed kept"))
        pct = lambda v: f"{num(v)} ({100 * v / e:.0f}%)" if isinstance(v, float) and e else num(v)  # noqa
        rows.append([r["label"], num(r.get("diffgpu frames")), num(e), pct(lazy), pct(dist), pct(kept),
                     num(r.get("pyfai pyfai")),
                     f"{r['vs_pyfai']:.1f}x" if "vs_pyfai" in r else "n/a",
                     num(r.get("diffgpu roofline")),
                     f"{100 * r['roof_frac']:.0f}%" if "roof_frac" in r else "n/a"])
    fai_v = next((r["pyfai version"] for r in results if "pyfai version" in r), "")
    print_table("Azimuthal integration over the matrix, frames/s (2 cores)",
                ["point", "frames", "diffgpu eager", "lazy threaded (% eager)",
                 "LocalCluster 2x1, compute (% eager)", "LocalCluster, results kept (% eager)",
                 f"pyFAI {fai_v} csr full", "vs pyFAI",
                 "roofline", "% of roofline"], rows)
    rows = [[r["label"], num(r.get("diffgpu first call (s)"), "{:.2f}"),
             num(r.get("pyfai first call (s)"), "{:.2f}"), num(r.get("diffgpu copy GB/s"), "{:.1f}"),
             r.get("diffgpu lazy chunks", ""), num(r.get("cluster frames")),
             num(r.get("cluster one chunk (ms)"), "{:.0f}")] for r in results]
    print_table("First call (geometry, matrix, kernel; 8 frames), the roofline's copy rate, the "
                "LocalCluster's timings",
                ["point", "diffgpu first call (s)", "pyFAI first call (s)", "np.copyto GB/s (2 threads)",
                 "lazy frames per chunk", "LocalCluster frames per timing",
                 "LocalCluster compute of one chunk (ms)"], rows)
    vs = [r["vs_pyfai"] for r in results if "vs_pyfai" in r]
    fr = [r["roof_frac"] for r in results if "roof_frac" in r]
    lz = [r["diffgpu lazy"] / r["diffgpu eager"] for r in results
          if isinstance(r.get("diffgpu lazy"), float) and isinstance(r.get("diffgpu eager"), float)]
    if vs:
        print(f"\nrange over {len(results)} points: {min(vs):.1f}x - {max(vs):.1f}x pyFAI; "
              f"{100 * min(fr):.0f}% - {100 * max(fr):.0f}% of the roofline; lazy threaded "
              f"{100 * min(lz):.0f}% - {100 * max(lz):.0f}% of eager")
    OUT.mkdir(exist_ok=True)
    (OUT / "integration_matrix.json").write_text(json.dumps(results, indent=1))
    if results:
        plot(results, Path(args.figure) if args.figure else OUT / "integration_roofline.png")


if __name__ == "__main__":
    main()
