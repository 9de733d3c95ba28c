# Sourced by the r0_s*/r1_s* scripts: the tabular pipeline's paths, all overridable from the environment.
#   DATASET     the held-out data set's YAML (configs/tabular/abalone.yaml)
#   SOURCES     the cold-start training data sets' YAMLs (adult, buddy, california)
#   WORKDIR     where every stage writes (runs/tabular); ROUND: the round of r1_* scripts (1)
#   GEN_CKPT    the generator that r1_s1 samples (default: the latest SFT checkpoint, or DPO of the round before)
#   MAX_SEQ_LEN context of the generator (1536 on the embedded default)
REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$REPO_ROOT/scripts/default_model.sh"
DATASET="${DATASET:-$REPO_ROOT/configs/tabular/abalone.yaml}"
SOURCES="${SOURCES:-$REPO_ROOT/configs/tabular/adult.yaml $REPO_ROOT/configs/tabular/buddy.yaml $REPO_ROOT/configs/tabular/california.yaml}"
WORKDIR="${WORKDIR:-$REPO_ROOT/runs/tabular}"
ROUND="${ROUND:-1}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-1536}"
PY="${PYTHON_BIN:-$([ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
NAME="$(PYTHONPATH="$REPO_ROOT" "$PY" -c 'import sys; from step0_coldstart.tabular import load_schema; print(load_schema(sys.argv[1]).name)' "$DATASET")"
SPLITS_DIR="$WORKDIR/splits"
RAW_FILE="$WORKDIR/r$ROUND/$NAME.raw.jsonl"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
latest() { "$PY" -m llama_mp.output_dir latest "$1"; }  # the checkpoint layout (llama_mp/output_dir.py: no torch)
if [ -z "${GEN_CKPT:-}" ]; then  # a finished training (.done), never an intermediate checkpoint
  if [ "$ROUND" -gt 1 ] && [ -f "$WORKDIR/dpo$((ROUND - 1))/.done" ]; then GEN_CKPT="$(latest "$WORKDIR/dpo$((ROUND - 1))")"
  elif [ -f "$WORKDIR/sft/.done" ]; then GEN_CKPT="$(latest "$WORKDIR/sft")"; fi
fi
