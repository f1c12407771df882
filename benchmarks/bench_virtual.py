"""Virtual imaging and centre of mass: diffgpu against pyxem on the same data, same run.

    python benchmarks/bench_virtual.py [--nav 32] [--repeat 5]

Data: a ``nav x nav`` scan of 256 x 256 float32 frames (synthetic rings, drifting beam,
Poisson noise). Virtual imaging: 3 detectors (bright field disc, annular dark field, a
rectangle), eager in memory; pyxem 0.21 ``get_virtual_image`` eager and lazy (the faster
is compared). Centre of mass: diffgpu ``center_of_mass`` vs pyxem
``get_direct_beam_position(method="center_of_mass")``; also NumPy's plain product with 3
dense masks, the memory bound. Each tool in its own process (``--tool``).
GPU rows run when CuPy finds a CUDA device.
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


TOOLS = {"diffgpu": tool_diffgpu, "diffgpu-gpu": tool_diffgpu_gpu, "pyxem": tool_pyxem}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nav", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tool")
    ap.add_argument("--data")
    args = ap.parse_args()
    if args.tool:
        return tool_process(lambda out: TOOLS[args.tool](args.data, args.repeat, out))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "frames.npy")
        make_data(args.nav, data_path)
        print(f"data: {args.nav}x{args.nav} scan of 256x256 float32 frames; medians of "
              f"{args.repeat} runs (pyxem: {max(1, args.repeat // 2)})")
        res = {name: run_tool(__file__, name, ["--data", data_path, "--repeat", args.repeat])
               for name in TOOLS}
    ours, pyx = res["diffgpu"], res["pyxem"]

    rows = []
    for key, label in (("virtual 3 detectors", "virtual imaging, 3 detectors"),
                       ("center of mass", "centre of mass")):
        theirs = pyx.get(key, pyx.get("error"))
        note = f" ({pyx['virtual which']})" if key.startswith("virtual") and "virtual which" in pyx else ""
        rows.append([label, ours.get(key, ours.get("error")), f"{theirs}{note}" if not isinstance(
            theirs, float) else theirs, ratio(ours.get(key), theirs)])
    header = ["operation", "diffgpu", f"pyxem {pyx.get('version', '')}", "ratio"]
    print_table("Frames/s, eager in memory (CPU)", header, rows)
    print_table("diffgpu, more (frames/s)", ["what", "value"],
                [[k, v] for k, v in ours.items() if k not in ("virtual 3 detectors", "center of mass")])
    print_table("GPU", ["what", "value"], [[k, v] for k, v in res["diffgpu-gpu"].items()])


if __name__ == "__main__":
    main()
