#!/usr/bin/env bash
# Build mmcv with its compiled ops against the torch of an existing environment, cache the wheel, install it.
#
#   scripts/build_mmcv.sh [PYTHON]              # default .venv/bin/python; any environment with torch works
#   FORCE_CUDA=1 scripts/build_mmcv.sh PYTHON   # with mmcv's CUDA kernels (nvcc + a GPU toolchain)
#   scripts/build_mmcv.sh --fetch-sdist DIR     # only download the mmcv sdist into DIR (checksum verified)
#
# The mmcv version is the one in constraints.txt (mmdet 3.x accepts mmcv >= 2.0.0rc4, < 2.2.0). PyPI has no
# mmcv wheel for current torch, and the sdist does not build as published: its setup.py asks for C++14/17
# where torch's headers need C++20 (torch >= 2.12), and imports pkg_resources, gone from setuptools >= 81.
# This script fetches the sdist through pip (pip's own index, proxy and certificate settings apply) in
# hash-checking mode (its sha256 is in pyproject.toml, [tool.dcn_det]), switches the std flags to C++20,
# builds with setuptools < 81 and no build isolation (long: it compiles all of mmcv's ops), and caches the wheel under
# $DCN_DET_CACHE (default ~/.cache/dcn_det), keyed by mmcv, torch, Python and CPU/CUDA: every later build
# for the same key installs the cached wheel in seconds.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
CACHE=${DCN_DET_CACHE:-$HOME/.cache/dcn_det}
say() { echo "[build_mmcv] $*"; }

# The mmcv sdist into $2 (as mmcv-VERSION.tar.gz) through pip, in hash-checking mode: pip refuses any file whose
# sha256 is not the recorded one. $1: a Python with pip (and setuptools < 81: pip runs mmcv's setup.py).
fetch_sdist() {
  local python=$1 dir=$2 mmcv sha
  mmcv=$("$python" dcn_det/env_check.py --pin mmcv)
  sha=$("$python" dcn_det/env_check.py --mmcv-sdist-sha256)
  "$python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation --require-hashes -d "$dir" \
      -r <(echo "mmcv==$mmcv --hash=sha256:$sha") \
    || { echo "[build_mmcv] pip could not fetch mmcv==$mmcv with sha256 $sha (pyproject.toml): see pip's message above" >&2
         exit 1; }
}

if [ "${1:-}" = --fetch-sdist ]; then
  [ $# = 2 ] || { echo "usage: $0 --fetch-sdist DIR" >&2; exit 2; }
  dir=$2; [[ $dir = /* ]] || dir=$CALLER_DIR/$dir
  python=python3; [ -x .venv/bin/python ] && python=.venv/bin/python
  fetch_sdist "$python" "$dir"
  say "downloaded $(ls "$dir"/mmcv-*.tar.gz)"; exit 0
fi

PY=${1:-.venv/bin/python}
[[ $PY = */* && $PY != /* ]] && PY=$CALLER_DIR/$PY
"$PY" -c 'import torch' 2>/dev/null || { echo "[build_mmcv] $PY cannot import torch: install torch there first" >&2; exit 1; }
MMCV=$("$PY" dcn_det/env_check.py --pin mmcv)
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
flavour=cpu
[ "${FORCE_CUDA:-0}" = 1 ] && flavour=cuda
wheel_dir="$CACHE/mmcv-$MMCV-torch$TORCH-$PYTAG-$flavour"
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  say "no cached mmcv wheel in $wheel_dir: building mmcv $MMCV with ops ($flavour) from its sdist, ~15 min on 2 cores"
  "$PY" -m pip install -q "setuptools<81" wheel ninja
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  fetch_sdist "$PY" "$work"
  tar -xzf "$work/mmcv-$MMCV.tar.gz" -C "$work"
  src="$work/mmcv-$MMCV"
  say "patching $src/setup.py: -std=c++14/17 -> c++20 (the headers of torch >= 2.12 need C++20)"
  sed -i -E 's/c\+\+1[47]/c++20/g' "$src/setup.py"
  grep -q 'c++20' "$src/setup.py" || { echo "[build_mmcv] patch did not apply to mmcv's setup.py" >&2; exit 1; }
  mkdir -p "$wheel_dir.tmp"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel --no-build-isolation --no-deps \
    -w "$wheel_dir.tmp" "$src"
  rm -rf "$wheel_dir"; mv "$wheel_dir.tmp" "$wheel_dir"   # atomic: a killed build leaves no half cache
  say "cached $(ls "$wheel_dir")"
else
  say "using cached mmcv wheel $(ls "$wheel_dir")"
fi
"$PY" -m pip install -q --no-deps "$wheel_dir"/mmcv-*.whl
