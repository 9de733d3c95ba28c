#!/usr/bin/env bash
# r1_s4: gain_score and status_score of every sample. BACKEND=sklearn (default, offline) or BACKEND=llm with
# SCORER_CKPT (default GEN_CKPT) answering the ds0/ds1 prompts (sharded, resumable, launched like r1_s1).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
BACKEND="${BACKEND:-sklearn}"
args=(--dataset "$DATASET" --raw_file "$RAW_FILE" --output_file "$WORKDIR/r$ROUND/$NAME.score.jsonl" --splits_dir "$SPLITS_DIR")
if [ "$BACKEND" = llm ]; then
  SCORER_CKPT="${SCORER_CKPT:-${GEN_CKPT:?set SCORER_CKPT or GEN_CKPT}}"
  exec bash "$REPO_ROOT/scripts/launch.sh" step0_coldstart.syn_addscore "${args[@]}" --backend llm \
    --ckpt_dir "$SCORER_CKPT" --tokenizer_path "$TOKENIZER" --max_seq_len "$MAX_SEQ_LEN" "$@"
fi
exec "$PY" -m step0_coldstart.syn_addscore "${args[@]}" --backend sklearn "$@"
