"""A reusable pool of N gloo processes for multi-process tests.

    pool = get_pool(4)                      # spawned once per pytest session and size
    results = pool.run(fn, *args)           # fn(*args) on every rank; [result of rank 0, ...]

``fn`` and its arguments and results must be picklable (``fn``: a module-level function of an
importable module, e.g. a test module). Inside ``fn``, ``torch.distributed`` is initialised
(gloo, world = N) and ``parallel_state(...)`` returns cached ``ParallelState`` objects, so each
layout's process groups are built once per worker. Every gloo group of a worker shares one
transport device (``_share_one_gloo_device``), so groups left alive cost no CPU while idle.

Failure is a test failure, never a hang: an exception on any rank raises ``DistFailure`` with
every failing rank's traceback; a rank that does not answer within ``timeout`` seconds (or
within a few seconds of another rank's failure), or dies, raises it too. Such a rank may be
stuck in a collective, so the pool is then killed and the next ``get_pool`` starts a fresh one;
when every rank answered (all finished, some with an exception) the pool stays usable.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from tests.helpers import spawn_guard

__all__ = ["DistFailure", "DistPool", "close_all", "get_pool", "own_groups", "parallel_state"]

_GRACE_S = 3.0  # how long to wait for the other ranks once one rank failed


class DistFailure(AssertionError):
    """A rank raised, died or timed out."""


# ---- worker side ------------------------------------------------------------------------------

_PS_CACHE: dict[tuple, Any] = {}


def parallel_state(tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1, pp: int = 1):
    """The worker's ``ParallelState`` for this layout (groups created on first use, then
    cached: every rank must ask for the same layouts in the same order)."""
    from moe_parallel.distributed.parallel_state import ParallelState

    key = (tp, cp, ep, etp, pp)
    if key not in _PS_CACHE:
        _PS_CACHE[key] = ParallelState.build(tp=tp, cp=cp, ep=ep, etp=etp, pp=pp)
    return _PS_CACHE[key]


@contextlib.contextmanager
def own_groups():
    """Inside a worker: destroy, on the way out, every process group created inside (each keeps
    two gloo threads, and its buffers, until it is freed). Every rank must create the same
    groups inside, as ``new_group`` requires anyway."""
    import gc

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    before = set(c10d._world.pg_map)
    try:
        yield
    finally:
        for pg in [g for g in list(c10d._world.pg_map) if g not in before]:
            dist.destroy_process_group(pg)
        gc.collect()


def _share_one_gloo_device() -> None:
    """Make every gloo group of this process use one transport device. torch gives each group
    its own device, whose event-loop thread wakes every 10 ms however idle the group is (100
    idle groups: 13% of a core per process, measured): with the hundreds of groups a session's
    tests build, the idle workers of the pools would take most of a two-core machine. Groups on
    a shared device behave the same (gloo's contexts are made to share devices). Left as torch
    has it where its private registry differs."""
    import torch.distributed as dist
    from torch.distributed import ProcessGroupGloo

    backend = dist.Backend
    if not (hasattr(backend, "_plugins") and hasattr(backend, "_ensure_backend_registered")
            and hasattr(ProcessGroupGloo, "_Options")):
        return
    backend._ensure_backend_registered("gloo")
    plugin = backend._plugins.get("GLOO")
    if plugin is None or not hasattr(plugin, "_replace"):
        return
    device = ProcessGroupGloo.create_default_device()

    def create(opts, backend_options):
        options = ProcessGroupGloo._Options()
        options._devices = [device]
        options._threads = 2
        options._timeout = opts.timeout
        options.enable_reconfigure = opts.enable_reconfigure
        pg = ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, options)
        pg.options.global_ranks_in_group = opts.global_ranks_in_group
        pg.options.group_name = opts.group_id
        return pg

    backend._plugins["GLOO"] = plugin._replace(creator_fn=create)


def _worker(rank: int, world: int, init_file: str, tasks, results, parent_pid: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    _share_one_gloo_device()
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=300),
    )
    results.put((None, rank, True, b""))  # ready
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # orphaned: the test process is gone
                return
            continue
        if task is None:  # shut down: nothing to keep, skip the slow interpreter teardown
            os._exit(0)
        call_id, payload = task
        try:
            fn, args, kwargs = pickle.loads(payload)
            out = pickle.dumps(fn(*args, **kwargs))
            results.put((call_id, rank, True, out))
        except BaseException:  # noqa: B036 - report everything, the parent decides
            results.put((call_id, rank, False, traceback.format_exc()))


# ---- parent side ------------------------------------------------------------------------------


class DistPool:
    """``world_size`` spawned gloo processes that run functions on request."""

    def __init__(self, world_size: int, start_timeout: float = 180.0) -> None:
        self.world_size = world_size
        self.broken = False
        self._calls = 0
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="dist_harness_")
        os.close(fd)
        os.unlink(self._init_file)  # the FileStore creates it
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, self._init_file, self._tasks[r], self._results, os.getpid()),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(None, start_timeout, "start")

    def _collect(self, call_id, timeout: float, what: str) -> list:
        """Results of ``call_id`` from every rank, or ``DistFailure`` (pool killed)."""
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            if any(not ok for ok, _ in got.values()):
                deadline = min(deadline, time.monotonic() + _GRACE_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                cid, rank, ok, payload = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
                for r in dead:
                    got[r] = (False, f"rank {r} died (exit code {self._procs[r].exitcode})")
                continue
            if cid == call_id:
                got[rank] = (ok, payload)
        failed = {r: msg for r, (ok, msg) in got.items() if not ok}
        missing = [r for r in range(self.world_size) if r not in got]
        if missing or not all(p.is_alive() for p in self._procs):
            self.close(kill=True)  # a rank is dead or may be stuck in a collective
        if failed or missing:
            lines = [f"{what} failed on {self.world_size} ranks"]
            lines += [f"--- rank {r} ---\n{msg}" for r, msg in sorted(failed.items())]
            if missing:
                lines.append(f"ranks {missing} gave no answer within the time limit "
                             f"({timeout:.0f} s) or after another rank failed")
            raise DistFailure("\n".join(lines))
        return [pickle.loads(got[r][1]) if got[r][1] else None for r in range(self.world_size)]

    def run(self, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> list:
        """``fn(*args, **kwargs)`` on every rank; the results in rank order."""
        if self.broken:
            raise DistFailure("this pool was killed after an earlier failure; use get_pool()")
        spawn_guard.check("runs work on a pool of processes")
        self._calls += 1
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put((self._calls, payload))
        return self._collect(self._calls, timeout, getattr(fn, "__name__", repr(fn)))

    def close(self, kill: bool = False) -> None:
        if not self.broken and not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        self.broken = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in [*self._tasks, self._results]:
            q.cancel_join_thread()
            q.close()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


_POOLS: dict[int, DistPool] = {}


def get_pool(world_size: int) -> DistPool:
    """The session's pool of ``world_size`` ranks (a fresh one if the last one was killed)."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.broken:
        pool = _POOLS[world_size] = DistPool(world_size)
    return pool


@atexit.register
def close_all() -> None:
    """Shut every pool down (the next ``get_pool`` starts a fresh one): idle workers keep their
    gloo threads, which take CPU from tests that start their own processes."""
    for pool in _POOLS.values():
        if not pool.broken:
            pool.close()
