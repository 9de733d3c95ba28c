#!/usr/bin/env bash
# r1_s5: preference pairs from the scores (MAX_PAIRS: default RoundsConfig.max_pairs), then DPO of GEN_CKPT on them into
# WORKDIR/dpo$ROUND (the step-3 trainer; torchrun on one node, or salloc ... srun --ntasks-per-node 1 bash ...).
# Extra arguments go to step3_rl.train_dpo (e.g. --beta 0.1 --lr 1e-4; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
: "${GEN_CKPT:?no generator: set GEN_CKPT}"
PAIRS="$WORKDIR/r$ROUND/$NAME.pref.jsonl"
if ! "$PY" -m llama_mp.outputs "$PAIRS"; then  # not recorded complete (llama_mp/outputs.py)
  "$PY" -m step0_coldstart.convert_score_to_prefer --score_file "$WORKDIR/r$ROUND/$NAME.score.jsonl" \
    --output_file "$PAIRS" --max_pairs "${MAX_PAIRS:-$("$PY" -c 'from step0_coldstart.rounds import RoundsConfig; print(RoundsConfig.max_pairs)')}"
fi
resume=$([ -f "$WORKDIR/dpo$ROUND/latest" ] && echo --resume || true)
bash "$REPO_ROOT/scripts/launch.sh" step3_rl.train_dpo --ckpt_dir "$GEN_CKPT" --tokenizer_path "$TOKENIZER" \
  --train_file "$PAIRS" --rejected_key rejected --prompt_format plain --output_dir "$WORKDIR/dpo$ROUND" \
  --max_seq_len "$MAX_SEQ_LEN" --max_prompt_len "$MAX_SEQ_LEN" $resume "$@"
touch "$WORKDIR/dpo$ROUND/.done"
