#!/usr/bin/env bash
# The project's test command: creates/reuses ./.venv, installs requirements.txt, runs the test suite.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k sampler).
export SETUP_TEST=1
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python -m pytest -q tests "$@"
