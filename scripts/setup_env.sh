#!/usr/bin/env bash
# Set up .venv with the pinned MMDetection stack; idempotent, safe to rerun.
#
# The versions are pinned in pyproject.toml only (with the mmcv sdist's sha256 under [tool.dcn_det]);
# this script reads them through dcn_det/env_check.py. Everything is fetched with pip, so pip's own
# configuration (index, proxy, certificates: pip.conf, PIP_* variables) applies.
#
# The one slow step is mmcv: PyPI has no wheel for our torch, and its sdist does not build as
# published (setup.py asks for C++14/17, torch's headers need C++20; setup.py imports pkg_resources,
# gone from setuptools >= 81). We patch the std flags, build the wheel once (~15 min on 2 cores)
# into a cache outside the repo, keyed by mmcv/torch/python/CPU-or-CUDA, and every later set-up
# installs that wheel in seconds.
#
#   FORCE_CUDA=1 scripts/setup_env.sh   # build mmcv's CUDA kernels too (needs nvcc + a GPU toolchain)
#   DCN_DET_CACHE=/path                 # where the mmcv wheel and dcn_det's compiled kernels are cached
#                                       # (default ~/.cache/dcn_det)
#   scripts/setup_env.sh --fetch-mmcv-sdist DIR   # only download the pinned mmcv sdist into DIR
#                                                 # (checks that pip's index serves it, checksum verified)
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
CACHE=${DCN_DET_CACHE:-$HOME/.cache/dcn_det}
say() { echo "[setup] $*"; }

# The pinned mmcv sdist into $2 (as mmcv-VERSION.tar.gz) through pip, in hash-checking mode: pip
# refuses any file whose sha256 is not the pinned one. $1: a Python with pip (and setuptools < 81:
# pip runs mmcv's setup.py for its metadata).
fetch_mmcv_sdist() {
  local python=$1 dir=$2 mmcv sha
  mmcv=$("$python" dcn_det/env_check.py --pin mmcv)
  sha=$("$python" dcn_det/env_check.py --mmcv-sdist-sha256)
  "$python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation --require-hashes -d "$dir" \
      -r <(echo "mmcv==$mmcv --hash=sha256:$sha") \
    || { echo "[setup] pip could not fetch mmcv==$mmcv with sha256 $sha (pyproject.toml): see pip's message above" >&2
         exit 1; }
}

if [ "${1:-}" = --fetch-mmcv-sdist ]; then
  [ $# = 2 ] || { echo "usage: $0 --fetch-mmcv-sdist DIR" >&2; exit 2; }
  dir=$2; [[ $dir = /* ]] || dir=$CALLER_DIR/$dir
  python=$PY; [ -x "$VENV/bin/python" ] && python=$VENV/bin/python
  fetch_mmcv_sdist "$python" "$dir"
  say "downloaded $(ls "$dir"/mmcv-*.tar.gz)"; exit 0
fi

stamp_key=$(cat pyproject.toml scripts/setup_env.sh dcn_det/ops/kernels/extension.py dcn_det/ops/kernels/csrc/* \
  | sha256sum | cut -c1-16)-${FORCE_CUDA:-0}
if [ -f "$VENV/.setup-$stamp_key" ] && "$VENV/bin/python" dcn_det/env_check.py --quiet 2>/dev/null; then
  say ".venv is up to date"; exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || { echo "[setup] $PY not found: install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pin() { "$VENV/bin/python" dcn_det/env_check.py --pin "$1"; }
TORCH=$(pin torch)
TORCHVISION=$(pin torchvision)
MMCV=$(pin mmcv)
PYTAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

say "installing torch==$TORCH torchvision==$TORCHVISION and the build tools (exact pins: a loose 'torch' pulls a newer multi-GB build)"
pip install -q "setuptools<81" wheel ninja "torch==$TORCH" "torchvision==$TORCHVISION"

flavour=cpu
[ "${FORCE_CUDA:-0}" = 1 ] && flavour=cuda
wheel_dir="$CACHE/mmcv-$MMCV-torch$TORCH-$PYTAG-$flavour"
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  say "no cached mmcv wheel in $wheel_dir: building mmcv $MMCV with ops ($flavour) from its sdist, ~15 min on 2 cores"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  fetch_mmcv_sdist "$VENV/bin/python" "$work"
  tar -xzf "$work/mmcv-$MMCV.tar.gz" -C "$work"
  src="$work/mmcv-$MMCV"
  say "patching $src/setup.py: -std=c++14/17 -> c++20 (torch $TORCH headers need C++20)"
  sed -i -E 's/c\+\+1[47]/c++20/g' "$src/setup.py"
  grep -q 'c++20' "$src/setup.py" || { echo "[setup] patch did not apply to mmcv's setup.py" >&2; exit 1; }
  mkdir -p "$wheel_dir.tmp"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip wheel --no-build-isolation --no-deps -w "$wheel_dir.tmp" "$src"
  rm -rf "$wheel_dir"; mv "$wheel_dir.tmp" "$wheel_dir"   # atomic: a killed build leaves no half cache
  say "cached $(ls "$wheel_dir")"
else
  say "using cached mmcv wheel $(ls "$wheel_dir")"
fi
pip install -q --no-deps "$wheel_dir"/mmcv-*.whl

say "installing dcn_det (editable) with mmengine, mmdet, pycocotools and the test tools"
pip install -q -e ".[test]"

# dcn_det's compiled CPU kernels (C++, public ATen API), cached beside the mmcv wheel and keyed by their
# source, torch and Python; without a compiler the ops run their slower public-API path instead.
say "building dcn_det's compiled CPU kernels (cached in $CACHE; about a minute the first time)"
"$VENV/bin/python" dcn_det/ops/kernels/extension.py || say "continuing without them (public-API path)"

"$VENV/bin/python" dcn_det/env_check.py
rm -f "$VENV"/.setup-*; touch "$VENV/.setup-$stamp_key"
say "done"
