#!/usr/bin/env bash
# SALMON step 1.1, first response per prompt (seed 42). See generate_oasst1_responses.sh for the environment.
SEED="${SEED:-42}" INDEX=0 exec bash "$(dirname "${BASH_SOURCE[0]}")/generate_oasst1_responses.sh" "$@"
