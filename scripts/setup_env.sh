#!/usr/bin/env bash
# Set up .venv with exactly the versions in constraints.txt; idempotent, safe to rerun.
#
# The exact versions live in constraints.txt (what `make setup` and CI install); pyproject.toml states the
# ranges dcn_det works with. torch and torchvision come first (an exact pin: a loose 'torch' pulls a newer
# multi-GB build), then mmcv, built against that torch by scripts/build_mmcv.sh (cached), then dcn_det itself,
# editable, with the deploy and test extras: its build compiles the CPU kernel in place (dcn_det/_C*.so).
# Everything is fetched with pip, so pip's own configuration (index, proxy, certificates) applies.
#
#   FORCE_CUDA=1 scripts/setup_env.sh   # build mmcv's CUDA kernels too (needs nvcc + a GPU toolchain)
#   DCN_DET_CACHE=/path                 # where the mmcv wheel is cached (default ~/.cache/dcn_det)
#   PYTHON=python3.12 ...               # the interpreter .venv is made with (default python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
say() { echo "[setup] $*"; }

stamp_key=$(cat pyproject.toml constraints.txt setup.py scripts/*.sh dcn_det/ops/csrc/* | sha256sum | cut -c1-16)
stamp_key=$stamp_key-${FORCE_CUDA:-0}
if [ -f "$VENV/.setup-$stamp_key" ] && "$VENV/bin/python" -m dcn_det.env_check --quiet 2>/dev/null; then
  say ".venv is up to date"; exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || { echo "[setup] $PY not found: install Python 3.11 or set PYTHON=/path/to/python" >&2; exit 1; }
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

say "installing torch, torchvision and the build tools at the versions in constraints.txt"
pip install -q -c constraints.txt "setuptools<81" wheel ninja torch torchvision

bash scripts/build_mmcv.sh "$VENV/bin/python"

say "installing dcn_det (editable, compiling its CPU kernel: about a minute) with its deploy and test extras"
pip install -q --no-build-isolation -c constraints.txt -e ".[deploy,test]"

"$VENV/bin/python" -m dcn_det.env_check
rm -f "$VENV"/.setup-*; touch "$VENV/.setup-$stamp_key"
say "done"
