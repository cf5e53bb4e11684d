"""Dropless block-sparse mode on one process: the layer against the float64 reference and the
grouped-GEMM path, the padding bound, the row ceiling, and batch isolation."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE
from moe_parallel.experts.block_sparse import padded_rows, resolve_block_size

BASE = dict(hidden_size=16, ffn_hidden_size=16, num_experts=8, top_k=2,
            params_dtype=torch.float64, init_std=0.3, expert_impl="block_sparse")

CASES = {
    "top1_gelu": dict(top_k=1, norm_topk_prob=False, activation="gelu"),
    "top2_swiglu": dict(),
    "top2_relu_shared": dict(activation="relu", num_shared_experts=1),
    "top6_fine": dict(num_experts=16, top_k=6),
    "sigmoid_grouped_routing": dict(num_experts=16, top_k=4, num_groups=4, group_topk=2,
                                    score_function="sigmoid"),
    "losses": dict(aux_loss_coeff=0.1, z_loss_coeff=0.01),
    "expert_choice": dict(router_type="expert_choice"),
    "expert_choice_cf": dict(router_type="expert_choice", capacity_factor=0.6),
}
BLOCK_SIZES = (1, 4, 8, 16)


def _layer(cfg: MoEConfig, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(cfg)


def _run(module, x: torch.Tensor, cot: torch.Tensor):
    """Output, input grad and parameter grads of ``(y * cot).sum() + losses``."""
    x = x.detach().clone().requires_grad_(True)
    if isinstance(module, MoELayer):
        y, aux = module(x, return_aux=True)
        losses = aux.losses
    else:
        y, losses = module(x)
    ((y * cot).sum() + sum(losses.values(), torch.zeros((), dtype=y.dtype))).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _copy_params(dst: MoELayer, src: MoELayer) -> None:
    with torch.no_grad():
        for (n, p), (m, q) in zip(dst.named_parameters(), src.named_parameters()):
            assert n == m
            p.copy_(q)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_block_sparse_layer_matches_reference_and_grouped(name, block_size):
    cfg = MoEConfig(**{**BASE, **CASES[name], "block_size": block_size})
    layer = _layer(cfg)
    assert layer.experts.block_size == block_size
    grouped = MoELayer(cfg.replace(expert_impl="grouped"))
    _copy_params(grouped, layer)
    ref = ReferenceMoE.from_layer(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, cfg.hidden_size, generator=gen, dtype=torch.float64)
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    y, gx, grads = _run(layer, x, cot)
    y_ref, gx_ref, grads_ref = _run(ref, x, cot)
    y_g, gx_g, grads_g = _run(grouped, x, cot)
    for what, a, b, c in [("output", y, y_ref, y_g), ("input grad", gx, gx_ref, gx_g)]:
        assert _rel(a, b) < 1e-10, f"{what} vs reference"
        assert _rel(a, c) < 1e-10, f"{what} vs grouped"
    assert grads.keys() == grads_ref.keys() == grads_g.keys()
    for n in grads:
        assert grads_ref[n].norm() > 0, f"{n}: zero reference gradient exercises nothing"
        assert _rel(grads[n], grads_ref[n]) < 1e-10, f"grad {n} vs reference"
        assert _rel(grads[n], grads_g[n]) < 1e-10, f"grad {n} vs grouped"

    stats = layer.last_stats
    local = cfg.num_experts
    assert stats.dropped == 0 or cfg.router_type == "expert_choice"
    assert stats.expert_rows == int(stats.tokens_per_expert.sum())
    # at most E_local * (B - 1) padding rows, and exactly the per-expert round-up
    assert 0 <= stats.padded_rows - stats.expert_rows <= local * (block_size - 1)
    assert stats.padded_rows == padded_rows(stats.tokens_per_expert, block_size)
    assert stats.padded_rows % block_size == 0


@pytest.mark.parametrize("counts_kind", ["empty_experts", "multiples_of_b", "ones"])
def test_ragged_counts(counts_kind):
    """Empty experts, counts that are exact multiples of B and counts of 1 (top-1 routing
    forced by the router weights), against the reference."""
    cfg = MoEConfig(**{**BASE, "top_k": 1, "norm_topk_prob": False, "block_size": 4,
                       "activation": "gelu"})
    layer = _layer(cfg)
    targets = {"empty_experts": [2] * 5 + [6] * 7,            # experts 2 and 6 only
               "multiples_of_b": [0] * 8 + [5] * 4 + [7] * 12,  # 8, 4, 12 rows
               "ones": list(range(8))}[counts_kind]            # one row per expert
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(len(targets), cfg.hidden_size, generator=gen, dtype=torch.float64) + 0.5
    with torch.no_grad():  # token t's features point at its target expert
        layer.router.weight.zero_()
        for e in range(cfg.num_experts):
            layer.router.weight[e, e] = 20.0
        x[:, : cfg.num_experts] = 0.0
        x[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    ref = ReferenceMoE.from_layer(layer)
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y, gx, grads = _run(layer, x, cot)
    y_ref, gx_ref, grads_ref = _run(ref, x, cot)
    counts = layer.last_stats.tokens_per_expert
    assert counts.tolist() == torch.bincount(torch.tensor(targets), minlength=8).tolist()
    assert _rel(y, y_ref) < 1e-10 and _rel(gx, gx_ref) < 1e-10
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-10, n


def test_default_block_size_and_validation():
    assert resolve_block_size(None, 2048, torch.device("cpu")) == 32
    assert resolve_block_size(None, 2048, torch.device("cuda")) == 128
    assert resolve_block_size(None, 48, torch.device("cpu")) == 16
    assert resolve_block_size(None, 1408, torch.device("cuda")) == 128
    assert resolve_block_size(8, 48, torch.device("cpu")) == 8
    with pytest.raises(ValueError, match=r"block_size \(32\) must be a positive divisor .*\(48"):
        resolve_block_size(32, 48, torch.device("cpu"))
    with pytest.raises(ValueError, match="block_size"):
        MoELayer(MoEConfig(**{**BASE, "block_size": 5}))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        MoEConfig(**{**BASE, "block_size": 0})
    with pytest.raises(ValueError, match="expert_impl must be one of"):
        MoEConfig(**{**BASE, "expert_impl": "dense"})
    assert MoELayer(MoEConfig(**BASE)).experts.block_size == 16  # 32 halved to divide F=16
    assert MoELayer(MoEConfig(**{**BASE, "expert_impl": "grouped"})).experts.block_size is None


# ---- bounded memory ---------------------------------------------------------------------------


def _hot_layer(cfg: MoEConfig) -> MoELayer:
    """Top-1 router sending every positive token to expert 3."""
    layer = _layer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 5.0
    return layer


def test_row_ceiling_config_rules():
    for bad, match in [
        (dict(max_rows_per_rank=0), "max_rows_per_rank must be a positive int"),
        (dict(max_rows_factor=0.5), "max_rows_factor must be a finite number >= 1"),
        (dict(max_rows_factor=1.5, capacity_factor=1.0), "apply only to dropless"),
        (dict(max_rows_per_rank=8, router_type="expert_choice"), "apply only to dropless"),
        (dict(row_overflow="drop"), "row_overflow must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            MoEConfig(**{**BASE, **bad})


def test_row_ceiling_error_names_load_and_knob():
    cfg = MoEConfig(**{**BASE, "top_k": 1, "norm_topk_prob": False, "max_rows_factor": 2.0})
    layer = _hot_layer(cfg)
    x = torch.rand(32, cfg.hidden_size, dtype=torch.float64) + 0.5
    # one process: the balanced load is all 32 rows, so a factor >= 1 is never exceeded
    layer(x)
    assert not layer.last_stats.overflow
    layer = _hot_layer(cfg.replace(max_rows_factor=None, max_rows_per_rank=20))
    with pytest.raises(RuntimeError, match=r"32 expert rows .* ceiling of 20 rows per rank "
                                           r"set by max_rows_per_rank=20"):
        layer(x)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_row_ceiling_capacity_fallback_equals_capacity_mode(policy):
    """Over the ceiling with row_overflow='capacity', each expert keeps
    floor(M / E_local) assignments: the reference with that capacity."""
    cfg = MoEConfig(**{**BASE, "max_rows_per_rank": 20, "row_overflow": "capacity",
                       "drop_policy": policy, "block_size": 4})
    torch.manual_seed(0)
    layer = _layer(cfg)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, cfg.hidden_size, generator=gen, dtype=torch.float64)  # 48 rows > 20
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    cap = 20 // cfg.num_experts
    ref = ReferenceMoE(cfg.replace(max_rows_per_rank=None, capacity_factor=1e-9,
                                   min_capacity=cap))
    ref.load_state_dict(ReferenceMoE.from_layer(layer).state_dict())
    with pytest.warns(RuntimeWarning, match="fell back to capacity"):
        y, gx, grads = _run(layer, x, cot)
    y_ref, gx_ref, grads_ref = _run(ref, x, cot)
    stats = layer.last_stats
    assert stats.overflow and stats.dropped > 0
    assert stats.expert_rows <= 20 and int(stats.tokens_per_expert.max()) <= cap
    assert _rel(y, y_ref) < 1e-10 and _rel(gx, gx_ref) < 1e-10
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-10, n
    # under the ceiling the same layer is dropless
    layer(x[:8])
    assert not layer.last_stats.overflow and layer.last_stats.dropped == 0


# ---- batch isolation --------------------------------------------------------------------------

ISOLATION = dict(hidden_size=16, ffn_hidden_size=16, num_experts=8, top_k=2,
                 params_dtype=torch.float64, init_std=0.3, norm_topk_prob=False)


def _victim_and_mates(cfg: MoEConfig, layer: MoELayer, mates: str):
    """A [S, 1, H] victim sequence and [S, n, H] batch-mates: random ones, or adversarial
    ones that all target the victim's favourite expert."""
    gen = torch.Generator().manual_seed(11)
    S, H = 12, cfg.hidden_size
    victim = torch.randn(S, 1, H, generator=gen, dtype=torch.float64)
    if mates == "random":
        return victim, torch.randn(S, 5, H, generator=gen, dtype=torch.float64)
    logits = victim.reshape(S, H) @ layer.router.weight.detach().t()
    hot = int(torch.mode(logits.argmax(1)).values)
    direction = layer.router.weight.detach()[hot]
    noise = 0.01 * torch.randn(S, 7, H, generator=gen, dtype=torch.float64)
    return victim, 50.0 * direction / direction.norm() + noise  # every mate picks `hot`


