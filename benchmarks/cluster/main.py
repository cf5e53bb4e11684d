"""``python -m benchmarks cluster``: under a launcher this process is one rank; bare, it spawns
``--nproc`` local ranks itself (``benchmarks.harness.run_ranks``) that run the same
:func:`benchmarks.cluster.rank.rank_main` over gloo."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

from benchmarks.cluster.cli import (
    SPAWNED,
    PlanError,
    build_parser,
    launched,
    log,
    make_plan,
    parse_args,
)
from benchmarks.cluster.rank import rank_main
from benchmarks.harness import free_port, run_ranks


def _spawned_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """Entry of a self-spawned rank: the launcher's variables, then ``rank_main``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{SPAWNED: "1"})
    code = 0
    try:
        rank_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (the traceback goes to stderr, the exit code up)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

def spawn(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Run ``rank_main`` on ``nproc`` fresh local processes (spawn), wait; the first
    non-zero exit code (0 when all succeed). A rank that fails makes the others stop 10 s later;
    the whole run is stopped after ``timeout_s``."""
    codes, why = run_ranks(_spawned_rank, (nproc, free_port(), argv), nproc, timeout_s,
                           grace_s=10.0)
    if why is not None:
        log(f"cluster bench: stopped the ranks ({why})")
    return next((c if c > 0 else 1 for c in codes if c != 0), 0)

def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """``python -m benchmarks cluster``: under a launcher this process is one rank; bare, it
    spawns ``--nproc`` ranks (exits with their failure code). Returns rank 0's record when this
    process is rank 0, else None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if launched(os.environ):
        return rank_main(argv, args)
    nproc = args.nproc or 4
    try:
        make_plan(args, nproc)
    except PlanError as exc:
        build_parser().error(str(exc))
    if nproc == 1:
        return rank_main(argv, args)
    code = spawn([*argv, "--nproc", str(nproc)] if args.nproc is None else argv, nproc,
                 args.timeout * 4)
    if code:
        raise SystemExit(code)
    return None


if __name__ == "__main__":
    main()
