"""From detector files: diffgpu against LiberTEM 0.16 on the same Merlin .mib and HDF5 files.

    python benchmarks/bench_files.py                  # 128 x 128 scan of 256 x 256 U16: 2.15 GB
    python benchmarks/bench_files.py --large          # 480 x 480 scan: 30.3 GB (then deleted)
    python benchmarks/bench_files.py --dir /big/disk --keep

Writes a Merlin ``.mib`` (with its ``.hdr``) by the format's documented layout, big-endian
uint16 frames of 256 x 256 from :func:`diffgpu.data.synthetic_4dstem` (Poisson counts; 512
distinct frames repeated), and the same scan as an HDF5 file compressed the way Dectris
Arina/EIGER detectors write (bitshuffle + LZ4 through ``hdf5plugin``, one frame per chunk,
dataset ``entry/data/data``). Then, each tool in its own process (``_common.run_tool``):

- ``read``: a plain sequential read of the ``.mib`` file (64 MiB ``readinto`` a reused
  buffer): the rate at which the file can be read at all;
- ``diffgpu``: virtual imaging (a disc and an annulus), centre of mass, 1D (100 bins) and
  2D (100 x 360) azimuthal integration lazily from the ``.mib``; the first three together
  in one graph (one read of the file); virtual imaging and centre of mass from the HDF5;
- ``diffgpu-memory``: the same integration on the same frames already in memory (the first
  4,096 frames, native uint16), eagerly and through dask;
- ``libertem``: LiberTEM 0.16, ``Context.make_with("threads", cpus=2)``, its mask analysis
  (the same two detectors) and centre-of-mass analysis, on the ``.mib`` and the HDF5.

Integration results are computed chunk by chunk and dropped (one number kept per chunk), not
gathered into memory. Times are medians of ``--repeat`` runs after a warm-up run on two scan
rows, page cache warm (the files were
just written or read, and fit in memory) unless ``--cold`` evicts the file from the page
cache (``posix_fadvise(DONTNEED)``) before every run. For the large file, which does not
fit in memory, every run reads from disk whatever the setting. Peak anonymous and
file-backed memory (``RssAnon``, ``RssFile`` of ``/proc/self/status``, sampled every 5 ms
during the timed runs) are given per tool, above what the process held before.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_tool, tool_process  # noqa: E402

import numpy as np  # noqa: E402

SIG = (256, 256)
CENTER = (127.5, 127.5)
DISC = 20.0
ANNULUS = (40.0, 100.0)
ORIENTATION_ROWS = 16  # scan rows for orientation mapping (see main_job)


# -- measuring ---------------------------------------------------------------------------------

def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Peak RssAnon / RssFile above the level at entry, sampled in a thread."""

    def __enter__(self):
        self.base = _status()
        self.peak = dict(self.base)
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop:
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    def gib(self):
        return {k: (self.peak[k] - self.base[k]) / 2**30 for k in self.base}


def evict(path):
    """Drop ``path`` from the page cache (clean pages only: the file was written and synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Seconds(float):
    """Wall seconds, with the process's CPU seconds of the same runs in ``.cpu``."""


def timed(func, repeat, cold_path=None, warmup=None):
    """Median seconds of ``func()`` over ``repeat`` runs after a warm-up run (of ``warmup``,
    e.g. the same work on a few frames, where given); ``.cpu``: median CPU seconds of this
    process (all its threads). On a shared machine the CPU time says how much work a tool
    did whatever share of the cores it got."""
    (warmup or func)()
    times, cpu = [], []
    for _ in range(repeat):
        if cold_path:
            for p in np.atleast_1d(cold_path):
                evict(str(p))
        c0 = time.process_time()
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = Seconds(np.median(times))
    out.cpu = float(np.median(cpu))
    return out


def with_cpu(body):
    """The tool's results plus ``<key>_cpu`` for every timing that has CPU seconds."""
    def wrapped(out):
        body(out)
        for key, value in list(out.items()):
            if isinstance(value, Seconds):
                out[key + "_cpu"] = value.cpu
    return wrapped


