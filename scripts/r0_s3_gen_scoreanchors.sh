#!/usr/bin/env bash
# r0_s3: scoring anchors of the held-out data set (KMeans over its validation split, configs/synscore_anchors.yaml).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
exec "$PY" -m step0_coldstart.synscore_anchors --dataset "$DATASET" --splits_dir "$SPLITS_DIR" \
  --output_dir "$WORKDIR/score_anchors" "$@"
