"""Bragg disks and strain: diffgpu against py4DSTEM's CPU disk detection, same data, same run.

    python benchmarks/bench_strain.py [--nav 24] [--repeat 3] [--py4dstem PYTHON]

Data: a ``nav x nav`` scan of simulated 192 x 192 NBED patterns (about 60 anti-aliased
disks of radius 4 px, Poisson noise at 2e6 electrons per pattern, a known strain field up
to 1 % and a rotation up to 0.3 degrees), made by diffgpu and handed to each tool as a
``.npy`` file. Timed:

* diffgpu ``find_bragg_disks(radius=4)`` then ``get_strain_map`` (disk detection, sub-pixel
  refinement, lattice fits, strain), eager in memory (its own thread per core) and lazy
  (dask's threads; the chunks ``as_lazy()`` gives, diffgpu's; environment variable
  ``BENCH_STRAIN_CHUNK_ROWS=k`` for chunks of ``k`` scan rows instead);
* py4DSTEM ``DataCube.find_Bragg_disks(template=..., CUDA=False)`` with the same disk
  template, its default ``subpixel="multicorr"`` (upsampled DFT, factor 16; slow, so timed
  once on the first ~96 patterns) and ``subpixel="poly"``. Disk detection only: its lattice
  fit and strain are not timed.

py4DSTEM needs NumPy < 2, so it runs in its own virtual environment (``--py4dstem``,
default /work/py4dstem-venv/bin/python); each tool runs in its own process. Also reported:
the RMS error of the disk positions against the simulation's truth, for both tools, and
diffgpu's strain error. GPU rows run when CuPy finds a CUDA device.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, ratio, run_tool, tool_process  # noqa: E402

import numpy as np  # noqa: E402

SHAPE = (192, 192)
RADIUS = 4.0
G1, G2 = (24.0, 2.0), (-5.0, 22.0)
PY4DSTEM = "/work/py4dstem-venv/bin/python"


def make_data(nav, path):
    from diffgpu.synthetic_nbed import synthetic_nbed

    s = synthetic_nbed(nav_shape=(nav, nav), sig_shape=SHAPE, g1=G1, g2=G2, disk_radius=RADIUS,
                       dose=2e6, seed=7)
    np.save(path, s.data)
    md = s.metadata.Synthetic
    np.save(path.replace(".npy", "_truth.npy"), md.positions)
    np.save(path.replace(".npy", "_strain.npy"), np.stack([md.exx, md.eyy, md.exy, md.theta], -1))
    np.save(path.replace(".npy", "_template.npy"), _template())


def _template():
    """The same anti-aliased disk both tools correlate with, centred on the (0, 0) corner."""
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    size = 2 * int(np.ceil(RADIUS)) + 5
    c = size // 2
    x = (np.arange(size) - c)[:, None] + sub[None, :]
    img = ((x[:, None, :, None] ** 2 + x[None, :, None, :] ** 2) <= RADIUS**2).mean(axis=(2, 3))
    full = np.zeros(SHAPE)
    full[:size, :size] = img / img.sum()
    return np.roll(full, (-c, -c), axis=(0, 1))


def timed(out, name, n, func, repeat, warmup=1, sync=None):
    """Patterns/s by wall clock (median) and per CPU-second of this process (median): the
    second is what a shared machine's other load cannot inflate."""
    import time

    for _ in range(warmup):
        func()
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        func()
        if sync:
            sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    out[name] = n / float(np.median(walls))
    out["_cpu " + name] = n / float(np.median(cpus))


def rms_error(found, truth):
    """RMS (x, y) error of found disks matched to true ones within 1 px, and the share found."""
    errs, n_true = [], 0
    for f, t in zip(found, truth):
        f = f[np.all(np.isfinite(f), axis=1)]
        t = t[np.all(np.isfinite(t), axis=1)]
        n_true += len(t)
        if not len(f):
            continue
        d = np.linalg.norm(f[:, None] - t[None], axis=-1)
        j = d.argmin(1)
        ok = d[np.arange(len(f)), j] < 1.0
        errs.append(f[ok] - t[j[ok]])
    e = np.concatenate(errs)
    return float(np.sqrt((e**2).mean())), len(e) / n_true


