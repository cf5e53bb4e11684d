"""Helpers for tests that spawn their own processes (outside the shared worker pool)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "MPI_LOCALRANKID", "NNODES", "NODE_RANK",
                 "RDZV_ENDPOINT")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "SLURM_")


def launcher_free_env(**extra) -> dict:
    """This environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _kill_session(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_sessions(commands: list[tuple[list[str], dict]], timeout_s: float
                 ) -> list[tuple[int, str]]:
    """Start every command in its own session (in the repository root); (returncode, output)
    each. Past the deadline all sessions are killed and the test fails with what they printed."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for cmd, env in commands]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout_s)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        outputs = []
        for p in procs:
            _kill_session(p)
            outputs.append(p.communicate()[0])
        pytest.fail(f"still running after {timeout_s}s:\n" + "\n---\n".join(outputs))
    finally:
        for p in procs:
            _kill_session(p)
    return results
