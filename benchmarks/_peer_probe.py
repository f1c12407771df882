"""Probe / characterise peer azimuthal-integration tools (pyFAI, pyxem).

Standalone: run with the benchmark venv, e.g.

    /work/benchvenv/bin/python benchmarks/_peer_probe.py [--runs 3] [--nav 32]

Each tool runs in its own subprocess (``--tool pyfai`` / ``--tool pyxem``),
which prints one JSON line; the parent prints a table.

Conventions used here (pixel units, "pixel-centre-at-integer-index"):
  pixel (row i, col j) has centre at x = j, y = i; centre given as (cx, cy).
  pyFAI  : pixel centre at (i+0.5)*pixel_size  ->  poni1 = (cy+0.5)*p,  poni2 = (cx+0.5)*p
           with p = 1e-3 m (1 mm) the radial unit "r_mm" equals pixels.
  pyxem  : s.calibration.center = [cx, cy]  (x=columns first), scale 1 -> radius in pixels.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before importing pyFAI / numba

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

CX, CY = 130.3, 121.7  # centre in pixels (x = column, y = row)
SHAPE = (256, 256)
NPT_RAD, NPT_AZIM = 100, 360
PIX_M = 1e-3  # pyFAI pixel size in metres -> r_mm == pixels


def make_data(nav=32, seed=0):
    """(nav, nav, 256, 256) float32: random Gaussian rings about (CX, CY) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(SHAPE, dtype=np.float32)
    r = np.hypot(xx - CX, yy - CY)
    out = np.empty((nav, nav) + SHAPE, dtype=np.float32)
    radii = np.array([18.0, 41.0, 67.0, 93.0], dtype=np.float32)
    for a in range(nav):
        amps = rng.uniform(50, 200, size=(nav, radii.size)).astype(np.float32)
        for b in range(nav):
            img = 20.0 * np.exp(-r / 60.0)
            for rad, amp in zip(radii + rng.normal(0, 0.5, radii.size), amps[b]):
                img += amp * np.exp(-0.5 * ((r - rad) / 2.0) ** 2)
            out[a, b] = img
    out += rng.normal(0, 5.0, out.shape).astype(np.float32)
    return out


def spot_image(dx, dy):
    """A single Gaussian spot displaced (dx, dy) pixels from the centre (+x right, +y down)."""
    yy, xx = np.indices(SHAPE, dtype=np.float64)
    return np.exp(-0.5 * (((xx - CX - dx) ** 2 + (yy - CY - dy) ** 2) / 1.5**2)).astype(np.float32)


SPOTS = {"+x(right)": (30, 0), "+y(down,row+)": (0, 30), "-y(up,row-)": (0, -30)}


