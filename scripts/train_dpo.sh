#!/usr/bin/env bash
# DPO on prompt/chosen/rejected pairs (the RL-free path). Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/train_dpo.sh
# Environment (all optional): CONFIG (configs/dpo_tiny.yaml), CKPT_DIR TOKENIZER (default: stories260K),
# TRAIN_FILE (runs/step1/synthetic_preference_pairs.jsonl), OUTPUT_DIR (runs/dpo), NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to step3_rl.train_dpo (any config option as a flag, e.g. --beta 0.05; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
exec bash "$REPO_ROOT/scripts/launch.sh" step3_rl.train_dpo \
  --config "${CONFIG:-$REPO_ROOT/configs/dpo_tiny.yaml}" --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
  --train_file "${TRAIN_FILE:-$REPO_ROOT/runs/step1/synthetic_preference_pairs.jsonl}" \
  --output_dir "${OUTPUT_DIR:-$REPO_ROOT/runs/dpo}" ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
