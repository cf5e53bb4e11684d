"""Overlap of communication with compute changes no result.

* ``collectives.all_to_all(..., async_op=True)``: the result after ``Pending.wait()`` and the
  gradient equal the synchronous exchange's (4 ranks, uneven splits, float64).
* ``shared_expert_overlap`` and ``overlap_chunks = n`` (2, 3, and 7 > some ranks' tokens, so
  chunks are empty): the layer against the same layer (same weights) without overlap, on one
  process and on 4 ranks (ep4; ep2 etp2; tp2 ep2 with the hierarchical all-to-all on 2 nodes × 2
  ranks), float64, dropless and capacity, grouped and block-sparse experts, gated and ungated
  shared experts, expert choice, Llama-4 scaled input. ``shared_expert_overlap`` alone:
  everything bitwise. With chunks, the same to 1e-13 relative (output, input gradient, every
  parameter gradient): a GEMM's rows round differently with the row count (BLAS blocking:
  ``a[:6] @ w`` differs from ``(a @ w)[:6]`` by about 1e-16), and a chunked wgrad sums the same
  terms in another order.
  The kept and dropped counts are equal.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.distributed import collectives as comm
from moe_parallel.distributed.parallel_state import ParallelState
from tests.helpers.dist_harness import get_pool, own_groups
from tests.helpers.layer_runs import forward_backward

TOKENS = [6, 0, 11, 3]
BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, params_dtype=torch.float64,
            init_std=0.3)
CASES = {
    "dropless_shared": dict(top_k=2, num_shared_experts=1),
    "gated_shared": dict(top_k=2, num_shared_experts=1, shared_expert_gate=True),
    "capacity": dict(top_k=2, capacity_factor=1.0),
    "block_sparse": dict(top_k=2, expert_impl="block_sparse", num_shared_experts=1),
    "expert_choice": dict(router_type="expert_choice", top_k=2),
    "scaled_input": dict(top_k=1, norm_topk_prob=False, scale_expert_input=True,
                         score_function="sigmoid"),
}
OVERLAPS = {
    "shared": dict(shared_expert_overlap=True),
    "chunks2": dict(overlap_chunks=2),
    "chunks3_shared": dict(overlap_chunks=3, shared_expert_overlap=True),
    "chunks7": dict(overlap_chunks=7),
}
LAYOUTS = {"ep4": (dict(ep=4), "alltoall", 4), "ep2_etp2": (dict(ep=2, etp=2), "alltoall", 4),
           "tp2_ep2_hier": (dict(tp=2, ep=2), "alltoall_hierarchical", 1)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp_min(1e-300)).item()


def _compare(a, b, exact: bool) -> dict:
    rel = max(_rel(a[2][n], b[2][n]) for n in a[2])
    same = torch.equal if exact else (lambda u, v: _rel(u, v) < 1e-13)
    return {"y": same(a[0], b[0]), "dx": same(a[1], b[1]),
            "grad_names": a[2].keys() == b[2].keys(), "grad_rel": rel,
            "counts": torch.equal(a[3], b[3]) and a[4] == b[4],
            "nonzero": bool(a[0].numel() == 0 or a[0].abs().sum() > 0)}


def _cases(ps, dispatcher: str, tokens: int, seed: int) -> dict:
    out = {}
    for cname, case in CASES.items():
        for oname, overlap in OVERLAPS.items():
            if "shared" in oname and not case.get("num_shared_experts"):
                continue
            cfg = MoEConfig(**{**BASE, **case}, token_dispatcher_type=dispatcher)
            layers = []
            for c in (cfg, replace(cfg, **overlap)):
                torch.manual_seed(0)
                full = MoELayer(c)
                layers.append(full if ps is None else MoELayer.shard_from(full, ps))
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(tokens, 8, dtype=torch.float64, generator=g)
            gy = torch.randn(tokens, 8, dtype=torch.float64, generator=g)
            out[(cname, oname)] = _compare(forward_backward(layers[0], x, gy),
                                           forward_backward(layers[1], x, gy),
                                           exact="chunks" not in oname)
    return out


def _check(results: dict) -> None:
    for key, r in results.items():
        assert r["y"] and r["dx"] and r["grad_names"] and r["counts"] and r["nonzero"], (key, r)
        assert (r["grad_rel"] < 1e-13 if "chunks" in key[1] else r["grad_rel"] == 0.0), (key, r)


def test_overlap_single_process():
    _check(_cases(None, "alltoall", 13, 0))


def run_layout(layout: str) -> dict:
    sizes, dispatcher, rpn = LAYOUTS[layout]
    with own_groups():
        ps = ParallelState.build(**sizes, ranks_per_node=rpn if rpn > 1 else 2)
        rank = dist.get_rank()
        return _cases(ps, dispatcher, TOKENS[rank], 10 + rank)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_overlap_expert_parallel(layout):
    for res in get_pool(4).run(run_layout, layout):
        _check(res)


def run_async_exchange() -> dict:
    rank, w = dist.get_rank(), dist.get_world_size()
    send = [(rank + j) % 3 for j in range(w)]
    recv = [(i + rank) % 3 for i in range(w)]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(send), 5, dtype=torch.float64, generator=g, requires_grad=True)
    gy = torch.randn(sum(recv), 5, dtype=torch.float64, generator=g)
    sync = comm.all_to_all(x, recv, send, None if w == 1 else dist.group.WORLD)
    (gs,) = torch.autograd.grad(sync, x, gy)
    out, pending = comm.all_to_all(x, recv, send, dist.group.WORLD, async_op=True)
    pending.wait()
    pending.wait()  # idempotent
    (ga,) = torch.autograd.grad(out, x, gy)
    return {"y": torch.equal(sync, out), "grad": torch.equal(gs, ga),
            "moved": bool(sync.numel() > 0 and sync.abs().sum() > 0)}


@pytest.mark.distributed
def test_async_all_to_all_equals_sync():
    for r in get_pool(4).run(run_async_exchange):
        assert r == {"y": True, "grad": True, "moved": True}


def test_overlap_options_are_checked():
    with pytest.raises(ValueError, match="overlap_chunks"):
        MoEConfig(**BASE, overlap_chunks=0)
    with pytest.raises(ValueError, match="overlap_chunks=2 cannot be combined with "
                                         "pad_to_capacity"):
        MoEConfig(**BASE, overlap_chunks=2, capacity_factor=1.0, pad_to_capacity=True)
    with pytest.raises(ValueError, match="max_rows_per_rank"):
        MoEConfig(**BASE, overlap_chunks=2, max_rows_per_rank=10)
    with pytest.raises(ValueError, match="shared_expert_overlap=True needs num_shared_experts"):
        MoEConfig(**BASE, shared_expert_overlap=True)
