"""Virtual imaging and centre of mass: diffgpu against pyxem on the same data, same run.

    python benchmarks/bench_virtual.py [--nav 32] [--repeat 5] [--matrix]

Data: a ``nav x nav`` scan of 256 x 256 float32 frames (synthetic rings, drifting beam,
Poisson noise). Virtual imaging: 3 detectors (bright field disc, annular dark field, a
rectangle), eager in memory; pyxem 0.21 ``get_virtual_image`` eager and lazy (the faster
is compared). Centre of mass: diffgpu ``center_of_mass`` vs pyxem
``get_direct_beam_position(method="center_of_mass")``; also NumPy's plain product with 3
dense masks, the memory bound. Each tool in its own process (``--tool``).
GPU rows run when CuPy finds a CUDA device.

``--matrix`` adds virtual imaging over detector counts (1 to 64 annuli, a ring series)
and input dtypes (uint16, big-endian uint16 as Merlin writes it, float16, float32), the same
frames converted, diffgpu against pyxem at each point.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, median_time, print_table, ratio, run_tool, tool_process  # noqa: E402

import numpy as np  # noqa: E402

SHAPE = (256, 256)


def make_data(nav, path):
    import diffgpu

    s = diffgpu.data.synthetic_4dstem(nav_shape=(nav, nav), sig_shape=SHAPE, dtype="float32")
    np.save(path, s.data.compute())
    np.save(path.replace(".npy", "_center.npy"), np.asarray(s.calibration.center))


def rois():
    import hyperspy.api as hs

    return [hs.roi.CircleROI(cx=0, cy=0, r=8), hs.roi.CircleROI(cx=0, cy=0, r=100, r_inner=30),
            hs.roi.RectangularROI(left=-60, top=-20, right=-20, bottom=20)]


def bad_pixels():
    """A bad-pixel mask as detectors have them: a dead column, a 4 x 4 cluster, 40 lone pixels."""
    mask = np.zeros(SHAPE, bool)
    mask[:, 37] = True
    mask[100:104, 150:154] = True
    rng = np.random.default_rng(3)
    mask[rng.integers(0, SHAPE[0], 40), rng.integers(0, SHAPE[1], 40)] = True
    return mask


def tool_diffgpu(data_path, repeat, out):
    import diffgpu

    frames = np.load(data_path)
    n = frames.shape[0] * frames.shape[1]
    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = tuple(np.load(data_path.replace(".npy", "_center.npy")))
    r = rois()
    out["virtual 3 detectors"] = n / median_time(lambda: s.get_virtual_image(r), repeat)
    cx, cy = s.calibration.center
    out["center of mass"] = n / median_time(lambda: s.center_of_mass(), repeat)
    out["center of mass, disc r=20"] = n / median_time(lambda: s.center_of_mass(mask=(cx, cy, 20)),
                                                       repeat)
    out["blur beam finder"] = n / median_time(
        lambda: s.get_direct_beam_position(method="blur", sigma=2, window=10), max(1, repeat // 2))
    out["bad pixels corrected"] = n / median_time(lambda: s.correct_bad_pixels(mask=bad_pixels()),
                                                  max(1, repeat // 2))
    shifts = s.get_direct_beam_position(method="blur", sigma=2, window=10)
    out["centring (bilinear shift)"] = n / median_time(lambda: s.center_direct_beam(shifts=shifts),
                                                       max(1, repeat // 2))
    masks = np.random.default_rng(0).random((3,) + SHAPE).astype(np.float32)
    w = np.ascontiguousarray(masks.reshape(3, -1).T)
    flat = frames.reshape(n, -1)
    out["numpy dense product, 3 masks"] = n / median_time(lambda: flat @ w, repeat)


def tool_diffgpu_gpu(data_path, repeat, out):
    import diffgpu

    if not diffgpu.gpu_available():
        out["skipped"] = diffgpu.device._probe()[2]
        return
    cp = diffgpu.device.require_gpu()
    sync = cp.cuda.Stream.null.synchronize
    frames = np.load(data_path)
    big = np.concatenate([frames.reshape(-1, *SHAPE)] * 8)
    s = diffgpu.DiffractionPatterns(big)
    s.calibration.center = tuple(np.load(data_path.replace(".npy", "_center.npy")))
    s.to_device()
    n = big.shape[0]
    out["device"] = str(diffgpu.devices()[0])
    r = rois()
    out["virtual 3 detectors, device-resident"] = n / median_time(lambda: s.get_virtual_image(r),
                                                                  repeat, sync=sync)
    out["center of mass, device-resident"] = n / median_time(lambda: s.center_of_mass(), repeat,
                                                             sync=sync)
    out["blur beam finder, device-resident"] = n / median_time(
        lambda: s.get_direct_beam_position(method="blur", sigma=2, window=10), repeat, sync=sync)


def tool_pyxem(data_path, repeat, out):
    import hyperspy.api as hs
    import pyxem

    out["version"] = pyxem.__version__
    frames = np.load(data_path)
    n = frames.shape[0] * frames.shape[1]
    s = hs.signals.Signal2D(frames)
    s.set_signal_type("electron_diffraction")
    s.calibration.center = list(np.load(data_path.replace(".npy", "_center.npy")))
    lazy = s.as_lazy()
    lazy.rechunk(nav_chunks=(8, 8))
    r = rois()
    reps = max(1, repeat // 2)
    s.get_virtual_image(r)  # warm-up
    eager = n / median_time(lambda: s.get_virtual_image(r), reps)

    def run_lazy():
        v = lazy.get_virtual_image(r)
        v.compute(show_progressbar=False)

    lz = n / median_time(run_lazy, reps)
    out["virtual 3 detectors"] = max(eager, lz)
    out["virtual which"] = "eager" if eager >= lz else "lazy"
    s.get_direct_beam_position(method="center_of_mass")
    out["center of mass"] = n / median_time(
        lambda: s.get_direct_beam_position(method="center_of_mass"), reps)
    kw = dict(show_progressbar=False)
    out["blur beam finder"] = n / median_time(
        lambda: s.get_direct_beam_position(method="blur", sigma=2, **kw), reps)
    out["bad pixels corrected"] = n / median_time(
        lambda: s.correct_bad_pixels(bad_pixels(), **kw), reps)


MATRIX_DETECTORS = (1, 3, 8, 16, 32, 64)
MATRIX_DTYPES = ("uint16", ">u2", "float16", "float32")


def ring_series(k):
    """``k`` annuli splitting radii 2-122 px (a ring series of virtual detectors)."""
    import hyperspy.api as hs

    edges = np.linspace(2.0, 122.0, k + 1)
    return [hs.roi.CircleROI(cx=0, cy=0, r=float(edges[i + 1]), r_inner=float(edges[i]))
            for i in range(k)]


def _matrix_frames(data_path, dtype):
    frames = np.load(data_path)
    return np.round(frames).clip(0, 65000).astype(dtype) if dtype != "float32" else frames


def tool_diffgpu_matrix(data_path, repeat, out):
    import diffgpu

    center = tuple(np.load(data_path.replace(".npy", "_center.npy")))
    for dtype in MATRIX_DTYPES:
        frames = _matrix_frames(data_path, dtype)
        n = frames.shape[0] * frames.shape[1]
        s = diffgpu.DiffractionPatterns(frames)
        s.calibration.center = center
        for k in MATRIX_DETECTORS:
            r = ring_series(k)
            out[f"{dtype}|{k}"] = n / median_time(lambda: s.get_virtual_image(r), repeat)


def tool_pyxem_matrix(data_path, repeat, out):
    import hyperspy.api as hs
    import pyxem  # noqa: F401  (the signal type)

    center = list(np.load(data_path.replace(".npy", "_center.npy")))
    for dtype in MATRIX_DTYPES:
        frames = _matrix_frames(data_path, dtype)
        n = frames.shape[0] * frames.shape[1]
        s = hs.signals.Signal2D(frames)
        s.set_signal_type("electron_diffraction")
        s.calibration.center = center
        for k in MATRIX_DETECTORS:
            r = ring_series(k)
            try:
                out[f"{dtype}|{k}"] = n / median_time(lambda: s.get_virtual_image(r),
                                                      max(1, repeat // 2))
            except Exception as err:  # noqa: BLE001  (reported in the table)
                out[f"{dtype}|{k}"] = f"{type(err).__name__}"


TOOLS = {"diffgpu": tool_diffgpu, "diffgpu-gpu": tool_diffgpu_gpu, "pyxem": tool_pyxem,
         "diffgpu-matrix": tool_diffgpu_matrix, "pyxem-matrix": tool_pyxem_matrix}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nav", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tool")
    ap.add_argument("--data")
    ap.add_argument("--matrix", action="store_true",
                    help="also virtual imaging over detector counts and dtypes, against pyxem")
    args = ap.parse_args()
    if args.tool:
        return tool_process(lambda out: TOOLS[args.tool](args.data, args.repeat, out))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "frames.npy")
        make_data(args.nav, data_path)
        print(f"data: {args.nav}x{args.nav} scan of 256x256 float32 frames; medians of "
              f"{args.repeat} runs (pyxem: {max(1, args.repeat // 2)})")
        names = [t for t in TOOLS if args.matrix or not t.endswith("-matrix")]
        res = {name: run_tool(__file__, name, ["--data", data_path, "--repeat", args.repeat])
               for name in names}
    ours, pyx = res["diffgpu"], res["pyxem"]

    rows = []
    for key, label in (("virtual 3 detectors", "virtual imaging, 3 detectors"),
                       ("center of mass", "centre of mass"),
                       ("blur beam finder", "beam finder, Gaussian blur sigma 2"),
                       ("bad pixels corrected", "bad pixels corrected (a column, a 4 x 4 cluster, 40)")):
        theirs = pyx.get(key, pyx.get("error"))
        note = f" ({pyx['virtual which']})" if key.startswith("virtual") and "virtual which" in pyx else ""
        rows.append([label, ours.get(key, ours.get("error")), f"{theirs}{note}" if not isinstance(
            theirs, float) else theirs, ratio(ours.get(key), theirs)])
    header = ["operation", "diffgpu", f"pyxem {pyx.get('version', '')}", "ratio"]
    print_table("Frames/s, eager in memory (CPU)", header, rows)
    print_table("diffgpu, more (frames/s)", ["what", "value"],
                [[k, v] for k, v in ours.items()
                 if k not in ("virtual 3 detectors", "center of mass", "blur beam finder",
                              "bad pixels corrected")])
    print_table("GPU", ["what", "value"], [[k, v] for k, v in res["diffgpu-gpu"].items()])
    if args.matrix:
        ours, pyx = res["diffgpu-matrix"], res["pyxem-matrix"]
        rows = [[dtype, k, ours.get(f"{dtype}|{k}", ours.get("error")),
                 pyx.get(f"{dtype}|{k}", pyx.get("error")),
                 ratio(ours.get(f"{dtype}|{k}"), pyx.get(f"{dtype}|{k}"))]
                for dtype in MATRIX_DTYPES for k in MATRIX_DETECTORS]
        print_table("Virtual imaging over detectors (annuli) and dtypes, frames/s, eager",
                    ["dtype", "detectors", "diffgpu", "pyxem", "ratio"], rows)


if __name__ == "__main__":
    main()
