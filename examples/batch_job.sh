#!/usr/bin/env bash
# A batch run of diffgpu on a SLURM cluster: GPU workers started by dask-jobqueue,
# the diffgpu command line connected to their scheduler.
#
#   sbatch examples/batch_job.sh scan.mib results/
#
#SBATCH --job-name=diffgpu
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --gres=gpu:1
# (--device gpu below checks for a GPU where the command runs, in this job, as well as on
# the workers: the graph is built here with CuPy blocks)
set -euo pipefail
input=${1:?usage: batch_job.sh INPUT OUTPUT_DIR}
outdir=${2:?usage: batch_job.sh INPUT OUTPUT_DIR}
mkdir -p "$outdir"

# 1. start GPU workers as their own jobs; write the scheduler address to a file
python - "$outdir/scheduler.json" <<'PY' &
import sys, time
from dask_jobqueue import SLURMCluster
cluster = SLURMCluster(cores=8, processes=1, memory="64GB", walltime="02:00:00",
                       job_extra_directives=["--gres=gpu:1"],
                       worker_extra_args=["--resources", "GPU=1"])
cluster.scale(jobs=4)
open(sys.argv[1], "w").write(cluster.scheduler_address)
print("dashboard:", cluster.dashboard_link, flush=True)
while True:
    time.sleep(60)  # keep the cluster alive until this job ends
PY
cluster_pid=$!
# wait for the scheduler's address, at most 20 minutes, and not at all if the cluster's
# script has failed (dask-jobqueue missing, the jobs refused): a failed background job
# does not stop a `set -e` script, and a plain wait loop ran until the walltime
for _ in $(seq 600); do
    [ -s "$outdir/scheduler.json" ] && break
    if ! kill -0 "$cluster_pid" 2>/dev/null; then
        echo "batch_job.sh: the dask-jobqueue cluster did not start (see its error above)" >&2
        exit 1
    fi
    sleep 2
done
if [ ! -s "$outdir/scheduler.json" ]; then
    echo "batch_job.sh: no scheduler address after 20 minutes" >&2
    kill "$cluster_pid"
    exit 1
fi
scheduler=$(cat "$outdir/scheduler.json")

# 2. the reductions; each writes its .zspy atomically
diffgpu info
diffgpu integrate "$input" -o "$outdir/polar.zspy" --npt 100 --npt-azim 360 \
    --device gpu --scheduler "$scheduler"
diffgpu virtual "$input" -o "$outdir/virtual.zspy" --disc 4 --annulus 12 60 \
    --device gpu --scheduler "$scheduler"

kill "$cluster_pid"
