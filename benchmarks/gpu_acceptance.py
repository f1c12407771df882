"""GPU acceptance: every GPU check and GPU benchmark row of diffgpu in one command, under 8 minutes.

    python benchmarks/gpu_acceptance.py [--out DIR] [--no-results] [--budget SECONDS]

On a machine with a CUDA device it runs, each stage in its own process with a time limit
(the stages share ``--budget``, default 450 s; a stage that runs out is reported as such and
the next one starts):

1. ``pytest -m gpu``: the tests that run diffgpu on real CuPy;
2. integration, 256 x 256 uint16 frames -> 100 x 360 (and 1D, 100 bins): device-resident
   frames/s, and the lazy host -> device -> host pipeline on uint16 against the host-to-device
   bandwidth measured in the same process;
3. virtual images (3 detectors) and centre of mass, device-resident;
4. template matching of device-resident polar patterns (64 x 360) against simulated Si
   libraries of 1,081 (1 degree) and 25,651 (0.2 degree) templates, n_best=1, exact search;
   and the refinement of those patterns on the device (1,081 templates, n_best=3);
5. with several GPUs and dask-cuda: one dask-cuda worker per GPU running the lazy uint16
   integration pipeline.

It then adds one section, dated and naming the device, to ``benchmarks/RESULTS.md`` (above
the earlier ones: the file is newest first), with each figure next to its target, and with
``--out DIR`` (default ``$OUT`` when set) also writes that table (``gpu_acceptance.md``), the
stages' raw figures (``gpu_acceptance.json``) and the pytest log (``pytest_gpu.log``) there.

Without a GPU it says why, lists what it would run, and exits 0 (changing nothing).

What a bare GPU machine needs
-----------------------------
Python >= 3.11 and an NVIDIA driver; CuPy for its CUDA (``cupy-cuda12x`` or ``cupy-cuda13x``),
NumPy, SciPy, numba, h5py and pytest; and diffgpu's other dependencies with the test extra:
dask[array], distributed, hyperspy, zarr < 3, matplotlib, tqdm, threadpoolctl, diffsims,
orix, hdf5plugin, pytest-timeout, nbclient, ipykernel (``pip install -e ".[test]"`` online;
add ``dask-cuda`` for the several-GPU stage). The project's GPU machines have Python 3.12,
CuPy (CUDA 13), NumPy, SciPy, numba, h5py and pytest but no network: gather the rest as
wheels here, from the
project root (``.whl/`` is git-ignored), and leave out hdf5plugin: its wheel alone is 46 MB
and the device tool carries 64 MiB at most (95 MB -> 51 MB without it; measured 2026-12-01).
Without it only compressed Dectris (bitshuffle/LZ4) files cannot be read there (their tests
skip); a test file whose imports are missing would be reported by the pytest stage, which
runs the rest::

    ../shared/tools/offline-wheels.sh .whl test && rm .whl/hdf5plugin-*.whl

then run it there with the device tool, carrying the wheels::

    run(command="python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl"
                " && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_acceptance.py --out $OUT",
        carry=[".whl"], timeout_s=600)

and add ``$OUT/gpu_acceptance.md`` to ``benchmarks/RESULTS.md`` here (the machine's own copy
of the file does not come back). ``PYTHONPATH=$PWD:...`` makes the working tree's diffgpu the
one imported (the wheel in ``/tmp/site`` only provides its entry point for HyperSpy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import device_pipeline, machine, median_time  # noqa: E402

SHAPE = (256, 256)
NPT, NPT_AZIM = 100, 360
CENTER = (130.3, 121.7)
R_MAX, RECIPROCAL_RADIUS = 1.28, 1.2  # as bench_orientation.py
N_FRAMES = 8192  # device-resident frames for integration, virtual images, centre of mass
N_PATTERNS = 512  # simulated Si patterns (matched 16 times over at 1,081 templates)
LIBRARIES = ((1.0, "1,081", 5), (0.2, "25,651", 3))  # (resolution in degrees, name, repeats)

# (name, what it runs, share of the budget it may take at most, in seconds)
STAGES = [
    ("pytest", "pytest -m gpu: diffgpu's tests on real CuPy", 180),
    ("integration", "integration 256x256 uint16 -> 100x360 and 1D: device-resident, and the "
                    "lazy host->device->host pipeline against host->device bandwidth", 90),
    ("virtual", "virtual images (3 detectors), centre of mass and the blur beam finder, "
                "device-resident", 60),
    ("matching", "template matching, device-resident polar patterns, Si libraries of 1,081 "
                 "and 25,651 templates; refinement on the device", 210),
    ("cluster", "one dask-cuda worker per GPU (only with several GPUs and dask-cuda): lazy "
                "uint16 integration pipeline", 90),
]

TARGETS = {  # figure -> (target, higher is better)
    "integration 2D, device-resident (frames/s)": 1_000_000,
    "pipeline / host->device bandwidth": 0.5,
    "matching 1,081 templates (patterns/s)": 50_000,
    "matching 25,651 templates (patterns/s)": 5_000,
}


# -- stages (each in its own process) ---------------------------------------------------------

def _sync(cp):
    return cp.cuda.Stream.null.synchronize


def _device_frames(cp, n):
    """``n`` synthetic 256 x 256 uint16 frames on the device (256 made, then repeated there)."""
    import diffgpu

    s = diffgpu.data.synthetic_4dstem(nav_shape=(16, 16), sig_shape=SHAPE, center=CENTER,
                                      drift=(0, 0), wobble=0, dtype="uint16")
    base = cp.asarray(s.data.compute().reshape(-1, *SHAPE))
    return cp.concatenate([base] * (n // base.shape[0]))


def stage_integration(out):
    import numpy as np

    import diffgpu

    cp = diffgpu.device.require_gpu()
    sync = _sync(cp)
    n = N_FRAMES
    frames = _device_frames(cp, n)
    s = diffgpu.DiffractionPatterns(frames)
    s.calibration.center = CENTER
    run2d = lambda: s.get_azimuthal_integral2d(npt=NPT, npt_azim=NPT_AZIM, radial_range=(0, 128))  # noqa
    run1d = lambda: s.get_azimuthal_integral1d(npt=NPT, radial_range=(0, 128))  # noqa
    out["integration 2D, device-resident (frames/s)"] = n / median_time(run2d, 5, sync=sync)
    out["integration 1D, device-resident (frames/s)"] = n / median_time(run1d, 5, sync=sync)
    host = frames.get()
    out["host->device, pageable uint16 (GB/s)"] = host.nbytes / median_time(
        lambda: cp.asarray(host), 5, sync=sync) / 1e9
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(host.nbytes), host.dtype,
                           host.size).reshape(host.shape)  # as bench_device.py
    pinned[...] = host
    out["host->device, pinned uint16 (GB/s)"] = host.nbytes / median_time(
        lambda: cp.asarray(pinned), 5, sync=sync) / 1e9
    pinned = None  # the pinned buffer goes now
    out["device->host uint16 (GB/s)"] = host.nbytes / median_time(
        lambda: frames.get(), 5, sync=sync) / 1e9
    pipeline = device_pipeline(host, (min(1024, n), -1, -1), CENTER, NPT, NPT_AZIM)
    t = median_time(pipeline, 3, sync=sync)
    out["pipeline uint16 host->device->host (frames/s)"] = n / t
    out["pipeline uint16 (GB/s of frames)"] = host.nbytes / t / 1e9
    out["pipeline / host->device bandwidth"] = (out["pipeline uint16 (GB/s of frames)"]
                                                / out["host->device, pageable uint16 (GB/s)"])


def stage_virtual(out):
    import hyperspy.api as hs

    import diffgpu

    cp = diffgpu.device.require_gpu()
    sync = _sync(cp)
    n = N_FRAMES
    s = diffgpu.DiffractionPatterns(_device_frames(cp, n))
    s.calibration.center = CENTER
    rois = [hs.roi.CircleROI(cx=0, cy=0, r=8), hs.roi.CircleROI(cx=0, cy=0, r=60, r_inner=20),
            hs.roi.CircleROI(cx=0, cy=0, r=120, r_inner=60)]
    out["virtual images, 3 detectors, device-resident (frames/s)"] = n / median_time(
        lambda: s.get_virtual_image(rois), 5, sync=sync)
    out["centre of mass, device-resident (frames/s)"] = n / median_time(
        lambda: s.center_of_mass(), 5, sync=sync)
    out["blur beam finder, device-resident (frames/s)"] = n / median_time(
        lambda: s.get_direct_beam_position(method="blur", sigma=2, window=10), 3, sync=sync)


def _match_rate(polar, lib, sync, repeat):
    polar.get_orientation(lib)  # renders the templates and moves them to the GPU, once
    sync()
    t = median_time(lambda: polar.get_orientation(lib), repeat, sync=sync)
    return polar.data.shape[0] / t


def stage_matching(out):
    import numpy as np
    from orix.quaternion import Orientation, Rotation

    import diffgpu

    cp = diffgpu.device.require_gpu()
    sync = _sync(cp)
    si = diffgpu.TemplateLibrary.silicon()
    truth = Rotation.random(N_PATTERNS)
    s = diffgpu.data.orientation_patterns(si, truth, sig_shape=SHAPE, calibration=0.01,
                                          reciprocal_radius=RECIPROCAL_RADIUS, seed=1)
    s.calibration.center = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)
    s.to_device()
    polar = s.get_azimuthal_integral2d(npt=64, npt_azim=360, radial_range=(0, R_MAX), mean=True)
    many = diffgpu.PolarPatterns(cp.concatenate([polar.data] * 16),  # 16 x N_PATTERNS
                                 axes=[{"size": 16 * N_PATTERNS, "navigate": True}]
                                 + polar.axes_manager._get_signal_axes_dicts())
    for resolution, label, repeat in LIBRARIES:
        t0 = time.perf_counter()
        lib = diffgpu.TemplateLibrary.from_phase(si, resolution=resolution,
                                                 reciprocal_radius=RECIPROCAL_RADIUS)
        out[f"library {label}: templates, simulated in (s)"] = \
            f"{len(lib)}, {time.perf_counter() - t0:.0f}"
        target = many if resolution >= 1.0 else polar  # N_PATTERNS for the large library
        out[f"matching {label} templates (patterns/s)"] = _match_rate(target, lib, sync, repeat)
        found = polar.get_orientation(lib)
        found.to_host()
        angle = Orientation(truth, symmetry=si.point_group).angle_with(
            found.to_orientations(), degrees=True)
        out[f"matching {label}: within 2 deg ({N_PATTERNS} random)"] = float(np.mean(angle < 2))
        if resolution >= 1.0:  # refinement of device-resident patterns, near-twins included
            matches = polar.get_orientation(lib, n_best=3)
            refined = matches.refine(polar, lib)  # (compiles the host kernels of the sample)
            out[f"refinement {label}, n_best 3, device-resident (patterns/s)"] = \
                N_PATTERNS / median_time(lambda: matches.refine(polar, lib), 3, sync=sync)
            angle = Orientation(truth, symmetry=si.point_group).angle_with(
                refined.to_orientations(), degrees=True)
            out[f"refinement {label}: median error (deg)"] = float(np.median(angle))
            out[f"refinement {label}: within 2 deg"] = float(np.mean(angle < 2))
        if resolution < 1.0:  # the prefilter, for large libraries (as bench_orientation.py)
            polar.get_orientation(lib, frac_keep=0.1)  # builds the template-major copy once
            out[f"matching {label}, frac_keep=0.1 (patterns/s)"] = polar.data.shape[0] / \
                median_time(lambda: polar.get_orientation(lib, frac_keep=0.1), repeat, sync=sync)


def stage_cluster(out):
    import diffgpu

    if len(diffgpu.devices()) < 2:
        out["skipped"] = f"{len(diffgpu.devices())} GPU: one worker per GPU needs several"
        return
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        out["skipped"] = "dask-cuda is not installed (pip install diffgpu[cuda-cluster])"
        return
    client = diffgpu.start_cluster(device="gpu", quiet=True, dashboard_address=":0")
    try:
        n_gpu = len(client.scheduler_info()["workers"])
        s = diffgpu.data.synthetic_4dstem(nav_shape=(64, 128), sig_shape=SHAPE, center=CENTER,
                                          drift=(0, 0), wobble=0, dtype="uint16")
        pipeline = device_pipeline(s.data.compute(), (8, 128, -1, -1), CENTER,  # 1,024 a chunk
                                   NPT, NPT_AZIM)
        out[f"dask-cuda, {n_gpu} workers: uint16 pipeline (frames/s)"] = \
            64 * 128 / median_time(pipeline, 3)
    finally:
        client.close()
        client.cluster.close()


def stage_pytest(out, log_path=None):
    # a test file whose imports are missing there (e.g. hdf5plugin) is reported, not fatal
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                           "no:cacheprovider", "-o", "addopts=-ra --strict-markers",
                           "--continue-on-collection-errors"],
                          cwd=ROOT, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(text)
    counts = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)\b")
    summary = [ln for ln in text.splitlines() if counts.search(ln)]
    out["pytest -m gpu"] = summary[-1].strip("= ") if summary else f"exit code {proc.returncode}"
    out["pytest exit code"] = proc.returncode


STAGE_FUNCS = {"integration": stage_integration, "virtual": stage_virtual,
               "matching": stage_matching, "cluster": stage_cluster}


# -- driver -----------------------------------------------------------------------------------

def _run_stage(name, limit, out_dir):
    """Run one stage in a fresh process, at most ``limit`` seconds; its figures as a dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name]
    if out_dir:
        cmd += ["--out", str(out_dir)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after its {limit:.0f} s"}, time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": tail[:300]}, time.perf_counter() - t0
    return json.loads(lines[-1]), time.perf_counter() - t0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def results_table(device, figures, seconds):
    """The Markdown section for RESULTS.md: each figure, its target and whether it is met."""
    today = datetime.date.today().isoformat()
    lines = [f"## {today}, GPU acceptance on {device} ({machine()})", "",
             f"`python benchmarks/gpu_acceptance.py`: all stages in {seconds:.0f} s.", "",
             "| stage | figure | value | target | met |", "|---|---|---|---|---|"]
    for stage, values in figures.items():
        for key, value in values.items():
            if key == "pytest exit code":
                continue
            target = TARGETS.get(key)
            met = "" if target is None or not isinstance(value, float) else \
                ("yes" if value >= target else "**no**")
            lines.append(f"| {stage} | {key} | {_fmt(value)} | "
                         f"{'' if target is None else '>= ' + _fmt(float(target))} | {met} |")
    return "\n".join(lines) + "\n"


