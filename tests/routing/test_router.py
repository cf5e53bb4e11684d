"""Routers against an independent per-token float64 re-implementation, plus losses and errors."""

from __future__ import annotations

import math

import pytest
import torch

from moe_parallel.config import MoEConfig
from moe_parallel.routing.router import (
    ExpertChoiceRouter,
    Routing,
    TopKRouter,
    build_router,
)

T, H, E = 12, 16, 8


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny CPU tensors: one intra-op thread avoids thread-pool overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(**changes) -> MoEConfig:
    base = dict(hidden_size=H, ffn_hidden_size=32, num_experts=E, top_k=2, init_std=0.3)
    base.update(changes)
    return MoEConfig(**base)


def make_router(seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_router(make_cfg(**changes))


def inputs(seed: int = 1, n: int = T) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


# ---- independent reference ---------------------------------------------------------------------


def _dot(a, b) -> float:
    return math.fsum(float(u) * float(v) for u, v in zip(a.tolist(), b.tolist()))


def ref_logits(x, weight, noise=None, noise_weight=None) -> list[list[float]]:
    """Per-token float64 logits; with noise: clean + noise * softplus(x . noise_weight)."""
    out = []
    for t in range(x.shape[0]):
        row = []
        for e in range(weight.shape[0]):
            v = _dot(x[t], weight[e])
            if noise is not None:
                u = _dot(x[t], noise_weight[e])
                v += float(noise[t, e]) * math.log1p(math.exp(u))
            row.append(v)
        out.append(row)
    return out


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    s = math.fsum(ex)
    return [a / s for a in ex]


def ref_topk(cfg: MoEConfig, logits: list[list[float]], bias=None):
    """Per token: ({expert: prob}, selection margin), written out token by token."""
    k, n_exp = cfg.top_k, cfg.num_experts
    bias = [0.0] * n_exp if bias is None else [float(b) for b in bias]
    result = []
    for row in logits:
        if cfg.score_function == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        elif cfg.softmax_before_topk:
            s = _softmax(row)
        else:
            s = list(row)
        choose = [s[e] + bias[e] for e in range(n_exp)]
        allowed = list(range(n_exp))
        if cfg.num_groups is not None:
            size = n_exp // cfg.num_groups
            group_score = []
            for g in range(cfg.num_groups):
                members = sorted(choose[g * size : (g + 1) * size], reverse=True)
                group_score.append(sum(members[: k // cfg.group_topk]))
            groups = sorted(range(cfg.num_groups), key=lambda g: -group_score[g])
            groups = groups[: cfg.group_topk]
            allowed = [e for e in range(n_exp) if e // size in groups]
        ranked = sorted(allowed, key=lambda e: -choose[e])
        chosen = ranked[:k]
        margin = choose[ranked[k - 1]] - choose[ranked[k]] if len(ranked) > k else 1.0
        if cfg.score_function == "softmax" and not cfg.softmax_before_topk:
            p = _softmax([row[e] for e in chosen])
        else:
            p = [s[e] for e in chosen]
            renormalise = cfg.top_k > 1 if cfg.norm_topk_prob is None else cfg.norm_topk_prob
            if renormalise:
                total = sum(p) + (1e-20 if cfg.score_function == "sigmoid" else 0.0)
                p = [v / total for v in p]
        p = [v * cfg.routed_scaling_factor for v in p]
        result.append((dict(zip(chosen, p)), margin))
    return result


def ref_full_scores(cfg: MoEConfig, logits):
    if cfg.score_function == "softmax":
        return [_softmax(row) for row in logits]
    out = []
    for row in logits:
        s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        out.append([v / sum(s) for v in s])
    return out


def ref_losses(cfg: MoEConfig, logits, selections, num_seqs: int) -> dict[str, float]:
    """Switch aux, per-sequence aux and z-loss written out with plain loops."""
    n_tok, k, n_exp = len(logits), cfg.top_k, cfg.num_experts
    scores = ref_full_scores(cfg, logits)
    counts = [sum(e in sel for sel in selections) for e in range(n_exp)]
    f = [c / (n_tok * k) for c in counts]
    P = [sum(scores[t][e] for t in range(n_tok)) / n_tok for e in range(n_exp)]
    aux = cfg.aux_loss_coeff * n_exp * sum(fi * pi for fi, pi in zip(f, P))
    per_seq = []
    for b in range(num_seqs):
        toks = [t for t in range(n_tok) if t % num_seqs == b]
        cb = [sum(e in selections[t] for t in toks) for e in range(n_exp)]
        fb = [n_exp * c / (k * len(toks)) for c in cb]
        Pb = [sum(scores[t][e] for t in toks) / len(toks) for e in range(n_exp)]
        per_seq.append(sum(a * c for a, c in zip(fb, Pb)))
    seq_aux = cfg.seq_aux_loss_coeff * sum(per_seq) / num_seqs
    lse = [max(r) + math.log(math.fsum(math.exp(v - max(r)) for v in r)) for r in logits]
    z = cfg.z_loss_coeff * sum(v * v for v in lse) / n_tok
    return {"aux": aux, "seq_aux": seq_aux, "z": z}


def assert_matches_reference(routing: Routing, ref, atol: float = 2e-6) -> None:
    assert routing.probs.shape == routing.expert_idx.shape
    for t, (want, margin) in enumerate(ref):
        assert margin > 1e-4, f"token {t}: near-tie in the test data, pick another seed"
        got_idx = routing.expert_idx[t].tolist()
        assert len(set(got_idx)) == len(got_idx)
        assert set(got_idx) == set(want), f"token {t}: {got_idx} vs {sorted(want)}"
        for j, e in enumerate(got_idx):
            assert routing.probs[t, j].item() == pytest.approx(want[e], rel=1e-5, abs=atol)


def assert_routing_invariants(routing: Routing, cfg: MoEConfig, n_tok: int = T) -> None:
    assert routing.probs.dtype == torch.float32
    assert routing.logits.dtype == torch.float32
    assert routing.logits.shape == (n_tok, cfg.num_experts)
    assert routing.expert_idx.dtype == torch.int64
    assert routing.expert_idx.shape == (n_tok, cfg.top_k)
    assert routing.keep is None
    assert routing.routed_per_expert.dtype == torch.int64
    want = torch.bincount(routing.expert_idx.flatten(), minlength=cfg.num_experts)
    assert torch.equal(routing.routed_per_expert, want)
    assert int(routing.routed_per_expert.sum()) == n_tok * cfg.top_k


# ---- token choice against the reference ----------------------------------------------------------

VARIANTS = {
    "softmax_pre_norm": dict(),
    "softmax_pre_no_norm": dict(norm_topk_prob=False),
    "softmax_post": dict(softmax_before_topk=False),
    "softmax_post_k3": dict(softmax_before_topk=False, top_k=3),
    "sigmoid_norm": dict(score_function="sigmoid"),
    "sigmoid_no_norm": dict(score_function="sigmoid", norm_topk_prob=False),
    "softmax_scaled": dict(routed_scaling_factor=2.5),
    "sigmoid_scaled_no_norm": dict(
        score_function="sigmoid", norm_topk_prob=False, routed_scaling_factor=1.7
    ),
    "group_softmax_one_group": dict(num_groups=4, group_topk=1),
    "group_softmax_post_k4": dict(num_groups=4, group_topk=2, top_k=4, softmax_before_topk=False),
    "group_sigmoid_dsv3": dict(
        score_function="sigmoid", num_groups=4, group_topk=2, top_k=4, routed_scaling_factor=2.5
    ),
    "top1": dict(top_k=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_topk_matches_reference(name):
    router = make_router(**VARIANTS[name])
    cfg = router.config
    x = inputs()
    routing, losses = router(x)
    assert losses == {}
    assert_routing_invariants(routing, cfg)
    logits = ref_logits(x, router.weight.detach())
    assert torch.allclose(
        routing.logits.double(), torch.tensor(logits, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    assert_matches_reference(routing, ref_topk(cfg, logits))


def test_norm_and_scaling_give_expected_sums():
    x = inputs()
    r_norm, _ = make_router(routed_scaling_factor=2.5)(x)
    torch.testing.assert_close(r_norm.probs.sum(-1), torch.full((T,), 2.5))
    r_post, _ = make_router(softmax_before_topk=False, routed_scaling_factor=2.5)(x)
    torch.testing.assert_close(r_post.probs.sum(-1), torch.full((T,), 2.5))
    r_raw, _ = make_router(norm_topk_prob=False)(x)
    assert bool((r_raw.probs.sum(-1) < 0.999).all())  # unnormalised top-2 of 8 softmax scores
    # Same selection with and without normalisation; the ratio is the per-token sum.
    assert torch.equal(r_raw.expert_idx, r_norm.expert_idx)
    torch.testing.assert_close(r_norm.probs / 2.5, r_raw.probs / r_raw.probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", ["group_softmax_one_group", "group_sigmoid_dsv3"])
def test_group_limit_restricts_selection(name):
    changes = VARIANTS[name]
    x = inputs(seed=5, n=32)
    routed, _ = make_router(**changes)(x)
    free_changes = {k: v for k, v in changes.items() if k not in ("num_groups", "group_topk")}
    free, _ = make_router(**free_changes)(x)
    size = E // changes["num_groups"]
    groups_used = [len({e // size for e in row}) for row in routed.expert_idx.tolist()]
    assert max(groups_used) <= changes["group_topk"]
    # The limit must bite somewhere, else this test shows nothing.
    free_groups = [len({e // size for e in row}) for row in free.expert_idx.tolist()]
    assert max(free_groups) > changes["group_topk"]
    assert not torch.equal(routed.expert_idx.sort(-1).values, free.expert_idx.sort(-1).values)


@pytest.mark.parametrize(
    "changes",
    [
        dict(expert_bias=True),
        dict(expert_bias=True, score_function="sigmoid"),
        dict(expert_bias=True, softmax_before_topk=False),
        dict(expert_bias=True, score_function="sigmoid", num_groups=4, group_topk=2, top_k=4),
    ],
)
def test_expert_bias_changes_selection_not_probs(changes):
    router = make_router(**changes)
    cfg = router.config
    x = inputs()
    before, _ = router(x)
    bias = torch.tensor([0.0, 0.18, -0.1, 0.0, 0.09, 0.0, -0.18, 0.04])
    if not cfg.softmax_before_topk:
        bias = bias * 4  # selection on raw logits needs a bigger push
    with torch.no_grad():
        router.expert_bias.copy_(bias)
    after, _ = router(x)
    assert_routing_invariants(after, cfg)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    logits = ref_logits(x, router.weight.detach())
    assert_matches_reference(after, ref_topk(cfg, logits, bias=bias))
    assert not torch.equal(after.expert_idx.sort(-1).values, before.expert_idx.sort(-1).values)
    # Where the selection is unchanged, the weights are unchanged too.
    same = (after.expert_idx.sort(-1).values == before.expert_idx.sort(-1).values).all(-1)
    assert bool(same.any())
    order_a = after.expert_idx.argsort(-1)
    order_b = before.expert_idx.argsort(-1)
    pa = after.probs.gather(1, order_a)[same]
    pb = before.probs.gather(1, order_b)[same]
    torch.testing.assert_close(pa, pb)


def test_noisy_gating_reproducible_and_training_only():
    router = make_router(noisy_gating=True)
    cfg = router.config
    assert router.noise_weight is not None and router.noise_weight.detach().abs().sum().item() > 0
    x = inputs()
    router.train()
    torch.manual_seed(123)
    r1, _ = router(x)
    torch.manual_seed(123)
    r2, _ = router(x)
    assert torch.equal(r1.logits, r2.logits) and torch.equal(r1.expert_idx, r2.expert_idx)
    torch.manual_seed(123)
    noise = torch.randn(T, E)
    logits = ref_logits(x, router.weight.detach(), noise, router.noise_weight.detach())
    torch.testing.assert_close(
        r1.logits.double(), torch.tensor(logits, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    assert_matches_reference(r1, ref_topk(cfg, logits))
    r3, _ = router(x)  # a fresh draw
    assert not torch.allclose(r3.logits, r1.logits)

    router.eval()
    e1, _ = router(x)
    e2, _ = router(x)
    clean = ref_logits(x, router.weight.detach())
    torch.testing.assert_close(
        e1.logits.double(), torch.tensor(clean, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(e1.logits, e2.logits)
    assert not torch.allclose(e1.logits, r1.logits)


def test_noise_gradient_reaches_noise_weight():
    router = make_router(noisy_gating=True, z_loss_coeff=1.0).train()
    routing, losses = router(inputs())
    (losses["z"] + routing.probs.square().sum()).backward()
    assert float(router.noise_weight.grad.abs().sum()) > 0
    assert float(router.weight.grad.abs().sum()) > 0


# ---- expert choice -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top_k", "cf", "cap"),
    [
        (1, None, 2),  # ceil(12*1/8*1.0) = 2
        (2, 1.5, 5),  # ceil(12*2/8*1.5) = ceil(4.5) = 5
        (3, 1.0, 5),  # ceil(12*3/8) = ceil(4.5) = 5
        (8, 2.0, 12),  # ceil(24) = 24, clamped to T = 12
    ],
)
def test_expert_choice_matches_reference(top_k, cf, cap):
    router = make_router(router_type="expert_choice", top_k=top_k, capacity_factor=cf)
    assert isinstance(router, ExpertChoiceRouter)
    assert router.capacity(T) == cap
    x = inputs(seed=3)
    routing, losses = router(x)
    assert losses == {}
    assert routing.probs.dtype == torch.float32 and routing.probs.shape == (T, E)
    assert torch.equal(routing.expert_idx, torch.arange(E).expand(T, E))
    assert routing.keep is not None and routing.keep.dtype == torch.bool
    assert routing.routed_per_expert.tolist() == [cap] * E
    scores = [_softmax(row) for row in ref_logits(x, router.weight.detach())]
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: -scores[t][e])
        if cap < T:
            assert scores[ranked[cap - 1]][e] - scores[ranked[cap]][e] > 1e-6
        want = set(ranked[:cap])
        got = set(routing.keep[:, e].nonzero().flatten().tolist())
        assert got == want, f"expert {e}"
        for t in range(T):
            want_p = scores[t][e] if t in want else 0.0
            assert routing.probs[t, e].item() == pytest.approx(want_p, rel=1e-5, abs=1e-7)


def test_expert_choice_z_loss_and_grad():
    router = make_router(router_type="expert_choice", z_loss_coeff=0.01)
    x = inputs()
    routing, losses = router(x)
    assert set(losses) == {"z"}
    want = ref_losses(router.config, ref_logits(x, router.weight.detach()), [()] * T, 1)["z"]
    assert losses["z"].item() == pytest.approx(want, rel=1e-5)
    losses["z"].backward(retain_graph=True)
    assert float(router.weight.grad.abs().sum()) > 0
    router.weight.grad = None
    routing.probs.sum().backward()  # the combine weights are differentiable too
    assert float(router.weight.grad.abs().sum()) > 0


# ---- losses ------------------------------------------------------------------------------------


def _hand_router(**changes) -> TopKRouter:
    """E = 2, H = 4 router whose logits for x = I_4 are the rows of LOGITS."""
    cfg = MoEConfig(
        hidden_size=4, ffn_hidden_size=4, num_experts=2, top_k=1, norm_topk_prob=False, **changes
    )
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(LOGITS.t())
    return router


# softmax rows: t0 [.75, .25] -> e0, t1 [.25, .75] -> e1, t2 [.8, .2] -> e0, t3 [.9, .1] -> e0
LOGITS = torch.tensor(
    [[math.log(3), 0.0], [0.0, math.log(3)], [math.log(4), 0.0], [math.log(9), 0.0]]
)


def test_hand_computed_losses():
    router = _hand_router(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.1, z_loss_coeff=0.01)
    routing, losses = router(torch.eye(4), num_seqs=2)
    assert routing.expert_idx.flatten().tolist() == [0, 1, 0, 0]
    assert routing.routed_per_expert.tolist() == [3, 1]
    # Switch: f = [3/4, 1/4]; P = [(.75+.25+.8+.9)/4, (.25+.75+.2+.1)/4] = [.675, .325];
    # aux = 0.1 * 2 * (.75*.675 + .25*.325) = 0.1 * 2 * .5875 = 0.1175.
    assert losses["aux"].item() == pytest.approx(0.1175, rel=1e-6)
    # Sequences (t % 2): seq0 = {t0, t2}, seq1 = {t1, t3}, T_b = 2, f = E/(k*T_b)*count = count.
    # seq0: count [2, 0], P [(.75+.8)/2, (.25+.2)/2] = [.775, .225] -> L0 = 2*.775 = 1.55.
    # seq1: count [1, 1], P [(.25+.9)/2, (.75+.1)/2] = [.575, .425] -> L1 = 1.0.
    # seq_aux = 0.1 * (1.55 + 1.0) / 2 = 0.1275.
    assert losses["seq_aux"].item() == pytest.approx(0.1275, rel=1e-6)
    # logsumexp rows: ln 4, ln 4, ln 5, ln 10; z = 0.01 * (2 ln²4 + ln²5 + ln²10) / 4 ≈ 0.0293395.
    z = 0.01 * (2 * math.log(4) ** 2 + math.log(5) ** 2 + math.log(10) ** 2) / 4
    assert losses["z"].item() == pytest.approx(z, rel=1e-6)
    assert losses["z"].item() == pytest.approx(0.0293395, rel=1e-5)


def test_hand_seq_aux_single_sequence_equals_switch():
    # One sequence: f = E/(k*T)*count = 2/4*[3, 1] = [1.5, .5]; L = 1.5*.675 + .5*.325 = 1.175,
    # the Switch value before the coefficient.
    router = _hand_router(aux_loss_coeff=1.0, seq_aux_loss_coeff=1.0)
    _, losses = router(torch.eye(4), num_seqs=1)
    assert losses["seq_aux"].item() == pytest.approx(1.175, rel=1e-6)
    assert losses["aux"].item() == pytest.approx(1.175, rel=1e-6)


def test_hand_computed_sigmoid_aux():
    # sigmoid(logit) with logits [ln 3, 0] -> [3/4, 1/2]; normalised [.6, .4] (and mirrored).
    # t2: [4/5, 1/2] -> [8/13, 5/13]; t3: [9/10, 1/2] -> [9/14, 5/14]. top-1 picks e0, e1, e0, e0.
    # P0 = (.6 + .4 + 8/13 + 9/14) / 4; aux = 2 * (3/4 * P0 + 1/4 * (1 - P0)).
    router = _hand_router(score_function="sigmoid", aux_loss_coeff=1.0)
    _, losses = router(torch.eye(4))
    p0 = (0.6 + 0.4 + 8 / 13 + 9 / 14) / 4
    assert losses["aux"].item() == pytest.approx(2 * (0.75 * p0 + 0.25 * (1 - p0)), rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "num_seqs"),
    [
        (dict(), 3),
        (dict(softmax_before_topk=False), 4),
        (dict(score_function="sigmoid", top_k=3), 2),
        (dict(score_function="sigmoid", num_groups=4, group_topk=2, top_k=4), 6),
        (dict(expert_bias=True), 1),
    ],
)
def test_losses_match_reference(changes, num_seqs):
    coeffs = dict(aux_loss_coeff=0.01, seq_aux_loss_coeff=0.02, z_loss_coeff=0.003)
    router = make_router(**changes, **coeffs)
    if getattr(router, "expert_bias", None) is not None:
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = inputs(seed=7)
    routing, losses = router(x, num_seqs=num_seqs)
    assert set(losses) == {"aux", "seq_aux", "z"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
    logits = ref_logits(x, router.weight.detach())
    selections = [set(row) for row in routing.expert_idx.tolist()]
    want = ref_losses(router.config, logits, selections, num_seqs)
    for key in ("aux", "seq_aux", "z"):
        assert losses[key].item() == pytest.approx(want[key], rel=1e-5), key
        assert want[key] > 1e-4


def test_losses_absent_without_coefficients():
    _, losses = make_router()(inputs())
    assert losses == {}
    _, losses = make_router(z_loss_coeff=0.1)(inputs())
    assert set(losses) == {"z"}


@pytest.mark.parametrize("key", ["aux", "seq_aux", "z"])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_loss_alone_gives_router_gradient(key, score_function):
    coeff = {"aux": "aux_loss_coeff", "seq_aux": "seq_aux_loss_coeff", "z": "z_loss_coeff"}[key]
    router = make_router(score_function=score_function, **{coeff: 0.5})
    _, losses = router(inputs(), num_seqs=2)
    assert set(losses) == {key}
    losses[key].backward()
    assert router.weight.grad is not None
    assert float(router.weight.grad.abs().max()) > 1e-6


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(softmax_before_topk=False),
        dict(score_function="sigmoid", num_groups=4, group_topk=2, top_k=4),
    ],
)
def test_gradcheck_float64(changes):
    cfg = make_cfg(
        hidden_size=4,
        params_dtype=torch.float64,
        aux_loss_coeff=0.3,
        seq_aux_loss_coeff=0.2,
        z_loss_coeff=0.1,
        routed_scaling_factor=1.5,
        **changes,
    )
    torch.manual_seed(0)
    router = TopKRouter(cfg)
    assert router.weight.dtype == torch.float64
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    routing, _ = router(x)
    assert routing.probs.dtype == torch.float64

    def fn(weight):
        r, losses = torch.func.functional_call(router, {"weight": weight}, (x,), {"num_seqs": 2})
        return losses["aux"], losses["seq_aux"], losses["z"], r.probs

    w = router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- expert bias update -----------------------------------------------------------------------


def test_update_expert_bias_explicit_counts():
    router = make_router(expert_bias=True, bias_update_rate=0.01)
    old = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.05, 0.0, 0.0, -0.1])
    with torch.no_grad():
        router.expert_bias.copy_(old)
        router.local_tokens_per_expert.fill_(7.0)
    # mean(c) = 40 / 8 = 5: sign(5 - c) = [-1, +1, 0, +1, -1, +1, +1, -1]
    c = torch.tensor([10.0, 2.0, 5.0, 3.0, 9.0, 4.0, 0.0, 7.0])
    router.update_expert_bias(c)
    step = torch.tensor([-1.0, 1.0, 0.0, 1.0, -1.0, 1.0, 1.0, -1.0])
    assert torch.equal(router.expert_bias, old + 0.01 * step)
    torch.testing.assert_close(router.expert_bias - old, 0.01 * step, rtol=0, atol=1e-7)
    assert float(router.expert_bias[0]) < 0.1 and float(router.expert_bias[1]) > -0.2
    assert torch.equal(router.local_tokens_per_expert, torch.zeros(E))


def test_update_expert_bias_from_accumulator():
    router = make_router(expert_bias=True, bias_update_rate=0.05).train()
    r1, _ = router(inputs(seed=1))
    r2, _ = router(inputs(seed=2))
    acc = (r1.routed_per_expert + r2.routed_per_expert).float()
    assert torch.equal(router.local_tokens_per_expert, acc)
    assert float(acc.sum()) == 2 * T * 2
    router.eval()
    router(inputs(seed=3))  # eval forwards do not accumulate
    assert torch.equal(router.local_tokens_per_expert, acc)
    router.update_expert_bias()
    assert torch.equal(router.expert_bias, 0.05 * torch.sign(acc.mean() - acc))
    assert float(router.expert_bias.abs().sum()) > 0
    assert torch.equal(router.local_tokens_per_expert, torch.zeros(E))


def test_update_expert_bias_balances_load():
    router = make_router(expert_bias=True, bias_update_rate=0.02, top_k=1, norm_topk_prob=False)
    x = inputs(seed=4, n=64) + 1.0
    with torch.no_grad():
        router.weight[0] = 0.3  # logit_0 ~ 0.3 * sum(x) ~ 4.8: nearly every token picks expert 0
    router.train()
    first, _ = router(x)
    probs_first = first.probs.clone()
    for _ in range(60):
        router(x)
        router.update_expert_bias()
    last, _ = router(x)
    assert int(first.routed_per_expert[0]) > 56
    assert int(last.routed_per_expert.max()) < 20
    assert float(router.expert_bias[0]) < 0
    # Tokens still routed to expert 0 keep their bias-free weight.
    both = (first.expert_idx == 0) & (last.expert_idx == 0)
    assert bool(both.any())
    torch.testing.assert_close(last.probs[both], probs_first[both])


def test_update_expert_bias_errors():
    with pytest.raises(RuntimeError, match="expert_bias"):
        make_router().update_expert_bias(torch.ones(E))
    router = make_router(expert_bias=True)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        router.update_expert_bias(torch.ones(E + 1))


def test_buffers():
    router = make_router(expert_bias=True)
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.shape == (E,)
    assert "expert_bias" in router.state_dict()
    # Without the bias the router has no such attribute: Megatron-Core's finalize_model_grads
    # updates every module that has one, and would stack a None.
    assert not hasattr(make_router(), "expert_bias")
    assert router.weight.dtype == torch.float32 and router.weight.shape == (E, H)
    assert 0.2 < router.weight.detach().std().item() < 0.4  # N(0, init_std = 0.3)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_bias_and_counts_stay_float32_under_dtype_casts(cast):
    router = make_router(expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-1e-3, 1e-3, E) + 0.1)
        router.local_tokens_per_expert.copy_(torch.arange(E) + 4097.0)  # not exact in bf16
    bias, counts = router.expert_bias.clone(), router.local_tokens_per_expert.clone()
    getattr(router, cast)()
    assert router.weight.dtype == {"bfloat16": torch.bfloat16, "half": torch.float16,
                                   "double": torch.float64}[cast]
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, bias)
    assert torch.equal(router.local_tokens_per_expert, counts)
    router.load_state_dict({k: v.double() for k, v in router.state_dict().items()})
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, bias)


# ---- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
def test_low_precision_input_routes_in_float32(dtype, router_type):
    router = make_router(router_type=router_type, z_loss_coeff=0.1)
    x = inputs().to(dtype)
    routing, losses = router(x)
    assert routing.probs.dtype == torch.float32
    assert routing.logits.dtype == torch.float32
    assert losses["z"].dtype == torch.float32
    ref, ref_losses_ = router(x.float())
    assert torch.equal(routing.logits, ref.logits)
    assert torch.equal(routing.probs, ref.probs)
    assert torch.equal(routing.expert_idx, ref.expert_idx)
    assert torch.equal(losses["z"], ref_losses_["z"])


def test_low_precision_weight_still_routes_in_float32():
    router = make_router().to(torch.bfloat16)
    routing, _ = router(inputs().bfloat16())
    assert routing.probs.dtype == torch.float32 and routing.logits.dtype == torch.float32


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(router_type, bad):
    router = make_router(router_type=router_type)
    x = inputs()
    x[3, 5] = bad
    with pytest.raises(FloatingPointError, match="router input"):
        router(x)


def test_non_finite_input_propagates_without_check():
    router = make_router(check_finite=False)
    x = inputs()
    x[3, 5] = float("nan")
    routing, _ = router(x)
    assert bool(routing.logits[3].isnan().all())
    assert bool(routing.logits[[0, 1, 2, 4]].isfinite().all())


@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
def test_bad_inputs(router_type):
    router = make_router(router_type=router_type)
    with pytest.raises(ValueError, match="num_seqs"):
        router(inputs(), num_seqs=5)  # 12 tokens into 5 sequences
    with pytest.raises(ValueError, match="num_seqs"):
        router(inputs(), num_seqs=0)
    with pytest.raises(ValueError, match=f"hidden_size={H}"):
        router(torch.randn(T, H + 1))
    with pytest.raises(ValueError, match="hidden_size"):
        router(torch.randn(3, 4, H))
    with pytest.raises(ValueError, match="floating point"):
        router(torch.ones(T, H, dtype=torch.int64))


def test_router_class_checks_router_type():
    with pytest.raises(ValueError, match="router_type"):
        TopKRouter(make_cfg(router_type="expert_choice"))
    with pytest.raises(ValueError, match="router_type"):
        ExpertChoiceRouter(make_cfg())
    assert type(build_router(make_cfg())) is TopKRouter
    assert type(build_router(make_cfg(router_type="expert_choice"))) is ExpertChoiceRouter


def test_empty_batch():
    coeffs = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.1, z_loss_coeff=0.1)
    routing, losses = make_router(**coeffs)(torch.zeros(0, H), num_seqs=2)
    assert routing.probs.shape == (0, 2) and routing.routed_per_expert.tolist() == [0] * E
    assert all(v.item() == 0.0 for v in losses.values())
    ec, _ = make_router(router_type="expert_choice")(torch.zeros(0, H))
    assert ec.keep.shape == (0, E)


EMPTY_MODES = {
    **VARIANTS,
    "expert_bias": dict(expert_bias=True, score_function="sigmoid"),
    "noisy": dict(noisy_gating=True),
    "group_bias": dict(num_groups=4, group_topk=2, expert_bias=True, score_function="sigmoid"),
    "losses": dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.1, z_loss_coeff=0.1),
    "expert_choice": dict(router_type="expert_choice"),
}


@pytest.mark.parametrize("name", sorted(EMPTY_MODES))
def test_a_rank_without_tokens_routes_in_every_mode(name):
    """A rank with T = 0 tokens (uneven data, or sequence-parallel slices) gets an empty
    routing of the right shapes and finite (zero) losses, in every router mode."""
    router = make_router(**EMPTY_MODES[name])
    router.train()
    cfg = router.config
    x = torch.randn(0, H, requires_grad=True)
    routing, losses = router(x)
    k = E if cfg.router_type == "expert_choice" else cfg.top_k
    assert routing.expert_idx.shape == routing.probs.shape == (0, k)
    assert routing.logits.shape == (0, E)
    assert routing.routed_per_expert.tolist() == [0] * E
    for key, value in losses.items():
        assert torch.isfinite(value) and float(value.detach()) == 0.0, key
    total = routing.probs.sum() + sum(losses.values(), torch.zeros(()))
    total.backward()
    assert router.weight.grad is not None and torch.equal(router.weight.grad,
                                                          torch.zeros_like(router.weight))


# ---- the renormalisation's summation order (DeepSeek-V3 as HF, bit for bit) --------------------


def _deepseek_v3_router(k: int, group_score: str = "sum_top2", group_topk: int = 3,
                        seed: int = 0) -> TopKRouter:
    """16 experts in 4 groups, the ``group_topk`` best groups allowed, sigmoid, a random
    selection bias (as HF's ``e_score_correction_bias``, float32), scaling 2.5."""
    router = make_router(seed, num_experts=16, top_k=k, score_function="sigmoid",
                         expert_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                         num_groups=4, group_topk=group_topk, group_score=group_score,
                         router_dtype=torch.float32)
    with torch.no_grad():
        router.expert_bias.copy_(0.1 * torch.randn(16, generator=torch.Generator()
                                                   .manual_seed(seed + 1)))
    return router


def _by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (expert ids, weights) sorted by expert id."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


def _hf_deepseek_v3_weights(router: TopKRouter, x: torch.Tensor, k: int):
    """HF ``DeepseekV3TopkRouter.forward`` (transformers 5) written out: float32 sigmoid
    scores, group scores from the 2 best of ``s + b``, the ``topk_group`` best groups
    (``sorted=False``), ``s + b`` set to -inf outside them, ``topk(sorted=False)``, the gathered
    scores divided by their sum + 1e-20 in that order, times the scaling."""
    s = torch.sigmoid(torch.nn.functional.linear(x.float(), router.weight.float()))
    c = s + router.expert_bias
    groups = c.view(-1, 4, 4).topk(2, dim=-1)[0].sum(dim=-1)
    best = torch.topk(groups, k=3, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(groups).scatter_(1, best, 1)
    mask = mask.unsqueeze(-1).expand(-1, 4, 4).reshape(-1, 16)
    idx = torch.topk(c.masked_fill(~mask.bool(), float("-inf")), k=k, dim=-1, sorted=False)[1]
    w = s.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * 2.5


@pytest.mark.parametrize("k", [3, 4, 6, 8])
def test_deepseek_v3_weights_are_hf_bit_for_bit(k):
    """float32 weights of ``group_score="sum_top2"`` equal HF's bitwise for every k: the sum
    of the renormalisation in HF's order (a best-first sum differs in some rows for k >= 4,
    which makes this check able to fail)."""
    router = _deepseek_v3_router(k)
    x = inputs(5, n=512)
    routing, _ = router(x)
    idx, w = _hf_deepseek_v3_weights(router, x, k)
    ours_idx, ours_w = _by_expert(routing.expert_idx, routing.probs)
    hf_idx, hf_w = _by_expert(idx, w)
    assert torch.equal(ours_idx, hf_idx)
    assert routing.probs.dtype == torch.float32 and torch.equal(ours_w, hf_w)
    picked = torch.sigmoid(routing.logits).gather(1, routing.expert_idx)
    best_first = picked / (picked.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
    differ = (best_first != routing.probs).any(dim=-1).float().mean().item()
    print(f"k={k}: rows whose best-first sum would differ from HF's: {100 * differ:.1f} %")
    if k >= 4:
        assert differ > 0.0


@pytest.mark.parametrize("k", [4, 8])
def test_other_routers_sum_best_first(k):
    """Megatron-Core's group score (``"sum_topk"``) and the softmax routers keep the best-first
    sum: ``p = picked / (Σ picked + eps)`` with ``picked`` in ``expert_idx`` order, bitwise."""
    for router, eps in ((_deepseek_v3_router(k, group_score="sum_topk", group_topk=2), 1e-20),
                        (make_router(3, num_experts=16, top_k=k, norm_topk_prob=True), 0.0)):
        routing, _ = router(inputs(6, n=256))
        picked = router.scores(routing.logits).gather(1, routing.expert_idx)
        want = picked / (picked.sum(dim=-1, keepdim=True) + eps)
        want = want * router.config.routed_scaling_factor
        assert torch.equal(routing.probs, want)


def test_deepseek_v3_replayed_assignment_sums_best_first():
    """An assignment that is not the router's selection (replay) is summed in its own order."""
    router = _deepseek_v3_router(4)
    x = inputs(7, n=64)
    forced = torch.arange(64 * 4).remainder(16).view(64, 4)
    routing, _ = router(x, assignment=(forced, None))
    chosen = router.selection(router.scores(routing.logits).detach())[0]
    assert not (chosen.sort(-1).values == forced.sort(-1).values).all(-1).any()  # all replayed
    picked = torch.sigmoid(routing.logits).gather(1, forced)
    assert torch.equal(routing.expert_idx, forced)
    assert torch.equal(routing.probs, picked / (picked.sum(dim=-1, keepdim=True) + 1e-20) * 2.5)
