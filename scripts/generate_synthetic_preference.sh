#!/usr/bin/env bash
# SALMON step 1.2: the policy judges its two responses per prompt under every principle, both orders, then the
# judgments are aggregated into reward-model data. Runs on one node (torchrun) or as
#   salloc --nodes N ... srun --ntasks-per-node 1 bash scripts/generate_synthetic_preference.sh
# Environment (all optional): CKPT_DIR TOKENIZER (default: stories260K), OUT_DIR (runs/step1, holding
# oasst1_response0.jsonl and oasst1_response1.jsonl), CONFIG (the judge's YAML, configs/judge.yaml), AGGREGATE_CONFIG
# (a YAML of the aggregation's options; none: its defaults), NPROC_PER_NODE, MODEL_PARALLEL_SIZE.
# Extra arguments go to synthetic_preference: any option as a flag (--max_response_tokens 128; --help lists them),
# --overwrite (which also redoes the aggregation). Both commands read min_response_chars (default 16): set it in both
# YAML files or neither. Rerunning resumes an interrupted run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/default_model.sh"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/step1}"
PY="${PYTHON_BIN:-$([ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
complete() { PYTHONPATH="$REPO_ROOT" "$PY" -m llama_mp.outputs "$@"; }  # the outputs' record says complete
overwrite=$([[ " $* " == *" --overwrite "* ]] && echo --overwrite || true)
if complete "$OUT_DIR/oasst1_preference.jsonl" && [ -z "$overwrite" ]; then
  echo "[judge] $OUT_DIR/oasst1_preference.jsonl is complete: judging skipped (pass --overwrite to redo it)"
else
  bash "$REPO_ROOT/scripts/launch.sh" step1_synthetic_preference.synthetic_preference \
    --config "${CONFIG:-$REPO_ROOT/configs/judge.yaml}" --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
    --response_files "$OUT_DIR/oasst1_response0.jsonl" "$OUT_DIR/oasst1_response1.jsonl" \
    --output_file "$OUT_DIR/oasst1_preference.jsonl" \
    ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
fi
if complete "$OUT_DIR/synthetic_preference.json" "$OUT_DIR/synthetic_preference_pairs.jsonl" && [ -z "$overwrite" ]; then
  echo "[aggregate] $OUT_DIR/synthetic_preference.json is complete: aggregation skipped (pass --overwrite to redo it)"
elif [ "${SLURM_PROCID:-0}" = "0" ]; then
  "$PY" -m step1_synthetic_preference.aggregate_synthetic_preference ${AGGREGATE_CONFIG:+--config "$AGGREGATE_CONFIG"} \
    --response_files "$OUT_DIR/oasst1_response0.jsonl" "$OUT_DIR/oasst1_response1.jsonl" \
    --preference_file "$OUT_DIR/oasst1_preference.jsonl" --output_file "$OUT_DIR/synthetic_preference.json" $overwrite
fi
