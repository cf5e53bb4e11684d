"""MoEConfig.force_balance: token t of a rank's T tokens goes to experts (t·k + j) mod E.

* Exact per-expert counts floor(T·k/E) + (e < T·k mod E), whatever the router's scores (a
  router that prefers one expert included), T a multiple of E or not, k = E, k not dividing E.
* The weights are the router's scores at the forced experts (float64 reference written out in
  this file for every score function and normalisation); the layer's output and its gradients
  (router weight included, nonzero) equal a loop over the forced assignment, 1e-12.
* The losses are computed on the forced assignment; the expert bias plays no part in selection.
* Capacity: nothing drops with capacity_factor >= 1 (every drop policy, padded or not); below
  1 exactly the excess over C drops.
* 4 gloo ranks, ep4 (all-to-all and all-gather dispatch): every rank routes its tokens evenly,
  each rank's experts receive the rows the formula gives, and output and gradients equal the
  one-process layer on the same tokens (1e-12, float64).
* Refused, naming force_balance and the conflicting field: expert choice, top_p, groups the
  forced experts would overstep.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_parallel import MoEConfig, MoELayer
from tests.helpers.dist_harness import get_pool, parallel_state

TOL = 1e-12
BASE = dict(hidden_size=10, ffn_hidden_size=6, num_experts=6, top_k=2,
            params_dtype=torch.float64, init_std=0.3, force_balance=True)


def _forced(T: int, k: int, E: int) -> torch.Tensor:
    """The forced assignment, written out: row t is [(t·k + j) mod E for j < k]."""
    return torch.tensor([[(t * k + j) % E for j in range(k)] for t in range(T)],
                        dtype=torch.int64).view(T, k)


def _counts(T: int, k: int, E: int) -> torch.Tensor:
    """Per-expert count of the forced assignment: floor(T·k/E) + (e < T·k mod E)."""
    q, r = divmod(T * k, E)
    return torch.tensor([q + (e < r) for e in range(E)], dtype=torch.int64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _weights(cfg: MoEConfig, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
             idx: torch.Tensor) -> torch.Tensor:
    """The combine weights at ``idx``, from the config's formula (float64)."""
    logits = x @ w.t() + (0 if b is None else b)
    if cfg.score_function == "sigmoid":
        picked = logits.sigmoid().gather(1, idx)
        if cfg.renormalize_topk:
            picked = picked / (picked.sum(-1, keepdim=True) + 1e-20)
    elif not cfg.softmax_before_topk:
        picked = logits.gather(1, idx).softmax(-1)
    else:
        picked = logits.softmax(-1).gather(1, idx)
        if cfg.renormalize_topk:
            picked = picked / picked.sum(-1, keepdim=True)
    return picked * cfg.routed_scaling_factor


def _reference(layer: MoELayer, x: torch.Tensor):
    """(y, leaves) of a loop over the forced assignment with copies of ``layer``'s weights
    (SwiGLU experts, w1 [E, H, 2F] gate | up, w2 [E, F, H]); leaves: router weight, w1, w2."""
    cfg = layer.config
    w = layer.router.weight.detach().clone().requires_grad_()
    b = None if layer.router.bias is None else layer.router.bias.detach().clone()
    w1 = layer.experts.w1.detach().clone().requires_grad_()
    w2 = layer.experts.w2.detach().clone().requires_grad_()
    T, k = x.shape[0], cfg.top_k
    idx = _forced(T, k, cfg.num_experts)
    p = _weights(cfg, x, w, b, idx)
    y = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            gate, up = (x[t] @ w1[idx[t, j]]).chunk(2)
            y[t] = y[t] + p[t, j] * ((F.silu(gate) * up) @ w2[idx[t, j]])
    return y, (w, w1, w2)


def _skewed(layer: MoELayer, expert: int = 0) -> None:
    """Make the router prefer ``expert`` for inputs of positive mean (``_inputs``): its top-k
    then picks it for every token."""
    with torch.no_grad():
        layer.router.weight[expert] += 1.0


