#!/usr/bin/env bash
# Machine A: one 96 GB Blackwell GPU, 7B ternary model.
exec "$(dirname "$0")"/launch.sh "$(dirname "$0")"/../configs/config_a_threadripper_blackwell.toml 1 "$@"
