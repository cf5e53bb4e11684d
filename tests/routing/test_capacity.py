"""expert_capacity and apply_capacity: hand-computed cases and a brute-force cross-check."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.routing.capacity import apply_capacity, expert_capacity


@pytest.mark.parametrize(
    ("T", "E", "k", "cf", "min_cap", "expected"),
    [
        (16, 4, 2, 1.0, 0, 8),  # 16*2/4*1.0 = 8 exactly
        (10, 4, 2, 1.0, 0, 5),  # 10*2/4 = 5
        (10, 4, 1, 1.0, 0, 3),  # 10/4 = 2.5 -> ceil 3
        (10, 3, 2, 1.25, 0, 9),  # 20/3*1.25 = 8.33 -> 9
        (7, 8, 1, 0.5, 0, 1),  # 7/8*0.5 = 0.4375 -> 1
        (7, 8, 1, 0.5, 4, 4),  # min_capacity 4 wins over 1
        (64, 8, 2, 2.0, 4, 32),  # 64*2/8*2 = 32 beats min_capacity 4
        (100, 16, 2, 1.5, 0, 19),  # 200/16*1.5 = 18.75 -> 19
        (0, 4, 2, 1.0, 0, 0),  # no tokens, no capacity
        (0, 4, 2, 1.0, 3, 3),  # ... unless min_capacity
        (5, 5, 5, 1.0, 0, 5),  # k = E: every expert sees every token
    ],
)
def test_expert_capacity_hand_values(T, E, k, cf, min_cap, expected):
    assert expert_capacity(T, E, k, cf, min_cap) == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_tokens=-1), "num_tokens"),
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=9), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(min_capacity=-1), "min_capacity"),
        (dict(num_tokens=3.0), "num_tokens"),
    ],
)
def test_expert_capacity_rejects(kwargs, field):
    args = dict(num_tokens=8, num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        expert_capacity(**args)


# 6 tokens, 3 experts, k = 2. Per expert (token: prob):
#   e0: t0 .60, t2 .50, t3 .20, t4 .10, t5 .55   (5 assignments)
#   e1: t0 .40, t1 .70, t4 .90, t5 .45           (4 assignments)
#   e2: t1 .30, t2 .50, t3 .80                   (3 assignments)
# capacity 3 = expert_capacity(6, 3, 2, 0.75) = ceil(12/3*0.75).
IDX = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0], [1, 0], [0, 1]])
PROBS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2], [0.9, 0.1], [0.55, 0.45]])


def test_hand_capacity_is_three():
    assert expert_capacity(6, 3, 2, 0.75) == 3


def test_position_policy_hand_case():
    # e0 keeps the earliest t0, t2, t3 and drops t4, t5; e1 keeps t0, t1, t4, drops t5;
    # e2 keeps all three.
    expected = torch.tensor(
        [[True, True], [True, True], [True, True], [True, True], [True, False], [False, False]]
    )
    keep = apply_capacity(IDX, PROBS, 3, 3, "position")
    assert keep.dtype == torch.bool and keep.shape == (6, 2)
    assert torch.equal(keep, expected)


def test_probs_policy_hand_case():
    # e0 keeps its highest t0 .60, t5 .55, t2 .50 and drops t3 .20, t4 .10;
    # e1 keeps t4 .90, t1 .70, t5 .45 and drops t0 .40; e2 keeps all three.
    expected = torch.tensor(
        [[True, False], [True, True], [True, True], [True, False], [True, False], [True, True]]
    )
    keep = apply_capacity(IDX, PROBS, 3, 3, "probs")
    assert torch.equal(keep, expected)


def test_capacity_one_hand_case():
    # capacity 1: probs -> e0 keeps t0 (.60), e1 keeps t4 (.90), e2 keeps t3 (.80);
    # position -> e0 keeps t0, e1 keeps t0, e2 keeps t1.
    probs_expected = torch.tensor(
        [[True, False], [False, False], [False, False], [True, False], [True, False], [False] * 2]
    )
    pos_expected = torch.tensor(
        [[True, True], [False, True], [False, False], [False, False], [False, False], [False] * 2]
    )
    assert torch.equal(apply_capacity(IDX, PROBS, 3, 1, "probs"), probs_expected)
    assert torch.equal(apply_capacity(IDX, PROBS, 3, 1, "position"), pos_expected)


def test_capacity_zero_and_large():
    assert not apply_capacity(IDX, PROBS, 3, 0, "probs").any()
    assert apply_capacity(IDX, PROBS, 3, 5, "probs").all()
    assert apply_capacity(IDX, PROBS, 3, 5, "position").all()


def test_probs_ties_go_to_earlier_token():
    # Expert 0 gets four assignments of equal prob 0.5 (t1 slot 1, t2 slot 0, t3 slot 1, t4
    # slot 0) and one higher (t0 .9). Capacity 3 keeps t0, then the two earliest ties t1, t2.
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    keep = apply_capacity(idx, probs, 2, 3, "probs")
    e0 = keep & (idx == 0)
    assert e0.nonzero().tolist() == [[0, 0], [1, 1], [2, 0]]
    # Expert 1 (t0 .1 and four 0.5 ties at t1..t4): keeps the ties t1, t2, t3.
    e1 = keep & (idx == 1)
    assert e1.nonzero().tolist() == [[1, 0], [2, 1], [3, 0]]


def test_existing_keep_is_respected_and_frees_slots():
    # Pre-drop t0's e0 assignment: it must stay dropped and no longer occupy an e0 slot, so with
    # capacity 3 e0 now keeps t2, t3, t4 under 'position' and t5, t2, t3 under 'probs'.
    pre = torch.ones(6, 2, dtype=torch.bool)
    pre[0, 0] = False
    pos = apply_capacity(IDX, PROBS, 3, 3, "position", keep=pre)
    assert not pos[0, 0]
    assert (pos & (IDX == 0)).nonzero()[:, 0].tolist() == [2, 3, 4]
    prb = apply_capacity(IDX, PROBS, 3, 3, "probs", keep=pre)
    assert not prb[0, 0]
    assert sorted((prb & (IDX == 0)).nonzero()[:, 0].tolist()) == [2, 3, 5]
    # Idempotent: re-applying with its own output changes nothing.
    assert torch.equal(apply_capacity(IDX, PROBS, 3, 3, "probs", keep=prb), prb)


def _brute_force_keep(idx, probs, E, cap, policy, keep):
    T, k = idx.shape
    out = torch.zeros(T, k, dtype=torch.bool)
    for e in range(E):
        cands = [(t, j) for t in range(T) for j in range(k) if idx[t, j] == e and keep[t, j]]
        if policy == "probs":
            cands.sort(key=lambda tj: (-float(probs[tj]), tj[0]))
        for t, j in cands[:cap]:
            out[t, j] = True
    return out


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_brute_force(policy, seed):
    g = torch.Generator().manual_seed(seed)
    T, E, k = 40, 6, 3
    idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    # Quantised probs so that ties actually occur.
    probs = torch.randint(0, 5, (T, k), generator=g).float() / 4
    keep = torch.rand(T, k, generator=g) > 0.2
    cap = expert_capacity(T, E, k, 0.8)
    got = apply_capacity(idx, probs, E, cap, policy, keep=keep)
    want = _brute_force_keep(idx, probs, E, cap, policy, keep)
    assert torch.equal(got, want)
    kept_per_expert = torch.bincount(idx[got], minlength=E)
    assert int(kept_per_expert.max()) == cap  # some expert is actually full


def test_empty_routing():
    idx = torch.zeros(0, 2, dtype=torch.int64)
    keep = apply_capacity(idx, torch.zeros(0, 2), 4, 3, "probs")
    assert keep.shape == (0, 2) and keep.dtype == torch.bool


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(drop_policy="random"), "drop_policy"),
        (dict(capacity=-1), "capacity"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2), "expert_idx"),  # ids up to 2 are out of range for E = 2
        (dict(expert_idx=IDX.float()), "expert_idx"),
        (dict(expert_idx=IDX[:, 0]), "expert_idx"),
        (dict(probs=PROBS[:, :1]), "probs"),
        (dict(keep=torch.ones(6, 2)), "keep"),
        (dict(keep=torch.ones(5, 2, dtype=torch.bool)), "keep"),
    ],
)
def test_apply_capacity_rejects(kwargs, field):
    args = dict(
        expert_idx=IDX, probs=PROBS, num_experts=3, capacity=2, drop_policy="probs", keep=None
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        apply_capacity(**args)
