#!/usr/bin/env bash
# SALMON step 1.2: the policy judges its two responses per prompt under every principle, both orders, then the
# judgments are aggregated into reward-model data. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/generate_synthetic_preference.sh
# Environment (all optional): CKPT_DIR TOKENIZER (default: stories260K), OUT_DIR (runs/step1, holding
# oasst1_response0.jsonl and oasst1_response1.jsonl), NPROC_PER_NODE, MODEL_PARALLEL_SIZE, MAX_SEQ_LEN (1536),
# MAX_BATCH_SIZE (32), MAX_RESPONSE_TOKENS (640), MAX_INSTRUCTION_TOKENS (256), MIN_RESPONSE_CHARS (16, for both
# judging and aggregation), PRINCIPLE_FILE, AGGREGATE_FLAGS (extra flags for the aggregation).
# Extra arguments go to synthetic_preference (e.g. --overwrite). Rerunning resumes an interrupted run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/step1}"
PY="${PYTHON_BIN:-$([ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
complete() { PYTHONPATH="$REPO_ROOT" "$PY" -m llama_mp.outputs "$@"; }  # the outputs' record says complete
if complete "$OUT_DIR/oasst1_preference.jsonl" && [[ " $* " != *" --overwrite "* ]]; then
  echo "[judge] $OUT_DIR/oasst1_preference.jsonl is complete: judging skipped (pass --overwrite to redo it)"
else
bash "$REPO_ROOT/scripts/launch.sh" step1_synthetic_preference.synthetic_preference \
  --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
  --response_files "$OUT_DIR/oasst1_response0.jsonl" "$OUT_DIR/oasst1_response1.jsonl" \
  --output_file "$OUT_DIR/oasst1_preference.jsonl" --max_seq_len "${MAX_SEQ_LEN:-1536}" \
  --max_batch_size "${MAX_BATCH_SIZE:-32}" --max_response_tokens "${MAX_RESPONSE_TOKENS:-640}" \
  --max_instruction_tokens "${MAX_INSTRUCTION_TOKENS:-256}" ${PRINCIPLE_FILE:+--principle_file "$PRINCIPLE_FILE"} \
  --min_response_chars "${MIN_RESPONSE_CHARS:-16}" \
  ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
fi
# The aggregation is a single CPU process: only the first task of an allocation runs it.
overwrite=$([[ " $* " == *" --overwrite "* ]] && echo --overwrite || true)
if complete "$OUT_DIR/synthetic_preference.json" "$OUT_DIR/synthetic_preference_pairs.jsonl" && [ -z "$overwrite" ]; then
  echo "[aggregate] $OUT_DIR/synthetic_preference.json is complete: aggregation skipped (pass --overwrite to redo it)"
elif [ "${SLURM_PROCID:-0}" = "0" ]; then
  "$PY" -m step1_synthetic_preference.aggregate_synthetic_preference \
    --response_files "$OUT_DIR/oasst1_response0.jsonl" "$OUT_DIR/oasst1_response1.jsonl" \
    --preference_file "$OUT_DIR/oasst1_preference.jsonl" --output_file "$OUT_DIR/synthetic_preference.json" \
    --min_response_chars "${MIN_RESPONSE_CHARS:-16}" ${AGGREGATE_FLAGS:-} $overwrite
fi