def computed(*xs):
    """``dask.compute(*xs)`` as a diffgpu signal's ``compute()`` runs it (one BLAS thread per
    dask thread)."""
    import dask

    from diffgpu.device import blas_for_dask

    with blas_for_dask(xs[0]):
        out = dask.compute(*xs)
    return out[0] if len(xs) == 1 else out


def sink(x):
    """Compute a lazy result keeping one number per chunk: the work is done, the (large)
    output is not gathered into memory (2D integration of 230,400 frames would be 33 GB). The
    number is copied: a view would keep its whole block alive."""
    keep = tuple((1,) * len(c) for c in x.chunks)
    return computed(x.map_blocks(lambda b: b.reshape(-1)[:1].reshape((1,) * b.ndim).copy(),
                                 chunks=keep, dtype=x.dtype))


def _masks():
    yy, xx = np.mgrid[:SIG[0], :SIG[1]]
    r = np.hypot(xx - CENTER[0], yy - CENTER[1])
    return (r <= DISC).astype(np.float32), ((r >= ANNULUS[0]) & (r <= ANNULUS[1])).astype(np.float32)


# -- writing the files -------------------------------------------------------------------------

def write_files(folder, nav, with_h5=True):
    import diffgpu
    from diffgpu.readers.mib import write_mib

    mib = os.path.join(folder, "scan.mib")
    h5 = os.path.join(folder, "scan.h5")
    n = math.prod(nav)
    distinct = min(512, n)
    side = int(math.sqrt(distinct))
    frames = diffgpu.data.synthetic_4dstem(nav_shape=(distinct // side, side), sig_shape=SIG,
                                           noise=True, lazy=False, seed=1).data
    frames = np.asarray(frames).reshape(-1, *SIG)

    class Cycle:  # frame i of the scan = distinct frame i % 512, without building the scan
        shape = tuple(nav) + SIG
        dtype = frames.dtype

        def reshape(self, shape):
            return self

        def __getitem__(self, sl):
            idx = np.arange(sl.start, sl.stop) % len(frames)
            return frames[idx]

    t0 = time.perf_counter()
    write_mib(mib, Cycle(), depth="U16", frames_per_write=1024)
    t_mib = time.perf_counter() - t0
    t_h5 = None
    if with_h5:
        import h5py
        import hdf5plugin

        t0 = time.perf_counter()
        with h5py.File(h5, "w") as f:
            d = f.create_dataset("entry/data/data", shape=(n,) + SIG, dtype="uint16",
                                 chunks=(1,) + SIG, **hdf5plugin.Bitshuffle(cname="lz4"))
            for start in range(0, n, 1024):
                stop = min(n, start + 1024)
                d[start:stop] = Cycle()[slice(start, stop)]
        t_h5 = time.perf_counter() - t0
    return mib, (h5 if with_h5 else None), t_mib, t_h5


# -- the main job, step by step ----------------------------------------------------------------

def _library():
    import diffgpu

    return diffgpu.TemplateLibrary.from_phase(diffgpu.TemplateLibrary.silicon(), resolution=1.0,
                                              reciprocal_radius=1.2)


def main_job(rois):
    """Every step of the main job as ``{name: job(signal)}``, each computed chunk by chunk
    (results larger than the scan's few numbers per frame are dropped as they come).

    ``beam``: the direct beam's position per frame; ``centre``: the frames shifted to put it
    at the centre; ``orientation``: 2D integration (64 x 360 bins, the signal axes taken as
    0.01 1/Å per pixel) and template matching against 1,081 Si templates, on the first
    ``ORIENTATION_ROWS`` scan rows. The frames are not Si patterns: rings and a disc, which
    every template matches about as well, so the exact search correlates most templates
    fully and runs ~10x slower than on spot patterns (~100-300 frames/s); the whole
    30 GB scan would take most of an hour. Each is computed as a signal's ``compute()``
    runs it (:func:`computed`).
    """
    library = []

    def beam(s):
        return computed(s.get_direct_beam_position(method="center_of_mass").data)

    def centre(s):
        return sink(s.center_direct_beam(method="center_of_mass").data)

    def orientation(s):
        if not library:
            library.append(_library())
        s = s.inav[:, :ORIENTATION_ROWS]
        cal = s.calibration
        scale, units = cal.scale, cal.units
        cal.scale, cal.units = 0.01, "1/Å"  # the graph takes the geometry as it is now
        try:
            polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, 1.28),
                                               mean=True)
        finally:
            cal.scale, cal.units = scale, units
        return computed(polar.get_orientation(library[0]).data)

    return {
        "virtual": lambda s: computed(s.get_virtual_image(rois).data),
        "com": lambda s: computed(s.center_of_mass().data),
        "int1d": lambda s: sink(s.get_azimuthal_integral1d(npt=100).data),
        "int2d": lambda s: sink(s.get_azimuthal_integral2d(npt=100, npt_azim=360).data),
        "together": lambda s: computed(s.get_virtual_image(rois).data,
                                       s.center_of_mass().data,
                                       s.get_azimuthal_integral1d(npt=100).data),
        "beam": beam,
        "centre": centre,
        "orientation": orientation,
    }


