#!/usr/bin/env bash
# One node, NPROC worker processes started by torchrun (standalone c10d rendezvous on localhost).
# Every worker calls moe_parallel.init_distributed, which reads torchrun's RANK/WORLD_SIZE/...
#
#   launch/torchrun_single_node.sh NPROC [train args...]
#   e.g. launch/torchrun_single_node.sh 4 --steps 100
#
# Env: MAX_RESTARTS (0: times torchrun starts the job again when a rank fails; run the job with
#   --save-dir/--save-every/--resume to continue from its latest checkpoint), MODULE (default
#   moe_parallel.train), PYTHON, DRY_RUN=1 (print the command only).
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each restart its own rendezvous store (torchrun
# otherwise reuses one, and a restarted rank can read a dead rank's address: pytorch#135712).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 NPROC [train args...]"
NPROC="$1"
shift
run env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "$PY" -m torch.distributed.run --standalone \
    --nnodes 1 --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" -m "$MODULE" "$@"
