"""Azimuthal integration: diffgpu against pyFAI and pyxem on the same data, in the same run.

    python benchmarks/bench_integration.py [--nav 32] [--repeat 5]

Data: a ``nav x nav`` scan of 256 x 256 float32 frames (synthetic rings, drifting beam,
Poisson noise), integrated to 100 radial x 360 azimuthal bins (2D) and 100 bins (1D)
with full pixel splitting around an off-centre beam. Each tool runs in its own process
(``--tool NAME``) with ``OMP_WAIT_POLICY=PASSIVE`` so that no tool's threads slow the
next; the data go through a temporary ``.npy`` file. Peers that are not installed
(``pip install -e ".[bench]"``) are reported as such.

GPU rows run when CuPy finds a CUDA device.

    python benchmarks/bench_integration.py --first-call [--repeat 3] [--cold]

The first call on one large frame (geometry and integration matrix built, kernels loaded),
diffgpu against pyFAI (full splitting, CSR), for 512^2, 1024^2 and 2048^2 detectors and 1D
(1,000 bins) and 2D (500 x 360, 1,000 x 1,440) outputs; each call in a fresh process, the
tools alternating. diffgpu's rows also give the matrix build alone (compiled, after numba is
loaded) and the NumPy reference build of the same matrix. ``--cold`` runs diffgpu with an
empty numba cache (everything compiled on the first call).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (device_pipeline, machine, median_time, print_table, ratio,  # noqa: E402
                     run_tool, tool_process)

import numpy as np  # noqa: E402

SHAPE = (256, 256)
NPT, NPT_AZIM = 100, 360
CENTER = (130.3, 121.7)  # (x, y) pixels, off the detector middle
PIX_M = 1e-3  # pyFAI pixel size: 1 mm pixels make its "r_mm" unit equal to pixels


def make_data(nav, path):
    import diffgpu

    s = diffgpu.data.synthetic_4dstem(nav_shape=(nav, nav), sig_shape=SHAPE, center=CENTER,
                                      drift=(0, 0), wobble=0, dtype="float32")
    np.save(path, s.data.compute())
    # a noise-free frame for the accuracy comparison: differences then come from pixel splitting
    smooth = diffgpu.data.synthetic_4dstem(nav_shape=(1, 1), sig_shape=SHAPE, center=CENTER,
                                           drift=(0, 0), wobble=0, dtype="float64", noise=False)
    np.save(path.replace(".npy", "_smooth.npy"), smooth.data.compute()[0, 0])


def mask():
    m = np.zeros(SHAPE, bool)
    m[:, 60:64] = True  # a dead column band
    m[120:124, 200:256] = True  # a beam-stop arm
    return m


def supersampled(frame, bins, sub=32, r_max=128.0):
    """Mean per bin from sub x sub points per pixel (an independent, slow reference).

    Only pixels near the radial rows of ``bins`` ((j, k) pairs) are sampled.
    """
    edges = np.linspace(0, r_max, NPT + 1)
    cx, cy = CENTER
    yy, xx = np.indices(SHAPE)
    rc = np.hypot(xx - cx, yy - cy)
    sel = np.zeros(SHAPE, bool)
    for j in np.unique(bins[:, 0]):
        sel |= (rc > edges[j] - 1) & (rc < edges[j + 1] + 1)
    sel &= ~mask()
    py, px = np.nonzero(sel)
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    num = np.zeros((NPT, NPT_AZIM))
    den = np.zeros((NPT, NPT_AZIM))
    a_edges = np.linspace(-180, 180, NPT_AZIM + 1)
    for k in range(0, len(py), 2000):
        y = py[k:k + 2000, None, None] + offs[None, :, None] - cy
        x = px[k:k + 2000, None, None] + offs[None, None, :] - cx
        y, x = np.broadcast_arrays(y, x)
        r, phi = np.hypot(x, y).ravel(), np.rad2deg(np.arctan2(y, x)).ravel()
        w = np.repeat(frame[py[k:k + 2000], px[k:k + 2000]], sub * sub)
        num += np.histogram2d(r, phi, bins=[edges, a_edges], weights=w)[0]
        den += np.histogram2d(r, phi, bins=[edges, a_edges])[0]
    return num / np.where(den > 0, den, np.nan)


# -- one tool per process ----------------------------------------------------------

def tool_diffgpu(data_path, repeat, out):
    import diffgpu
    from diffgpu.geometry import PolarGeometry, integration_matrix

    frames = np.load(data_path)
    n = frames.shape[0] * frames.shape[1]
    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = CENTER
    r_max = 128.0

    def run2d():
        return s.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, r_max))

    def run1d():
        return s.get_azimuthal_integral1d(npt=NPT, radial_range=(0, r_max))

    out["2d eager"] = n / median_time(run2d, repeat)
    out["1d eager"] = n / median_time(run1d, repeat)

    g = PolarGeometry((512, 512), (250.3, 261.7), (1.0, 1.0), 200, 360, (0.0, 362.0),
                      (-180.0, 180.0))
    out["build 512x512 -> 200x360 (s)"] = median_time(lambda: integration_matrix(g), 3, warmup=0)

    # lazy from a chunked zarr file on local disk (in the page cache), three compressions
    import numcodecs

    compressors = {"zstd-1 (RosettaSciIO default)": None,
                   "lz4-1": numcodecs.Blosc("lz4", 1, numcodecs.Blosc.SHUFFLE),
                   "uncompressed": numcodecs.Blosc("lz4", 0)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, comp in compressors.items():
            zpath = os.path.join(tmp, f"scan-{len(name)}.zspy")
            kw = {} if comp is None else {"compressor": comp}
            s.save(zpath, chunks=(8, 8) + SHAPE, show_progressbar=False, **kw)
            lazy = diffgpu.load(zpath, lazy=True)

            def run_lazy():
                p = lazy.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, r_max))
                p.compute(show_progressbar=False)

            out[f"lazy zarr {name}"] = n / median_time(run_lazy, repeat)
            out[f"read zarr {name}"] = n / median_time(lambda: lazy.data.compute(), repeat)

    # accuracy reference: one masked frame, mean intensity per bin
    one = diffgpu.DiffractionPatterns(np.load(data_path.replace(".npy", "_smooth.npy")))
    one.calibration.center = CENTER
    one.calibration.mask = mask()
    p = one.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, r_max), mean=True,
                                     dtype="float64")
    gm = PolarGeometry(SHAPE, CENTER, (1.0, 1.0), NPT, NPT_AZIM, (0.0, r_max), (-180.0, 180.0))
    coverage = np.asarray(integration_matrix(gm, mask()).sum(axis=1)).reshape(NPT, NPT_AZIM)
    edges = np.linspace(0, r_max, NPT + 1)
    exact = 0.5 * (edges[1:] ** 2 - edges[:-1] ** 2) * np.deg2rad(360 / NPT_AZIM)
    full = coverage / exact[:, None] > 0.999
    np.save(data_path.replace(".npy", "_diffgpu_mean.npy"), np.where(full, p.data, np.nan))


def tool_diffgpu_gpu(data_path, repeat, out):
    import diffgpu

    if not diffgpu.gpu_available():
        out["skipped"] = diffgpu.device._probe()[2]
        return
    cp = diffgpu.device.require_gpu()
    sync = cp.cuda.Stream.null.synchronize
    frames = np.load(data_path)
    out["device"] = str(diffgpu.devices()[0])
    # device-resident, many frames per call
    big = np.concatenate([frames.reshape(-1, *SHAPE)] * 8)  # 8 x nav^2 frames
    s = diffgpu.DiffractionPatterns(big)
    s.calibration.center = CENTER
    s.to_device()
    n = big.shape[0]
    run2d = lambda: s.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, 128))  # noqa
    run1d = lambda: s.get_azimuthal_integral1d(npt=NPT, radial_range=(0, 128))  # noqa
    out["2d device-resident"] = n / median_time(run2d, repeat, sync=sync)
    out["1d device-resident"] = n / median_time(run1d, repeat, sync=sync)
    # lazy host -> device -> host pipeline on uint16
    u16 = np.clip(big, 0, 65535).astype("uint16")
    h2d = median_time(lambda: cp.asarray(u16), repeat, sync=sync)
    out["host->device GB/s (uint16, pageable)"] = u16.nbytes / h2d / 1e9
    pipeline = device_pipeline(u16, (1024,) + (-1,) * (u16.ndim - 1), CENTER, NPT, NPT_AZIM)
    t = median_time(pipeline, repeat, sync=sync)
    out["lazy uint16 pipeline frames/s"] = n / t
    out["lazy uint16 pipeline GB/s"] = u16.nbytes / t / 1e9


def _pyfai(frames, m=None):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=PIX_M, pixel2=PIX_M, max_shape=SHAPE)
    ai = AzimuthalIntegrator(dist=1.0, poni1=(CENTER[1] + 0.5) * PIX_M,
                             poni2=(CENTER[0] + 0.5) * PIX_M, detector=det)
    kw = dict(unit="r_mm", method=("full", "csr", "cython"), correctSolidAngle=False,
              polarization_factor=None, radial_range=(0, 128.0), azimuth_range=(-180, 180), mask=m)
    return ai, kw


def tool_pyfai(data_path, repeat, out):
    import pyFAI

    out["version"] = pyFAI.version
    frames = np.load(data_path).reshape(-1, *SHAPE)
    ai, kw = _pyfai(frames)
    n = frames.shape[0]
    out["2d"] = n / median_time(lambda: [ai.integrate2d_ng(f, NPT, NPT_AZIM, **kw) for f in frames],
                                max(1, repeat // 2))
    out["1d"] = n / median_time(lambda: [ai.integrate1d_ng(f, NPT, **kw) for f in frames],
                                max(1, repeat // 2))
    ai, kw = _pyfai(frames, mask())
    res = ai.integrate2d_ng(np.load(data_path.replace(".npy", "_smooth.npy")), NPT, NPT_AZIM, **kw)
    np.save(data_path.replace(".npy", "_pyfai_mean.npy"), np.asarray(res.intensity).T)


def tool_pyxem(data_path, repeat, out):
    import hyperspy.api as hs
    import pyxem

    out["version"] = pyxem.__version__
    frames = np.load(data_path)
    n = frames.shape[0] * frames.shape[1]

    def setup():
        s = hs.signals.Signal2D(frames)
        s.set_signal_type("electron_diffraction")
        s.calibration.scale = 1.0
        s.calibration.center = list(CENTER)
        return s

    small = setup().inav[:2, :2]  # warm up numba before timing
    small.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, show_progressbar=False)
    small.get_azimuthal_integral1d(npt=NPT, show_progressbar=False)
    reps = max(1, repeat // 2)
    out["2d incl. setup"] = n / median_time(
        lambda: setup().get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, 128.0),
                                                 show_progressbar=False), reps, warmup=0)
    out["1d incl. setup"] = n / median_time(
        lambda: setup().get_azimuthal_integral1d(npt=NPT, radial_range=(0, 128.0),
                                                 show_progressbar=False), reps, warmup=0)


FIRST_SHAPES = ((512, 512), (1024, 1024), (2048, 2048))
FIRST_BINS = ((1000, 1), (500, 360), (1000, 1440))


def _first_point(args):
    h, w, npt, naz = (int(v) for v in args.data.split(","))
    return (h, w), npt, naz, (w / 2 - 0.7, h / 2 + 0.3), float(np.hypot(h, w)) / 2


def tool_first_diffgpu(args, out):
    shape, npt, naz, center, r_max = _first_point(args)
    frame = np.random.default_rng(0).poisson(5, shape).astype(np.float32)
    import diffgpu
    from diffgpu.geometry import PolarGeometry, integration_matrix

    s = diffgpu.DiffractionPatterns(frame[None])
    s.calibration.center = center
    t0 = time.perf_counter()
    if naz == 1:
        s.get_azimuthal_integral1d(npt=npt, radial_range=(0, r_max))
    else:
        s.get_azimuthal_integral2d(npt=npt, npt_azim=naz, radial_range=(0, r_max))
    out["first call (s)"] = time.perf_counter() - t0
    g = PolarGeometry(shape, center, (1.0, 1.0), npt, naz, (0.0, r_max), (-180.0, 180.0))
    t0 = time.perf_counter()
    integration_matrix(g)
    out["matrix (s)"] = time.perf_counter() - t0
    if args.before:
        t0 = time.perf_counter()
        integration_matrix(g, _reference=True)
        out["matrix, NumPy build (s)"] = time.perf_counter() - t0


def tool_first_pyfai(args, out):
    shape, npt, naz, (cx, cy), r_max = _first_point(args)
    frame = np.random.default_rng(0).poisson(5, shape).astype(np.float32)
    import pyFAI
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    out["version"] = pyFAI.version
    det = Detector(pixel1=PIX_M, pixel2=PIX_M, max_shape=shape)
    ai = AzimuthalIntegrator(dist=1.0, poni1=(cy + 0.5) * PIX_M, poni2=(cx + 0.5) * PIX_M,
                             detector=det)
    kw = dict(unit="r_mm", method=("full", "csr", "cython"), correctSolidAngle=False,
              polarization_factor=None, radial_range=(0, r_max), azimuth_range=(-180, 180))
    t0 = time.perf_counter()
    if naz == 1:
        ai.integrate1d_ng(frame, npt, **kw)
    else:
        ai.integrate2d_ng(frame, npt, naz, **kw)
    out["first call (s)"] = time.perf_counter() - t0


def first_calls(args):
    """Fresh-process first calls, diffgpu and pyFAI alternating: a Markdown table of ranges."""
    print(f"machine: {machine()}")
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        for rep in range(args.repeat):
            for shape in FIRST_SHAPES:
                for npt, naz in FIRST_BINS:
                    point = ",".join(str(v) for v in (*shape, npt, naz))
                    argv = ["--data", point] + (["--before"] if rep == 0 else [])
                    if args.cold:  # an empty numba cache for each diffgpu process
                        os.environ["NUMBA_CACHE_DIR"] = os.path.join(cache, f"{rep}-{point}")
                    ours = run_tool(__file__, "first-diffgpu", argv)
                    os.environ.pop("NUMBA_CACHE_DIR", None)
                    fai = run_tool(__file__, "first-pyfai", argv)
                    for name, r in (("diffgpu", ours), ("pyfai", fai)):
                        for key, v in r.items():
                            res.setdefault((shape, npt, naz, name, key), []).append(v)

    def span(key):
        v = [x for x in res.get(key, []) if isinstance(x, float)]
        if not v:
            return (res.get(key) or ["n/a"])[0]
        return f"{min(v):.2f}" if len(v) == 1 else f"{min(v):.2f} - {max(v):.2f}"

    rows = []
    for shape in FIRST_SHAPES:
        for npt, naz in FIRST_BINS:
            k = (shape, npt, naz)
            rows.append([f"{shape[0]}^2 -> " + (f"{npt}" if naz == 1 else f"{npt} x {naz}"),
                         span(k + ("diffgpu", "first call (s)")), span(k + ("pyfai", "first call (s)")),
                         span(k + ("diffgpu", "matrix (s)")),
                         span(k + ("diffgpu", "matrix, NumPy build (s)"))])
    version = (res.get(((512, 512), 1000, 1, "pyfai", "version")) or [""])[0]
    print_table(f"First call on one frame, s (range of {args.repeat} fresh processes"
                + (", empty numba cache" if args.cold else ", numba cache warm") + ")",
                ["detector -> bins", "diffgpu first call", f"pyFAI {version} first call (full, csr)",
                 "diffgpu matrix (compiled)", "matrix, NumPy build"], rows)


TOOLS = {"diffgpu": tool_diffgpu, "diffgpu-gpu": tool_diffgpu_gpu, "pyfai": tool_pyfai,
         "pyxem": tool_pyxem, "first-diffgpu": tool_first_diffgpu, "first-pyfai": tool_first_pyfai}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nav", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tool")
    ap.add_argument("--data")
    ap.add_argument("--first-call", action="store_true")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--before", action="store_true")
    args = ap.parse_args()
    if args.tool and args.tool.startswith("first-"):
        return tool_process(lambda out: TOOLS[args.tool](args, out), gib=0)
    if args.tool:
        return tool_process(lambda out: TOOLS[args.tool](args.data, args.repeat, out))
    if args.first_call:
        return first_calls(args)

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "frames.npy")
        t0 = time.perf_counter()
        make_data(args.nav, data_path)
        n = args.nav**2
        print(f"data: {args.nav}x{args.nav} scan of 256x256 float32 frames ({n} frames), "
              f"made in {time.perf_counter() - t0:.1f} s; 2D {NPT}x{NPT_AZIM}, 1D {NPT}; "
              f"centre {CENTER}; medians of {args.repeat} runs")
        res = {name: run_tool(__file__, name, ["--data", data_path, "--repeat", args.repeat])
               for name in TOOLS}
        ours, fai, pyx = res["diffgpu"], res["pyfai"], res["pyxem"]

        rows = []
        for key, fkey, xkey in (("2d eager", "2d", "2d incl. setup"), ("1d eager", "1d", "1d incl. setup")):
            rows.append([f"{key[:2]} in memory", ours.get(key, ours.get("error")),
                         fai.get(fkey, fai.get("error")), pyx.get(xkey, pyx.get("error")),
                         ratio(ours.get(key), fai.get(fkey)), ratio(ours.get(key), pyx.get(xkey))])
        print_table("Azimuthal integration, frames/s (CPU)",
                    ["case", "diffgpu", f"pyFAI {fai.get('version', '')} csr full",
                     f"pyxem {pyx.get('version', '')}", "vs pyFAI", "vs pyxem"], rows)
        eager = ours.get("2d eager")
        rows = []
        for key in [k for k in ours if k.startswith("lazy zarr")]:
            lazy, read = ours[key], ours[key.replace("lazy", "read")]
            rows.append([f"2D lazy from chunked zarr, {key[10:]} (frames/s)", lazy,
                         f"{100 * lazy / eager:.0f}% of eager; reading alone {read:,.0f} frames/s"])
        rows.append(["build 512x512 -> 200x360 geometry (s)", ours.get("build 512x512 -> 200x360 (s)"), ""])
        ours_mean = data_path.replace(".npy", "_diffgpu_mean.npy")
        fai_mean = data_path.replace(".npy", "_pyfai_mean.npy")
        if os.path.exists(ours_mean) and os.path.exists(fai_mean):
            a, b = np.load(ours_mean), np.load(fai_mean)
            ok = np.isfinite(a) & np.isfinite(b) & (np.abs(b) > 1e-6 * np.nanmax(np.abs(b)))
            rel = np.abs(a[ok] - b[ok]) / np.abs(b[ok])
            rows.append(["accuracy vs pyFAI full split, masked off-centre noise-free frame: largest "
                         f"rel. difference over {ok.sum()} fully covered bins", float(rel.max()),
                         f"median {np.median(rel):.2e}"])
            far = np.argwhere(ok & (np.abs(a - b) > 0.01 * np.abs(b)))
            rows.append(["fully covered bins differing by more than 1 %", len(far),
                         f"{100 * len(far) / ok.sum():.1f}% of bins"])
            if len(far):
                ref = supersampled(np.load(data_path.replace(".npy", "_smooth.npy")), far)
                j, k = far[:, 0], far[:, 1]
                e_ours = np.abs(a[j, k] - ref[j, k]) / ref[j, k]
                e_fai = np.abs(b[j, k] - ref[j, k]) / ref[j, k]
                rows.append(["...of which a 32x32 sub-sampled reference is closer to diffgpu",
                             f"{100 * np.mean(e_ours < e_fai):.1f}%",
                             f"median error there: diffgpu {np.median(e_ours):.1e}, "
                             f"pyFAI {np.median(e_fai):.1e}"])
        print_table("diffgpu, more", ["what", "value", "note"], rows)
        gpu = res["diffgpu-gpu"]
        print_table("GPU", ["what", "value"], [[k, v] for k, v in gpu.items()])


if __name__ == "__main__":
    main()