# -- tools -------------------------------------------------------------------------------------

def tool_read(args):
    def body(out):
        buf = bytearray(64 * 2**20)
        view = memoryview(buf)

        def read():
            with open(args.mib, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass

        with PeakMemory() as mem:
            t = timed(read, args.repeat, args.mib if args.cold else None)
        out.update(seconds=t, gbps=os.path.getsize(args.mib) / t / 1e9, mem=mem.gib())
    return body


def tool_diffgpu(args):
    def body(out):
        import hyperspy.api as hs

        import diffgpu

        nav = tuple(args.nav)
        cold = args.mib if args.cold else None
        s = diffgpu.load(args.mib, lazy=True)
        assert s.data.shape[:2] == nav, s.data.shape
        s.calibration.center = CENTER
        rois = [hs.roi.CircleROI(cx=0, cy=0, r=DISC),
                hs.roi.CircleROI(cx=0, cy=0, r=ANNULUS[1], r_inner=ANNULUS[0])]
        out["chunks"] = f"{s.data.chunksize} x {s.data.npartitions}"
        from diffgpu.mapping import stored_regions
        from diffgpu.sources import stored_frames

        stored = stored_frames(s.data)
        if stored is not None:  # frame-wise operations read this array in place, by regions
            regions = stored_regions(stored)[1]
            out["regions"] = (f"{tuple(max(c) for c in regions)} frames x "
                              f"{int(np.prod([len(c) for c in regions]))}")

        def jobs(s):
            return {name: (lambda job=job: job(s)) for name, job in main_job(rois).items()}

        small = jobs(s.inav[:, :2])  # warm-up (imports, compilation) on two scan rows
        with PeakMemory() as mem:
            for name, job in jobs(s).items():
                if name in args.skip:
                    continue
                out[name] = timed(job, args.repeat, cold, small[name])
        out["mem"] = mem.gib()
        if args.h5:
            h = diffgpu.load(args.h5, lazy=True)
            h.calibration.center = CENTER
            cold_h5 = args.h5 if args.cold else None
            h2 = h.inav[:, :2]
            with PeakMemory() as mem:
                out["h5_virtual"] = timed(lambda: computed(h.get_virtual_image(rois).data),
                                          args.repeat, cold_h5,
                                          lambda: computed(h2.get_virtual_image(rois).data))
                out["h5_com"] = timed(lambda: computed(h.center_of_mass().data), args.repeat, cold_h5,
                                      lambda: computed(h2.center_of_mass().data))
            out["h5_mem"] = mem.gib()
            out["h5_chunks"] = f"{h.data.chunksize} x {h.data.npartitions}"
    return body


def tool_diffgpu_memory(args):
    def body(out):
        import dask.array as da

        import diffgpu

        s = diffgpu.load(args.mib, lazy=True)
        frames = s.data.reshape((-1,) + SIG)[:4096].compute()  # native uint16, in memory
        out["frames"] = len(frames)
        m = diffgpu.DiffractionPatterns(frames)
        m.calibration.center = CENTER
        out["int1d"] = timed(lambda: m.get_azimuthal_integral1d(npt=100), args.repeat)
        out["int2d"] = timed(lambda: m.get_azimuthal_integral2d(npt=100, npt_azim=360), args.repeat)
        # the same frames in memory through the lazy path (dask chunks as from the file)
        lazy = diffgpu.DiffractionPatterns(da.from_array(frames, chunks=(256,) + SIG)).as_lazy()
        lazy.calibration.center = CENTER
        out["lazy_int1d"] = timed(lambda: sink(lazy.get_azimuthal_integral1d(npt=100).data), args.repeat)
        out["lazy_int2d"] = timed(
            lambda: sink(lazy.get_azimuthal_integral2d(npt=100, npt_azim=360).data), args.repeat)
    return body


def tool_libertem(args):
    def body(out):
        import hdf5plugin  # noqa: F401  (bitshuffle for the HDF5 file)
        from libertem.api import Context

        nav = tuple(args.nav)
        disc, annulus = _masks()
        with Context.make_with("threads", cpus=2) as ctx:
            ds = ctx.load("mib", path=args.mib, nav_shape=nav)
            masks = ctx.create_mask_analysis(factories=[lambda: disc, lambda: annulus], dataset=ds)
            com = ctx.create_com_analysis(dataset=ds, cx=CENTER[0], cy=CENTER[1])
            cold = args.mib if args.cold else None
            few = np.zeros(nav, dtype=bool)
            few[:2] = True  # warm-up on two scan rows
            with PeakMemory() as mem:
                out["virtual"] = timed(lambda: ctx.run(masks), args.repeat, cold,
                                       lambda: ctx.run(masks, roi=few))
                out["com"] = timed(lambda: ctx.run(com), args.repeat, cold, lambda: ctx.run(com, roi=few))
            out["mem"] = mem.gib()
            if args.h5:
                dh = ctx.load("hdf5", path=args.h5, ds_path="entry/data/data", nav_shape=nav)
                m5 = ctx.create_mask_analysis(factories=[lambda: disc, lambda: annulus], dataset=dh)
                c5 = ctx.create_com_analysis(dataset=dh, cx=CENTER[0], cy=CENTER[1])
                cold_h5 = args.h5 if args.cold else None
                with PeakMemory() as mem:
                    out["h5_virtual"] = timed(lambda: ctx.run(m5), args.repeat, cold_h5,
                                              lambda: ctx.run(m5, roi=few))
                    out["h5_com"] = timed(lambda: ctx.run(c5), args.repeat, cold_h5,
                                          lambda: ctx.run(c5, roi=few))
                out["h5_mem"] = mem.gib()
    return body


def tool_cluster(args):
    """diffgpu on a 2-worker distributed LocalCluster with 2 GiB per worker: throughput, each
    worker's peak memory, and whether any worker was paused or restarted for memory."""
    def body(out):
        import hyperspy.api as hs
        from distributed import Client, LocalCluster

        import diffgpu

        def worker_peak(dask_worker=None):
            return _status()

        with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            workers = sorted(client.scheduler_info()["workers"])
            s = diffgpu.load(args.mib, lazy=True)
            s.calibration.center = CENTER
            rois = [hs.roi.CircleROI(cx=0, cy=0, r=DISC),
                    hs.roi.CircleROI(cx=0, cy=0, r=ANNULUS[1], r_inner=ANNULUS[0])]
            few = s.inav[:, :2]
            peaks = {}
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    for w, st in client.run(worker_peak).items():
                        old = peaks.get(w, {"RssAnon": 0, "RssFile": 0})
                        peaks[w] = {k: max(old[k], st[k]) for k in old}
                    time.sleep(0.2)

            jobs = {k: v for k, v in main_job(rois).items() if k != "com"}
            t = threading.Thread(target=watch, daemon=True)
            t.start()
            for name, job in jobs.items():
                if name in args.skip:
                    continue
                out[name] = timed(lambda: job(s), args.repeat, args.mib if args.cold else None,
                                  lambda: job(few))
            stop.set()
            t.join()
            logs = "\n".join(line for _, lines in client.get_worker_logs().items()
                             for _, line in lines)
            out["paused"] = logs.count("Pausing worker")
            out["restarted"] = int(sorted(client.scheduler_info()["workers"]) != workers)
            out["worker_mem"] = {k: max(p[k] for p in peaks.values()) / 2**30
                                 for k in ("RssAnon", "RssFile")} if peaks else {}
    return body


def cli_runs(mib, folder, interrupt_after=8.0):
    """``diffgpu virtual`` on the file: a full run, a run interrupted after ``interrupt_after``
    seconds (SIGINT) and its restart; peak RSS of each, no output left by the interrupted
    run, identical results."""
    import resource
    import signal
    import subprocess

    import diffgpu

    exe = [sys.executable, "-m", "diffgpu", "virtual", mib, "--disc", str(DISC),
           "--annulus", str(ANNULUS[0]), str(ANNULUS[1]), "--center", *map(str, CENTER),
           "--no-progress", "--overwrite"]
    rows = []

    def run(out, stop_after=None):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.Popen(exe + ["-o", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if stop_after:
            try:
                proc.wait(stop_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return proc.returncode, time.perf_counter() - t0, peak / 2**20 if peak > before else None, err

    out1 = os.path.join(folder, "vi_full.zspy")
    out2 = os.path.join(folder, "vi_restarted.zspy")
    code, t, peak, err = run(out1)
    rows.append(["full run", code, f"{t:.0f} s", f"{peak:.2f}" if peak else "(below an earlier run)"])
    code, t, _, err = run(out2, interrupt_after)
    left = [p for p in os.listdir(folder) if p.startswith(".vi_restarted") or p == "vi_restarted.zspy"]
    rows.append([f"interrupted after {interrupt_after:.0f} s (SIGINT)", code, f"{t:.0f} s",
                 f"output left: {left or 'none'}"])
    code, t, peak, err = run(out2)
    same = (code == 0 and np.array_equal(diffgpu.load(out1, lazy=False).data,
                                         diffgpu.load(out2, lazy=False).data))
    rows.append(["started again", code, f"{t:.0f} s", f"identical to the full run: {same}"])
    print_table("diffgpu virtual on the file (batch command, atomic output)",
                ["run", "exit code", "time", "peak RSS (GiB) / check"], rows)


TOOLS = {"read": tool_read, "diffgpu": tool_diffgpu, "diffgpu-memory": tool_diffgpu_memory,
         "libertem": tool_libertem, "diffgpu-cluster": tool_cluster}


# -- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=sorted(TOOLS))
    ap.add_argument("--nav", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"))
    ap.add_argument("--large", action="store_true", help="480 x 480 frames: a 30.3 GB .mib")
    ap.add_argument("--dir", help="folder for the files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--no-h5", action="store_true", help="skip the HDF5 file")
    ap.add_argument("--cold", action="store_true", help="evict the file from the page cache "
                                                        "before every timed run")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default 3; 1 with --large)")
    ap.add_argument("--tools", default="read,diffgpu,diffgpu-memory,libertem")
    ap.add_argument("--skip", default="", help="diffgpu jobs to skip, comma separated")
    ap.add_argument("--cli", action="store_true", help="also run `diffgpu virtual` on the file: "
                                                       "full, interrupted, restarted")
    ap.add_argument("--mib")
    ap.add_argument("--h5")
    args = ap.parse_args()
    args.skip = [s for s in args.skip.split(",") if s]
    if args.nav is None:
        args.nav = (480, 480) if args.large else (128, 128)
    if args.repeat is None:
        args.repeat = 1 if args.large else 3
    if args.tool:
        tool_process(with_cpu(TOOLS[args.tool](args)), gib=1)
        return

    folder = args.dir or tempfile.mkdtemp(prefix="bench_files_")
    os.makedirs(folder, exist_ok=True)
    nav = tuple(args.nav)
    n = math.prod(nav)
    try:
        if args.mib:
            mib, h5, t_mib, t_h5 = args.mib, args.h5, None, None
        else:
            mib, h5, t_mib, t_h5 = write_files(folder, nav, with_h5=not args.no_h5 and not args.large)
        size = os.path.getsize(mib)
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        warm = "cold (evicted before every run)" if args.cold else (
            "warm (the file fits in memory and was just written/read)" if size < 0.6 * mem_total
            else "cold: the file is larger than what the page cache can hold")
        print(f"machine: {machine()}, {mem_total / 2**30:.0f} GiB memory; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"files: {mib} {size / 1e9:.2f} GB ({nav[0]} x {nav[1]} frames of 256 x 256 U16)"
              + (f", written in {t_mib:.0f} s" if t_mib else "")
              + (f"; {h5} {os.path.getsize(h5) / 1e9:.2f} GB bitshuffle-LZ4" if h5 else "")
              + (f", written in {t_h5:.0f} s" if t_h5 else ""))
        print(f"page cache: {warm}; medians of {args.repeat} runs after a warm-up run on two scan rows")
        argv = ["--mib", mib, "--nav", *nav, "--repeat", args.repeat]
        argv += ["--h5", h5] if h5 else []
        argv += ["--cold"] if args.cold else []
        argv += ["--skip", ",".join(args.skip)] if args.skip else []
        results = {}
        for tool in args.tools.split(","):
            t0 = time.perf_counter()
            results[tool] = run_tool(__file__, tool, argv)
            print(f"  {tool}: {time.perf_counter() - t0:.0f} s {results[tool].get('error', '')}")
            print("    " + json.dumps(results[tool]))  # the raw figures, as they come
            sys.stdout.flush()
        report(results, n, size, nav)
        if args.cli:
            cli_runs(mib, folder)
    finally:
        if not args.keep and not args.mib:
            if args.dir:  # a folder of the user's: remove only what this script wrote
                for name in ("scan.mib", "scan.hdr", "scan.h5", "vi_full.zspy", "vi_restarted.zspy"):
                    p = os.path.join(folder, name)
                    shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
            else:
                shutil.rmtree(folder, ignore_errors=True)


def report(r, n, size, nav):
    def rate(tool, key):
        v = r.get(tool, {}).get(key)
        frames = n if key != "orientation" else min(nav[0], ORIENTATION_ROWS) * nav[1]
        return frames / v if isinstance(v, float) else None

    def fmt(v):
        return f"{v:,.0f}" if isinstance(v, float) else "n/a"

    def ratio(a, b):
        return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "n/a"

    read = rate("read", "seconds")
    rows = []
    keys = [("virtual imaging, 2 detectors, .mib", "virtual"), ("centre of mass, .mib", "com"),
            ("virtual imaging, 2 detectors, HDF5 bitshuffle-LZ4", "h5_virtual"),
            ("centre of mass, HDF5 bitshuffle-LZ4", "h5_com")]
    for label, key in keys:
        d, lt = rate("diffgpu", key), rate("libertem", key)
        dc, lc = rate("diffgpu", key + "_cpu"), rate("libertem", key + "_cpu")
        if d or lt:
            rows.append([label, fmt(d), fmt(lt), ratio(d, lt), f"{fmt(dc)} / {fmt(lc)}", ratio(dc, lc)])
    print_table(f"From files: diffgpu vs LiberTEM 0.16 ({nav[0]} x {nav[1]} frames, {size / 1e9:.2f} GB; "
                "frames/s)", ["", "diffgpu", "LiberTEM (threads, 2 CPUs)", "diffgpu / LiberTEM",
                              "frames per CPU-second, diffgpu / LiberTEM", "ratio per CPU-second"],
                rows)

    rows = [["plain sequential read of the .mib", fmt(read),
             f"{r['read']['gbps']:.2f} GB/s" if "gbps" in r.get("read", {}) else "n/a", ""]]
    mem = r.get("diffgpu-memory", {})
    m_frac = mem.get("frames", 0) / n if mem.get("frames") else None
    for label, key in [("1D integration, 100 bins", "int1d"), ("2D integration, 100 x 360", "int2d")]:
        d = rate("diffgpu", key)
        inmem = n * m_frac / mem[key] if key in mem else None
        lazy_mem = n * m_frac / mem["lazy_" + key] if "lazy_" + key in mem else None
        rows.append([f"{label} from the .mib", fmt(d),
                     f"in memory: {fmt(inmem)} eager, {fmt(lazy_mem)} lazy",
                     f"{ratio(d, inmem)} of in-memory eager, {ratio(d, lazy_mem)} of lazy, "
                     f"{ratio(d, read)} of the read rate"])
    t = rate("diffgpu", "together")
    parts = [r.get("diffgpu", {}).get(k) for k in ("virtual", "com", "int1d")]
    separate = sum(parts) if all(isinstance(p, float) for p in parts) else None
    rows.append(["virtual images + centre of mass + 1D profile in one graph (one read)", fmt(t),
                 f"separately: {separate:.1f} s" if separate else "n/a",
                 f"{r['diffgpu']['together']:.1f} s together" if "together" in r.get("diffgpu", {})
                 else ""])
    for label, key in [("direct beam positions (centre of mass)", "beam"),
                       ("frames centred on the beam (shifted, dropped as they come)", "centre"),
                       (f"orientation mapping: 2D integration 64 x 360 + 1,081 templates "
                        f"(first {ORIENTATION_ROWS} scan rows)", "orientation")]:
        d = rate("diffgpu", key)
        if d:
            rows.append([label, fmt(d), "", f"{ratio(d, read)} of the read rate"])
    print_table("diffgpu from the .mib: integration against the read rate and in-memory (frames/s)",
                ["", "frames/s", "reference", "ratio"], rows)

    rows = []
    for tool, keys in [("read", ["mem"]), ("diffgpu", ["mem", "h5_mem"]), ("libertem", ["mem", "h5_mem"])]:
        for k in keys:
            m = r.get(tool, {}).get(k)
            if m:
                rows.append([f"{tool}{' (HDF5)' if k == 'h5_mem' else ''}", f"{m['RssAnon']:.2f}",
                             f"{m['RssFile']:.2f}"])
    print_table("Peak memory above the process's level before the timed runs (GiB)",
                ["tool", "anonymous (RssAnon)", "file-backed (RssFile)"], rows)
    c = r.get("diffgpu-cluster", {})
    if c and "error" not in c:
        rows = [[label, fmt(rate("diffgpu-cluster", key))] for label, key in
                [("virtual imaging, 2 detectors", "virtual"), ("1D integration", "int1d"),
                 ("2D integration", "int2d"), ("virtual + centre of mass + 1D, one graph", "together"),
                 ("direct beam positions", "beam"), ("frames centred on the beam", "centre"),
                 ("orientation mapping (2D integration + 1,081 templates)", "orientation")]
                if key in c]
        wm = c.get("worker_mem", {})
        rows.append(["largest worker peak RssAnon / RssFile (GiB, absolute)",
                     f"{wm.get('RssAnon', float('nan')):.2f} / {wm.get('RssFile', float('nan')):.2f}"])
        rows.append(["workers paused for memory / restarted", f"{c.get('paused')} / {c.get('restarted')}"])
        print_table("diffgpu on a LocalCluster: 2 workers x 1 thread, 2 GiB each (frames/s)",
                    ["", "diffgpu"], rows)
    elif c:
        print(f"\ndiffgpu-cluster: {c['error']}")
    if "chunks" in r.get("diffgpu", {}):
        print(f"\ndiffgpu chunks: .mib {r['diffgpu']['chunks']}"
              + (f" (read in place by scan regions of {r['diffgpu']['regions']})"
                 if "regions" in r["diffgpu"] else "")
              + (f"; HDF5 {r['diffgpu']['h5_chunks']}" if "h5_chunks" in r["diffgpu"] else ""))


if __name__ == "__main__":
    main()
