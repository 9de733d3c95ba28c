#!/usr/bin/env bash
# The project's main job on the embedded default (stories260K on CPU, gloo), under torchrun on this machine.
#   bash scripts/quickstart.sh [--fresh]
# Creates/reuses ./.venv, then runs each stage once; a rerun skips the stages whose outputs exist (--fresh: start over).
# Stages so far (the later SALMON and tabular stages join as they land):
#   1. convert data/llama2c/stories260K.bin to the Meta layout, 1 shard and 2 shards
#   2. sample completions for data/prompts/stories_prompts.jsonl with 2 processes: 2-way tensor parallel
#   3. score the completions (teacher-forced log-probs) in one process
#   4. SALMON step 1 on 32 OASST1 prompts: two responses each, self-judging under 11 principles, aggregation
#   5. SALMON step 2: the principle-following reward model on those pairs, evaluated on held-out and human pairs
#   6. SALMON step 3: DPO on the same pairs, and PPO for a few steps against the reward model
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
RUN=runs/quickstart
if [ "${1:-}" = "--fresh" ]; then rm -rf "$RUN"; fi
mkdir -p "$RUN"
TOKENIZER=data/llama2c/tok512.model
stage() { echo "[quickstart] $(date +%H:%M:%S) $*"; }

stage "1/6 convert stories260K to the Meta layout"
for mp in 1 2; do
  if [ ! -f "$RUN/stories260K_mp$mp/params.json" ]; then
    python -m llama_mp.convert llama2c --input data/llama2c/stories260K.bin --output_dir "$RUN/stories260K_mp$mp" \
      --model_parallel_size "$mp"
  else
    echo "  $RUN/stories260K_mp$mp exists, skipped"
  fi
done

stage "2/6 sample with torchrun, 2 processes, model-parallel 2"
if [ ! -f "$RUN/samples.jsonl" ]; then
  NPROC_PER_NODE=2 OMP_NUM_THREADS=1 bash scripts/launch.sh llama_mp.generate --ckpt_dir "$RUN/stories260K_mp2" \
    --tokenizer_path "$TOKENIZER" --prompts_file data/prompts/stories_prompts.jsonl --output_file "$RUN/samples.jsonl" \
    --max_gen_len 96 --temperature 0.7 --top_p 0.9 --stop "\n" --seed 42
else
  echo "  $RUN/samples.jsonl exists, skipped"
fi

stage "3/6 score the samples with the 1-shard checkpoint"
python - "$RUN" <<'PY'
import json, sys
from llama_mp import distributed
from llama_mp.checkpoint import load_model
from llama_mp.jsonl import read_jsonl
from llama_mp.sampler import Sampler
from llama_mp.tokenizer import Tokenizer
run = sys.argv[1]
distributed.init(1)
sampler = Sampler(load_model(f"{run}/stories260K_mp1"), Tokenizer("data/llama2c/tok512.model"), progress_every=1e9)
records = read_jsonl(f"{run}/samples.jsonl")
scores = sampler.score([r["prompt"] for r in records], [r["tokens"] for r in records], temperature=0.7)
for r, s in zip(records, scores):
    drift = max(abs(a - b) for a, b in zip(r["logprobs"], s))
    story = json.dumps(r["prompt"] + r["generation"])
    print(f"  {r['id']}: {story[:90]}{'...' if len(story) > 90 else ''} [{r['finish_reason']}, {len(s)} tokens, "
          f"mean log-prob {sum(s) / len(s):.3f}, |sampled - rescored| <= {drift:.1e}]")
distributed.teardown()
PY
stage "4/6 SALMON step 1: responses (seeds 42, 43), self-judging, aggregation (2 data-parallel processes)"
STEP1="$RUN/step1"
export CKPT_DIR="$RUN/stories260K_mp1" TOKENIZER OUT_DIR="$STEP1" NPROC_PER_NODE=2 MODEL_PARALLEL_SIZE=1 OMP_NUM_THREADS=1
for i in 0 1; do
  if [ ! -f "$STEP1/oasst1_response$i.jsonl" ]; then  # a killed run resumes: same command, same flags
    MAX_PROMPTS=32 MAX_GEN_LEN=128 bash scripts/generate_oasst1_response$i.sh
  else
    echo "  $STEP1/oasst1_response$i.jsonl exists, skipped"
  fi
done
if [ ! -f "$STEP1/synthetic_preference.json" ]; then
  MAX_RESPONSE_TOKENS=128 MAX_INSTRUCTION_TOKENS=64 bash scripts/generate_synthetic_preference.sh
else
  echo "  $STEP1/synthetic_preference.json exists, skipped"
fi
stage "5/6 SALMON step 2: reward model (2 data-parallel processes)"
if [ ! -f "$RUN/rm/eval.json" ]; then
  resume=$([ -f "$RUN/rm/latest" ] && echo --resume || true)  # a killed run continues from its last checkpoint
  TRAIN_FILE="$STEP1/synthetic_preference.json" OUTPUT_DIR="$RUN/rm" bash scripts/train_reward_model.sh \
    --save_every 5 $resume
else
  echo "  $RUN/rm/eval.json exists, skipped"
fi
cat "$RUN/rm/eval.json"; echo
stage "6/6 SALMON step 3: DPO on the step-1 pairs, PPO against the reward model (2 data-parallel processes)"
run_stage() {  # name, command...: skipped once it has finished; a killed run continues with --resume
  local name="$1"; shift
  if [ -f "$RUN/$name/.done" ]; then echo "  $RUN/$name finished, skipped"; return; fi
  local resume; resume=$([ -f "$RUN/$name/latest" ] && echo --resume || true)
  OUTPUT_DIR="$RUN/$name" "$@" $resume && touch "$RUN/$name/.done"
}
run_stage dpo env TRAIN_FILE="$STEP1/synthetic_preference_pairs.jsonl" bash scripts/train_dpo.sh --save_every 4
run_stage ppo env RM_DIR="$RUN/rm" bash scripts/train_ppo.sh --save_every 2
tail -n 1 "$RUN/dpo/metrics.jsonl"; echo
tail -n 1 "$RUN/ppo/metrics.jsonl"; echo
stage "done: outputs in $RUN"
