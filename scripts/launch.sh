#!/usr/bin/env bash
# Usage: scripts/launch.sh CONFIG NPROC [--set section.key=value ...]
# Builds the data for CONFIG (cached), then trains on NPROC GPUs (torchrun when NPROC > 1).
set -euo pipefail
config="$1"; nproc="$2"; shift 2
ternchat data --config "$config" "$@"
if ! ternchat train --help >/dev/null 2>&1; then
  echo "launch: data for $config is ready; this ternchat has no 'train' command yet" >&2
  exit 0
fi
if [ "$nproc" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node="$nproc" -m ternchat train --config "$config" "$@"
fi
exec ternchat train --config "$config" "$@"
