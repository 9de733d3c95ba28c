#!/usr/bin/env bash
# r0_s2: per-client {input, output} JSONL of the held-out data set's real rows. Extra arguments go to
# step0_coldstart.sft_federated (e.g. --split_type test, --num_client 4 --split_method dirichlet --alpha 0.5).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO_ROOT/scripts/tabular_env.sh"
exec "$PY" -m step0_coldstart.sft_federated --dataset "$DATASET" --splits_dir "$SPLITS_DIR" --output_dir "$WORKDIR/fed" "$@"
