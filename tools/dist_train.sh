#!/usr/bin/env bash
# Multi-GPU / multi-node training through torchrun and mmengine's pytorch launcher.
#   tools/dist_train.sh CONFIG GPUS [train.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_train.sh CONFIG 8   # on each node
# On a machine without CUDA the same command trains on CPU processes with gloo.
set -euo pipefail
CONFIG=$1
GPUS=$2
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
exec "$PY" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$GPUS" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "${@:3}"
