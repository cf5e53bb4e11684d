"""The expert-parallel MoELayer on 4 (and 8) gloo ranks against ReferenceMoE on one process.

Layouts on 4 ranks: ep=4; ep=2 with edp=2; ep=2 with etp=2; tp=2 (sequence parallel: TP ranks
bring distinct tokens) with ep=2; each with top-1/top-2/fine-grained top-6 + shared expert,
dropless, capacity (both drop policies), pad-to-capacity, all tokens to one expert, expert
choice, dynamic-k (top-p) routing and the GShard / V-MoE priority drop policies, 3-D input,
ranks without tokens; every case with both the AllToAllDispatcher and the
AllGatherDispatcher. Six 8-rank layouts run a subset of the cases: the three that need 8 ranks
for ETP×EDP or TP×EP4 (and the all-gather dispatcher on them), and ep=8, ep=4 with edp=2,
tp=2 with ep=2 and edp=2 (top-1/top-2/fine-grained top-6 + shared, dropless and capacity).

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
The all-gather cases also check the dispatcher against the all-to-all one: identical group sizes
and, per local expert, the same rows (as a multiset); the layer output with the all-to-all
dispatcher swapped in; and the handle's own-token ``row_map`` (every kept assignment's row in its
owning rank's ``expert_in`` holds that token).
The experts run grouped GEMMs (the default ``expert_impl``) except in the ``-block_sparse``
cases, which run the dropless block-sparse products and also check the padding bound (at most
``E_local·(B-1)`` padding rows per rank) and the output against the same layer with grouped
GEMMs. The row ceiling (``max_rows_per_rank``) is checked on 4 ranks: the ETP×EP
groups over it raise on every rank (or, opted in, fall back to capacity and equal the
reference with that capacity), the others run dropless.
All cases of one layout run in one pool call; each case is reported as its own test.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE
from moe_parallel.dispatch import (
    AllGatherDispatcher,
    AllToAllDispatcher,
    LocalDispatcher,
    build_dispatcher,
)
from moe_parallel.distributed import collectives as comm
from moe_parallel.experts import shard_expert_weights
from tests.helpers.dist_harness import DistFailure, get_pool, parallel_state

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
    "w8_ep8": (8, dict(ep=8)),
    "w8_ep4_edp2": (8, dict(ep=4)),
    "w8_tp2_ep2_edp2": (8, dict(tp=2, ep=2)),
}
DISPATCHER_CLASSES = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}

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
for _r in ("top1", "top2", "top6_fine_shared"):
    CASES[f"{_r}-dropless-block_sparse"] = dict(
        cfg={**ROUTINGS[_r], "expert_impl": "block_sparse"})
CASES["one_expert-dropless-block_sparse"] = dict(
    cfg={**ROUTINGS["top1"], "activation": "gelu", "expert_impl": "block_sparse"},
    one_expert=True,
)
CASES["relu_shared_gated"] = dict(
    cfg=dict(top_k=2, activation="relu", num_shared_experts=2, shared_expert_gate=True)
)
CASES["seq_major_3d"] = dict(cfg=dict(top_k=2), tokens=[6, 0, 10, 4], seqs=2)
CASES["one_rank_has_tokens"] = dict(cfg=dict(top_k=2, capacity_factor=1.0), tokens=[0, 0, 5, 0])
CASES["no_tokens_anywhere"] = dict(cfg=dict(top_k=2, num_shared_experts=1), tokens=[0] * 4)
# One rank's layer input does not require grad: every rank must still run the same backward
# collectives (its expert and router parameters need their gradients).
CASES["input_without_grad_on_rank2"] = dict(cfg=dict(top_k=2), frozen_input_rank=2)
CASES["input_without_grad_on_rank2-block_sparse"] = dict(
    cfg=dict(top_k=2, expert_impl="block_sparse"), frozen_input_rank=2)
CASES["no_tokens_anywhere_padded"] = dict(
    cfg=dict(top_k=2, capacity_factor=1.0, pad_to_capacity=True), tokens=[0] * 4
)
# Dynamic-k (top-p) routing and the priority drop policies (GShard k-major, V-MoE BPR).
_TOP_P = dict(top_k=4, top_p=0.6)
CASES["top_p-dropless"] = dict(cfg=_TOP_P)
CASES["top_p-dropless-block_sparse"] = dict(cfg={**_TOP_P, "expert_impl": "block_sparse"})
CASES["top_p-cap_k_major"] = dict(cfg={**_TOP_P, "capacity_factor": 0.6, "drop_policy": "k_major"})
CASES["top_p-pad_batch_priority"] = dict(cfg={**_TOP_P, "capacity_factor": 0.6,
                                              "drop_policy": "batch_priority",
                                              "pad_to_capacity": True})
CASES["top2-cap_k_major"] = dict(cfg=dict(top_k=2, capacity_factor=0.7, drop_policy="k_major"))
CASES["top2-cap_batch_priority"] = dict(cfg=dict(top_k=2, capacity_factor=0.7,
                                                 drop_policy="batch_priority"))
EIGHT_RANK_CASES = ["top1-cap_probs", "top2-dropless", "top6_fine_shared-pad_position",
                    "one_expert-cap_probs"]
# the 8-rank layouts that 4 ranks also hold in a smaller form: every routing, dropless/capacity
EIGHT_RANK_ROUTING_CASES = [
    "top1-dropless", "top1-cap_probs", "top2-dropless", "top2-dropless-block_sparse",
    "top2-cap_position", "top6_fine_shared-dropless", "top6_fine_shared-cap_probs",
    "top6_fine_shared-pad_position", "top_p-dropless", "top_p-cap_k_major",
    "top2-cap_batch_priority",
]
ROUTING_LAYOUTS = ("w8_ep8", "w8_ep4_edp2", "w8_tp2_ep2_edp2")


def _cases(layout: str) -> list[tuple[str, str]]:
    """(dispatcher, case) pairs run on ``layout``."""
    if LAYOUTS[layout][0] == 4:
        return [(d, c) for d in DISPATCHER_CLASSES for c in sorted(CASES)]
    if layout in ROUTING_LAYOUTS:
        return [("alltoall", c) for c in EIGHT_RANK_ROUTING_CASES]
    return [(d, c) for d in DISPATCHER_CLASSES for c in EIGHT_RANK_CASES]


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


def _build(cfg: MoEConfig, ps, seed: int, one_expert: bool, dispatcher: str):
    """The full local layer, its reference copy and this rank's parallel layer (same weights)."""
    torch.manual_seed(seed)
    full = MoELayer(cfg)
    if one_expert:
        with torch.no_grad():
            full.router.weight.zero_()
            full.router.weight[-1] = 5.0
    ref = ReferenceMoE.from_layer(full)
    par = MoELayer(cfg, parallel_state=ps,
                   dispatcher=DISPATCHER_CLASSES[dispatcher](cfg.num_experts, ps))
    own = dict(full.named_parameters())
    w1, w2 = shard_expert_weights(own["experts.w1"], own["experts.w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, cfg.gated)
    with torch.no_grad():
        for name, p in par.named_parameters():
            src = {"experts.w1": w1, "experts.w2": w2}.get(name, own[name])
            p.copy_(src)
    return full, ref, par


def _sorted_rows(rows: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Each group's rows in a canonical order (by a fixed random projection): rows as a
    multiset per group."""
    v = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(7),
                    dtype=rows.dtype)
    return torch.cat([g[(g @ v).argsort()] for g in rows.split(group_sizes.tolist())])


def _check_allgather(par: MoELayer, ps, x: torch.Tensor, spied: dict, y: torch.Tensor) -> dict:
    """All-gather dispatch against all-to-all dispatch on the same routing, and the handle's
    own-token row map against the owning rank's expert input. 0.0 / relative errors."""
    cfg = par.config
    tokens = x.reshape(-1, cfg.hidden_size)
    expert_in, group_sizes, handle = spied["out"]
    routing, pad_to = spied["routing"], spied["pad_to"]
    out = {}
    with torch.no_grad():
        a2a = AllToAllDispatcher(cfg.num_experts, ps)
        rows, gs, _ = a2a.dispatch(tokens, routing, pad_to)
        out["group_sizes_differ"] = float(not torch.equal(gs, group_sizes))
        out["expert_rows_differ"] = float(
            out["group_sizes_differ"] > 0
            or not torch.equal(_sorted_rows(rows, gs), _sorted_rows(expert_in, group_sizes))
        )
        ag = par.dispatcher
        par.dispatcher = a2a
        out["vs_alltoall"] = _rel(y.detach(), par(x))
        par.dispatcher = ag

        # own row map: row_map[t, j] is a row of the owner's expert_in holding token t
        group = ps.group("tp_ep") if ps.ep * ps.etp > 1 else None
        everyone = comm.all_gather(expert_in, group)
        sizes = comm.all_gather_sizes(expert_in.shape[0], group)
        starts = torch.tensor([0, *sizes]).cumsum(0)
        E_local = cfg.num_experts // ps.ep
        row_map, idx = handle.row_map, routing.expert_idx
        bad = 0
        for t, j in (row_map >= 0).nonzero().tolist():
            owner = ps.etp_rank + ps.etp * (int(idx[t, j]) // E_local)
            r = int(row_map[t, j])
            bad += not (r < sizes[owner]
                        and torch.equal(everyone[starts[owner] + r], tokens[t]))
        keep = torch.ones_like(idx, dtype=torch.bool) if routing.keep is None else routing.keep
        bad += not torch.equal(row_map >= 0, keep)
        own = handle.gathered_row_map[handle.offset: handle.offset + tokens.shape[0]]
        bad += not torch.equal(own[own >= 0], row_map[own >= 0])
        out["row_map_wrong"] = float(bad)
    return out


def _run_case(cfg: MoEConfig, ps, seed: int, case: dict, dispatcher: str) -> dict:
    rank = dist.get_rank()
    one_expert = case.get("one_expert", False)
    full, ref, par = _build(cfg, ps, seed, one_expert, dispatcher)
    spied: dict = {}
    if dispatcher == "allgather":
        dispatch = par.dispatcher.dispatch

        def spy(x, routing, pad_to=0):
            spied.update(out=dispatch(x, routing, pad_to), routing=routing, pad_to=pad_to)
            return spied["out"]

        par.dispatcher.dispatch = spy
    gen = torch.Generator().manual_seed(100 * seed + rank)
    T, H = case.get("tokens", TOKENS)[rank], cfg.hidden_size
    seqs = case.get("seqs")
    shape = (T // seqs, seqs, H) if seqs else (T, H)  # [S, B, H] sequence-major, or [T, H]
    if one_expert:  # positive tokens: expert -1 wins everywhere
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    cot = torch.randn(*shape, generator=gen, dtype=torch.float64)

    frozen = case.get("frozen_input_rank") == rank
    xp = x.clone().requires_grad_(not frozen)
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
        "input_grad": 0.0 if frozen else _rel(xp.grad, gx_ref),
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
    out.update(_check_block_sparse(cfg, ps, par, dispatcher, x, y))
    if dispatcher == "allgather":
        par.dispatcher.dispatch = dispatch
        out.update(_check_allgather(par, ps, x, spied, y))
    return out


def _check_block_sparse(cfg: MoEConfig, ps, par: MoELayer, dispatcher: str, x, y) -> dict:
    """Padding rows over the bound ``E_local·(B-1)`` (must be 0), and in dropless mode the
    relative difference to the grouped-GEMM layer with the same weights."""
    if cfg.expert_impl != "block_sparse":
        return {}
    stats, b = par.last_stats, par.experts.block_size
    bound = cfg.num_experts // ps.ep * (b - 1)
    out = {"padding_over_bound": float(max(0, stats.padded_rows - stats.expert_rows - bound))}
    if cfg.dropless:
        grouped = MoELayer(cfg.replace(expert_impl="grouped"), parallel_state=ps,
                           dispatcher=DISPATCHER_CLASSES[dispatcher](cfg.num_experts, ps))
        grouped.load_state_dict(par.state_dict())
        with torch.no_grad():
            out["vs_grouped"] = _rel(grouped(x), y.detach())
    return out


def run_layout(layout: str, names: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """Every (dispatcher, case) of ``names`` on this rank's layout; {(dispatcher, case):
    metrics}. A case has the same seed with either dispatcher."""
    ps = parallel_state(**LAYOUTS[layout][1])
    seeds = {name: i + 1 for i, name in enumerate(sorted(CASES))}
    results = {}
    for dispatcher, name in names:
        case = CASES[name]
        cfg = MoEConfig(**{**BASE, **case["cfg"]})
        results[dispatcher, name] = _run_case(cfg, ps, seeds[name], case, dispatcher)
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


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout, dispatcher, case", [(lay, *dc) for lay in LAYOUTS for dc in _cases(lay)]
)
def test_layer_matches_reference(layout, dispatcher, case):
    per_rank = [r[dispatcher, case] for r in _layout_results(layout)]
    for rank, m in enumerate(per_rank):
        for key, err in m.items():
            if key in ("output", "input_grad", "vs_alltoall", "vs_grouped") or key.startswith(
                    "grad "):
                assert err < TOL, f"rank {rank} {key}: relative error {err:.3e}"
        for key in ("tokens_per_expert_equal", "group_sizes_differ", "expert_rows_differ",
                    "row_map_wrong", "padding_over_bound"):
            assert m.get(key, 0.0) == 0.0, f"rank {rank}: {key}"
        if dispatcher == "allgather":
            assert "row_map_wrong" in m
    # not vacuous: every parameter's reference gradient is nonzero somewhere
    has_tokens = any(CASES[case].get("tokens", TOKENS))
    for key, norm in per_rank[0].items():
        if key.startswith("norm ") and has_tokens:
            assert norm > 0, f"{key} is zero: the case exercises nothing"
    if ("cap" in case or "pad" in case) and has_tokens:
        assert sum(m["dropped"] for m in per_rank) > 0, "capacity case dropped nothing"
    cfg = MoEConfig(**{**BASE, **CASES[case]["cfg"]})
    block_sparse = cfg.expert_impl == "block_sparse"
    assert ("padding_over_bound" in per_rank[0]) == block_sparse
    assert ("vs_grouped" in per_rank[0]) == (block_sparse and cfg.dropless)


# ---- row ceiling (bounded memory in dropless mode) ---------------------------------------------

CEILING_LAYOUTS = ("ep4", "ep2_edp2", "ep2_etp2", "tp2_ep2")


def run_row_ceiling(layout: str, overflow: str, dispatcher: str) -> dict:
    """Every token to the last expert, ``max_rows_per_rank = E_local·w`` (fallback capacity 1
    per rank and expert). Reports whether this rank's group overflowed (expected: the group's
    tokens exceed the ceiling), and with ``overflow="capacity"`` the errors against the
    reference with capacity 1 (overflowing groups) or dropless (the others)."""
    ps = parallel_state(**LAYOUTS[layout][1])
    rank = dist.get_rank()
    group = ps.group("tp_ep") if ps.ep * ps.etp > 1 else None
    members = dist.get_process_group_ranks(group) if group is not None else [rank]
    ceiling = BASE["num_experts"] // ps.ep * len(members)
    expected = sum(TOKENS[r] for r in members) > ceiling
    cfg = MoEConfig(**{**BASE, **ROUTINGS["top1"], "activation": "gelu",
                       "max_rows_per_rank": ceiling, "row_overflow": overflow})
    full, ref, par = _build(cfg, ps, 3, True, dispatcher)
    gen = torch.Generator().manual_seed(40 + rank)
    x = torch.rand(TOKENS[rank], cfg.hidden_size, generator=gen, dtype=torch.float64) + 0.5
    cot = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = {"expected": expected}
    xp = x.clone().requires_grad_(True)
    if overflow == "error":
        try:
            y = par(xp)
        except RuntimeError as exc:
            return {**out, "raised": True, "message": str(exc)}
        (y * cot).sum().backward()  # the group's other ranks run the backward too
        return {**out, "raised": False}
    y = par(xp)
    (y * cot).sum().backward()
    stats = par.last_stats
    out.update(overflow=stats.overflow, dropped=stats.dropped, rows=stats.expert_rows,
               ceiling=ceiling)
    if expected:  # the reference with capacity 1 per (rank, expert)
        ref_cfg = cfg.replace(max_rows_per_rank=None, capacity_factor=1e-9, min_capacity=1)
        capped = ReferenceMoE(ref_cfg)
        capped.load_state_dict(ref.state_dict())
        ref = capped
    xr = x.clone().requires_grad_(True)
    y_ref, _ = ref(xr)
    loss_ref = (y_ref * cot).sum()
    if loss_ref.requires_grad:  # a rank without tokens has nothing to differentiate
        loss_ref.backward()
    out["output"] = _rel(y.detach(), y_ref.detach())
    out["input_grad"] = _rel(xp.grad, xr.grad if xr.grad is not None else torch.zeros_like(x))
    g_par, g_ref = _grads(par), _grads(ref)
    w1, w2 = shard_expert_weights(_all_reduce(g_ref["experts.w1"]),
                                  _all_reduce(g_ref["experts.w2"]),
                                  ps.ep_rank, ps.ep, ps.etp_rank, ps.etp, cfg.gated)
    out["grad experts.w1"] = _rel(_all_reduce(g_par["experts.w1"], ps.group("edp")), w1)
    out["grad experts.w2"] = _rel(_all_reduce(g_par["experts.w2"], ps.group("edp")), w2)
    out["grad router.weight"] = _rel(_all_reduce(g_par["router.weight"]),
                                     _all_reduce(g_ref["router.weight"]))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("dispatcher", sorted(DISPATCHER_CLASSES))
@pytest.mark.parametrize("layout", CEILING_LAYOUTS)
def test_row_ceiling_error_is_raised_by_the_whole_group(layout, dispatcher):
    per_rank = get_pool(4).run(run_row_ceiling, layout, "error", dispatcher, timeout=60)
    assert any(m["expected"] for m in per_rank), "no group over the ceiling: vacuous"
    for rank, m in enumerate(per_rank):
        assert m["raised"] == m["expected"], f"rank {rank}: raised={m['raised']}"
        if m["raised"]:
            assert "max_rows_per_rank=" in m["message"] and "expert rows" in m["message"]
    if layout == "ep2_edp2":  # one group over the ceiling, the other under it
        assert not all(m["expected"] for m in per_rank)


@pytest.mark.distributed
@pytest.mark.parametrize("dispatcher", sorted(DISPATCHER_CLASSES))
@pytest.mark.parametrize("layout", CEILING_LAYOUTS)
def test_row_ceiling_capacity_fallback(layout, dispatcher):
    per_rank = get_pool(4).run(run_row_ceiling, layout, "capacity", dispatcher, timeout=60)
    assert any(m["expected"] for m in per_rank)
    for rank, m in enumerate(per_rank):
        assert m["overflow"] == m["expected"], f"rank {rank}: overflow={m['overflow']}"
        assert m["rows"] <= m["ceiling"], f"rank {rank}: {m['rows']} rows"
        for key in ("output", "input_grad", "grad experts.w1", "grad experts.w2",
                    "grad router.weight"):
            assert m[key] < TOL, f"rank {rank} {key}: relative error {m[key]:.3e}"
    assert sum(m["dropped"] for m in per_rank) > 0


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
    from moe_parallel.distributed.parallel_state import ParallelState
    from moe_parallel.experts import GroupedExperts

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
    from moe_parallel.distributed.parallel_state import ParallelState

    ps = ParallelState(world_size=4, rank=0, ep=4, etp=1, dp=4, edp=1)
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(MoEConfig(**{**BASE, "num_experts": 6}), parallel_state=ps)
    ps = ParallelState(world_size=4, rank=0, ep=1, etp=4, dp=4, edp=1)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        MoELayer(MoEConfig(**{**BASE, "ffn_hidden_size": 6}), parallel_state=ps)


@pytest.mark.parametrize("pad", [False, True])
def test_allgather_single_process_is_the_local_dispatcher(pad):
    """With ParallelState.single() the all-gather dispatcher is the local one, bit for bit:
    the same expert input, group sizes, output and gradients (x and router)."""
    from moe_parallel.distributed.parallel_state import ParallelState

    cfg = MoEConfig(**{**BASE, "top_k": 2, "capacity_factor": 1.0, "pad_to_capacity": pad})
    torch.manual_seed(0)
    local = MoELayer(cfg)
    par = MoELayer(cfg, dispatcher=AllGatherDispatcher(cfg.num_experts, ParallelState.single()))
    par.load_state_dict(local.state_dict())
    x = torch.randn(13, cfg.hidden_size, dtype=torch.float64)
    routing, _, pad_to = local.route(x)
    assert (pad_to > 0) == pad
    a_in, a_gs, a_h = local.dispatcher.dispatch(x, routing, pad_to)
    b_in, b_gs, b_h = par.dispatcher.dispatch(x, routing, pad_to)
    assert torch.equal(a_in, b_in) and torch.equal(a_gs, b_gs)
    assert torch.equal(a_h.row_map, b_h.row_map) and torch.equal(b_h.row_map, b_h.gathered_row_map)
    assert torch.equal(a_h.tokens_per_expert, b_h.tokens_per_expert)
    assert int((a_h.row_map < 0).sum()) > 0  # capacity dropped something
    xl, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yl, yp = local(xl), par(xp)
    assert torch.equal(yl, yp)
    cot = torch.randn_like(yl)
    (yl * cot).sum().backward()
    (yp * cot).sum().backward()
    assert torch.equal(xl.grad, xp.grad)
    for (n, p), q in zip(local.named_parameters(), par.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_build_dispatcher():
    from moe_parallel.distributed.parallel_state import ParallelState

    single = ParallelState.single()
    assert type(build_dispatcher(8)) is LocalDispatcher
    assert type(build_dispatcher(8, single)) is AllToAllDispatcher
    assert type(build_dispatcher(8, single, "allgather")) is AllGatherDispatcher
    with pytest.raises(ValueError, match="alltoall"):
        build_dispatcher(8, single, "ring")
    ps = ParallelState(world_size=4, rank=0, ep=4, etp=1, dp=4, edp=1)
    with pytest.raises(ValueError, match="num_experts"):
        AllGatherDispatcher(6, ps)
