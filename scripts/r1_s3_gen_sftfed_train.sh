#!/usr/bin/env bash
# r1_s3: per-client {input, output} JSONL of the synthetic rows (same options as r0_s2).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
exec "$PY" -m step0_coldstart.sft_federated --dataset "$DATASET" --input_file "$WORKDIR/r$ROUND/$NAME.syn.csv" \
  --splits_dir "$SPLITS_DIR" --output_dir "$WORKDIR/r$ROUND/fed" "$@"
