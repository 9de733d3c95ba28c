#!/usr/bin/env bash
# The project's main job on the embedded default (stories260K on CPU, gloo): both pipelines end to end, with a report.
#   bash scripts/quickstart.sh [--fresh] [--config configs/quickstart.yaml] [--run_dir DIR]
# Creates/reuses ./.venv, then runs scripts/quickstart.py: SALMON (responses, self-judging, reward model, DPO, PPO)
# and the tabular rounds (SFT generator, one round of synthetic preference + DPO, ML efficiency); sizes in
# configs/quickstart.yaml. A rerun after a crash or kill -9 continues where it stopped (--fresh starts over).
# Outputs: runs/quickstart/report.md and report.json (per stage: status, seconds, peak memory, figures).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python scripts/quickstart.py "$@"
