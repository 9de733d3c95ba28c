#!/usr/bin/env bash
# r1_s1: sample num_repeat rows per held-out prompt from GEN_CKPT (configs/syn_addprompt.yaml), parse them, attach the
# ds0/ds1 scoring prompts. SYN_CONFIG: configs/syn_addprompt.yaml (configs/syn_addprompt_tiny.yaml, guided, on the
# embedded default). Sharded and resumable: torchrun on one node, or salloc ... srun --ntasks-per-node 1 bash ...
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
: "${GEN_CKPT:?no generator: run scripts/r0_s1_gen_synsft.sh first or set GEN_CKPT}"
exec bash "$REPO_ROOT/scripts/launch.sh" step0_coldstart.syn_addprompt --dataset "$DATASET" --ckpt_dir "$GEN_CKPT" \
  --tokenizer_path "$TOKENIZER" --max_seq_len "$MAX_SEQ_LEN" --prompt_file "$WORKDIR/r0/${NAME}_prompts.jsonl" \
  --anchor_file "$WORKDIR/score_anchors/${NAME}_anchors.csv" --output_dir "$WORKDIR/r$ROUND" --splits_dir "$SPLITS_DIR" \
  --config "${SYN_CONFIG:-$REPO_ROOT/configs/syn_addprompt$([ -n "${EMBEDDED_DEFAULT:-}" ] && echo _tiny).yaml}" "$@"
