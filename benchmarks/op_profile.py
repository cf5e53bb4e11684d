"""Where a distributed step spends its CPU time: ``torch.profiler`` self time by op family.

``op_family(name)`` maps a profiler event to the family its self time is summed into;
``profile_calls(fn, iters, top)`` profiles ``iters`` calls of ``fn`` after one untimed call
(all ranks start together after a barrier).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from benchmarks.harness import Stopwatch


def op_family(name: str) -> str:
    """The family a profiler event's self time is summed into (``by_family_self_ms``)."""
    low = name.lower()
    for family, keys in (("all_to_all", ("alltoall", "all_to_all")),
                         ("all_gather", ("allgather", "all_gather")),
                         ("sort_chunks", ("sort_chunks",)),
                         ("permute/unpermute", ("permute",)),
                         ("gemm", ("grouped_gemm", "bsr_", "aten::mm", "addmm", "matmul",
                                   "linear", "bmm")),
                         ("other collectives", ("gloo", "c10d", "allreduce"))):
        if any(k in low for k in keys):
            return family
    return "other"


def profile_calls(fn: Callable[[], object], iters: int, top: int) -> dict:
    """``torch.profiler`` over ``iters`` calls of ``fn`` (CPU), per call: wall ms, the ``top``
    ops by self CPU time, and self time summed by ``op_family`` plus ``untracked`` (wall minus
    all self time: Python, and the wait inside a bare ``dist.all_to_all_single``).

    Reading the names: a custom op called with autograd recording shows as ``moe_parallel::<op>``
    (the wrapper) around ``GeneratedBackwardFor_moe_parallel_<op>_default`` (its forward kernel);
    ``..._defaultBackward`` is its backward node, whose op calls (no autograd there) show as
    ``moe_parallel::<op>`` with the kernel time as self time. Collective waits count as self
    time of ``_AllToAll`` / ``_AllGather`` (the autograd functions of ``comm``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dist.barrier()
        with Stopwatch() as sw:
            for _ in range(iters):
                fn()
    wall = sw.seconds / iters
    events = [e for e in prof.key_averages()
              if e.self_cpu_time_total > 0 and "barrier" not in e.key.lower()]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    families: dict[str, float] = {}
    for e in events:
        f = op_family(e.key)
        families[f] = families.get(f, 0.0) + e.self_cpu_time_total / 1e3 / iters
    families["untracked"] = max(0.0, wall * 1e3 - sum(families.values()))
    return {
        "wall_ms_per_call": wall * 1e3,
        "by_family_self_ms": families,
        "top_ops": [{"op": e.key, "calls": e.count / iters,
                     "self_ms": e.self_cpu_time_total / 1e3 / iters,
                     "total_ms": e.cpu_time_total / 1e3 / iters} for e in events[:top]],
    }
