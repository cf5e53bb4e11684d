# Sourced by the launch scripts: repository root, interpreter, entry module, and `run`.
#   PY      the repo's .venv/bin/python when present, else python3 (override: PYTHON=...)
#   MODULE  the Python module to run (default moe_parallel.train; override: MODULE=...)
#   run CMD...  prints the command ("+ ..."), then execs it; DRY_RUN=1 prints only.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
MODULE="${MODULE:-moe_parallel.train}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        exit 0
    fi
    exec "$@"
}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}
