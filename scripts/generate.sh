#!/usr/bin/env bash
# Sample completions for a JSONL prompts file, on one node or under `salloc ... srun bash scripts/generate.sh`.
#   CKPT_DIR=... TOKENIZER=... PROMPTS=in.jsonl OUTPUT=out.jsonl [NPROC_PER_NODE=8 MODEL_PARALLEL_SIZE=8] \
#     bash scripts/generate.sh [extra llama_mp.generate flags]
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${CKPT_DIR:?set CKPT_DIR to a Meta-layout checkpoint}" "${TOKENIZER:?set TOKENIZER to a SentencePiece model}"
: "${PROMPTS:?set PROMPTS to a JSONL prompts file}" "${OUTPUT:?set OUTPUT to the JSONL output path}"
exec bash "$REPO_ROOT/scripts/launch.sh" llama_mp.generate --ckpt_dir "$CKPT_DIR" --tokenizer_path "$TOKENIZER" \
  --prompts_file "$PROMPTS" --output_file "$OUTPUT" ${MODEL_PARALLEL_SIZE:+--model_parallel_size "$MODEL_PARALLEL_SIZE"} "$@"
