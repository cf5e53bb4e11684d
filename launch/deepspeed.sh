#!/usr/bin/env bash
# One node, NPROC worker processes started by DeepSpeed's launcher, each training under the
# DeepSpeed engine with CONFIG (ZeRO 0/1/2; moe_parallel.integrations.deepspeed). The launcher
# sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and passes --local_rank=N, which
# moe_parallel.train accepts.
#
#   launch/deepspeed.sh NPROC CONFIG.json [train args...]
#   e.g. launch/deepspeed.sh 4 ds_zero2.json --ep 2 --steps 100
#
# Env: MODULE (default moe_parallel.train), PYTHON, DRY_RUN=1 (print the command only),
#      MASTER_PORT (default 29500), DS_ACCELERATOR (default: cpu when torch sees no CUDA GPU),
#      TORCH_EXTENSIONS_DIR (default build/torch_extensions: DeepSpeed's JIT ops, built once).
set -euo pipefail
CALLER_DIR="$PWD"  # _common.sh moves to the repository root; CONFIG is relative to here
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[[ $# -ge 2 && "$1" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 NPROC CONFIG.json [train args...]"
NPROC="$1"
CONFIG="$2"
[[ "$CONFIG" == /* ]] || CONFIG="${CALLER_DIR%/}/$CONFIG"
shift 2
[[ -f "$CONFIG" || "${DRY_RUN:-0}" == 1 ]] || die "DeepSpeed config $CONFIG not found"
if [[ -z "${DS_ACCELERATOR:-}" ]] && \
   [[ "$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != True ]]; then
    export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/build/torch_extensions}"
run "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" \
    --master_port "${MASTER_PORT:-29500}" --module "$MODULE" --deepspeed "$CONFIG" "$@"
