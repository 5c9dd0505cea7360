#!/usr/bin/env bash
# Machine C: one RTX 4090, 5B ternary model.
exec "$(dirname "$0")"/launch.sh "$(dirname "$0")"/../configs/config_c_dual_epyc_4090.toml 1 "$@"
