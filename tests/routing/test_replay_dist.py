"""Router replay on 4 gloo ranks (float64).

* Every layout (ep4, ep2 with dp2, tp2·ep2, ep2·etp2) × every dispatcher × dropless, capacity,
  top-p and expert recompute: each rank records, then replays: output, input and parameter
  gradients bitwise equal. The recording gathered over the ranks (``gather_recording``) is the
  one-process routing of the union of their tokens (dropless: the same keys, expert ids and
  selected slots).
* A policy-gradient step: one process records the rollout routing of the global batch, the
  weights change, and the training forward replays that recording: on 4 ranks (each its part of
  the batch, gradients synchronised) the updated weights equal the one-process step's, 1e-10;
  plain routing after the change would have moved tokens to other experts.
* A recording that lacks one rank's token raises ValueError on every rank (that rank's naming
  the token, the others naming that rank), and the next forward works; a recording with another
  layer count raises on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.distributed import sync_gradients
from moe_parallel.experts import GroupedExperts
from moe_parallel.replay import (
    gather_recording,
    router_recording,
    set_router_replay,
    set_token_keys,
)
from moe_parallel.routing.record import RoutingRecord
from tests.helpers.dist_harness import get_pool, parallel_state

BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2,
            params_dtype=torch.float64, init_std=0.5)
S = 4
BATCH = [3, 2, 4, 3]  # sequences per rank (uneven)
LAYOUTS = {"ep4": dict(ep=4), "ep2-dp2": dict(ep=2), "tp2-ep2": dict(tp=2, ep=2),
           "ep2-etp2": dict(ep=2, etp=2)}
CASES = {"dropless": {}, "capacity": dict(capacity_factor=0.75, drop_policy="position"),
         "top_p": dict(top_p=0.55, top_k=3),
         "recompute": dict(recompute="experts", capacity_factor=1.0, drop_policy="probs")}


def _rank_batch(rank: int):
    """Rank ``rank``'s tokens ``[S, B_r, H]``, output gradient, and keys (the same anywhere)."""
    gen = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(S, BATCH[rank], BASE["hidden_size"], generator=gen, dtype=torch.float64)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    first = sum(BATCH[:rank])
    seq = torch.arange(1000 + first, 1000 + first + BATCH[rank]).view(1, -1)
    return x, gy, seq, torch.arange(S).view(-1, 1)


def _step(layer: MoELayer, x, gy):
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y, aux = layer(xg, return_aux=True)
    y.backward(gy)
    return y.detach(), aux, xg.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def run_layout(layout: dict) -> dict:
    ps = parallel_state(**layout)
    rank = dist.get_rank()
    x, gy, seq, pos = _rank_batch(rank)
    out = {}
    for dispatcher in ("alltoall", "allgather", "alltoall_hierarchical"):
        for case, changes in CASES.items():
            cfg = MoEConfig(**{**BASE, **changes, "token_dispatcher_type": dispatcher})
            torch.manual_seed(3)
            full = MoELayer(cfg)
            layer = MoELayer.shard_from(full, ps)
            layer.train()
            set_token_keys(layer, seq, pos)
            set_router_replay(layer, "record")
            y0, aux0, gx0, g0 = _step(layer, x, gy)
            mine = router_recording(layer)
            set_router_replay(layer, "replay", mine)
            y1, aux1, gx1, g1 = _step(layer, x, gy)
            bitwise = (torch.equal(y0, y1) and torch.equal(gx0, gx1)
                       and all(torch.equal(g0[n], g1[n]) for n in g0)
                       and torch.equal(aux0.routing.expert_idx, aux1.routing.expert_idx))
            res = {"bitwise": bitwise, "dropped": aux0.stats.dropped}
            if "capacity_factor" not in changes:  # the one-process routing of every rank's tokens
                glob = gather_recording(mine, dist.group.WORLD).layers[0]
                xs = [_rank_batch(r) for r in range(4)]
                set_router_replay(full, "record")
                for xr, _, sr, pr in xs:
                    set_token_keys(full, sr, pr)
                    full(xr)
                ref = router_recording(full).layers[0]
                res["keys"] = torch.equal(glob.seq_id, ref.seq_id) and torch.equal(
                    glob.position, ref.position)
                res["idx"] = torch.equal(glob.expert_idx, ref.expert_idx)
                res["sel"] = torch.equal(glob.selected, ref.selected)
            out[(dispatcher, case)] = res
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_record_then_replay_is_bitwise_on_every_layout_and_dispatcher(layout):
    per_rank = get_pool(4).run(run_layout, LAYOUTS[layout], timeout=300)
    for rank, got in enumerate(per_rank):
        assert len(got) == 3 * len(CASES)
        for (dispatcher, case), res in got.items():
            assert res["bitwise"], (rank, dispatcher, case)
            if "capacity_factor" not in CASES[case]:
                assert res["keys"] and res["idx"] and res["sel"], (rank, dispatcher, case, res)
    assert sum(per_rank[r][("alltoall", "capacity")]["dropped"] for r in range(4)) > 0


# ---- policy gradient ----------------------------------------------------------------------

ACTIONS = 5


