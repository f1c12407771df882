"""Run every benchmark (benchmarks/bench_*.py), each in its own process, and print their tables.

    python benchmarks/run_all.py            # all
    python benchmarks/run_all.py device     # those whose name contains "device"

Each benchmark runs in a fresh interpreter so that one tool's threads (OpenMP in pyFAI or
numba spin after their parallel regions) cannot slow the next. Paste the tables, with the
date and machine, into benchmarks/RESULTS.md.
"""

import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv):
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [p for p in scripts if any(a in p.stem for a in argv)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    print(f"# diffgpu benchmarks, {datetime.date.today().isoformat()}")
    failed = []
    for script in scripts:
        print(f"\n## {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script)], env=env) != 0:
            failed.append(script.name)
    if failed:
        print("\nFAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
