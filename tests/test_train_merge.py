"""Merging dense models of the main job into an MoE model (``moe_parallel.train.merge``), in
float64: expert i of the merged model is source i's expert, so with the router giving expert i
probability 1 the merged model's logits are source i's; the dense part is the mean or the named
source's; the routers are drawn as documented; bad inputs are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_parallel.distributed import ParallelState
from moe_parallel.replay import set_router_replay, set_token_keys
from moe_parallel.routing.record import LayerRouting, RoutingRecord
from moe_parallel.train import (
    _parse,
    average_models,
    build_model,
    merge_dense_models,
    router_parameters,
)

TOL = 1e-12
B, S, VOCAB = 2, 8, 40


def _dense(seed: int, **flags) -> torch.nn.Module:
    """The main job's dense model (``--experts 1 --top-k 1``, float64), every parameter random
    and non-zero (LayerNorm scales in [0.5, 1.5], so ``1 / gamma`` is finite)."""
    argv = ["--experts", "1", "--top-k", "1", "--dtype", "float64", "--vocab", str(VOCAB),
            "--hidden", "16", "--ffn", "24", "--layers", "2", "--heads", "4", "--seq-len",
            str(S), "--seed", str(seed)]
    for k, v in flags.items():
        argv += [k, str(v)]
    model = build_model(_parse(argv), ParallelState.single())
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.eval()


def _with_new_experts(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose expert weights alone are redrawn."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in out.blocks:
            for p in block.moe.experts.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return out


def _tokens(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _route_all_to(merged: torch.nn.Module, i: int, gap: float = 80.0) -> None:
    """Every layer's router gives expert ``i`` the logit ``gap`` and the others 0, for every
    token: the router input is ``ln2(x) = gamma * xhat + beta`` with ``Σ_h xhat_h = 0``, so the
    row ``w = c / gamma`` gives ``w · ln2(x) = c Σ_h beta_h / gamma_h``, whatever ``x``. Its
    softmax probability is then ``1 / (1 + (n - 1) e^-gap)``, 1.0 in float64."""
    with torch.no_grad():
        for block in merged.blocks:
            gamma, beta = block.ln2.weight, block.ln2.bias
            c = gap / float((beta / gamma).sum())
            w = torch.zeros_like(block.moe.router.weight)
            w[i] = c / gamma
            block.moe.router.weight.copy_(w)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def test_merged_logits_equal_source_i_when_routed_to_expert_i():
    base = _dense(0)
    sources = [_with_new_experts(base, 10 + i) for i in range(3)]
    merged = merge_dense_models(sources, top_k=1).eval()
    assert [b.moe.config.num_experts for b in merged.blocks] == [3, 3]
    ids = _tokens()
    with torch.no_grad():
        want = [s(ids) for s in sources]
        for i in range(3):
            _route_all_to(merged, i)
            got = merged(ids)
            err = _max_diff(got, want[i])
            others = min(_max_diff(got, want[j]) for j in range(3) if j != i)
            print(f"top-1, routed to expert {i}: max |merged - source {i}| = {err:.3e}; "
                  f"to the nearest other source {others:.3e}")
            assert err < TOL
            assert others > 1e-3  # the sources differ: the check could fail


def test_top2_merge_with_replayed_assignment_equals_source_i():
    """top_k=2: the replayed assignment (i, i+1) with the router at (80, 0): weights
    (1, e^-80 / (1 + e^-80)) after renormalisation, so the logits are source i's."""
    base = _dense(1)
    sources = [_with_new_experts(base, 20 + i) for i in range(3)]
    merged = merge_dense_models(sources, top_k=2).eval()
    ids = _tokens(8)
    with torch.no_grad():
        want = [s(ids) for s in sources]
        for i in range(3):
            _route_all_to(merged, i)
            pair = torch.tensor([i, (i + 1) % 3]).expand(S * B, 2)
            seq = torch.arange(B).repeat(S)  # sequence-major tokens: [S, B] flattened
            pos = torch.arange(S).repeat_interleave(B)
            ones = torch.ones(S * B, 2, dtype=torch.bool)
            table = LayerRouting(seq, pos, pair.clone(), ones, ones).unique(later_wins=False)
            record = RoutingRecord([table, table], num_experts=3, top_k=2)
            set_router_replay(merged, "replay", record)
            set_token_keys(merged, torch.arange(B).view(1, B), torch.arange(S).view(S, 1))
            try:
                got = merged(ids)
            finally:
                set_router_replay(merged, "off")
            err = _max_diff(got, want[i])
            print(f"top-2, replayed ({i}, {(i + 1) % 3}): max |merged - source {i}| = {err:.3e}")
            assert err < TOL
            assert _max_diff(got, want[(i + 1) % 3]) > 1e-3


