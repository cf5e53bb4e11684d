"""The expert-parallel MoELayer on 4 (and 8) gloo ranks against ReferenceMoE on one process.

Layouts on 4 ranks: ep=4; ep=2 with edp=2; ep=2 with etp=2; tp=2 (sequence parallel: TP ranks
bring distinct tokens) with ep=2; each with top-1/top-2/fine-grained top-6 + shared expert,
dropless, capacity (both drop policies), pad-to-capacity, all tokens to one expert, expert
choice, 3-D input, ranks without tokens. Three 8-rank layouts run a subset of the cases.

Every rank builds the same full layer from one seed, its reference copy, and the parallel layer
holding its shard (EP rank's experts, ETP rank's hidden units). Each rank draws its own tokens
(a different count per rank, some ranks have none) and runs the reference on them (capacity is
per rank). float64, compared at relative error 1e-10:
  * the output and the input gradient, per rank;
  * expert weight gradients summed over EDP against the reference's gradient summed over all
    ranks, sliced to [this EP rank's experts, this ETP rank's hidden units];
  * dense gradients (router, shared expert) summed over all ranks against the same sum of the
    reference's (this stands in for grads.py: DP/EDP/TP sync done by hand here);
  * the routing statistics (tokens per expert, drops) against the local layer's.
All cases of one layout run in one pool call; each case is reported as its own test.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import DistFailure, get_pool, parallel_state

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE
from moe_parallel.experts import shard_expert_weights

TOKENS = [6, 0, 11, 3, 5, 9, 0, 2]  # tokens of each global rank: uneven, ranks 1 and 6 empty
TOL = 1e-10
BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, params_dtype=torch.float64,
            init_std=0.3)

LAYOUTS = {  # name -> (world size, ParallelState sizes)
    "ep4": (4, dict(ep=4)),
    "ep2_edp2": (4, dict(ep=2)),
    "ep2_etp2": (4, dict(ep=2, etp=2)),
    "tp2_ep2": (4, dict(tp=2, ep=2)),
    # 8 ranks: the layouts 4 cannot hold, on a subset of the cases (EIGHT_RANK_CASES)
    "w8_ep2_etp2_edp2": (8, dict(ep=2, etp=2)),
    "w8_tp2_ep4": (8, dict(tp=2, ep=4)),
    "w8_ep4_etp2": (8, dict(ep=4, etp=2)),
}

ROUTINGS = {
    "top1": dict(top_k=1, norm_topk_prob=False),
    "top2": dict(top_k=2),
    "top6_fine_shared": dict(num_experts=16, top_k=6, ffn_hidden_size=4, num_shared_experts=1),
}
MODES = {
    "dropless": dict(),
    "cap_probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "cap_position": dict(capacity_factor=1.0, drop_policy="position"),
    "pad_probs": dict(capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True),
    "pad_position": dict(capacity_factor=1.0, drop_policy="position", pad_to_capacity=True),
}
CASES: dict[str, dict] = {
    f"{r}-{m}": dict(cfg={**ROUTINGS[r], **MODES[m]}) for r in ROUTINGS for m in MODES
}
# Every token to the last expert (on the last EP rank): top-1, dropless / capacity / padded.
for _m in ("dropless", "cap_probs", "pad_probs"):
    CASES[f"one_expert-{_m}"] = dict(
        cfg={**ROUTINGS["top1"], **MODES[_m], "activation": "gelu"}, one_expert=True
    )
CASES["expert_choice"] = dict(cfg=dict(router_type="expert_choice", top_k=2))
CASES["relu_shared_gated"] = dict(
    cfg=dict(top_k=2, activation="relu", num_shared_experts=2, shared_expert_gate=True)
)
CASES["seq_major_3d"] = dict(cfg=dict(top_k=2), tokens=[6, 0, 10, 4], seqs=2)
CASES["one_rank_has_tokens"] = dict(cfg=dict(top_k=2, capacity_factor=1.0), tokens=[0, 0, 5, 0])
CASES["no_tokens_anywhere"] = dict(cfg=dict(top_k=2, num_shared_experts=1), tokens=[0] * 4)
CASES["no_tokens_anywhere_padded"] = dict(
    cfg=dict(top_k=2, capacity_factor=1.0, pad_to_capacity=True), tokens=[0] * 4
)
EIGHT_RANK_CASES = ["top1-cap_probs", "top2-dropless", "top6_fine_shared-pad_position",
                    "one_expert-cap_probs"]


def _cases(layout: str) -> list[str]:
    return sorted(CASES) if LAYOUTS[layout][0] == 4 else EIGHT_RANK_CASES


# ---- worker side ------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad if p.grad is not None else torch.zeros_like(p)
            for n, p in module.named_parameters()}


def _build(cfg: MoEConfig, ps, seed: int, one_expert: bool):
    """The full local layer, its reference copy and this rank's parallel layer (same weights)."""
    torch.manual_seed(seed)
    full = MoELayer(cfg)
    if one_expert:
        with torch.no_grad():
            full.router.weight.zero_()
            full.router.weight[-1] = 5.0
    ref = ReferenceMoE.from_layer(full)
    par = MoELayer(cfg, parallel_state=ps)
    own = dict(full.named_parameters())
    w1, w2 = shard_expert_weights(own["experts.w1"], own["experts.w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, cfg.gated)
    with torch.no_grad():
        for name, p in par.named_parameters():
            src = {"experts.w1": w1, "experts.w2": w2}.get(name, own[name])
            p.copy_(src)
    return full, ref, par


def _run_case(cfg: MoEConfig, ps, seed: int, case: dict) -> dict:
    rank = dist.get_rank()
    one_expert = case.get("one_expert", False)
    full, ref, par = _build(cfg, ps, seed, one_expert)
    gen = torch.Generator().manual_seed(100 * seed + rank)
    T, H = case.get("tokens", TOKENS)[rank], cfg.hidden_size
    seqs = case.get("seqs")
    shape = (T // seqs, seqs, H) if seqs else (T, H)  # [S, B, H] sequence-major, or [T, H]
    if one_expert:  # positive tokens: expert -1 wins everywhere
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    cot = torch.randn(*shape, generator=gen, dtype=torch.float64)

    xp = x.clone().requires_grad_(True)
    y = par(xp)
    (y * cot).sum().backward()  # every rank, even with no tokens: backward has collectives

    xr = x.clone().requires_grad_(True)
    y_ref, _ = ref(xr)
    loss_ref = (y_ref * cot).sum()
    if loss_ref.requires_grad:  # no tokens and no shared expert: nothing to differentiate
        loss_ref.backward()
    gx_ref = xr.grad if xr.grad is not None else torch.zeros_like(x)

    full(x)  # the local layer's routing statistics
    stats, stats_full = par.last_stats, full.last_stats
    out = {
        "output": _rel(y.detach(), y_ref.detach()),
        "input_grad": _rel(xp.grad, gx_ref),
        "tokens_per_expert_equal": float(
            not torch.equal(stats.tokens_per_expert, stats_full.tokens_per_expert)
        ),
    }
    g_par, g_ref = _grads(par), _grads(ref)
    for name, p in par.named_parameters():
        ref_sum = _all_reduce(g_ref[name])
        if p.expert_parallel:
            par_sum = _all_reduce(g_par[name], ps.group("edp"))
            w1, w2 = shard_expert_weights(
                _all_reduce(g_ref["experts.w1"]), _all_reduce(g_ref["experts.w2"]),
                ps.ep_rank, ps.ep, ps.etp_rank, ps.etp, cfg.gated,
            )
            ref_sum = w1 if name == "experts.w1" else w2
        else:
            par_sum = _all_reduce(g_par[name])
        out[f"grad {name}"] = _rel(par_sum, ref_sum)
        out[f"norm {name}"] = float(_all_reduce(ref_sum.norm().reshape(1)))
    out["dropped"] = stats.dropped
    return out


def run_layout(layout: str, names: list[str]) -> dict[str, dict]:
    """Every case of ``names`` on this rank's layout; {case: metrics}."""
    ps = parallel_state(**LAYOUTS[layout][1])
    results = {}
    for i, name in enumerate(names):
        case = CASES[name]
        cfg = MoEConfig(**{**BASE, **case["cfg"]})
        results[name] = _run_case(cfg, ps, seed=i + 1, case=case)
    return results


# ---- test side --------------------------------------------------------------------------------

_RESULTS: dict[str, list[dict] | DistFailure] = {}


def _layout_results(layout: str) -> list[dict]:
    """One pool call per layout; a failure is kept too, so the layout's other cases report it
    at once instead of each waiting for its own timeout."""
    if layout not in _RESULTS:
        world = LAYOUTS[layout][0]
        try:
            _RESULTS[layout] = get_pool(world).run(run_layout, layout, _cases(layout),
                                                   timeout=90)
        except DistFailure as exc:
            _RESULTS[layout] = exc
    got = _RESULTS[layout]
    if isinstance(got, DistFailure):
        raise DistFailure(f"layout {layout} failed (all its cases ran in one call):\n{got}")
    return got


@pytest.mark.parametrize(
    "layout, case", [(lay, case) for lay in LAYOUTS for case in _cases(lay)]
)
def test_layer_matches_reference(layout, case):
    per_rank = [r[case] for r in _layout_results(layout)]
    for rank, m in enumerate(per_rank):
        for key, err in m.items():
            if key in ("output", "input_grad") or key.startswith("grad "):
                assert err < TOL, f"rank {rank} {key}: relative error {err:.3e}"
        assert m["tokens_per_expert_equal"] == 0.0, f"rank {rank}: stats differ"
    # not vacuous: every parameter's reference gradient is nonzero somewhere
    has_tokens = any(CASES[case].get("tokens", TOKENS))
    for key, norm in per_rank[0].items():
        if key.startswith("norm ") and has_tokens:
            assert norm > 0, f"{key} is zero: the case exercises nothing"
    if ("cap" in case or "pad" in case) and has_tokens:
        assert sum(m["dropped"] for m in per_rank) > 0, "capacity case dropped nothing"


# ---- single-process pieces --------------------------------------------------------------------


@pytest.mark.parametrize("gated", [True, False])
def test_shards_tile_the_full_weights(gated):
    """Concatenating every (EP, ETP) shard rebuilds the full weights; the gated w1 shard is
    [gate columns | up columns] of the same hidden units."""
    E, H, F, ep, etp = 6, 5, 8, 3, 4
    w1 = torch.randn(E, H, 2 * F if gated else F, dtype=torch.float64)
    w2 = torch.randn(E, F, H, dtype=torch.float64)
    rows1, rows2 = [], []
    for p in range(ep):
        parts = [shard_expert_weights(w1, w2, p, ep, q, etp, gated) for q in range(etp)]
        for a, _ in parts:
            assert a.shape == (E // ep, H, (2 if gated else 1) * F // etp) and a.is_contiguous()
        if gated:
            gate = torch.cat([a.chunk(2, dim=2)[0] for a, _ in parts], dim=2)
            up = torch.cat([a.chunk(2, dim=2)[1] for a, _ in parts], dim=2)
            rows1.append(torch.cat([gate, up], dim=2))
        else:
            rows1.append(torch.cat([a for a, _ in parts], dim=2))
        rows2.append(torch.cat([b for _, b in parts], dim=1))
    assert torch.equal(torch.cat(rows1), w1) and torch.equal(torch.cat(rows2), w2)
    a, b = shard_expert_weights(w1, w2, 0, 1, 0, 1, gated)
    assert a.data_ptr() != w1.data_ptr() and b.data_ptr() != w2.data_ptr()


def test_single_process_state_matches_local_layer():
    """With ParallelState.single() the expert-parallel path is the local layer, bit for bit."""
    from moe_parallel.experts import GroupedExperts
    from moe_parallel.parallel_state import ParallelState

    cfg = MoEConfig(**{**BASE, "top_k": 2, "capacity_factor": 1.0, "pad_to_capacity": True,
                       "num_shared_experts": 1})
    torch.manual_seed(0)
    local = MoELayer(cfg)
    par = MoELayer(cfg, parallel_state=ParallelState.single())
    par.load_state_dict(local.state_dict())
    x = torch.randn(13, cfg.hidden_size, dtype=torch.float64)
    assert torch.equal(local(x), par(x))
    tags = {n: (p.expert_parallel, p.sync_group) for n, p in par.named_parameters()}
    assert tags["experts.w1"] == tags["experts.w2"] == (True, "edp")
    assert tags["router.weight"] == tags["shared_expert.w1"] == (False, "dp")
    shard = GroupedExperts.from_full(cfg, local.experts.w1, local.experts.w2, 1, 2, 1, 2)
    assert shard.w1.shape == (4, 8, 8) and shard.w2.shape == (4, 4, 8)
    assert torch.equal(shard.w2, local.experts.w2[4:, 4:])


def test_layout_rules_are_checked():
    from moe_parallel.parallel_state import ParallelState

    ps = ParallelState(world_size=4, rank=0, ep=4, etp=1, dp=4, edp=1)
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(MoEConfig(**{**BASE, "num_experts": 6}), parallel_state=ps)
    ps = ParallelState(world_size=4, rank=0, ep=1, etp=4, dp=4, edp=1)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        MoELayer(MoEConfig(**{**BASE, "ffn_hidden_size": 6}), parallel_state=ps)
