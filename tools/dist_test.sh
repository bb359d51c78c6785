#!/usr/bin/env bash
# Multi-GPU / multi-node testing through torchrun and mmengine's pytorch launcher.
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_test.sh CONFIG CKPT 8   # on each node
# On a machine without CUDA the same command tests on CPU processes with gloo.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
exec "$PY" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$GPUS" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
