#!/usr/bin/env bash
# SALMON step 3: PPO against the principle-following reward model. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/train_ppo.sh
# Environment (all optional): CONFIG (configs/ppo_tiny.yaml), CKPT_DIR TOKENIZER (the policy; default: stories260K),
# REWARD_CKPT (runs/rm/checkpoint-<latest>), OUTPUT_DIR (runs/ppo), PROMPT_FILE, NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to step3_rl.train_ppo (any config option as a flag, e.g. --kl_coef 0.05; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
if [ -z "${REWARD_CKPT:-}" ]; then
  RM_DIR="${RM_DIR:-$REPO_ROOT/runs/rm}"
  PY="${PYTHON_BIN:-$([ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
  REWARD_CKPT="$(PYTHONPATH="$REPO_ROOT" "$PY" -m llama_mp.checkpoint latest "$RM_DIR")" || {
    echo "error: no reward model in $RM_DIR: set REWARD_CKPT or train one (scripts/train_reward_model.sh)" >&2; exit 2; }
fi
exec bash "$REPO_ROOT/scripts/launch.sh" step3_rl.train_ppo \
  --config "${CONFIG:-$REPO_ROOT/configs/ppo_tiny.yaml}" --policy_ckpt "$CKPT_DIR" --reward_ckpt "$REWARD_CKPT" \
  --tokenizer_path "$TOKENIZER" --output_dir "${OUTPUT_DIR:-$REPO_ROOT/runs/ppo}" \
  ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
