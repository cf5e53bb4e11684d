"""``torch.compile(layer)`` as a new user tries it (no ``fullgraph``), backends ``aot_eager`` and
``inductor``: a training step gives the output, the input gradient and every parameter gradient
of eager, the router's included (aux, z and per-sequence aux losses attached to the output's
graph), 1e-12 in float64, and the routed counts behind the expert-bias update (and the
dynamic-capacity counts) equal eager's exactly.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer

TOL = 1e-12
CASES = {
    "aux-z-bias": dict(aux_loss_coeff=0.1, z_loss_coeff=0.01, expert_bias=True),
    "seq_aux-capacity": dict(seq_aux_loss_coeff=0.05, capacity_factor=1.0,
                             dynamic_capacity=True, expert_bias=True),
}


def _step(config: MoEConfig, backend: str | None):
    torch.manual_seed(0)
    layer = MoELayer(config)
    layer.train()
    run = layer if backend is None else torch.compile(layer, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, config.hidden_size, generator=gen, dtype=torch.float64)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    y = run(xg)
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    counts = {"bias": layer.router.local_tokens_per_expert.clone()}
    if config.dynamic_capacity:
        counts["capacity"] = layer.capacity_counts.clone()
    return y.detach(), xg.grad, grads, counts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_training_keeps_the_aux_gradient_and_the_counts(case, backend):
    config = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2,
                       params_dtype=torch.float64, init_std=0.5, **CASES[case])
    torch._dynamo.reset()
    y0, gx0, g0, c0 = _step(config, None)
    y1, gx1, g1, c1 = _step(config, backend)
    assert _rel(y1, y0) <= TOL and _rel(gx1, gx0) <= TOL
    for name in g0:
        assert _rel(g1[name], g0[name]) <= TOL, name
    for name in c0:
        assert float(c0[name].abs().sum()) > 0 and torch.equal(c1[name], c0[name]), name
    # the losses do reach the router: without them its gradient differs
    plain = MoEConfig(**{**config.__dict__, "aux_loss_coeff": 0.0, "z_loss_coeff": 0.0,
                         "seq_aux_loss_coeff": 0.0})
    _, _, g_plain, _ = _step(plain, None)
    assert _rel(g_plain["router.weight"], g0["router.weight"]) > 1e-6
    torch._dynamo.reset()
