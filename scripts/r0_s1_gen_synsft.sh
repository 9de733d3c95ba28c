#!/usr/bin/env bash
# r0_s1: cold-start SFT data (prompts of in-context rows from SOURCES; prompts only for the held-out DATASET), then
# the SFT generator (the shared training loop; torchrun on one node, or salloc ... srun --ntasks-per-node 1 bash ...).
# Extra arguments go to step0_coldstart.train_sft (e.g. --epochs 2 --lr 1e-3; --resume to continue).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
R0="$WORKDIR/r0"
if ! "$PY" -m llama_mp.outputs "$R0/sft_train.jsonl" "$R0/${NAME}_prompts.jsonl" "$R0/lengths.json"; then  # not complete
  "$PY" -m step0_coldstart.sft_generator --datasets $SOURCES --heldout "$DATASET" --tokenizer_path "$TOKENIZER" \
    --output_dir "$WORKDIR/r0" --splits_dir "$SPLITS_DIR" --max_seq_len "$MAX_SEQ_LEN"
fi
resume=$([ -f "$WORKDIR/sft/latest" ] && echo --resume || true)  # a killed run continues from its last checkpoint
SFT_LR="$("$PY" -c 'from step0_coldstart.rounds import RoundsConfig; print(RoundsConfig.sft_lr)')"  # the one default
bash "$REPO_ROOT/scripts/launch.sh" step0_coldstart.train_sft --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
  --train_file "$WORKDIR/r0/sft_train.jsonl" --output_dir "$WORKDIR/sft" --max_seq_len "$MAX_SEQ_LEN" --lr "$SFT_LR" $resume "$@"
touch "$WORKDIR/sft/.done"
