#!/usr/bin/env bash
# Run the CPU suite in another environment: the command behind each row of the README's compatibility table.
#
#   scripts/compat_check.sh PYTHON [PYTEST ARGS...]
#
# PYTHON is the interpreter of an environment that already holds torch, torchvision, mmengine and mmdet at the
# versions to check. This builds mmcv there against its torch (scripts/build_mmcv.sh, cached), installs this
# checkout editable with its deploy and test extras (pip keeps what is installed where it fits dcn_det's
# ranges), prints the versions (python -m dcn_det.env_check) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 PYTHON [PYTEST ARGS...]" >&2; exit 2; }
PY=$1; shift
bash scripts/build_mmcv.sh "$PY"
"$PY" -m pip install -q "setuptools<81" wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[deploy,test]"
"$PY" -m dcn_det.env_check
"$PY" -m pytest -q -ra "$@" tests
