#!/usr/bin/env bash
# Usage: scripts/launch.sh CONFIG NPROC [--set section.key=value ...]
# Builds the data for CONFIG (cached, once), prints the memory plan for the config's machine, then
# trains: one process, or NPROC ranks through torchrun (the config's [dist] section says how).
# A stopped run continues with: scripts/config_X.sh --resume
set -euo pipefail
config="$1"; nproc="$2"; shift 2
sets=(); for arg in "$@"; do [ "$arg" != "--resume" ] && sets+=("$arg"); done
ternchat data --config "$config" "${sets[@]}"
ternchat plan --config "$config" "${sets[@]}"
if [ "$nproc" -gt 1 ]; then
  exec torchrun --standalone --nproc-per-node "$nproc" -m ternchat train --config "$config" "$@"
fi
exec ternchat train --config "$config" "$@"