def _inputs(T: int, hidden: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random float64 tokens of mean 2 in every coordinate."""
    return torch.randn(T, hidden, generator=gen, dtype=torch.float64) + 2.0


# ---- one process --------------------------------------------------------------------------


@pytest.mark.parametrize("T,k,E", [(12, 2, 6), (7, 2, 6), (11, 3, 8), (5, 4, 6), (9, 6, 6),
                                   (13, 1, 4), (0, 2, 6)])
def test_exact_counts_whatever_the_scores(T, k, E):
    cfg = MoEConfig(**{**BASE, "top_k": k, "num_experts": E})
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    _skewed(layer)
    x = _inputs(T, cfg.hidden_size)
    routing, _ = layer.router(x)
    assert torch.equal(routing.expert_idx, _forced(T, k, E))
    assert all(len(set(row)) == k for row in routing.expert_idx.tolist())  # distinct per token
    assert torch.equal(routing.routed_per_expert, _counts(T, k, E))
    assert int(routing.routed_per_expert.max() - routing.routed_per_expert.min()) <= (
        0 if T * k % E == 0 else 1)
    if T:  # without force_balance the same router sends every token to expert 0
        unforced = MoELayer(cfg.replace(force_balance=False))
        unforced.load_state_dict(layer.state_dict())
        assert bool((unforced.router(x)[0].expert_idx == 0).any(dim=1).all())
        assert int(unforced.router(x)[0].routed_per_expert[0]) == T
    y, aux = layer(x, return_aux=True)
    assert torch.equal(aux.stats.tokens_per_expert.cpu(), _counts(T, k, E))
    assert aux.stats.dropped == 0 and aux.stats.expert_rows == T * k


WEIGHT_CASES = {
    "softmax_top2_renorm": {},
    "softmax_top1_switch": dict(top_k=1),
    "softmax_after_topk": dict(top_k=3, softmax_before_topk=False),
    "softmax_no_renorm": dict(top_k=3, norm_topk_prob=False),
    "sigmoid_scaled": dict(score_function="sigmoid", routed_scaling_factor=2.5),
    "sigmoid_top1": dict(score_function="sigmoid", top_k=1),
    "router_bias": dict(router_bias=True),
    "all_experts": dict(top_k=6),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_weights_are_the_router_scores_at_the_forced_experts(case):
    cfg = MoEConfig(**{**BASE, **WEIGHT_CASES[case]})
    torch.manual_seed(1)
    layer = MoELayer(cfg)
    if cfg.router_bias:
        with torch.no_grad():
            layer.router.bias.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(2)
    T = 9
    x = torch.randn(T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    gy = torch.randn(T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    routing, _ = layer.router(x)
    want = _weights(cfg, x, layer.router.weight.detach(),
                    None if layer.router.bias is None else layer.router.bias.detach(),
                    _forced(T, cfg.top_k, cfg.num_experts))
    assert _rel(routing.probs, want) <= TOL

    xg = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(xg)
    y.backward(gy)
    y_ref, (w, w1, w2) = _reference(layer, x)
    y_ref.backward(gy)
    assert _rel(y, y_ref) <= TOL
    for name, got, ref in (("router.weight", layer.router.weight.grad, w.grad),
                           ("experts.w1", layer.experts.w1.grad, w1.grad),
                           ("experts.w2", layer.experts.w2.grad, w2.grad)):
        assert float(ref.abs().max()) > 0, f"{name}: vacuous gradient"
        assert _rel(got, ref) <= TOL, f"{name}: {_rel(got, ref):.2e}"


def test_losses_see_the_forced_assignment_and_expert_bias_selects_nothing():
    cfg = MoEConfig(**{**BASE, "aux_loss_coeff": 0.1, "z_loss_coeff": 0.01,
                       "expert_bias": True, "score_function": "sigmoid", "top_k": 3})
    torch.manual_seed(3)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([9.0, 0, 0, 0, 0, -9.0]))
    T, E, k = 10, cfg.num_experts, cfg.top_k
    x = torch.randn(T, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        routing, losses = layer.router(x)
    assert torch.equal(routing.expert_idx, _forced(T, k, E))
    logits = x @ layer.router.weight.detach().t()
    s = logits.sigmoid()
    P = (s / s.sum(-1, keepdim=True)).mean(0)
    f = _counts(T, k, E).double() / (T * k)
    assert abs(float(losses["aux"]) - 0.1 * E * float((f * P).sum())) <= 1e-14
    assert abs(float(losses["z"]) - 0.01 * float(logits.logsumexp(-1).square().mean())) <= 1e-14
    layer.train()
    layer(x).sum().backward()  # the routed counts behind the bias update are the forced ones
    assert torch.equal(layer.router.local_tokens_per_expert, _counts(T, k, E).float())


@pytest.mark.parametrize("policy", ["probs", "position", "k_major", "batch_priority"])
@pytest.mark.parametrize("pad", [False, True])
def test_no_drops_at_capacity_factor_one(policy, pad):
    cfg = MoEConfig(**{**BASE, "capacity_factor": 1.0, "drop_policy": policy,
                       "pad_to_capacity": pad})
    torch.manual_seed(4)
    layer = MoELayer(cfg)
    _skewed(layer, 2)
    T = 11  # T·k = 22 over 6 experts: counts 4 and 3, C = ceil(22/6) = 4
    y, aux = layer(_inputs(T, cfg.hidden_size), return_aux=True)
    assert aux.stats.dropped == 0
    assert torch.equal(aux.stats.tokens_per_expert.cpu(), _counts(T, 2, 6))
    assert aux.stats.expert_rows == (6 * 4 if pad else 22)


def test_below_capacity_factor_one_the_excess_drops():
    cfg = MoEConfig(**{**BASE, "capacity_factor": 0.5})
    layer = MoELayer(cfg)
    T = 11
    C = math.ceil(T * 2 / 6 * 0.5)
    _, aux = layer(torch.randn(T, cfg.hidden_size, dtype=torch.float64), return_aux=True)
    assert aux.stats.dropped == int((_counts(T, 2, 6) - C).clamp(min=0).sum()) > 0
    assert torch.equal(aux.stats.tokens_per_expert.cpu(), _counts(T, 2, 6).clamp(max=C))


def test_group_limited_routing_within_the_allowed_groups():
    # 16 experts in 4 groups of 4, top-4 in 2 groups: token t takes experts 4t .. 4t+3 mod 16,
    # one group each
    cfg = MoEConfig(**{**BASE, "num_experts": 16, "top_k": 4, "num_groups": 4,
                       "group_topk": 2, "score_function": "sigmoid"})
    layer = MoELayer(cfg)
    T = 10
    routing, _ = layer.router(torch.randn(T, cfg.hidden_size, dtype=torch.float64))
    assert torch.equal(routing.expert_idx, _forced(T, 4, 16))
    assert torch.equal(routing.routed_per_expert, _counts(T, 4, 16))
    assert max(len(set((routing.expert_idx[t] // 4).tolist())) for t in range(T)) == 1


@pytest.mark.parametrize("changes,match", [
    (dict(router_type="expert_choice"), r"force_balance.*router_type='expert_choice'"),
    (dict(top_p=0.5), r"force_balance.*top_p=0\.5"),
    # 6 experts, 2 groups of 3, top-2: token 1 takes experts 2 and 3, in both groups
    (dict(num_groups=2, group_topk=1, group_score="max"),
     r"force_balance.*num_groups=2, group_topk=1.*span 2 groups"),
    # 8 experts, 2 groups of 4, top-3: token 1 takes experts 3, 4 and 5, in both groups
    (dict(num_experts=8, top_k=3, num_groups=2, group_topk=1),
     r"force_balance.*num_groups=2, group_topk=1.*span 2 groups"),
    (dict(force_balance=1), r"force_balance must be a bool"),
])
def test_refusals_name_the_conflict(changes, match):
    MoEConfig(**{**BASE, **changes, "force_balance": False})  # valid without force_balance
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **changes, "force_balance": changes.get("force_balance", True)})


def test_layer_bench_force_balance_flag(tmp_path):
    from benchmarks.__main__ import main as bench_main

    out = tmp_path / "layer.json"
    bench_main(["layer", "--tokens", "24", "--hidden", "8", "--ffn", "8", "--experts", "4",
                "--top-k", "2", "--repeats", "1", "--no-memory", "--contenders", "grouped",
                "--force-balance", "--out", str(out)])
    assert json.loads(out.read_text())["case"]["force_balance"] is True


# ---- 4 gloo ranks, ep4 --------------------------------------------------------------------

DIST_TOKENS = {"uneven": [7, 5, 9, 6], "multiple": [8, 4, 12, 8]}  # T·k vs E = 8 at k = 2
DIST_E, DIST_K = 8, 2


def _rank_data(rank: int, tokens: list[int], hidden: int):
    """Rank ``rank``'s input and output gradient (the same on every process)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return (_inputs(tokens[rank], hidden, gen),
            torch.randn(tokens[rank], hidden, generator=gen, dtype=torch.float64))


