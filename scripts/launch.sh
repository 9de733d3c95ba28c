#!/usr/bin/env bash
# The one launcher: run `python -m MODULE ARGS...` on every process of this node or of a SLURM allocation.
#
#   bash scripts/launch.sh MODULE ARGS...                          one node: torchrun with NPROC_PER_NODE processes
#                                                                  (one: python directly)
#   salloc -N 2 --gpus-per-node 8 ... srun --ntasks-per-node 1 bash scripts/launch.sh MODULE ARGS...
#                                                                  one torchrun per node, rendezvous on the first node
#   srun --ntasks-per-node 8 ... bash scripts/launch.sh MODULE ARGS...
#                                                                  one task per process: python directly (llama_mp
#                                                                  reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
# Environment: NPROC_PER_NODE (default: the GPU count, else 1), MASTER_PORT (default: 29500 + job id % 1000),
# PYTHON_BIN (default: $VENV/bin/python, VENV defaulting to the project's .venv, else python3),
# OMP_NUM_THREADS (default: cores / processes).
# torchrun runs as llama_mp.torchrun: the same launcher, reporting a failed worker in one line, not a traceback.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/launch.sh MODULE [ARGS...]   e.g. bash scripts/launch.sh llama_mp.generate --help" >&2
  exit 2
fi
MODULE="$1"; shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
if [ -z "${PYTHON_BIN:-}" ]; then
  if [ -x "$VENV/bin/python" ]; then PYTHON_BIN="$VENV/bin/python"; else PYTHON_BIN=python3; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gpus="${gpus:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
MASTER_PORT="${MASTER_PORT:-$(( 29500 + ${SLURM_JOB_ID:-0} % 1000 ))}"

# Inside an srun step (only srun sets SLURM_STEP_NUM_TASKS; an sbatch script itself is one process and runs below).
if [ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_STEP_NUM_TASKS:-}" ]; then
  nodes="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"
  tasks="$SLURM_STEP_NUM_TASKS"
  nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-localhost}}"
  master="$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)"
  [ -n "$master" ] || master="$("$PYTHON_BIN" -m llama_mp.distributed "$nodelist")"
  export MASTER_ADDR="${MASTER_ADDR:-$master}" MASTER_PORT
  if [ "$tasks" -gt "$nodes" ]; then  # several tasks per node: each task is one process
    exec "$PYTHON_BIN" -m "$MODULE" "$@"
  fi
  # one task per node here, so the task's rank is the node's rank within this step
  exec "$PYTHON_BIN" -m llama_mp.torchrun --nnodes "$nodes" --node_rank "$SLURM_PROCID" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m "$MODULE" "$@"
fi
if [ "$NPROC_PER_NODE" = 1 ]; then  # one process: no launcher to start (torchrun's own start-up is ~2.4 s on CPU)
  exec "$PYTHON_BIN" -m "$MODULE" "$@"
fi
exec "$PYTHON_BIN" -m llama_mp.torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" -m "$MODULE" "$@"
