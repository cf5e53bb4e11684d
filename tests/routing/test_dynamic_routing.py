"""Dynamic routing: top-p (dynamic-k) selection, the priority drop policies and the dynamic
capacity schedule, each on hand-computed cases, against ``reference.py`` (float64: outputs, the
losses and every gradient), and the capacity factor across ranks (the same on every rank at
every step, equal to the reference schedule fed with every rank's counts, saved and loaded with
the model).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE
from moe_parallel import reference as ref_mod
from moe_parallel.distributed import ParallelState, update_capacity_factors
from moe_parallel.routing import TopKRouter, apply_capacity, next_capacity_factor
from tests.helpers.dist_harness import get_pool, own_groups

BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, params_dtype=torch.float64,
            init_std=0.3)


def _router_with_probs(probs: list[list[float]], **cfg) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose softmax over E = len(probs[0]) experts is ``probs`` (logits = log p:
    the weight is the identity, x = log p)."""
    E = len(probs[0])
    config = MoEConfig(hidden_size=E, ffn_hidden_size=4, num_experts=E,
                       params_dtype=torch.float64, **cfg)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E, dtype=torch.float64))
    return router, torch.tensor(probs, dtype=torch.float64).log()


# ---- top-p --------------------------------------------------------------------------------------

def test_top_p_takes_experts_until_the_probability_reaches_p():
    probs = [[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.3, 0.28, 0.22, 0.2]]
    router, x = _router_with_probs(probs, top_k=3, top_p=0.7)
    routing, _ = router(x)
    # token 0: 0.5 < 0.7 -> second; 0.8 >= 0.7 stop: k=2. token 1: 0.9: k=1.
    # token 2: 0.3, 0.58 < 0.7 -> third; 0.8: k=3 (= top_k, the cap)
    assert routing.expert_idx.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert routing.keep.tolist() == [[True, True, False], [True, False, False],
                                     [True, True, True]]
    assert routing.experts_per_token.tolist() == [2, 1, 3]
    want = torch.tensor([[0.5, 0.3, 0], [0.9, 0, 0], [0.3, 0.28, 0.22]], dtype=torch.float64)
    assert torch.allclose(routing.probs, want, rtol=1e-12, atol=0)  # no renormalisation
    assert routing.routed_per_expert.tolist() == [3, 2, 1, 0]

    router, x = _router_with_probs(probs, top_k=3, top_p=0.7, norm_topk_prob=True)
    routing, _ = router(x)
    assert torch.allclose(routing.probs[0], torch.tensor([0.625, 0.375, 0.0],
                                                         dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(routing.probs.sum(1), torch.ones(3, dtype=torch.float64))
    router, x = _router_with_probs(probs, top_k=2, top_p=1.0)  # p = 1: always the cap
    assert router(x)[0].keep.all()


def test_top_p_with_norm_topk_prob_gives_a_one_expert_token_weight_one():
    # MoEConfig.norm_topk_prob: a token that keeps one expert gets the weight 1, whose gradient
    # to the router is 0; a token that keeps two still trains the router through its weights
    probs = [[0.9, 0.05, 0.03, 0.02], [0.5, 0.3, 0.15, 0.05]]
    with pytest.warns(UserWarning, match="norm_topk_prob=True: a token that keeps one expert"):
        MoEConfig(**BASE, top_k=3, top_p=0.7, norm_topk_prob=True)
    router, x = _router_with_probs(probs, top_k=3, top_p=0.7, norm_topk_prob=True)
    routing, _ = router(x)
    assert routing.probs[0].tolist() == [1.0, 0.0, 0.0]
    cot = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    (routing.probs[0] * cot).sum().backward(retain_graph=True)
    assert torch.allclose(router.weight.grad, torch.zeros_like(router.weight), atol=1e-12)
    router.weight.grad = None
    (routing.probs[1] * cot).sum().backward()
    assert router.weight.grad.abs().max() > 1e-3


def test_top_p_stats_report_experts_per_token():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, top_k=4, top_p=0.5))
    _, aux = layer(torch.randn(40, 8, dtype=torch.float64), return_aux=True)
    per_token = aux.routing.experts_per_token
    hist = aux.stats.experts_per_token_histogram
    assert hist.tolist() == torch.bincount(per_token, minlength=5).tolist()
    assert hist[0] == 0 and hist.sum() == 40 and len(set(per_token.tolist())) > 1
    assert aux.stats.mean_experts_per_token == pytest.approx(per_token.double().mean().item())
    assert aux.stats.num_routed == int(per_token.sum()) == aux.stats.num_processed
    plain = MoELayer(MoEConfig(**BASE, top_k=2))
    _, aux = plain(torch.randn(5, 8, dtype=torch.float64), return_aux=True)
    assert aux.stats.experts_per_token_histogram.tolist() == [0, 0, 5]
    assert aux.stats.as_dict()["mean_experts_per_token"] == 2.0


