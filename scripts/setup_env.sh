#!/usr/bin/env bash
# Set up .venv with the pinned MMDetection stack; idempotent, safe to rerun.
#
# The one slow step is mmcv 2.1.0: PyPI has no wheel for torch 2.14, and its sdist does not build
# as published (setup.py asks for C++14/17, torch 2.14's headers need C++20; setup.py imports
# pkg_resources, gone from setuptools >= 81). We patch the std flags, build the wheel once
# (~15 min on 2 cores) into a cache outside the repo, keyed by mmcv/torch/python/CPU-or-CUDA,
# and every later set-up installs that wheel in seconds.
#
#   FORCE_CUDA=1 scripts/setup_env.sh   # build mmcv's CUDA kernels too (needs nvcc + a GPU toolchain)
#   DCN_DET_CACHE=/path                 # where the mmcv wheel is cached (default ~/.cache/dcn_det)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
MMCV_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f
CACHE=${DCN_DET_CACHE:-$HOME/.cache/dcn_det}
say() { echo "[setup] $*"; }

stamp_key=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-${FORCE_CUDA:-0}
if [ -f "$VENV/.setup-$stamp_key" ] && "$VENV/bin/python" dcn_det/env_check.py --quiet 2>/dev/null; then
  say ".venv is up to date"; exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || { echo "[setup] $PY not found: install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
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
  "$VENV/bin/python" - "$MMCV" "$MMCV_SHA256" "$work/mmcv.tar.gz" <<'PY'
import hashlib, json, sys, urllib.request
version, sha, dest = sys.argv[1:]
req = urllib.request.Request('https://pypi.org/simple/mmcv/',
                             headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
index = json.load(urllib.request.urlopen(req, timeout=120))
url = next(f['url'] for f in index['files'] if f['filename'] == f'mmcv-{version}.tar.gz')
data = urllib.request.urlopen(url, timeout=300).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f'mmcv sdist checksum mismatch for {url}')
open(dest, 'wb').write(data)
PY
  tar -xzf "$work/mmcv.tar.gz" -C "$work"
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
"$VENV/bin/python" dcn_det/env_check.py
rm -f "$VENV"/.setup-*; touch "$VENV/.setup-$stamp_key"
say "done"
