"""The static layer (``MoEConfig.static_exchange`` with ``verdict_scope="none"`` and
``check_finite=False``) on one GPU: a training step makes no host synchronisation, and the
layer captured in CUDA graphs (``torch.cuda.make_graphed_callables``: forward and backward)
replays equal to eager on new inputs, output, input gradient and every parameter gradient.
Skipped without CUDA (``benchmarks.cuda_graph_bench`` times eager against replay)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.layer_bench import sync_sites
from moe_parallel import MoEConfig, MoELayer

pytestmark = pytest.mark.cuda

E, K, H, T = 8, 2, 64, 256
STATIC = dict(hidden_size=H, ffn_hidden_size=96, num_experts=E, top_k=K, init_std=0.1,
              capacity_factor=1.25, pad_to_capacity=True, static_exchange=True,
              verdict_scope="none", check_finite=False)


def _layer(**changes) -> MoELayer:
    torch.manual_seed(3)
    layer = MoELayer(MoEConfig(**{**STATIC, **changes}), device="cuda")
    layer.train()
    return layer


def _eager(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(gy)
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_a_static_step_makes_no_host_synchronisation():
    layer = _layer()
    x = torch.randn(T, H, device="cuda")
    gy = torch.randn_like(x)
    _eager(layer, x, gy)  # warm-up: lazy initialisations are not per-step reads
    torch.cuda.synchronize()
    sites = sync_sites(lambda: _eager(layer, x, gy))
    assert sites == [], "\n".join(sites)


@pytest.mark.parametrize("changes", [{}, {"capacity_factor": 0.5},
                                     {"num_shared_experts": 1, "shared_expert_gate": True}],
                         ids=["fits", "overflow", "shared"])
def test_graph_replay_equals_eager(changes):
    eager, graphed_layer = _layer(**changes), _layer(**changes)
    sample = torch.randn(T, H, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(graphed_layer, (sample,), num_warmup_iters=3)
    for seed in (11, 12):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(T, H, device="cuda", generator=gen)
        gy = torch.randn(T, H, device="cuda", generator=gen)
        y0, gx0, g0 = _eager(eager, x, gy)
        graphed_layer.zero_grad(set_to_none=False)
        for p in graphed_layer.parameters():
            if p.grad is not None:
                p.grad.zero_()
        xg = x.clone().requires_grad_()
        y1 = graphed(xg)
        y1.backward(gy)
        torch.cuda.synchronize()
        assert _rel(y1.detach(), y0) < 1e-5, seed
        assert _rel(xg.grad, gx0) < 1e-5, seed
        for n, p in graphed_layer.named_parameters():
            assert _rel(p.grad, g0[n]) < 1e-5, (seed, n)
