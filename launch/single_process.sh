#!/usr/bin/env bash
# Train the demo MoE language model in one process; extra arguments go to moe_parallel.train.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m moe_parallel.train "$@"
