#!/usr/bin/env bash
# Machine B: two RTX 4090, 3B ternary model, FSDP2 over both GPUs (torchrun, 2 ranks).
exec "$(dirname "$0")"/launch.sh "$(dirname "$0")"/../configs/config_b_9800x3d_dual4090.toml 2 "$@"
