#!/usr/bin/env bash
# SALMON step 3: PPO against the principle-following reward model. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/train_ppo.sh
# Environment (all optional): CONFIG (configs/ppo_tiny.yaml), CKPT_DIR TOKENIZER (the policy; default: stories260K),
# REWARD_CKPT (a reward-model checkpoint or its training directory; default RM_DIR, else runs/rm: its latest),
# OUTPUT_DIR (runs/ppo), PROMPT_FILE, NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to step3_rl.train_ppo (any config option as a flag, e.g. --kl_coef 0.05; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
# the reward model: a checkpoint, or its training directory (train_ppo reads its latest checkpoint)
REWARD_CKPT="${REWARD_CKPT:-${RM_DIR:-$REPO_ROOT/runs/rm}}"
exec bash "$REPO_ROOT/scripts/launch.sh" step3_rl.train_ppo \
  --config "${CONFIG:-$REPO_ROOT/configs/ppo_tiny.yaml}" --policy_ckpt "$CKPT_DIR" --reward_ckpt "$REWARD_CKPT" \
  --tokenizer_path "$TOKENIZER" --output_dir "${OUTPUT_DIR:-$REPO_ROOT/runs/ppo}" \
  ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
