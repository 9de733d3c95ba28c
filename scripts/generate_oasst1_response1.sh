#!/usr/bin/env bash
# SALMON step 1.1, second response per prompt (seed 43). See generate_oasst1_responses.sh for the environment.
SEED="${SEED:-43}" INDEX=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/generate_oasst1_responses.sh" "$@"
