#!/usr/bin/env bash
# Set up ternchat on a Debian/Ubuntu machine: the one script behind the README's commands and CI.
#
#   bash scripts/setup.sh          system packages, .venv, PyTorch and ternchat
#   bash scripts/setup.sh --test   the same plus the test dependencies
#
# System packages: rustc (the compiler-verified evaluation), bubblewrap (the sandbox's namespaces:
# without it ternchat refuses to run model-written programs), a C toolchain (rustc's linker and
# torch.compile on CPU, the 2-bit decoding kernel), python3-venv and python3-dev, and with --test
# chromium (the chat page's browser test). They are installed with apt-get as root, or through sudo
# when it needs no password; otherwise the script prints what to install by hand and goes on.
# PyTorch: TERNCHAT_TORCH picks the requirement (default torch==2.13.0); a PyTorch already in
# .venv is kept, so a CUDA build installed there by hand stays.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup: unknown argument $arg (use --test or --help)" >&2; exit 2 ;;
  esac
done
say() { echo "setup: $*"; }

# --- system packages ---------------------------------------------------------------------------
missing=()
command -v rustc >/dev/null 2>&1 || missing+=(rustc)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v prlimit >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
# Python's headers: PyTorch's cpp_extension builds the 2-bit ternary decoding kernel with them
python3 -c "import os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" \
  >/dev/null 2>&1 || missing+=(python3-dev)
# the tests drive the chat page of `ternchat serve` in a real headless browser (Playwright on Debian's chromium)
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  missing+=(chromium)
fi

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  sudo=(none)
fi

if ! command -v apt-get >/dev/null 2>&1; then
  [ ${#missing[@]} -eq 0 ] || say "no apt-get here; install by hand: ${missing[*]} (rustc, bubblewrap, a C compiler)"
elif [ "${sudo[0]:-}" = none ]; then
  [ ${#missing[@]} -eq 0 ] || say "not root and no password-less sudo; install by hand, then rerun: sudo apt-get install ${missing[*]}"
else
  # Fresh package lists also keep `ternchat data --debian` (apt-get download of crates) working.
  say "apt-get update"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
command -v bwrap >/dev/null 2>&1 || say "warning: bubblewrap is missing: the Rust evaluation will refuse to run programs (see README)"

# --- Python ------------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "python3 -m venv .venv"
  python3 -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  say "pip install ${TERNCHAT_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q "${TERNCHAT_TORCH:-torch==2.13.0}"
fi
say "pip install -e .$extras"
.venv/bin/python -m pip install -q -e ".$extras"
say "ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'), $(rustc --version 2>/dev/null || echo 'no rustc'), $(bwrap --version 2>/dev/null || echo 'no bubblewrap')"
