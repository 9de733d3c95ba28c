# Sourced by the entry scripts: create or reuse ./.venv and install requirements.txt into it.
# Reinstalls only when requirements.txt changed (its hash is stamped into the venv).
# Override the interpreter that creates the venv with BASE_PYTHON=/path/to/python3.11, the venv location with VENV=dir.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
BASE_PYTHON="${BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV with $BASE_PYTHON"
  "$BASE_PYTHON" -m venv "$VENV"
fi
want="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
have="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "[setup] installing requirements.txt into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO_ROOT/requirements.txt"
  echo "$want" > "$VENV/.requirements.sha256"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO_ROOT"
