"""The benchmark harness: how every benchmark times its contenders and spawns its ranks.

Timing. ``time_rounds`` runs every function ``warmup`` times, synchronises, then ``rounds``
rounds in which the functions run in turn (so the machine's noise hits all of them alike),
each ``iters`` calls (``iters_of[name]`` for the names it holds) followed by ``sync()``; a
round's figure is ``elapsed / calls`` seconds. With ``across_ranks`` every function's timed
calls start after a ``dist.barrier()`` and a round's figure is the slowest rank's (one MAX
all-reduce of every round after the last one, on ``device``). ``median_seconds`` keeps the
median of the rounds, ``summarize_rounds`` the median, min, max and quartiles
(:func:`summarize`). ``cuda_event_ms`` times single calls with CUDA events instead (the GPU
time between two events on the current stream, host synchronisations inside the call
included). ``device_sync(device)`` is ``torch.cuda.synchronize`` on CUDA, else a no-op;
``Stopwatch`` measures wall seconds of a block (progress messages, profiler windows).

Ranks. ``free_port()`` is a TCP port on 127.0.0.1; ``run_ranks(target, args, n, timeout_s,
grace_s)`` starts ``target(rank, *args)`` on ``n`` fresh processes (``spawn``) and waits until
all exit, or ``timeout_s`` has passed, or ``grace_s`` after the first non-zero exit (the others
may still be reporting); then it kills what is left and returns every exit code (negative:
killed by that signal) and why it stopped the ranks (``None`` when every rank exited by
itself). ``run_gloo_job(job_fn, world, job, timeout_s)`` runs ``job_fn(job)`` on ``world``
fresh gloo ranks (one torch thread each, ``MASTER_ADDR``/``RANK``/... set, their stdout sent
to stderr) and returns every rank's JSON-ready result in rank order.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch


def _no_sync() -> None:
    return None


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """``torch.cuda.synchronize`` when ``device`` is a CUDA device, else a no-op."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else _no_sync


class Stopwatch:
    """``with Stopwatch() as sw: ...``; ``sw.seconds``: wall seconds of the block (while in
    it: so far)."""

    def __enter__(self) -> Stopwatch:
        self._t0, self._t1 = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self._t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self._t1 or time.perf_counter()) - self._t0


# ---- timing -----------------------------------------------------------------------------------
def summarize(rounds: Sequence[float]) -> dict:
    """``{"seconds": median, "min", "max", "q1", "q3", "iqr", "rounds"}`` of per-round times
    (quartiles: ``statistics.quantiles(..., method="inclusive")``; one round: all equal)."""
    if not rounds:
        raise ValueError("rounds is empty")
    med = statistics.median(rounds)
    q1, _, q3 = (statistics.quantiles(rounds, n=4, method="inclusive") if len(rounds) > 1
                 else (rounds[0],) * 3)
    return {"seconds": med, "min": min(rounds), "max": max(rounds), "q1": q1, "q3": q3,
            "iqr": q3 - q1, "rounds": list(rounds)}


def slowest_rank(rows: Sequence[Sequence[float]], device: torch.device | str = "cpu"
                 ) -> list[list[float]]:
    """Element-wise maximum of ``rows`` over the ranks of the default group (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([list(r) for r in rows], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_rounds(fns: Mapping[Hashable, Callable[[], object]], rounds: int, iters: int = 1,
                warmup: int = 1, sync: Callable[[], None] = _no_sync,
                iters_of: Optional[Mapping[Hashable, int]] = None, across_ranks: bool = False,
                device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Per name, the ``rounds`` per-call seconds of the module docstring's round-robin timing
    (``across_ranks``: the slowest rank's). ``progress`` prints ``timing round r/n`` to stderr
    after every round."""
    import torch.distributed as dist

    calls = {name: (iters_of or {}).get(name, iters) for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if across_ranks:
                dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / calls[name])
        if progress:
            print(f"timing round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    if across_ranks:
        return dict(zip(times, slowest_rank(list(times.values()), device)))
    return times


def median_seconds(fns: Mapping[Hashable, Callable[[], object]], repeats: int,
                   sync: Callable[[], None] = _no_sync, progress: bool = False) -> dict:
    """Median seconds per call of every fn: one warm-up call each (then ``sync()``), then
    ``repeats`` rounds calling each fn once in turn, ``sync()`` after each call."""
    times = time_rounds(fns, repeats, sync=sync, progress=progress)
    return {k: statistics.median(v) for k, v in times.items()}


def summarize_rounds(fns: Mapping[Hashable, Callable[[], object]], rounds: int,
                     **kwargs: object) -> dict:
    """:func:`summarize` of every fn's :func:`time_rounds` (same keyword arguments)."""
    return {k: summarize(v) for k, v in time_rounds(fns, rounds, **kwargs).items()}


def cuda_event_ms(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """Per-call times in ms, each bracketed by CUDA events on the current stream, after
    ``warmup`` calls and a synchronize."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


# ---- ranks ------------------------------------------------------------------------------------
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


def _gloo_rank(rank: int, world: int, port: int, job_fn: str, job: dict, outdir: str) -> None:
    """One rank of :func:`run_gloo_job`: gloo init, ``job_fn(job)``, write ``rank<r>.json``
    (``{"ok": result}`` or ``{"error": traceback}``) and leave with ``os._exit`` (some
    libraries, DeepSpeed's CPU comm op among them, abort at interpreter teardown)."""
    import torch.distributed as dist

    os.dup2(2, 1)  # the ranks' prints go to stderr, not into the parent's tables
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=job["timeout_s"]))
        module, _, name = job_fn.partition(":")
        out = {"ok": getattr(importlib.import_module(module), name)(job)}
    except BaseException:  # noqa: BLE001  (reported to the parent, whatever it is)
        out, code = {"error": f"rank {rank}: {traceback.format_exc()}"}, 1
    path = Path(outdir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(out))
    path.with_suffix(".tmp").rename(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_gloo_job(job_fn: str, world: int, job: dict, timeout_s: float,
                 grace_s: float = 5.0) -> list:
    """Every rank's ``job_fn(job)`` (``"package.module:function"``, importable by the spawned
    ranks) on ``world`` fresh gloo ranks, in rank order; ``job["timeout_s"]`` is set to the
    collective timeout ``timeout_s``. ``RuntimeError`` with the failing ranks' tracebacks when
    a rank raises or dies, and when the ranks still run after ``timeout_s`` (the rest are then
    killed, ``grace_s`` after a failure)."""
    job = dict(job, timeout_s=int(timeout_s))
    with tempfile.TemporaryDirectory(prefix="bench_ranks_") as tmp:
        codes, _ = run_ranks(_gloo_rank, (world, free_port(), job_fn, job, tmp), world,
                             timeout_s, grace_s=grace_s)
        outs = []
        for r in range(world):
            f = Path(tmp) / f"rank{r}.json"
            outs.append(json.loads(f.read_text()) if f.exists()
                        else {"error": f"rank {r}: no result (exit code {codes[r]}; "
                                       f"killed after the deadline or another rank's failure)"})
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"{job_fn} on {world} ranks failed:\n" + "\n".join(errors))
    return [o["ok"] for o in outs]
