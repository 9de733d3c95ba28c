# Sourced by the step scripts: CKPT_DIR and TOKENIZER default to the embedded stories260K (converted once into
# runs/stories260K) and its tok512 tokenizer; EMBEDDED_DEFAULT=1 then tells the scripts to use small default lengths.
REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -z "${CKPT_DIR:-}" ]; then
  CKPT_DIR="$REPO_ROOT/runs/stories260K"
  if [ ! -f "$CKPT_DIR/params.json" ]; then
    PY="${PYTHON_BIN:-$([ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}"
    PYTHONPATH="$REPO_ROOT" "$PY" -m llama_mp.convert llama2c --input "$REPO_ROOT/data/llama2c/stories260K.bin" \
      --output_dir "$CKPT_DIR"
  fi
  TOKENIZER="${TOKENIZER:-$REPO_ROOT/data/llama2c/tok512.model}"
  EMBEDDED_DEFAULT=1
fi
: "${TOKENIZER:?set TOKENIZER to the SentencePiece model of CKPT_DIR}"
export CKPT_DIR TOKENIZER EMBEDDED_DEFAULT
