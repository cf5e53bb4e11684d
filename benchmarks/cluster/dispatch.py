"""Part ``dispatch``: ``combine(dispatch(x))`` of every dispatcher kind against the raw all-to-all
moving the same rows, per EP size and routing, inside the ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from benchmarks.cluster.cli import HIERARCHICAL, log
from benchmarks.cluster.routings import make_routing
from benchmarks.cluster.sweep import bandwidth
from benchmarks.exchange import dispatch_combine_fns, raw_alltoall_fns


def hierarchical_states(eps: list[int], g: int, flat: dict) -> tuple[dict, dict]:
    """``ParallelState.build(ep=ep, ranks_per_node=g)`` per EP size (``flat[ep]`` itself when it
    was built with those nodes), or why not (every rank gets the same answer: the failures are
    argument checks)."""
    from moe_parallel import ParallelState
    from moe_parallel.dispatch import DISPATCHERS

    states, why = {}, {}
    for ep in eps:
        if HIERARCHICAL not in DISPATCHERS:
            why[ep] = (f"not available: {HIERARCHICAL!r} is not in "
                       f"moe_parallel.dispatch.DISPATCHERS {DISPATCHERS}")
            continue
        if getattr(flat[ep], "ranks_per_node", None) == g:
            states[ep] = flat[ep]
            continue
        try:
            states[ep] = ParallelState.build(ep=ep, ranks_per_node=g)
        except TypeError as exc:
            why[ep] = f"not available: ParallelState.build(ranks_per_node=) failed: {exc}"
        except ValueError as exc:
            why[ep] = f"not available at ep {ep}, ranks_per_node {g}: {exc}"
    return states, why


def _build_dispatchers(kinds: list[str], experts: int, ps, hier_ps, hier_why: Optional[str]
                       ) -> tuple[dict, dict]:
    from moe_parallel.dispatch import build_dispatcher

    built, why = {}, {}
    for kind in kinds:
        if kind == HIERARCHICAL and hier_ps is None:
            why[kind] = hier_why or "not available"
            continue
        try:
            built[kind] = build_dispatcher(experts, hier_ps if kind == HIERARCHICAL else ps,
                                           kind)
        except (TypeError, ValueError) as exc:
            why[kind] = f"not available: build_dispatcher(kind={kind!r}) failed: {exc}"
    # every rank must time the same set (a kind missing on one rank would hang the others)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(built))
    common = set.intersection(*(set(e) for e in everyone))
    for kind in list(built):
        if kind not in common:
            why[kind] = "not available on every rank"
            del built[kind]
    return built, why


def _dispatch_variants(disp: dict, x: torch.Tensor, probs: torch.Tensor, routing,
                       grad_y: torch.Tensor, send: list[int], recv: list[int],
                       send_rows: torch.Tensor, send_counts: torch.Tensor, group) -> dict:
    """The timed functions of one (EP size, routing): ``<kind>:fwd`` / ``<kind>:fwd_bwd`` per
    dispatcher (identity experts) and ``raw:fwd`` / ``raw:fwd_bwd``, the bare
    ``all_to_all_single`` calls moving the same rows with the same splits
    (``benchmarks.exchange``)."""
    fns = {}
    for kind, d in disp.items():
        fns[f"{kind}:fwd"], fns[f"{kind}:fwd_bwd"] = dispatch_combine_fns(d, x, probs, routing,
                                                                          grad_y)
    fns["raw:fwd"], fns["raw:fwd_bwd"] = raw_alltoall_fns(send_rows, send_counts, send, recv,
                                                          group)
    return fns


def _exchange_inputs(cfg: dict, disp: dict, routing_kind: str, dtype: torch.dtype,
                     device: torch.device) -> dict:
    """This rank's tokens, routing (``probs`` a leaf), upstream gradient, and the splits and
    rows of the raw exchange (from the flat dispatcher's handle) for one routing kind."""
    rank = dist.get_rank()
    H, E, k, T = cfg["hidden"], cfg["experts"], cfg["top_k"], cfg["tokens"]
    routing = make_routing(routing_kind, T, E, k, rank, cfg["seed"], cfg["zipf_s"], device)
    g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
    x = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    grad_y = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        _, _, handle = disp["alltoall"].dispatch(x, routing, 0)
    send, recv = list(handle.send_splits), list(handle.recv_splits)
    x.requires_grad_(True)
    probs = routing.probs.detach().requires_grad_(True)
    return {"x": x, "probs": probs, "routing": replace(routing, probs=probs), "grad_y": grad_y,
            "send": send, "recv": recv,
            "send_rows": torch.randn(sum(send), H, generator=g, device=device,
                                     dtype=torch.float32).to(dtype),
            "send_counts": torch.zeros(E, dtype=torch.int64, device=device)}


def _dispatch_row(ep: int, routing_kind: str, experts_per_rank: int, everyone: list[dict],
                  hidden: int, elem: int, times: dict, why: dict) -> dict:
    """Rank 0's row of one (EP size, routing): bytes of every rank, and per variant its times,
    bandwidths and ratio to raw."""
    world = len(everyone)
    send_bytes = [sum(e["send"]) * hidden * elem for e in everyone]
    recv_bytes = [sum(e["recv"]) * hidden * elem for e in everyone]
    off_rank = [(sum(e["send"]) - e["send"][e["ep_rank"]]) * hidden * elem for e in everyone]
    s_mean = sum(send_bytes) / world
    row = {"ep": ep, "routing": routing_kind, "experts_per_rank": experts_per_rank,
           "send_bytes_per_rank": send_bytes, "recv_bytes_per_rank": recv_bytes,
           "offrank_bytes_per_rank": off_rank, "bytes_per_rank": s_mean,
           "payload_bytes": {"fwd": 2 * s_mean, "fwd_bwd": 4 * s_mean},
           "max_recv_over_mean": max(recv_bytes) / s_mean if s_mean else None,
           "variants": {}, "not_available": why}
    for name, t in times.items():
        kind, mode = name.split(":")
        alg, bus = bandwidth(row["payload_bytes"][mode], t["seconds"], ep)
        entry = row["variants"].setdefault(kind, {})
        entry[mode] = {"time": t, "algbw_gbps": alg, "busbw_gbps": bus}
    raw = row["variants"]["raw"]
    for kind, modes in row["variants"].items():
        if kind != "raw":
            for mode, v in modes.items():
                v["ratio"] = v["time"]["seconds"] / raw[mode]["time"]["seconds"]
    return row


def run_dispatch(cfg: dict, states: dict, hier: tuple[dict, dict], dtype: torch.dtype,
                 device: torch.device, timer: Callable) -> list[dict]:
    """Part ``dispatch`` (package docstring); rank 0's rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for ep in cfg["ep_sizes"]:
        ps = states[ep]
        disp, why = _build_dispatchers(cfg["dispatchers"], cfg["experts"], ps, hier[0].get(ep),
                                       hier[1].get(ep))
        for routing_kind in cfg["routings"]:
            m = _exchange_inputs(cfg, disp, routing_kind, dtype, device)
            times = timer(_dispatch_variants(disp, m["x"], m["probs"], m["routing"],
                                             m["grad_y"], m["send"], m["recv"], m["send_rows"],
                                             m["send_counts"], ps.group("ep")))
            everyone: list = [None] * world
            dist.all_gather_object(everyone, {"send": m["send"], "recv": m["recv"],
                                              "ep_rank": ps.ep_rank})
            if rank == 0:
                rows.append(_dispatch_row(ep, routing_kind, cfg["experts"] // ep, everyone,
                                          cfg["hidden"], elem, times, why))
        if rank == 0:
            log(f"  dispatch ep={ep}: {', '.join(disp)}"
                + (f" ({'; '.join(f'{k}: {v}' for k, v in why.items())})" if why else ""))
    return rows