# ---- priority drop policies ---------------------------------------------------------------------

IDX = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
PROBS = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)


@pytest.mark.parametrize("policy, cap, want", [
    # expert 0: (t0, j0, .6) (t1, j1, .1) (t2, j0, .7) (t3, j1, .4)
    # expert 1: (t0, j1, .4) (t1, j0, .9) (t2, j1, .3) (t3, j0, .6)
    # k_major: first choices in token order, then second choices
    ("k_major", 1, [[True, False], [True, False], [False, False], [False, False]]),
    ("k_major", 3, [[True, True], [True, True], [True, False], [True, False]]),
    # batch_priority: priorities .6 .9 .7 .6 -> tokens t1, t2, t0, t3 (t0 before t3: tie)
    ("batch_priority", 1, [[False, False], [True, False], [True, False], [False, False]]),
    ("batch_priority", 2, [[True, False], [True, False], [True, False], [True, False]]),
    ("batch_priority", 3, [[True, False], [True, True], [True, True], [True, False]]),
    ("probs", 1, [[False, False], [True, False], [True, False], [False, False]]),
    ("position", 1, [[True, True], [False, False], [False, False], [False, False]]),
])
def test_priority_policies_keep_what_the_papers_define(policy, cap, want):
    assert apply_capacity(IDX, PROBS, 2, cap, policy).tolist() == want


def test_batch_priority_ties_go_to_the_earlier_token():
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    # expert 0 first choices t0, t2 tie at priority .6: t0; expert 1: t1
    assert apply_capacity(idx, probs, 2, 1, "batch_priority").tolist() == [
        [True, False], [True, False], [False, False]]
    # reversed token order: the tie now goes to the other token (index order, not data order)
    assert apply_capacity(idx.flip(0), probs.flip(0), 2, 1, "batch_priority").tolist() == [
        [True, False], [True, False], [False, False]]


def test_priority_policies_skip_unselected_assignments():
    keep = torch.tensor([[True, False], [True, True], [True, False], [True, True]])
    # expert 1 candidates: (t1, j0) (t3, j0) only -> k_major keeps t1 with capacity 1;
    # expert 0: (t0, j0) (t1, j1) (t2, j0) (t3, j1) -> t0
    got = apply_capacity(IDX, PROBS, 2, 1, "k_major", keep)
    assert got.tolist() == [[True, False], [True, False], [False, False], [False, False]]


@pytest.mark.parametrize("policy", ["k_major", "batch_priority", "probs", "position"])
def test_policies_match_the_reference_on_random_cases(policy):
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        T, k, E = 13, 3, 5
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        probs = torch.rand(T, k, generator=g, dtype=torch.float64).sort(1, descending=True)[0]
        probs[3] = probs[4]  # equal priorities
        cfg = MoEConfig(**{**BASE, "num_experts": E}, top_k=k, capacity_factor=0.5,
                        drop_policy=policy)
        ref = ReferenceMoE(cfg)
        selected = torch.rand(T, k, generator=g) > 0.2
        selected[:, 0] = True
        want = ref._capacity_keep(idx, probs, selected)
        cap = math.ceil(T * k / E * 0.5)
        assert apply_capacity(idx, probs, E, cap, policy, selected).tolist() == want.tolist()


# ---- against the reference (one process) --------------------------------------------------------

