"""Helpers for tests that spawn their own processes (outside the shared worker pool)."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_bounded(fn, nprocs: int, args: tuple, timeout_s: float) -> None:
    """mp.spawn with a deadline: a hang kills the ranks and fails the test."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"spawned ranks still running after {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
