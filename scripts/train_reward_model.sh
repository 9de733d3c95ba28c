#!/usr/bin/env bash
# SALMON step 2: train the principle-following reward model. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/train_reward_model.sh
# Environment (all optional): CONFIG (configs/reward_model_tiny.yaml), CKPT_DIR TOKENIZER (default: stories260K),
# TRAIN_FILE (runs/step1/synthetic_preference.json), OUTPUT_DIR (runs/rm), NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to train_reward_model (any config option as a flag, e.g. --lr 1e-5; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
exec bash "$REPO_ROOT/scripts/launch.sh" step2_reward_model.train_reward_model \
  --config "${CONFIG:-$REPO_ROOT/configs/reward_model_tiny.yaml}" --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
  --train_file "${TRAIN_FILE:-$REPO_ROOT/runs/step1/synthetic_preference.json}" \
  --output_dir "${OUTPUT_DIR:-$REPO_ROOT/runs/rm}" ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