def _victim_view(layer: MoELayer, victim: torch.Tensor, mates: torch.Tensor | None):
    """The victim's output and input gradient with ``mates`` in the same batch (column 0)."""
    x = victim if mates is None else torch.cat([victim, mates], dim=1)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    cot = torch.zeros_like(y)
    cot[:, 0] = torch.linspace(0.5, 1.5, y.shape[0] * y.shape[2], dtype=y.dtype).view(
        y.shape[0], y.shape[2])
    (y * cot).sum().backward()
    return y[:, 0].detach(), x.grad[:, 0]


@pytest.mark.parametrize("impl", ["block_sparse", "grouped"])
@pytest.mark.parametrize("mates", ["random", "adversarial"])
def test_dropless_isolates_sequences(impl, mates):
    """Dropless: a sequence's output and input gradient do not depend on its batch-mates,
    not even on adversarial ones that all flood its favourite expert (float64 rounding)."""
    cfg = MoEConfig(**{**ISOLATION, "expert_impl": impl, "block_size": 4 if impl ==
                       "block_sparse" else None})
    layer = _layer(cfg)
    victim, mates_x = _victim_and_mates(cfg, layer, mates)
    y_alone, g_alone = _victim_view(layer, victim, None)
    y_mixed, g_mixed = _victim_view(layer, victim, mates_x)
    assert layer.last_stats.dropped == 0
    assert _rel(y_mixed, y_alone) < 1e-13, "output depends on batch-mates"
    assert _rel(g_mixed, g_alone) < 1e-13, "input gradient depends on batch-mates"


def test_capacity_mode_couples_sequences():
    """The companion: with capacity, adversarial batch-mates push the victim's assignments over
    capacity, so its output changes (the coupling dropless mode removes)."""
    cfg = MoEConfig(**{**ISOLATION, "capacity_factor": 1.0})
    layer = _layer(cfg)
    victim, mates_x = _victim_and_mates(cfg, layer, "adversarial")
    y_alone, _ = _victim_view(layer, victim, None)
    dropped_alone = layer.last_stats.dropped
    y_mixed, _ = _victim_view(layer, victim, mates_x)
    assert layer.last_stats.dropped > dropped_alone
    assert _rel(y_mixed, y_alone) > 1e-2, "capacity mode did not couple the sequences"
