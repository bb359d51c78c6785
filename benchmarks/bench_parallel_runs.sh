#!/usr/bin/env bash
# Why benchmarks.bench_accuracy runs one training per core: one epoch of the DCNv2 demo trained once with
# 2 threads, then twice side by side with 1 thread each, on the same (2-core) machine, in one run.
#   bash benchmarks/bench_parallel_runs.sh [CONFIG]     (default configs/shapes_r18_dcnv2.py; needs data/shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes_r18_dcnv2.py}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
train() { OMP_NUM_THREADS=$1 .venv/bin/python tools/train.py "$config" --work-dir "$out/$2" --cfg-options \
  train_cfg.max_epochs=1 train_cfg.val_interval=2 default_hooks.checkpoint.interval=2 >"$out/$2.log" 2>&1; }
t0=$(date +%s.%N)
train 2 alone
t1=$(date +%s.%N)
train 1 a &
pid=$!
train 1 b
wait $pid
t2=$(date +%s.%N)
python3 -c "one = $t1 - $t0; two = $t2 - $t1
print(f'one epoch of $config: alone with 2 threads {one:.0f} s; two side by side with 1 thread each {two:.0f} s,'
      f' i.e. {two / 2:.0f} s per run = {two / 2 / one:.2f} of the 2-thread time')"
