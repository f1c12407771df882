"""Shared helpers for the benchmark scripts: honest timing and a printed table."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Peers' OpenMP threads (pyFAI, numba) spin after their parallel regions and slow whatever
# is timed next on a small machine: make them sleep instead. Set before any import of them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def warm_memory(gib=3):
    """Touch (then free) ``gib`` GiB once, before timing anything.

    On a virtual machine whose memory the hypervisor backs lazily (this development VM),
    the first touch of guest memory costs ~10x more than later touches: a 147 MB output
    array cost 290 ms on first touch and 16 ms afterwards. Every tool's process calls
    this first, so no tool is charged for the VM's warm-up.
    """
    import numpy as np

    buf = np.ones(int(gib * 2**30) // 8)
    del buf


def median_time(func, repeat=5, warmup=1, sync=None):
    """Median wall time of ``func()`` over ``repeat`` runs after ``warmup`` runs.

    ``sync`` is called after each run (e.g. a CUDA stream synchronise) before the clock stops.
    """
    for _ in range(warmup):
        func()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine():
    """One line naming this machine."""
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def print_table(title, header, rows):
    """Print rows (lists) under a header as a Markdown table."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row) + " |")
    sys.stdout.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def run_tool(script, name, argv, python=None):
    """Run ``script --tool name *argv`` in a fresh process; return the dict it printed as JSON.

    Each tool gets its own interpreter so that no tool's threads or caches affect another;
    ``python`` runs it with another interpreter (a peer in its own virtual environment).
    """
    cmd = [python or sys.executable, str(script), "--tool", name] + [str(a) for a in argv]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def tool_process(func, gib=3):
    """The body of a ``--tool`` process: warm the memory, fill a dict, print it as JSON."""
    warm_memory(gib)
    out = {}
    try:
        func(out)
    except ImportError as err:
        out = {"error": f"not installed ({err.name})"}
    print(json.dumps(out))


def ratio(a, b):
    """``a / b`` as "12.3x" when both are numbers, else "n/a"."""
    return f"{a / b:.1f}x" if isinstance(a, float) and isinstance(b, float) else "n/a"


def device_pipeline(frames, chunks, center, npt=100, npt_azim=360, r_max=128):
    """A callable running the host -> GPU -> host 2D integration of ``frames`` (a host array,
    lazily in ``chunks``): the transfer in, the kernel and the result back, as one dask graph."""
    import numpy as np

    import diffgpu

    lazy = diffgpu.DiffractionPatterns(frames).as_lazy()
    lazy.data = lazy.data.rechunk(chunks)
    lazy.calibration.center = center
    lazy.to_device()

    def pipeline():
        p = lazy.get_azimuthal_integral2d(npt=npt, npt_azim=npt_azim, radial_range=(0, r_max))
        p.to_host()
        p.compute(show_progressbar=False)
        assert type(p.data) is np.ndarray
    return pipeline
