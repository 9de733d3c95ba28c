#!/usr/bin/env bash
# SALMON step 1.1: sample one response per prompt with seed SEED into $OUT_DIR/oasst1_response$INDEX.jsonl.
# Usually called through generate_oasst1_response0.sh / ..._response1.sh. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/generate_oasst1_response0.sh
# Environment (all optional): CKPT_DIR TOKENIZER (default: stories260K), OUT_DIR (runs/step1), PROMPT_FILE,
# MAX_PROMPTS, NPROC_PER_NODE, MODEL_PARALLEL_SIZE, MAX_SEQ_LEN, MAX_GEN_LEN (768; 128 on the embedded default,
# whose context is 512), MAX_BATCH_SIZE (32).
# Extra arguments go to generate_responses (e.g. --overwrite). Rerunning resumes an interrupted run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
: "${SEED:?set SEED}" "${INDEX:?set INDEX}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/step1}"
mkdir -p "$OUT_DIR"
exec bash "$REPO_ROOT/scripts/launch.sh" step1_synthetic_preference.generate_responses \
  --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" --output_file "$OUT_DIR/oasst1_response$INDEX.jsonl" \
  --seed "$SEED" --max_gen_len "${MAX_GEN_LEN:-$([ -n "${EMBEDDED_DEFAULT:-}" ] && echo 128 || echo 768)}" --max_batch_size "${MAX_BATCH_SIZE:-32}" \
  ${PROMPT_FILE:+--prompt_file "$PROMPT_FILE"} ${MAX_PROMPTS:+--max_prompts "$MAX_PROMPTS"} \
  ${MAX_SEQ_LEN:+--max_seq_len "$MAX_SEQ_LEN"} ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
