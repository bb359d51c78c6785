#!/usr/bin/env bash
# The GPU check: one command for a machine with a CUDA GPU, PyTorch and torchvision (other versions than
# ours are fine; mmcv, mmdet and a network are not needed). It runs the CUDA op tests: the CUDA paths of the
# conformance suite (tests/ops/test_conformance.py -m cuda: native, torchvision and, where installed, mmcv
# against the float64 references and the published golden numbers, gradcheck, layouts, argument rules) and
# tests/ops/test_cuda.py (float16/bfloat16, autocast, CPU-CUDA agreement); then the CUDA benchmark rows
# against cuDNN's dense conv, and writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log. Every step has a
# time limit; the whole check stays under 9 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default work_dirs/gpu_check; PYTHON=... picks the python
#
# A dcn_det wheel built for that machine's Python and torch, placed in .whl/ (README, Installation), is
# installed with `pip install --no-deps --no-index` into OUT_DIR/site and tested instead of the checkout's
# copy, so its compiled CPU kernel is used; without one the checkout's code runs (CPU ops on their public path).
#
# Without a CUDA device it says what it skipped, writes the JSON all the same, and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-work_dirs/gpu_check}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
start=$(date +%s)
echo "[gpu_check] $(date -u +%FT%TZ) in $PWD with $PY"
site=
if ls .whl/dcn_det-*.whl >/dev/null 2>&1; then
  site=$OUT_DIR/site
  "$PY" -m pip install -q --no-deps --no-index --upgrade --target "$site" .whl/dcn_det-*.whl \
    && echo "[gpu_check] testing the wheel $(ls .whl/dcn_det-*.whl) (installed in $site)" \
    || { echo "[gpu_check] the wheel in .whl/ does not install here: testing the checkout's code"; site=; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${site:+$site:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m dcn_det.env_check --json > "$OUT_DIR/dcn_det_env.json"
echo "[gpu_check] dcn_det: $(cat "$OUT_DIR/dcn_det_env.json")"

"$PY" - "$OUT_DIR/env.json" <<'EOF'
import json, platform, sys
import torch, torchvision
env = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
           cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           cpu_capability=torch.backends.cpu.get_cpu_capability())
try:
    import mmcv.ops
    env['mmcv'] = f'{mmcv.__version__} (compiled cuda: {mmcv.ops.get_compiling_cuda_version()})'
except Exception as e:  # not installed on a bare GPU machine: the mmcv rows are then left out
    env['mmcv'] = f'not available ({type(e).__name__})'
print('[gpu_check] ' + ', '.join(f'{k} {v}' for k, v in env.items()))
json.dump(env, open(sys.argv[1], 'w'), indent=1)
EOF
[ $? -eq 0 ] || { echo "[gpu_check] FAILED: torch/torchvision do not import"; exit 1; }

cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
tests_rc=skipped; bench_rc=skipped; pool_rc=skipped
if [ "$cuda" != 1 ]; then
  echo "[gpu_check] SKIPPED: no CUDA device here, so neither the CUDA op tests (tests/ops/test_cuda.py,"
  echo "[gpu_check] tests/ops/test_conformance.py -m cuda) nor the"
  echo "[gpu_check] CUDA benchmark rows (benchmarks/bench_deform_conv.py, bench_deform_roi_pool.py --device cuda) ran."
else
  methods=dense,native,torchvision
  "$PY" -c 'import mmcv.ops, sys; sys.exit(mmcv.ops.get_compiling_cuda_version() == "not available")' 2>/dev/null \
    && methods=$methods,mmcv
  echo "[gpu_check] CUDA op tests (limit 300 s)"
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -o pythonpath= -m cuda tests/ops/test_cuda.py \
    tests/ops/test_conformance.py --junitxml="$OUT_DIR/cuda_tests.xml"
  tests_rc=$?
  echo "[gpu_check] deformable conv benchmark, $methods (limit 150 s)"
  timeout 150 "$PY" -m benchmarks.bench_deform_conv --device cuda --methods "$methods" --repeats 25 \
    --out "$OUT_DIR/deform_conv_cuda.json"
  bench_rc=$?
  echo "[gpu_check] deformable RoI pooling benchmark (limit 60 s)"
  timeout 60 "$PY" -m benchmarks.bench_deform_roi_pool --device cuda --out "$OUT_DIR/deform_roi_pool_cuda.json"
  pool_rc=$?
fi

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$pool_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, tests_rc, bench_rc, pool_rc, seconds = sys.argv[1:]
summary = dict(env=json.load(open(os.path.join(out, 'env.json'))), seconds=int(seconds), skipped=[])
try:
    summary['dcn_det_env'] = json.load(open(os.path.join(out, 'dcn_det_env.json')))
except ValueError:  # env_check could not run: its error is in the log
    summary['dcn_det_env'] = None
junit = os.path.join(out, 'cuda_tests.xml')
if tests_rc == 'skipped':
    summary['skipped'] = ['tests/ops/test_cuda.py, tests/ops/test_conformance.py -m cuda (no CUDA device)',
                          'CUDA benchmark rows (no CUDA device)']
elif os.path.exists(junit):
    suite = ET.parse(junit).getroot().find('testsuite') or ET.parse(junit).getroot()
    counts = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter('testcase')
              if c.find('failure') is not None or c.find('error') is not None]
    summary['tests'] = dict(counts, exit_code=int(tests_rc), failed=failed)
for name, rc in (('deform_conv_cuda', bench_rc), ('deform_roi_pool_cuda', pool_rc)):
    path = os.path.join(out, f'{name}.json')
    if rc != 'skipped':
        summary[name] = dict(exit_code=int(rc), results=json.load(open(path)) if os.path.exists(path) else None)
json.dump(summary, open(os.path.join(out, 'gpu_check.json'), 'w'), indent=1)
ok = tests_rc in ('skipped', '0') and bench_rc in ('skipped', '0') and pool_rc in ('skipped', '0')
print(f"[gpu_check] {'OK' if ok else 'FAILED'} in {seconds} s: {os.path.join(out, 'gpu_check.json')}"
      + (f" (skipped: {'; '.join(summary['skipped'])})" if summary['skipped'] else ''))
sys.exit(0 if ok else 1)
EOF
