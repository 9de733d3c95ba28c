#!/usr/bin/env bash
# SALMON step 1.1: sample one response per prompt with seed SEED into $OUT_DIR/oasst1_response$INDEX.jsonl.
# Usually called through generate_oasst1_response0.sh / ..._response1.sh. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/generate_oasst1_response0.sh
# Environment (all optional): CKPT_DIR TOKENIZER (default: stories260K), OUT_DIR (runs/step1), CONFIG (a YAML of
# generate_responses' options; default configs/responses_tiny.yaml on the embedded default, none otherwise),
# PROMPT_FILE, NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to generate_responses: any option as a flag (--max_prompts 64 --max_gen_len 128; --help lists
# them with their defaults), --overwrite. Rerunning resumes an interrupted run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
: "${SEED:?set SEED}" "${INDEX:?set INDEX}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/step1}"
CONFIG="${CONFIG-$([ -n "${EMBEDDED_DEFAULT:-}" ] && echo "$REPO_ROOT/configs/responses_tiny.yaml" || true)}"
mkdir -p "$OUT_DIR"
exec bash "$REPO_ROOT/scripts/launch.sh" step1_synthetic_preference.generate_responses ${CONFIG:+--config "$CONFIG"} \
  --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" --output_file "$OUT_DIR/oasst1_response$INDEX.jsonl" \
  --seed "$SEED" ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} \
  ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