CASES = {
    "top_p_losses": dict(top_k=4, top_p=0.6, aux_loss_coeff=0.01, seq_aux_loss_coeff=0.01,
                         z_loss_coeff=0.001, dynamic_loss_coeff=0.05),
    "top_p_norm_capacity_k_major": dict(top_k=4, top_p=0.7, norm_topk_prob=True,
                                        capacity_factor=0.5, drop_policy="k_major",
                                        aux_loss_coeff=0.01),
    "top_p_batch_priority_padded": dict(top_k=3, top_p=0.5, capacity_factor=0.6,
                                        drop_policy="batch_priority", pad_to_capacity=True),
    "top2_dynamic_loss": dict(top_k=2, dynamic_loss_coeff=0.1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_equals_reference(name):
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(**BASE, **CASES[name]))
    ref = ReferenceMoE.from_layer(layer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, 8, dtype=torch.float64, generator=g)
    cot = torch.randn(12, 3, 8, dtype=torch.float64, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, aux = layer(xa, return_aux=True)
    (y * cot).sum().backward()  # the losses ride on the graph with gradient 1
    y_ref, losses = ref(xb)
    ((y_ref * cot).sum() + sum(losses.values())).backward()
    assert aux.losses.keys() == losses.keys()
    assert bool(losses) == any("coeff" in k for k in CASES[name])
    for k in losses:
        assert aux.losses[k].item() == pytest.approx(losses[k].item(), rel=1e-12), k
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)
    theirs = dict(ref.named_parameters())
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert torch.allclose(p.grad, theirs[n].grad, rtol=1e-10, atol=1e-14), n
    if "capacity_factor" in CASES[name]:
        assert aux.stats.dropped > 0


# ---- the dynamic capacity schedule --------------------------------------------------------------

def test_schedule_steps():
    kw = dict(target_drop_rate=0.1, rate=0.25, lo=0.5, hi=2.0)
    assert next_capacity_factor(1.0, 20, 100, 0, 100, **kw) == 1.25        # d = .2 > .1
    assert next_capacity_factor(1.9, 20, 100, 0, 100, **kw) == 2.0         # clipped at hi
    assert next_capacity_factor(1.0, 7, 100, 50, 150, **kw) == 1.0         # .05 <= d <= .1
    assert next_capacity_factor(1.0, 2, 100, 50, 150, **kw) == 0.75        # d < .05, u = .33
    assert next_capacity_factor(1.0, 2, 100, 30, 128, **kw) == 1.0         # u = .23 < .25
    assert next_capacity_factor(0.6, 0, 100, 90, 190, **kw) == 0.5         # clipped at lo
    assert next_capacity_factor(1.0, 0, 0, 10, 10, **kw) == 1.0            # nothing routed
    cfg = MoEConfig(**BASE, top_k=2, capacity_factor=1.0, dynamic_capacity=True,
                    target_drop_rate=0.1, capacity_update_rate=0.25, capacity_factor_min=0.5,
                    capacity_factor_max=2.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # the reference's schedule is the same function
        routed = int(torch.randint(1, 200, (1,), generator=g))
        dropped = int(torch.randint(0, routed + 1, (1,), generator=g))
        slots = routed - dropped + int(torch.randint(0, 200, (1,), generator=g))
        f = float(torch.rand(1, generator=g)) * 1.5 + 0.5
        assert ref_mod.next_capacity_factor(cfg, f, dropped, routed, slots) == \
            next_capacity_factor(f, dropped, routed, slots - (routed - dropped), slots, **kw)


def test_dynamic_capacity_options_are_checked():
    with pytest.raises(ValueError, match="dynamic_capacity=True needs"):
        MoEConfig(**BASE, dynamic_capacity=True)
    with pytest.raises(ValueError, match="capacity_factor 5.0 must lie in"):
        MoEConfig(**BASE, capacity_factor=5.0, dynamic_capacity=True)
    with pytest.raises(ValueError, match="target_drop_rate"):
        MoEConfig(**BASE, capacity_factor=1.0, dynamic_capacity=True, target_drop_rate=0)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        MoEConfig(**BASE, top_p=1.5)
    with pytest.raises(ValueError, match="top_p needs router_type='topk', score_function"):
        MoEConfig(**BASE, top_p=0.5, score_function="sigmoid")
    with pytest.raises(ValueError, match="top_p cannot be combined with expert_bias"):
        MoEConfig(**BASE, top_p=0.5, expert_bias=True)
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        MoEConfig(**BASE, capacity_factor=1.0, drop_policy="gshard")
    with pytest.raises(ValueError, match="dynamic_loss_coeff"):
        MoEConfig(**BASE, dynamic_loss_coeff=-1.0)


STEPS = 4
TOKENS = [24, 8, 40, 16, 0, 32, 12, 20]


def run_dynamic_capacity(tmp: str, ep: int) -> dict:
    with own_groups():
        return _run_dynamic_capacity(tmp, ep)


def _run_dynamic_capacity(tmp: str, ep: int) -> dict:
    from moe_parallel import checkpoint

    rank = dist.get_rank()
    ps = ParallelState.build(ep=ep)
    cfg = MoEConfig(**{**BASE, "init_std": 1.0}, top_k=2, capacity_factor=1.0,
                    dynamic_capacity=True, target_drop_rate=0.05, capacity_update_rate=0.2,
                    capacity_factor_max=2.5)
    torch.manual_seed(0)
    full = MoELayer(cfg)
    layer = MoELayer.shard_from(full, ps)
    ref = ReferenceMoE.from_layer(full)
    factors, ref_factors, counts = [], [], []
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(STEPS):
        x = torch.randn(TOKENS[rank], 8, dtype=torch.float64, generator=g)
        layer(x.clone().requires_grad_()).sum().backward()
        ref(x)  # this rank's tokens, this step's factor
        mine = torch.tensor(ref.last_counts, dtype=torch.int64)
        counts.append(layer.capacity_counts.tolist() == mine.tolist())
        dist.all_reduce(mine)
        factors.append(update_capacity_factors(layer, ps)[0])
        ref.capacity_factor_now = ref_mod.next_capacity_factor(cfg, ref.capacity_factor_now,
                                                               *mine.tolist())
        ref_factors.append(ref.capacity_factor_now)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, factors)
    checkpoint.save(tmp, layer, ps=ps)
    fresh = MoELayer.shard_from(full, ps)
    before = fresh.capacity_factor_now.item()
    checkpoint.load(tmp, fresh, ps=ps)
    return {"factors": factors, "ref": ref_factors, "everyone": everyone, "counts": counts,
            "loaded": (before, fresh.capacity_factor_now.item(),
                       fresh.current_capacity_factor(True))}


@pytest.mark.distributed
@pytest.mark.parametrize("world, ep", [(4, 2), (8, 4)])
def test_dynamic_capacity_is_the_same_on_every_rank_and_saved(tmp_path, world, ep):
    results = get_pool(world).run(run_dynamic_capacity, str(tmp_path / "ckpt"), ep)
    for r in results:
        assert all(r["counts"]), r["counts"]  # the layer counts what the reference drops
        assert r["factors"] == r["ref"]
        assert all(f == r["factors"] for f in r["everyone"])  # bitwise on every rank
        assert r["loaded"] == (1.0, r["factors"][-1], r["factors"][-1])
    assert len(set(results[0]["factors"])) > 1  # the factor moved


def test_dynamic_capacity_single_process_follows_the_reference():
    cfg = MoEConfig(**{**BASE, "init_std": 1.0}, top_k=2, capacity_factor=1.0,
                    dynamic_capacity=True, target_drop_rate=0.05, capacity_update_rate=0.2,
                    drop_policy="k_major")
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    ref = ReferenceMoE.from_layer(layer)
    g = torch.Generator().manual_seed(4)
    path = []
    for _ in range(5):
        x = torch.randn(30, 8, dtype=torch.float64, generator=g)
        y = layer(x.clone().requires_grad_())
        y_ref, _ = ref(x)
        assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-14)  # the same capacity
        assert layer.capacity_counts.tolist() == [0, 0, 0]  # counted in the backward
        y.sum().backward()
        assert layer.capacity_counts.tolist() == list(ref.last_counts)
        (factor,) = update_capacity_factors(layer, ParallelState.single())
        ref.capacity_factor_now = ref_mod.next_capacity_factor(cfg, ref.capacity_factor_now,
                                                               *ref.last_counts)
        assert factor == ref.capacity_factor_now
        path.append(factor)
    assert len(set(path)) > 1
    layer.eval()  # eval uses the factor reached in training (no eval_capacity_factor)
    assert layer.current_capacity_factor(False) == path[-1]