def _pg_loss(y: torch.Tensor, rank: int, total: int) -> torch.Tensor:
    """``-Σ A · log π(a | y) / N`` over this rank's tokens: a fixed head ``[H, ACTIONS]``,
    actions and advantages drawn per token from rank-seeded generators."""
    head = torch.randn(BASE["hidden_size"], ACTIONS, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(70 + rank)
    n = y.shape[0] * y.shape[1]
    actions = torch.randint(0, ACTIONS, (n,), generator=gen)
    adv = torch.randn(n, dtype=torch.float64, generator=gen)
    logp = torch.log_softmax(y.reshape(n, -1) @ head, -1).gather(1, actions.view(-1, 1))[:, 0]
    return -(adv * logp).sum() / total


def _rollout_and_update(cfg: MoEConfig):
    """The one-process layer after the update and the rollout's recording (made before it)."""
    torch.manual_seed(4)
    full = MoELayer(cfg)
    full.train()
    set_router_replay(full, "record")
    with torch.no_grad():
        for r in range(4):
            x, _, seq, pos = _rank_batch(r)
            set_token_keys(full, seq, pos)
            full(x)
    record = router_recording(full)
    set_router_replay(full, "off")
    with torch.no_grad():  # the policy moved since the rollout
        gen = torch.Generator().manual_seed(11)
        for p in full.parameters():
            p.add_(0.8 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return full, record


def run_policy_gradient(layout: dict, dispatcher: str, changes: dict) -> dict:
    ps = parallel_state(**layout)
    rank = dist.get_rank()
    cfg = MoEConfig(**{**BASE, **changes, "token_dispatcher_type": dispatcher})
    total = S * sum(BATCH)
    lr = 0.1

    # one process: replay the rollout's routing over the global batch, one SGD step
    full, record = _rollout_and_update(cfg)
    layer = MoELayer.shard_from(full, ps)  # the updated weights, this rank's shard
    layer.train()
    set_router_replay(full, "replay", record)
    moved = 0
    for r in range(4):
        x, _, seq, pos = _rank_batch(r)
        set_token_keys(full, seq, pos)
        y, aux = full(x, return_aux=True)
        _pg_loss(y, r, total).backward()
        with torch.no_grad():
            plain = full.router(x.reshape(-1, cfg.hidden_size), count=False)[0].expert_idx
        moved += int((plain != aux.routing.expert_idx).any(1).sum())
    want = {n: (p - lr * p.grad).detach() for n, p in full.named_parameters()}

    # 4 ranks: this rank's part of the batch, the same recording
    set_router_replay(layer, "replay", record)
    x, _, seq, pos = _rank_batch(rank)
    set_token_keys(layer, seq, pos)
    _pg_loss(layer(x), rank, total).backward()
    sync_gradients(layer, ps, average=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.sub_(lr * p.grad)
    fe = layer.experts
    ref_experts = GroupedExperts.from_full(cfg, want["experts.w1"], want["experts.w2"],
                                           ps.ep_rank, ps.ep, ps.etp_rank, ps.etp)
    errs = {"router": (layer.router.weight - want["router.weight"]).abs().max().item(),
            "w1": (fe.w1 - ref_experts.w1).abs().max().item(),
            "w2": (fe.w2 - ref_experts.w2).abs().max().item(),
            "step": (want["router.weight"] - full.router.weight).abs().max().item()}
    return {"errs": errs, "moved": moved}


@pytest.mark.distributed
@pytest.mark.parametrize("layout,dispatcher,case", [
    ("ep4", "alltoall", "dropless"), ("tp2-ep2", "allgather", "capacity"),
    ("ep2-etp2", "alltoall", "top_p"), ("ep2-dp2", "alltoall_hierarchical", "dropless"),
])
def test_policy_gradient_step_with_replay_equals_one_process(layout, dispatcher, case):
    per_rank = get_pool(4).run(run_policy_gradient, LAYOUTS[layout], dispatcher, CASES[case],
                               timeout=180)
    for rank, got in enumerate(per_rank):
        errs = got["errs"]
        assert errs["step"] > 1e-4  # the step moved the weights
        assert max(errs["router"], errs["w1"], errs["w2"]) <= 1e-10, (rank, errs)
        assert got["moved"] > 0  # plain routing would have picked other experts


# ---- refusals -----------------------------------------------------------------------------

def run_mismatch() -> dict:
    ps = parallel_state(ep=4)
    rank = dist.get_rank()
    cfg = MoEConfig(**BASE)
    torch.manual_seed(5)
    layer = MoELayer.shard_from(MoELayer(cfg), ps)
    x, gy, seq, pos = _rank_batch(rank)
    set_token_keys(layer, seq, pos)
    set_router_replay(layer, "record")
    layer(x)
    record = gather_recording(router_recording(layer), dist.group.WORLD)
    out = {}
    lr = record.layers[0]
    if rank == 0:  # rank 0's recording lacks its first token
        lr = lr.take(~((lr.seq_id == 1000) & (lr.position == 0)))
    set_router_replay(layer, "replay", RoutingRecord([lr], record.num_experts, record.top_k))
    try:
        layer(x)
        out["missing"] = None
    except ValueError as e:
        out["missing"] = str(e)
    set_router_replay(layer, "replay", record)
    out["after"] = tuple(layer(x).shape)
    set_router_replay(layer, "replay", RoutingRecord(record.layers * 2, 8, 2))
    try:
        layer(x)
        out["layers"] = None
    except ValueError as e:
        out["layers"] = str(e)
    return out


@pytest.mark.distributed
def test_a_mismatched_recording_raises_on_every_rank():
    per_rank = get_pool(4).run(run_mismatch, timeout=120)
    assert "holds no token (seq_id=1000, position=0)" in per_rank[0]["missing"]
    for rank in (1, 2, 3):
        assert "input of rank(s) [0]" in per_rank[rank]["missing"], per_rank[rank]
    for rank, got in enumerate(per_rank):
        assert got["after"] == (S, BATCH[rank], BASE["hidden_size"])
        assert "recording holds 2 MoE layers, replay was set on 1" in got["layers"]