def add_to_results(section, path):
    """Insert ``section`` above the first dated section of ``path`` (newest first)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    at = text.find("\n## ")
    if at < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        new = text[:at + 1] + section + "\n" + text[at + 1:]
    path.write_text(new)


def plan():
    return "\n".join(f"  {i}. {what} (at most {limit} s)"
                     for i, (_, what, limit) in enumerate(STAGES, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="also write the table, raw figures and pytest log here (default $OUT)")
    ap.add_argument("--no-results", action="store_true", help="leave benchmarks/RESULTS.md alone")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all stages")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.stage:  # inside a stage's own process
        out = {}
        if args.stage == "pytest":
            stage_pytest(out, Path(args.out) / "pytest_gpu.log" if args.out else None)
        else:
            STAGE_FUNCS[args.stage](out)
        print(json.dumps(out))
        return 0

    import diffgpu

    _, n, reason = diffgpu.device._probe()
    if n == 0:
        print(f"No GPU: {reason}\nNothing was run and nothing written. On a machine with a GPU "
              f"this runs (budget {args.budget:.0f} s):\n{plan()}")
        return 0
    device = ", ".join(d.name for d in diffgpu.devices())
    print(f"GPU acceptance on {device}; machine: {machine()}\n{plan()}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figures = {}
    for name, what, limit in STAGES:
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            figures[name] = {"error": "not run: the time budget was spent"}
            continue
        figures[name], took = _run_stage(name, min(limit, left), args.out)
        print(f"{name} ({took:.0f} s): {figures[name]}", flush=True)
    section = results_table(device, figures, time.perf_counter() - start)
    print("\n" + section)
    if not args.no_results:
        add_to_results(section, args.results)
    if args.out:
        (Path(args.out) / "gpu_acceptance.md").write_text(section)
        (Path(args.out) / "gpu_acceptance.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
