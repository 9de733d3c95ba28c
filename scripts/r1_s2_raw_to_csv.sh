#!/usr/bin/env bash
# r1_s2: the parsed synthetic rows of round ROUND as a CSV with the data set's columns.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
exec "$PY" -m step0_coldstart.convert_raw_to_csv --dataset "$DATASET" --raw_file "$RAW_FILE" \
  --output_file "$WORKDIR/r$ROUND/$NAME.syn.csv" "$@"
