"""update_expert_biases on 4 gloo ranks: one call balances every layer from all ranks' counts,
and every rank holds the same bias afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.distributed import update_expert_biases
from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

STEPS = 20
CFG = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2, score_function="sigmoid",
           expert_bias=True, bias_update_rate=0.02, init_std=0.3)


def _imbalance(counts: torch.Tensor) -> float:
    return float(counts.max() / counts.mean())


def _balance(layout: dict) -> dict:
    ps = parallel_state(**layout)
    torch.manual_seed(0)
    model = nn.ModuleList(MoELayer(MoEConfig(**CFG), parallel_state=ps) for _ in range(2))
    with torch.no_grad():  # skew: experts 0 and 1 win for positive tokens
        for layer in model:
            layer.router.weight[:2] += 0.1
    gen = torch.Generator().manual_seed(1 + ps.rank)  # every rank its own tokens
    imbalance = []
    for _ in range(STEPS):
        x = torch.rand(16, CFG["hidden_size"], generator=gen) + 0.5
        sum(layer(x).square().sum() for layer in model).backward()  # counts come with it
        counts = [layer.router.local_tokens_per_expert.clone() for layer in model]
        for c in counts:
            dist.all_reduce(c)  # every rank routes distinct tokens here: the global load
        imbalance.append([_imbalance(c) for c in counts])
        assert update_expert_biases(model, ps) == 2
        assert all(float(layer.router.local_tokens_per_expert.abs().sum()) == 0 for layer in model)
    biases = torch.cat([layer.router.expert_bias for layer in model])
    everyone = [torch.empty_like(biases) for _ in range(ps.world_size)]
    dist.all_gather(everyone, biases)
    return {"imbalance": imbalance, "same_bias": all(torch.equal(b, biases) for b in everyone),
            "bias_norm": float(biases.norm())}


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=4), dict(tp=2, ep=2)],
                         ids=["ep2_dp4", "ep4", "tp2_ep2"])
def test_update_expert_biases_balances_every_layer_identically_on_every_rank(layout):
    results = get_pool(4).run(_balance, layout, timeout=120)
    for rank, r in enumerate(results):
        assert r["same_bias"], f"rank {rank}: the ranks' biases differ"
        assert r["bias_norm"] > 0
        for layer in range(2):
            series = [step[layer] for step in r["imbalance"]]
            first, last = sum(series[:3]) / 3, sum(series[-5:]) / 5  # max/mean load
            assert first > 3.0, "the skew is too weak to test anything"
            assert last < first - 1.0, (rank, layer, series)
    assert results[0]["imbalance"] == results[3]["imbalance"]  # every rank saw the same loads
