#!/usr/bin/env bash
# NP processes started by Open MPI's mpirun. moe_parallel.init_distributed reads
# OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; without MASTER_ADDR/MASTER_PORT, rank 0 picks a free port
# and broadcasts address and port with mpi4py (pip install mpi4py).
#
#   launch/mpirun.sh NP [train args...]
#   HOSTFILE=hosts launch/mpirun.sh 16 --steps 100     # hosts: "node0 slots=8" lines
#
# Env: HOSTFILE, MPIRUN_ARGS (extra mpirun options, split on spaces, e.g. "--oversubscribe"),
#   MPIRUN (mpirun), MASTER_ADDR/MASTER_PORT (forwarded when set), MODULE, PYTHON, DRY_RUN=1.
# Runs as root add --allow-run-as-root. --bind-to none leaves PyTorch's threads unpinned.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 NP [train args...]"
NP="$1"
shift
MPIRUN="${MPIRUN:-mpirun}"
if [[ "${DRY_RUN:-0}" != 1 ]]; then
    command -v "$MPIRUN" >/dev/null || die "$MPIRUN not found (apt-get install openmpi-bin)"
    "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI" \
        || die "$MPIRUN is not Open MPI (with MPICH: mpiexec -n $NP $PY -m $MODULE ...)"
fi

args=(-np "$NP" --bind-to none -x PYTHONPATH)
if [[ "$(id -u)" == 0 ]]; then
    args+=(--allow-run-as-root)
fi
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
fi
for var in MASTER_ADDR MASTER_PORT; do
    if [[ -n "${!var:-}" ]]; then
        args+=(-x "$var")
    fi
done
read -r -a extra <<< "${MPIRUN_ARGS:-}"
run "$MPIRUN" "${args[@]}" "${extra[@]}" "$PY" -m "$MODULE" "$@"
