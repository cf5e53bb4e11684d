"""Part ``sweep``: raw ``dist.all_to_all_single`` over each EP group per send-buffer size, and the
nccl-tests bandwidth conventions every part reports in."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from benchmarks.cluster.cli import log
from benchmarks.cluster.topology import layout_volumes


def bandwidth(payload_bytes: float, seconds: float, n: int) -> tuple[float, float]:
    """``(algbw, busbw)`` in GB/s (1e9 B/s), nccl-tests' all-to-all convention:
    ``algbw = payload / t``, ``busbw = algbw · (n - 1) / n`` over ``n`` ranks."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    alg = payload_bytes / seconds / 1e9
    return alg, alg * (n - 1) / n


def sweep_iters(iters: int, nbytes: int) -> int:
    """Calls per round of one sweep size: ``iters`` from 1 MiB up, more below (small exchanges
    are latency-bound and noisy): ``min(10·iters, max(iters, round(iters · 1 MiB / S)))``."""
    return min(10 * iters, max(iters, round(iters * 2 ** 20 / nbytes)))


def run_sweep(cfg: dict, states: dict, layout: dict, dtype: torch.dtype, device: torch.device,
           timer: Callable) -> list[dict]:
    """Part ``sweep`` (package docstring); rank 0's rows."""
    elem = torch.empty((), dtype=dtype).element_size()
    dispatch_volume = cfg["tokens"] * cfg["top_k"] * cfg["hidden"] * elem
    rows = []
    for ep in cfg["ep_sizes"]:
        group = states[ep].group("ep")
        fns, sizes, calls = {}, {}, {}
        for b in sorted({*cfg["sweep_bytes"], dispatch_volume}):
            n = max(ep, b // elem // ep * ep)
            inp = torch.randn(n, dtype=torch.float32, device=device).to(dtype)
            out = torch.empty_like(inp)
            name = str(n * elem)
            sizes[name] = (n * elem, b == dispatch_volume)
            fns[name] = (lambda o=out, i=inp, pg=group: dist.all_to_all_single(o, i, group=pg))
            calls[name] = sweep_iters(cfg["iters"], n * elem)
        times = timer(fns, iters_of=calls)
        for name, t in times.items():
            nbytes, is_dispatch = sizes[name]
            alg, bus = bandwidth(nbytes, t["seconds"], ep)
            rows.append({"ep": ep, "bytes": nbytes, "dispatch_volume": is_dispatch,
                         "iters": calls[name],
                         **layout_volumes(nbytes, ep, layout["node_of"]),
                         "time": t, "algbw_gbps": alg, "busbw_gbps": bus})
        if dist.get_rank() == 0:
            log(f"  sweep ep={ep}: {len(times)} sizes")
    return rows
