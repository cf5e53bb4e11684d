"""check_agreement on 4 gloo ranks: a rank whose layer was built with another config makes
every rank raise a ValueError naming the field and each rank's value, at the first forward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2)
ODD = {  # case -> (rank that differs, its config changes)
    "top_k": (3, dict(top_k=1)),
    "num_experts": (0, dict(num_experts=4)),
    "capacity_factor": (2, dict(capacity_factor=1.25)),
}


def _forward(case: str) -> str:
    ps = parallel_state(ep=4)
    odd_rank, changes = ODD[case]
    cfg = MoEConfig(**{**BASE, **(changes if dist.get_rank() == odd_rank else {})})
    layer = MoELayer(cfg, parallel_state=ps)
    try:
        layer(torch.randn(5, 8))
    except ValueError as exc:
        return str(exc)
    return "no error"


def _agreeing() -> str:
    layer = MoELayer(MoEConfig(**BASE), parallel_state=parallel_state(ep=4))
    y = layer(torch.randn(5, 8))
    layer(torch.randn(3, 8))  # later forwards run without the check
    return f"ok {tuple(y.shape)}"


@pytest.mark.parametrize("case", sorted(ODD))
def test_a_rank_built_differently_makes_every_rank_raise(case):
    odd_rank, changes = ODD[case]
    messages = get_pool(4).run(_forward, case, timeout=60)
    (value,) = changes.values()
    for rank, msg in enumerate(messages):
        assert "built differently" in msg, (rank, msg)
        assert f"{case}: " in msg and f"rank {odd_rank} {value!r}" in msg, (rank, msg)
        assert f"rank {(odd_rank + 1) % 4} {BASE.get(case)!r}" in msg, (rank, msg)


def test_agreeing_ranks_run():
    assert get_pool(4).run(_agreeing, timeout=60) == ["ok (5, 8)"] * 4


def _nan_on_rank1() -> str:
    ps = parallel_state(ep=4)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE), parallel_state=ps)
    x = torch.randn(5, 8)
    if dist.get_rank() == 1:
        x[2, 3] = float("nan")
    try:
        layer(x)
        first = "no error"
    except FloatingPointError as exc:
        first = str(exc)
    y = layer(torch.randn(4, 8))  # the group is still in step: the next forward runs everywhere
    y.sum().backward()
    return f"{first} | next {tuple(y.shape)}"


def test_non_finite_input_on_one_rank_makes_the_whole_group_skip():
    """check_finite's verdict is collective: the NaN on rank 1 makes every rank of the group
    raise at the same forward (none enters the exchange alone), and the next forward works."""
    messages = get_pool(4).run(_nan_on_rank1, timeout=60)
    for rank, msg in enumerate(messages):
        assert "non-finite router logits on rank(s) [1]" in msg, (rank, msg)
        assert msg.endswith("| next (4, 8)"), (rank, msg)


def _bad_input_on_rank2(check_finite: bool, first_forward: bool) -> str:
    ps = parallel_state(ep=4)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, check_finite=check_finite), parallel_state=ps)
    if not first_forward:
        layer(torch.randn(3, 8))  # the config agreement is behind it
    bad = dist.get_rank() == 2
    try:
        layer(torch.randn(5, 7) if bad else torch.randn(5, 8))
        first = "no error"
    except ValueError as exc:
        first = str(exc)
    torch.manual_seed(1 + dist.get_rank())
    x = torch.randn(4, 8)
    y = layer(x)  # the group is still in step: the next forward runs everywhere
    y.sum().backward()
    return f"{first} | next {tuple(y.shape)}"


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("first_forward", [True, False], ids=["first", "later"])
def test_refused_input_on_one_rank_makes_the_whole_group_raise(check_finite, first_forward):
    """The input checks' verdict is collective: rank 2's wrong hidden size makes it raise its
    own error and every other rank of the group a ValueError naming rank 2, at the same forward
    (at the first forward, after the config agreement every rank still joins); the next
    forward runs on every rank."""
    messages = get_pool(4).run(_bad_input_on_rank2, check_finite, first_forward, timeout=60)
    for rank, msg in enumerate(messages):
        if rank == 2:
            assert msg.startswith("x must be [T, hidden_size]"), (rank, msg)
        else:
            assert ("the input of rank(s) [2] of this layer's pipeline stage [0, 1, 2, 3]"
                    in msg), (rank, msg)
        assert msg.endswith("| next (4, 8)"), (rank, msg)


def _nan_on_rank1_layer_scope() -> str:
    ps = parallel_state(ep=2)  # EP groups [0, 1] and [2, 3]
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, verdict_scope="layer"), parallel_state=ps)
    x = torch.randn(5, 8)
    if dist.get_rank() == 1:
        x[2, 3] = float("nan")
    try:
        layer(x)
        first = "ran"
    except FloatingPointError as exc:
        first = str(exc)
    if dist.get_rank() < 2:  # one EP group runs one more forward than the other: no collective
        layer(torch.randn(4, 8))  # joins the other group, so nothing waits for it
    return first


def test_layer_scope_keeps_the_verdict_inside_the_ep_group():
    """``verdict_scope="layer"``: rank 1's NaN makes its ETP×EP group [0, 1] raise, the other
    group runs, and the groups may run different numbers of forwards (inference)."""
    messages = get_pool(4).run(_nan_on_rank1_layer_scope, timeout=60)
    for rank in (0, 1):
        assert ("non-finite router logits on rank(s) [1] of this layer's ETP×EP group [0, 1]"
                in messages[rank]), messages
    assert messages[2:] == ["ran", "ran"], messages