def test_dense_part_is_the_mean_or_the_named_source():
    a, b = _dense(2), _dense(3)  # differ everywhere
    mean = merge_dense_models([a, b])
    second = merge_dense_models([a, b], dense=1)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    checked = 0
    for name, p in mean.named_parameters():
        if ".moe.router." in name:
            continue
        if ".moe.experts." in name:
            assert torch.equal(p[0], pa[name][0]) and torch.equal(p[1], pb[name][0])
        else:
            assert _max_diff(p, (pa[name] + pb[name]) / 2) < 1e-15
            assert torch.equal(dict(second.named_parameters())[name], pb[name])
            checked += 1
    assert checked == 17  # embed, pos, 2 x (ln1 w/b, qkv, proj, ln2 w/b), ln_f w/b, head
    ids = _tokens(9)
    with torch.no_grad():
        _route_all_to(second.eval(), 1)
        err = _max_diff(second(ids), b(ids))
        print(f"dense=1, routed to expert 1: max |merged - source 1| = {err:.3e}")
        assert err < TOL
        _route_all_to(second, 0)
        assert _max_diff(second(ids), a(ids)) > 1e-3  # source 0's expert on source 1's body


def test_router_init_is_seeded_and_leaves_the_global_rng_alone():
    a = _dense(4)
    b = _with_new_experts(a, 5)
    state = torch.random.get_rng_state()
    m1 = merge_dense_models([a, b], router_init_std=0.3, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    m2 = merge_dense_models([a, b], router_init_std=0.3, seed=11)
    m3 = merge_dense_models([a, b], router_init_std=0.3, seed=12)
    g = torch.Generator().manual_seed(11)
    for p1, p2, p3 in zip(router_parameters(m1), router_parameters(m2), router_parameters(m3)):
        want = torch.randn(p1.shape, generator=g, dtype=torch.float64) * 0.3
        assert p1.shape == (2, 16) and torch.equal(p1, want.to(p1.dtype))
        assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    default = merge_dense_models([a, b])
    std = a.blocks[0].moe.config.init_std
    g = torch.Generator().manual_seed(0)
    for p in router_parameters(default):
        assert torch.equal(p, (torch.randn(p.shape, generator=g, dtype=torch.float64) * std
                               ).to(p.dtype))
    zero = merge_dense_models([a, b], router_init_std=0.0)
    assert all(not p.any() for p in router_parameters(zero))
    assert all(p.requires_grad for p in zero.parameters())


def test_zero_router_top2_outputs_the_mean_of_the_experts():
    """Two experts, top_k=2, zero router: weights (1/2, 1/2), so each layer's MoE output is
    the mean of the sources' experts; checked on the first layer's MoE alone."""
    a = _dense(6)
    b = _with_new_experts(a, 7)
    merged = merge_dense_models([a, b], top_k=2, router_init_std=0.0).eval()
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = merged.blocks[0].moe(x)
        want = (a.blocks[0].moe(x) + b.blocks[0].moe(x)) / 2
    err = _max_diff(got, want)
    print(f"zero router, top-2: max |moe - mean of experts| = {err:.3e}")
    assert err < TOL


def test_average_models_is_the_mean_of_every_parameter():
    a, b, c = _dense(2), _dense(3), _dense(4)
    avg = average_models([a, b, c])
    ps = [dict(m.named_parameters()) for m in (a, b, c)]
    for name, p in avg.named_parameters():
        assert _max_diff(p, (ps[0][name] + ps[1][name] + ps[2][name]) / 3) < 1e-15
    assert avg.blocks[0].moe.config.num_experts == 1


def test_bad_inputs_are_refused_by_name():
    a = _dense(0)
    b = _with_new_experts(a, 1)
    cases = [
        (dict(models=a), "models must be a sequence"),
        (dict(models=[a]), "at least 2"),
        (dict(models=[a, torch.nn.Linear(2, 2)]), r"models\[1\] must be a moe_parallel"),
        (dict(models=[a, _dense(0, **{"--ffn": 32})]), "ffn_hidden_size"),
        (dict(models=[a, _dense(0, **{"--aux-loss-coeff": 0.5})]), "aux_loss_coeff"),
        (dict(models=[a, _dense(0, **{"--vocab": 48})]), "vocab"),
        (dict(models=[a, _dense(0, **{"--layers": 3})]), "layers"),
        (dict(models=[a, _dense(0, **{"--heads": 2})]), "heads"),
        (dict(models=[a, b], top_k=0), "top_k must be an int in"),
        (dict(models=[a, b], top_k=3), "top_k must be an int in"),
        (dict(models=[a, b], dense="first"), "dense must be 'mean' or a model index"),
        (dict(models=[a, b], dense=2), "dense must be"),
        (dict(models=[a, b], dense=True), "dense must be"),
        (dict(models=[a, b], router_init_std=-0.1), "router_init_std"),
        (dict(models=[a, b], router_init_std=float("nan")), "router_init_std"),
        (dict(models=[a, b], seed=-1), "seed must be"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            merge_dense_models(**kwargs)
    moe_a = _dense(0, **{"--experts": 2})
    moe_b = _dense(1, **{"--experts": 2})
    with pytest.raises(ValueError, match="num_experts=1"):
        merge_dense_models([moe_a, moe_b])
    with pytest.raises(ValueError, match="top_k"):  # top-1 vs top-2 sources
        average_models([moe_a, _dense(0, **{"--experts": 2, "--top-k": 2})])