def med_rate(fn, nframes, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return nframes / statistics.median(ts), ts


# ---------------------------------------------------------------- pyFAI
def make_pyfai_ai():
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    from pyFAI.detectors import Detector

    det = Detector(pixel1=PIX_M, pixel2=PIX_M, max_shape=SHAPE)
    # dist is irrelevant for r_mm at zero tilt; keep solid angle correction off.
    ai = AzimuthalIntegrator(dist=1.0, poni1=(CY + 0.5) * PIX_M,
                             poni2=(CX + 0.5) * PIX_M, detector=det)
    return ai


def run_pyfai(data, runs):
    import pyFAI

    ai = make_pyfai_ai()
    method = ("full", "csr", "cython")
    kw = dict(unit="r_mm", method=method, correctSolidAngle=False,
              polarization_factor=None)
    frames = data.reshape((-1,) + SHAPE)
    res = {"version": pyFAI.version, "orientation": int(ai.detector.orientation)}

    t0 = time.perf_counter()
    r2 = ai.integrate2d_ng(frames[0], NPT_RAD, NPT_AZIM, **kw)
    res["int2d_warmup_s"] = time.perf_counter() - t0
    res["int2d_shape"] = list(r2.intensity.shape)
    res["radial_first_last"] = [float(r2.radial[0]), float(r2.radial[-1])]
    res["chi_first_last"] = [float(r2.azimuthal[0]), float(r2.azimuthal[-1])]

    def loop2d():
        for f in frames:
            ai.integrate2d_ng(f, NPT_RAD, NPT_AZIM, **kw)

    res["int2d_fps"], res["int2d_times"] = med_rate(loop2d, len(frames), runs)

    t0 = time.perf_counter()
    r1 = ai.integrate1d_ng(frames[0], NPT_RAD, **kw)
    res["int1d_warmup_s"] = time.perf_counter() - t0
    res["int1d_radial_first_last"] = [float(r1.radial[0]), float(r1.radial[-1])]

    def loop1d():
        for f in frames:
            ai.integrate1d_ng(f, NPT_RAD, **kw)

    res["int1d_fps"], res["int1d_times"] = med_rate(loop1d, len(frames), runs)

    # conventions: where does a spot displaced along +x / +y land in chi?
    conv = {}
    for name, (dx, dy) in SPOTS.items():
        rr = ai.integrate2d_ng(spot_image(dx, dy), NPT_RAD, NPT_AZIM, **kw)
        ia, ir = np.unravel_index(np.argmax(rr.intensity), rr.intensity.shape)
        conv[name] = {"chi_deg": float(rr.azimuthal[ia]), "r": float(rr.radial[ir])}
    res["spot_chi"] = conv
    # pixel-centre check: chiArray/rArray at pixel (row=int(CY), col=int(CX)+10)
    rarr = ai.array_from_unit(shape=SHAPE, typ="center", unit="r_mm", scale=True)
    res["r_at_pixel(row=0,col=0)"] = float(rarr[0, 0])
    res["expected_hypot(CX,CY)"] = float(np.hypot(CX, CY))
    return res


# ---------------------------------------------------------------- pyxem
def make_pyxem_signal(data, lazy=False):
    import pyxem  # noqa: F401
    import hyperspy.api as hs

    s = hs.signals.Signal2D(data)
    s.set_signal_type("electron_diffraction")  # -> pyxem ElectronDiffraction2D
    if lazy:
        s = s.as_lazy()
    s.calibration.scale = 1.0           # 1 "unit" per pixel (flat Ewald sphere)
    s.calibration.center = [CX, CY]     # pixels, x (columns) first
    return s


def run_pyxem(data, runs):
    import pyxem
    import hyperspy

    res = {"version": pyxem.__version__, "hyperspy": hyperspy.__version__}
    nf = data.shape[0] * data.shape[1]
    s = make_pyxem_signal(data)
    res["class"] = type(s).__name__
    res["calibration.center"] = [float(c) for c in s.calibration.center]
    res["signal_axes"] = [(a.name, a.scale, a.offset, a.units)
                          for a in s.axes_manager.signal_axes]

    # warm-up (numba JIT compile) on a small sub-stack
    small = make_pyxem_signal(data[:1, :2])
    t0 = time.perf_counter()
    small.get_azimuthal_integral2d(npt=NPT_RAD, npt_azim=NPT_AZIM, show_progressbar=False)
    small.get_azimuthal_integral1d(npt=NPT_RAD, show_progressbar=False)
    res["warmup_jit_s"] = time.perf_counter() - t0

    # setup only (slices / factors), to separate from per-frame cost
    t0 = time.perf_counter()
    s.calibration.get_slices2d(NPT_RAD, NPT_AZIM)
    res["setup2d_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.calibration.get_slices1d(NPT_RAD)
    res["setup1d_s"] = time.perf_counter() - t0

    out = {}

    def f2d():
        out["p"] = s.get_azimuthal_integral2d(npt=NPT_RAD, npt_azim=NPT_AZIM,
                                              show_progressbar=False)

    res["int2d_fps"], res["int2d_times"] = med_rate(f2d, nf, runs)
    p = out["p"]
    res["int2d_class"] = type(p).__name__
    res["int2d_data_shape"] = list(p.data.shape)
    res["int2d_axes"] = [(a.name, a.units, round(a.offset, 6), round(a.scale, 6), a.size)
                         for a in p.axes_manager.signal_axes]

    def f1d():
        out["q"] = s.get_azimuthal_integral1d(npt=NPT_RAD, show_progressbar=False)

    res["int1d_fps"], res["int1d_times"] = med_rate(f1d, nf, runs)
    q = out["q"]
    res["int1d_class"] = type(q).__name__
    res["int1d_axes"] = [(a.name, a.units, round(a.offset, 6), round(a.scale, 6), a.size)
                         for a in q.axes_manager.signal_axes]

    # lazy variant (dask, default threaded scheduler), including compute
    sl = make_pyxem_signal(data, lazy=True)
    sl.rechunk(nav_chunks=(8, 8))

    def f2d_lazy():
        sl.get_azimuthal_integral2d(npt=NPT_RAD, npt_azim=NPT_AZIM,
                                    show_progressbar=False).compute(show_progressbar=False)

    res["int2d_lazy_fps"], res["int2d_lazy_times"] = med_rate(f2d_lazy, nf, runs)

    def f1d_lazy():
        sl.get_azimuthal_integral1d(npt=NPT_RAD, show_progressbar=False).compute(
            show_progressbar=False)

    res["int1d_lazy_fps"], res["int1d_lazy_times"] = med_rate(f1d_lazy, nf, runs)

    # conventions: spot displaced along +x / +y
    conv = {}
    for name, (dx, dy) in SPOTS.items():
        sp = make_pyxem_signal(spot_image(dx, dy)[None, None])
        pp = sp.get_azimuthal_integral2d(npt=NPT_RAD, npt_azim=NPT_AZIM,
                                         show_progressbar=False)
        ir, ia = np.unravel_index(np.argmax(pp.data[0, 0]), pp.data.shape[-2:])
        rax, tax = pp.axes_manager.signal_axes  # (azimuth, radius) in hyperspy x,y order
        conv[name] = {"azim_deg": float(np.degrees(tax.axis[ia] if tax.name == "Radians" else rax.axis[ia])),
                      "r": float((rax if rax.name == "Radius" else tax).axis[ir])}
    res["spot_azim"] = conv

    # agreement with pyFAI (mean-normalised 1D profile) on frame 0
    try:
        ai = make_pyfai_ai()
        r1 = ai.integrate1d_ng(data[0, 0], NPT_RAD, unit="r_mm",
                               method=("full", "csr", "cython"),
                               correctSolidAngle=False,
                               radial_range=(q.axes_manager.signal_axes[0].axis[0],
                                             q.axes_manager.signal_axes[0].axis[-1]
                                             + q.axes_manager.signal_axes[0].scale))
        pm = make_pyxem_signal(data[:1, :1]).get_azimuthal_integral1d(
            npt=NPT_RAD, show_progressbar=False, mean=True).data[0, 0]
        good = np.isfinite(r1.intensity) & (r1.intensity != 0) & (pm != 0)
        res["1d_mean_vs_pyfai_max_rel_diff_inner80"] = float(
            np.max(np.abs(pm[good][:80] - r1.intensity[good][:80])
                   / np.abs(r1.intensity[good][:80])))
    except Exception as e:  # pragma: no cover
        res["1d_compare_error"] = repr(e)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["pyfai", "pyxem"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nav", type=int, default=32)
    a = ap.parse_args()
    if a.tool:
        t0 = time.perf_counter()
        data = make_data(a.nav)
        sys.stderr.write(f"data {data.shape} in {time.perf_counter() - t0:.1f}s\n")
        res = run_pyfai(data, a.runs) if a.tool == "pyfai" else run_pyxem(data, a.runs)
        print("JSON:" + json.dumps(res))
        return
    results = {}
    for tool in ("pyfai", "pyxem"):
        p = subprocess.run([sys.executable, __file__, "--tool", tool, "--runs", str(a.runs),
                            "--nav", str(a.nav)], capture_output=True, text=True,
                           env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("JSON:")]
        if p.returncode or not line:
            print(f"{tool} FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
            continue
        results[tool] = json.loads(line[0][5:])
    for tool, res in results.items():
        print(f"\n== {tool} details ==")
        for k, v in res.items():
            print(f"  {k}: {v}")
    print(f"\n{'tool / op (%dx%d x 256x256 f32, cores=%d)' % (a.nav, a.nav, os.cpu_count()):<52}{'frames/s':>10}")
    rows = [("pyFAI integrate2d_ng full/csr/cython 100x360", "pyfai", "int2d_fps"),
            ("pyFAI integrate1d_ng full/csr/cython 100", "pyfai", "int1d_fps"),
            ("pyxem get_azimuthal_integral2d eager (incl setup)", "pyxem", "int2d_fps"),
            ("pyxem get_azimuthal_integral2d lazy+compute", "pyxem", "int2d_lazy_fps"),
            ("pyxem get_azimuthal_integral1d eager (incl setup)", "pyxem", "int1d_fps"),
            ("pyxem get_azimuthal_integral1d lazy+compute", "pyxem", "int1d_lazy_fps")]
    for label, tool, key in rows:
        v = results.get(tool, {}).get(key)
        print(f"{label:<52}{(f'{v:10.1f}' if v else '       n/a')}")


if __name__ == "__main__":
    main()
