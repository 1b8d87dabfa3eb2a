#!/bin/bash
# LaCy pretraining across machines without a scheduler: run this script on every node.
#
#   # on node 0 (its address must be reachable from the others):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/multinode_train.sh lacy_stream/config/runs/1.3b.toml \
#       --data.shards='https://example.org/wiki-{000000..000127}.tar' --train.run_dir=/shared/runs/1.3b
#   # on node 1: the same command with NODE_RANK=1
#
# Every node needs the same code, config and shard URL, and a run directory on a shared file system.
# On CPU-only machines the trainer uses gloo instead of NCCL; set NPROC_PER_NODE to the processes to start.
set -euo pipefail

CONFIG=${1:?usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST scripts/multinode_train.sh CONFIG.toml [--section.key=value ...]}
shift
: "${NNODES:?set NNODES to the number of machines}"
: "${NODE_RANK:?set NODE_RANK to this machine's index, 0 .. NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --node-rank="$NODE_RANK" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m lacy_stream train --config "$CONFIG" "$@"
