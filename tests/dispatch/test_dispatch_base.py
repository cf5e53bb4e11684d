"""The declared interfaces: every dispatcher is a ``TokenDispatcher`` with a ``DispatchHandle``,
every routed-experts implementation a ``RoutedExperts`` returning ``ExpertsOutput``; the
registries cover the config's names; a foreign object is refused by ``MoELayer``."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.config import DISPATCHERS, EXPERT_IMPLS
from moe_parallel.dispatch import (
    DISPATCHER_CLASSES,
    AllGatherHandle,
    AllToAllHandle,
    DispatchHandle,
    LocalDispatcher,
    LocalHandle,
    RowBudget,
    TokenDispatcher,
)
from moe_parallel.experts import EXPERT_CLASSES, ExpertsOutput, RoutedExperts

BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2,
            params_dtype=torch.float64)


def test_registries_cover_the_config_names():
    assert set(DISPATCHER_CLASSES) == set(DISPATCHERS)
    assert all(issubclass(c, TokenDispatcher) for c in DISPATCHER_CLASSES.values())
    assert set(EXPERT_CLASSES) == set(EXPERT_IMPLS)
    assert all(issubclass(c, RoutedExperts) for c in EXPERT_CLASSES.values())
    assert all(issubclass(h, DispatchHandle) for h in (LocalHandle, AllToAllHandle,
                                                       AllGatherHandle))


def test_interfaces_are_abstract():
    with pytest.raises(TypeError):
        TokenDispatcher(4)
    with pytest.raises(TypeError):
        RoutedExperts()


@pytest.mark.parametrize("impl", EXPERT_IMPLS)
def test_experts_return_their_padding(impl):
    layer = MoELayer(MoEConfig(**BASE, expert_impl=impl))
    rows = torch.randn(5, 8, dtype=torch.float64)
    out = layer.experts(rows, torch.tensor([2, 0, 3, 0]))
    assert isinstance(out, ExpertsOutput) and out.y.shape == (5, 8)
    # block-sparse: each non-empty expert padded to a multiple of the block (here one block)
    assert out.padded_rows == (None if impl == "grouped" else 2 * layer.experts.block_size)


def test_start_forms_run_synchronously_by_default():
    layer = MoELayer(MoEConfig(**BASE))
    x = torch.randn(6, 8, dtype=torch.float64)
    routing, _, _ = layer.route(x)
    d = layer.dispatcher
    expert_in, sizes, handle = d.dispatch_start(x, routing).finish()
    assert isinstance(handle, DispatchHandle) and handle.overflow is False
    assert torch.equal(d.combine_start(expert_in, handle).finish(), d.combine(expert_in, handle))
    assert d.grid.num_local_experts == 4 and d.grid.tp_ep_group is None


def test_foreign_objects_are_refused():
    class Duck:
        def dispatch(self, x, routing, pad_to=0): ...
        def combine(self, y, handle): ...

    with pytest.raises(TypeError, match="dispatcher must be a .*TokenDispatcher, got Duck"):
        MoELayer(MoEConfig(**BASE), dispatcher=Duck())
    with pytest.raises(TypeError, match="experts must be a .*RoutedExperts, got Linear"):
        MoELayer(MoEConfig(**BASE), experts=torch.nn.Linear(2, 2))


def test_row_budget_is_set_on_a_given_dispatcher():
    cfg = MoEConfig(**BASE, max_rows_per_rank=100)
    layer = MoELayer(cfg, dispatcher=LocalDispatcher(cfg.num_experts))
    assert layer.dispatcher.row_budget == RowBudget.from_config(cfg)
    own = RowBudget(7, None, "error", cfg.drop_policy)
    layer = MoELayer(cfg, dispatcher=LocalDispatcher(cfg.num_experts, own))
    assert layer.dispatcher.row_budget is own
