"""The layer under ``torch.compile`` (one process).

* As a new user tries it (no ``fullgraph``), backends ``aot_eager`` and ``inductor``: a
  training step gives the output, the input gradient and every parameter gradient of eager, the
  router's included (aux, z and per-sequence aux losses ride on the output's graph), 1e-12 in
  float64, and the routed counts behind the expert-bias update (and the dynamic-capacity
  counts) equal eager's exactly.
* ``fullgraph=True`` (no graph break, hence no host read in forward or backward): dropless
  grouped, capacity with and without padding, top-p, expert choice, shared experts,
  ``scale_expert_input``, expert bias: equal to eager (float64 1e-12, float32 1e-5 relative);
  five token counts compile at most two graphs (the second with a dynamic token count), each
  step equal to eager.
* Block-sparse experts build their block topology from the counts on the host: they compile
  with graph breaks, whose count is pinned here (it may only shrink), and equal eager.
* ``check_finite`` under compile is a device-side assertion: non-finite logits raise.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moe_parallel import MoEConfig, MoELayer

TOL = 1e-12
BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2,
            params_dtype=torch.float64, init_std=0.5)
CASES = {
    "aux-z-bias": dict(aux_loss_coeff=0.1, z_loss_coeff=0.01, expert_bias=True),
    "seq_aux-capacity": dict(seq_aux_loss_coeff=0.05, capacity_factor=1.0,
                             dynamic_capacity=True, expert_bias=True),
}
FULLGRAPH = {
    "dropless": dict(aux_loss_coeff=0.1, z_loss_coeff=0.01),
    "expert_bias": dict(expert_bias=True, seq_aux_loss_coeff=0.05),
    "capacity": dict(capacity_factor=1.0, aux_loss_coeff=0.1),
    "capacity-padded": dict(capacity_factor=1.0, pad_to_capacity=True, drop_policy="position"),
    "top_p": dict(top_p=0.6, top_k=3, dynamic_loss_coeff=0.01),
    "expert_choice": dict(router_type="expert_choice", capacity_factor=1.0),
    "shared": dict(num_shared_experts=1, aux_loss_coeff=0.1),
    "scale_expert_input": dict(scale_expert_input=True, top_k=1),
}
INDUCTOR = ["dropless", "capacity-padded", "top_p"]
BLOCK_SPARSE_BREAKS = 12  # the block topology's host reads (see the module docstring)


def _inputs(config: MoEConfig, tokens: int = 18, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, config.hidden_size, generator=gen, dtype=config.params_dtype)
    return x, torch.randn(x.shape, generator=gen, dtype=config.params_dtype)


def _step(layer: MoELayer, run, x: torch.Tensor, gy: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y = run(xg)
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    counts = {}
    if getattr(layer.router, "local_tokens_per_expert", None) is not None:
        counts["bias"] = layer.router.local_tokens_per_expert.clone()
    if layer.config.dynamic_capacity:
        counts["capacity"] = layer.capacity_counts.clone()
    return y.detach(), xg.grad, grads, counts


def _layer(config: MoEConfig) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(config)
    layer.train()
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _compare(config: MoEConfig, backend: str, fullgraph: bool, tol: float,
             tokens=(18,)) -> None:
    """Eager and compiled copies of one layer, a training step per token count: equal."""
    torch._dynamo.reset()
    eager, compiled = _layer(config), _layer(config)
    run = torch.compile(compiled, backend=backend, fullgraph=fullgraph)
    for i, T in enumerate(tokens):
        x, gy = _inputs(config, T, seed=i)
        y0, gx0, g0, c0 = _step(eager, eager, x, gy)
        y1, gx1, g1, c1 = _step(compiled, run, x, gy)
        assert _rel(y1, y0) <= tol and _rel(gx1, gx0) <= tol, T
        for name in g0:
            assert _rel(g1[name], g0[name]) <= tol, (T, name)
        assert float(g0["router.weight"].abs().max()) > 0
        for name in c0:
            assert float(c0[name].abs().sum()) > 0 and torch.equal(c1[name], c0[name]), name
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_training_keeps_the_aux_gradient_and_the_counts(case, backend):
    config = MoEConfig(**BASE, **CASES[case])
    _compare(config, backend, fullgraph=False, tol=TOL)
    # the losses do reach the router: without them its gradient differs
    plain = MoEConfig(**{**BASE, **CASES[case], "aux_loss_coeff": 0.0, "z_loss_coeff": 0.0,
                         "seq_aux_loss_coeff": 0.0})
    x, gy = _inputs(config)
    with_losses, without = _layer(config), _layer(plain)
    g_loss = _step(with_losses, with_losses, x, gy)[2]["router.weight"]
    g_plain = _step(without, without, x, gy)[2]["router.weight"]
    assert _rel(g_plain, g_loss) > 1e-6


@pytest.mark.parametrize("case", sorted(FULLGRAPH))
def test_fullgraph_equals_eager(case):
    config = MoEConfig(**{**BASE, **FULLGRAPH[case]})
    _compare(config, "aot_eager", fullgraph=True, tol=TOL)


@pytest.mark.parametrize("case", INDUCTOR)
def test_fullgraph_inductor_equals_eager(case):
    config = MoEConfig(**{**BASE, **FULLGRAPH[case]})
    _compare(config, "inductor", fullgraph=True, tol=TOL)


def test_fullgraph_inductor_float32():
    config = MoEConfig(**{**BASE, **FULLGRAPH["dropless"], "params_dtype": torch.float32})
    _compare(config, "inductor", fullgraph=True, tol=1e-5)


@pytest.mark.parametrize("case", ["dropless", "capacity-padded", "top_p"])
def test_a_changing_token_count_compiles_at_most_two_graphs(case):
    config = MoEConfig(**{**BASE, **FULLGRAPH[case]})
    counters.clear()
    _compare(config, "aot_eager", fullgraph=True, tol=TOL, tokens=(12, 16, 20, 7, 30))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_block_sparse_breaks_are_pinned_and_it_equals_eager():
    config = MoEConfig(**{**BASE, "expert_impl": "block_sparse", "aux_loss_coeff": 0.1})
    torch._dynamo.reset()
    x, _ = _inputs(config)
    explained = torch._dynamo.explain(_layer(config))(x.clone().requires_grad_())
    assert explained.graph_break_count <= BLOCK_SPARSE_BREAKS, [
        str(b.reason).splitlines()[0] for b in explained.break_reasons]
    _compare(config, "aot_eager", fullgraph=False, tol=TOL)


def test_check_finite_under_compile_raises():
    config = MoEConfig(**BASE)
    torch._dynamo.reset()
    run = torch.compile(_layer(config), backend="aot_eager", fullgraph=True)
    x, _ = _inputs(config)
    run(x)
    x[3, 2] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite router logits"):
        run(x)
    torch._dynamo.reset()


TRAIN = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
         "--experts", "4", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
         "--steps", "3", "--log-every", "100", "--aux-loss-coeff", "0.01"]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_train_compile_equals_eager(backend):
    from moe_parallel import train

    torch._dynamo.reset()
    eager = train.main(TRAIN)
    compiled = train.main(TRAIN + ["--compile", backend])
    torch._dynamo.reset()
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled["model"].blocks)
    for x, y in zip(eager["history"], compiled["history"]):
        assert abs(x - y) <= 1e-10 * abs(x), (eager["history"], compiled["history"])
    want = dict(eager["model"].named_parameters())
    for name, p in compiled["model"].named_parameters():  # the same names: state unchanged
        assert float((p - want[name]).detach().norm() / want[name].detach().norm()) < 1e-10, name


def test_train_compile_refused_with_hf_model(capsys):
    from moe_parallel import train

    with pytest.raises(SystemExit):
        train.main(TRAIN + ["--compile", "--hf-model", "/nonexistent"])
    assert "--compile compiles the built-in model's blocks" in capsys.readouterr().err
