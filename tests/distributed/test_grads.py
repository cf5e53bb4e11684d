"""Gradient sync and global grad-norm on 4 gloo ranks against sums computed from every rank's
raw gradients (each rank regenerates any rank's raw gradients from its seed)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

LAYOUTS = [dict(ep=4), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, etp=2), dict(tp=2, ep=4)]


def _raw(rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s gradients before sync (random, never zero), float64. Replicated dense
    parameters see the same data on the TP ranks of a shard, so their raw gradients agree there."""
    g = torch.Generator().manual_seed(1000 + rank)
    same_on_tp = torch.Generator().manual_seed(5000 + rank // tp)
    return {
        "dense": torch.randn(7, 3, generator=same_on_tp, dtype=torch.float64),
        "seq_parallel": torch.randn(5, generator=g, dtype=torch.float64),
        "tp_sharded": torch.randn(4, generator=g, dtype=torch.float64),
        "expert": torch.randn(2, 6, generator=g, dtype=torch.float64),
    }


def _params(rank: int, tp: int) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, grad in _raw(rank, tp).items():
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad.clone()
        params[name] = p
    params["expert"].sync_group = "edp"
    params["expert"].expert_parallel = True
    params["seq_parallel"].sequence_parallel = True
    params["tp_sharded"].tensor_parallel = True
    return params


def _check_sync(layout: dict, average: bool) -> float:
    from moe_parallel.distributed.grads import clip_grad_norm, global_grad_norm, sync_gradients

    ps = parallel_state(**layout)
    params = _params(ps.rank, ps.tp)
    sync_gradients(params.values(), ps, average=average, bucket_mb=1e-5)  # 1 tensor per bucket
    R = ps.dp * ps.cp if average else 1
    raw = {r: _raw(r, ps.tp) for r in range(ps.world_size)}
    dense_group = ps.ranks["dp_cp"]
    seq_group = sorted({q for t in ps.ranks["tp"] for q in parallel_state_coords(ps, t)["dp_cp"]})
    expected = {
        "dense": sum(raw[r]["dense"] for r in dense_group) / R,
        "tp_sharded": sum(raw[r]["tp_sharded"] for r in dense_group) / R,
        "seq_parallel": sum(raw[r]["seq_parallel"] for r in seq_group) / R,
        "expert": sum(raw[r]["expert"] for r in ps.ranks["edp"]) / R,
    }
    for name, want in expected.items():
        torch.testing.assert_close(params[name].grad, want, rtol=1e-12, atol=1e-12)

    # Norm: replicated params once; tp-sharded summed over TP; experts over the ETP×EP block.
    def synced(r: int, name: str) -> torch.Tensor:
        other = parallel_state_coords(ps, r)
        if name == "expert":
            return sum(raw[q]["expert"] for q in other["edp"]) / R
        return sum(raw[q][name] for q in other["dp_cp"]) / R

    sq = expected["dense"].square().sum() + expected["seq_parallel"].square().sum()
    sq += sum(synced(r, "tp_sharded").square().sum() for r in ps.ranks["tp"])
    sq += sum(synced(r, "expert").square().sum() for r in ps.ranks["tp_ep"])
    norm = global_grad_norm(params.values(), ps)
    assert math.isclose(float(norm), math.sqrt(float(sq)), rel_tol=1e-6)
    before = {n: p.grad.clone() for n, p in params.items()}
    total = clip_grad_norm(params.values(), ps, max_norm=float(norm) / 4)
    assert math.isclose(float(total), float(norm), rel_tol=1e-12)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, before[n] * (float(norm) / 4) / (float(norm) + 1e-6))
    return float(norm)


def parallel_state_coords(ps, rank: int) -> dict[str, list[int]]:
    """The groups of another rank ``rank`` in the same layout."""
    from moe_parallel.distributed.parallel_state import grid_groups

    groups = grid_groups(ps.world_size, ps.tp, ps.cp, ps.ep, ps.etp, ps.pp)
    return {name: next(g for g in gs if rank in g) for name, gs in groups.items()}


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
def test_sync_and_global_norm(layout, average):
    norms = get_pool(4).run(_check_sync, layout, average)
    assert len(set(round(n, 12) for n in norms)) == 1, norms  # every rank agrees
