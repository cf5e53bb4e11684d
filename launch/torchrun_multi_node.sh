#!/usr/bin/env bash
# Several nodes, NPROC_PER_NODE workers each, joined by torchrun's c10d rendezvous. Run the same
# command on every node; the node whose address is RDZV_ENDPOINT's host serves the rendezvous.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 launch/torchrun_multi_node.sh 8 [train args...]
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29400 launch/torchrun_multi_node.sh 8 [train args...]
#
# Env (required): NNODES, RDZV_ENDPOINT (host:port reachable from every node).
# Env (optional): NODE_RANK (needed for RDZV_BACKEND=static; with c10d the rendezvous assigns
#   ranks and NODE_RANK is only shown), RDZV_BACKEND (c10d), RDZV_ID (moe_parallel: must be the
#   same on every node, unique per job), RDZV_TIMEOUT (join timeout in s, 600), LOCAL_ADDR
#   (this node's address as the others reach it; default: its host name), MAX_RESTARTS (0),
#   MODULE (moe_parallel.train), PYTHON, DRY_RUN=1.
# With MAX_RESTARTS > 0 run the job with --save-dir/--save-every/--resume so that each restart
# continues from the latest checkpoint. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each restart
# its own rendezvous store (torchrun otherwise reuses one, and a restarted rank can read a dead
# rank's address: pytorch#135712).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 NPROC_PER_NODE [train args...]"
NPROC="$1"
shift
[[ -n "${NNODES:-}" ]] || die "NNODES is not set (number of nodes)"
[[ -n "${RDZV_ENDPOINT:-}" ]] || die "RDZV_ENDPOINT is not set (host:port of the rendezvous)"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"

args=(--nnodes "$NNODES" --nproc-per-node "$NPROC"
      --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$RDZV_ENDPOINT"
      --rdzv-id "${RDZV_ID:-moe_parallel}" --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-600}"
      --max-restarts "${MAX_RESTARTS:-0}")
if [[ "$RDZV_BACKEND" == static ]]; then
    [[ -n "${NODE_RANK:-}" ]] || die "NODE_RANK is not set (required with RDZV_BACKEND=static)"
    args+=(--node-rank "$NODE_RANK")
elif [[ -n "${NODE_RANK:-}" ]]; then
    echo "note: node ${NODE_RANK} of ${NNODES}; c10d assigns the ranks in join order"
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    args+=(--local-addr "$LOCAL_ADDR")
fi
run env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "$PY" -m torch.distributed.run "${args[@]}" \
    -m "$MODULE" "$@"
