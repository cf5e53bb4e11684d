"""Local ranks for the self-spawning benchmarks: a free port, and ``n`` spawned processes run
to the end with a bound on the wait.

``run_ranks(target, args, n, timeout_s, grace_s)`` starts ``target(rank, *args)`` on ``n``
fresh processes (``spawn``) and waits until all exit, or ``timeout_s`` has passed, or
``grace_s`` after the first non-zero exit (the others may still be reporting); then it kills
what is left and returns every exit code (negative: killed by that signal) and why it stopped
the ranks (``None`` when every rank exited by itself).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections.abc import Callable, Sequence
from typing import Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target: Callable[..., None], args: Sequence, nproc: int, timeout_s: float,
              grace_s: float) -> tuple[list[Optional[int]], Optional[str]]:
    """``(exit codes in rank order, None | "a rank failed" | "timeout")``: see the module."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(nproc)]
    for p in procs:
        p.start()
    deadline, failed_at, why = time.monotonic() + timeout_s, None, None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > grace_s):
            why = "a rank failed" if failed_at is not None else "timeout"
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs], why
