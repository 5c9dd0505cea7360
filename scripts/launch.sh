#!/usr/bin/env bash
# Usage: scripts/launch.sh CONFIG NPROC [--set section.key=value ...]
# Builds the data for CONFIG (cached), then trains on NPROC GPUs (torchrun when NPROC > 1).
set -euo pipefail
config="$1"; nproc="$2"; shift 2
ternchat data --config "$config" "$@"
if [ "$nproc" -gt 1 ]; then
  echo "launch: $config is planned for $nproc GPUs, but ternchat trains on one device so far" \
       "(DDP/FSDP2 is future work); the data is ready." >&2
  exit 1
fi
exec ternchat train --config "$config" "$@"