def tool_diffgpu(data_path, repeat, out):
    import diffgpu

    frames = np.load(data_path)
    nav = frames.shape[:2]
    n = nav[0] * nav[1]
    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = None
    ref = (slice(0, max(1, nav[0] // 5)), slice(0, max(1, nav[1] // 5)))

    def run():
        return s.find_bragg_disks(radius=RADIUS).get_strain_map(reference=ref)

    timed(out, "diffgpu disks + lattice fit + strain (eager)", n, run, repeat)
    timed(out, "diffgpu disks only (eager)", n, lambda: s.find_bragg_disks(radius=RADIUS), repeat)
    lazy = s.as_lazy()  # diffgpu's chunks of whole frames (4 chunks of 8 rows until 2026-12-07)
    if os.environ.get("BENCH_STRAIN_CHUNK_ROWS"):  # to compare with other chunks
        lazy.rechunk(nav_chunks=(int(os.environ["BENCH_STRAIN_CHUNK_ROWS"]), nav[1]))
    out["_lazy_chunks"] = [len(c) for c in lazy.data.chunks[:2]]

    def run_lazy():
        st = lazy.find_bragg_disks(radius=RADIUS).get_strain_map(reference=ref)
        st.compute()
        return st

    timed(out, "diffgpu disks + lattice fit + strain (lazy, dask threads)", n, run_lazy, repeat)
    v = s.find_bragg_disks(radius=RADIUS)
    truth = np.load(data_path.replace(".npy", "_truth.npy")).reshape(n, -1, 2)
    out["_rms"], out["_found"] = rms_error(v.data[..., :2].reshape(n, -1, 2), truth)
    strain = v.get_strain_map(reference=ref)
    true_strain = np.load(data_path.replace(".npy", "_strain.npy"))
    err = (strain.data - true_strain).reshape(-1, 4)
    out["_strain_rms"] = np.sqrt(np.nanmean(err**2, axis=0)).tolist()
    out["_disks_per_frame"] = float(v.n_disks().mean())
    if diffgpu.gpu_available():
        import cupy as cp

        dev = diffgpu.DiffractionPatterns(cp.asarray(frames))
        dev.calibration.center = None

        def run_gpu():
            st = dev.find_bragg_disks(radius=RADIUS).get_strain_map(reference=ref)
            return st

        timed(out, "diffgpu GPU disks + lattice fit + strain (eager, data on the GPU)", n, run_gpu,
              repeat, sync=lambda: cp.cuda.Device().synchronize())


def tool_py4dstem(data_path, repeat, subpixel, out):
    import py4DSTEM

    frames = np.load(data_path)
    if subpixel == "multicorr":  # ~5 patterns/s here: time the first rows only, once
        frames = frames[: max(1, 96 // frames.shape[1])]
        repeat = 1
    nav = frames.shape[:2]
    n = nav[0] * nav[1]
    dc = py4DSTEM.DataCube(frames)
    kernel = np.load(data_path.replace(".npy", "_template.npy"))

    def run():
        return dc.find_Bragg_disks(template=kernel, CUDA=False, corrPower=1, subpixel=subpixel,
                                   upsample_factor=16, minRelativeIntensity=0.005,
                                   minPeakSpacing=RADIUS * 2, edgeBoundary=int(RADIUS) + 1,
                                   maxNumPeaks=128)

    timed(out, f"py4DSTEM find_Bragg_disks (CPU, subpixel={subpixel})", n, run, repeat, warmup=0)
    b = run()
    found = np.full((n, 128, 2), np.nan)
    for i in range(n):
        v = b.raw[i // nav[1], i % nav[1]].data
        found[i, : len(v), 0] = v["qy"]  # py4DSTEM: qx along rows, qy along columns
        found[i, : len(v), 1] = v["qx"]
    truth = np.load(data_path.replace(".npy", "_truth.npy"))[: nav[0]].reshape(n, -1, 2)
    out["_rms"], out["_found"] = rms_error(found, truth)
    out["_patterns"] = n


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--nav", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--py4dstem", default=PY4DSTEM)
    p.add_argument("--tool")
    p.add_argument("--data")
    p.add_argument("--subpixel", default="multicorr")
    args = p.parse_args(argv)
    if args.tool == "diffgpu":
        return tool_process(lambda out: tool_diffgpu(args.data, args.repeat, out))
    if args.tool == "py4dstem":
        return tool_process(lambda out: tool_py4dstem(args.data, args.repeat, args.subpixel, out),
                            gib=1)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "nbed.npy")
        make_data(args.nav, path)
        ours = run_tool(__file__, "diffgpu", ["--data", path, "--repeat", args.repeat])
        peers = {sp: run_tool(__file__, "py4dstem", ["--data", path, "--repeat", args.repeat,
                                                     "--subpixel", sp], python=args.py4dstem)
                 for sp in ("multicorr", "poly")}
    n = args.nav**2
    print(f"\n{machine()}; {n} patterns of {SHAPE[0]} x {SHAPE[1]}, disk radius {RADIUS} px, "
          f"{ours.get('_disks_per_frame', float('nan')):.0f} disks per pattern found by diffgpu; "
          f"lazy chunks along the scan's two axes: {ours.get('_lazy_chunks')}")
    key = "diffgpu disks + lattice fit + strain (eager)"
    base, base_cpu = ours.get(key), ours.get("_cpu " + key)

    def row(name, res, compare):
        return [name, res[name], res["_cpu " + name], ratio(base, res[name]) if compare else "",
                ratio(base_cpu, res["_cpu " + name]) if compare else "", f"{res['_rms']:.4f}"]

    rows = [row(k, ours, False) for k in ours
            if not k.startswith("_") and k != "error"]
    for sp, res in peers.items():
        if "error" in res:
            rows.append([f"py4DSTEM subpixel={sp}", res["error"], "", "", "", ""])
            continue
        rows += [row(k, res, True) for k in res if not k.startswith("_")]
    if "error" in ours:
        rows.append(["diffgpu", ours["error"], "", "", "", ""])
    print_table("Bragg disks (+ strain)", ["", "patterns/s (wall)", "patterns per CPU-second",
                                           "diffgpu (disks + strain) faster, wall",
                                           "faster, per CPU-second",
                                           "disk position RMS error (px)"], rows)
    if "_strain_rms" in ours:
        e = ours["_strain_rms"]
        print(f"\ndiffgpu strain RMS error vs truth: exx {e[0]:.1e}, eyy {e[1]:.1e}, "
              f"exy {e[2]:.1e}, theta {e[3]:.4f} deg; disks found: diffgpu "
              f"{100 * ours['_found']:.0f} %, py4DSTEM "
              + ", ".join(f"{sp} {100 * r.get('_found', float('nan')):.0f} %"
                          for sp, r in peers.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