def run_ep4(tokens: list[int], dispatcher: str) -> dict:
    """On every rank: this rank's counts and rows, and the relative errors of the ep4 layer
    against the one-process layer on the same tokens (output, router gradient) and on every
    rank's tokens (this rank's expert gradients)."""
    ps = parallel_state(ep=4)
    rank = dist.get_rank()
    cfg = MoEConfig(**{**BASE, "num_experts": DIST_E, "top_k": DIST_K,
                       "token_dispatcher_type": dispatcher})
    torch.manual_seed(5)
    full = MoELayer(cfg)
    _skewed(full, 3)
    layer = MoELayer.shard_from(full, ps)

    x, gy = _rank_data(rank, tokens, cfg.hidden_size)
    xg = x.clone().requires_grad_()
    y, aux = layer(xg, return_aux=True)
    y.backward(gy)

    # the one-process layer on this rank's tokens, then on every rank's tokens (expert grads)
    full.zero_grad(set_to_none=True)
    xf = x.clone().requires_grad_()
    y_full = full(xf)
    y_full.backward(gy)
    router_grad = full.router.weight.grad.clone()
    full.zero_grad(set_to_none=True)
    for r in range(4):
        xr, gyr = _rank_data(r, tokens, cfg.hidden_size)
        full(xr).backward(gyr)
    local = DIST_E // 4
    mine = slice(rank * local, (rank + 1) * local)
    return {
        "routed": aux.stats.routed_per_expert.cpu(),
        "expert_rows": aux.stats.expert_rows,
        "errors": {
            "output": _rel(y, y_full),
            "input_grad": _rel(xg.grad, xf.grad),
            "router_grad": _rel(layer.router.weight.grad, router_grad),
            "w1_grad": _rel(layer.experts.w1.grad, full.experts.w1.grad[mine]),
            "w2_grad": _rel(layer.experts.w2.grad, full.experts.w2.grad[mine]),
        },
        "router_grad_max": float(layer.router.weight.grad.abs().max()),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("tokens", sorted(DIST_TOKENS))
def test_ep4_even_rows_and_equal_to_one_process(tokens, dispatcher):
    counts = DIST_TOKENS[tokens]
    per_rank = get_pool(4).run(run_ep4, counts, dispatcher, timeout=120)
    local = DIST_E // 4
    for rank, got in enumerate(per_rank):
        routed = got["routed"]
        assert torch.equal(routed, _counts(counts[rank], DIST_K, DIST_E)), rank
        assert int(routed.max() - routed.min()) <= 1
        mine = slice(rank * local, (rank + 1) * local)
        rows = sum(int(_counts(t, DIST_K, DIST_E)[mine].sum()) for t in counts)
        assert got["expert_rows"] == rows, (rank, got["expert_rows"], rows)
        for name, err in got["errors"].items():
            assert err <= TOL, f"rank {rank} {name}: {err:.2e}"
        assert got["router_grad_max"] > 0
    rows = [got["expert_rows"] for got in per_rank]
    if tokens == "multiple":  # E divides every T·k: every rank's experts get the same rows
        assert len(set(rows)) == 1 and rows[0] == sum(counts) * DIST_K // 4
    else:  # at most one extra row per source rank and expert
        assert max(rows) - min(rows) <= 4 * local
