"""The data-dependent checks of permute / unpermute / unpermute_backward and their
``validate=False`` form: ``ops.expert_counts`` checks ids and counts kept assignments in one
host read; with ``validate=False`` the ops give the bits of the checked call; the layer checks
ids once per forward, and the backward never re-checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_parallel import MoEConfig, MoELayer, ops
from moe_parallel.dispatch import LocalDispatcher
from moe_parallel.routing.router import Routing

needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="moe_parallel._C not loaded")


def routing_case(seed: int, T: int = 40, k: int = 3, E: int = 7, drop: bool = True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    keep = torch.rand(T, k, generator=g) > 0.3 if drop else None
    x = torch.randn(T, 16, generator=g, dtype=torch.float64) + 0.05
    probs = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    return x, idx, keep, probs, E


@pytest.mark.parametrize("drop", [False, True])
def test_expert_counts_counts_the_kept_assignments(drop):
    _, idx, keep, _, E = routing_case(1, drop=drop)
    flat = idx.reshape(-1) if keep is None else idx[keep]
    expect = torch.bincount(flat, minlength=E)
    got = ops.expert_counts(idx, E, keep)
    assert got.device.type == "cpu" and got.dtype == torch.int64
    assert torch.equal(got, expect)


def test_expert_counts_empty_batch():
    assert torch.equal(ops.expert_counts(torch.empty(0, 2, dtype=torch.int64), 5),
                       torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("bad, shown", [(-2, r"\[-2, 6\]"), (7, r"\[0, 7\]")])
def test_expert_counts_rejects_ids_out_of_range(bad, shown):
    _, idx, keep, _, E = routing_case(2)
    idx[3, 1] = bad
    keep[3, 1] = False  # a dropped assignment is checked too, as permute does
    with pytest.raises(ValueError, match=r"expert_idx entries must lie in \[0, num_experts\) = "
                                         rf"\[0, {E}\), got values in {shown}"):
        ops.expert_counts(idx, E, keep)


def test_expert_counts_rejects_counts_above_pad_to():
    _, idx, _, _, E = routing_case(3, drop=False)
    largest = int(torch.bincount(idx.reshape(-1), minlength=E).max())
    assert torch.equal(ops.expert_counts(idx, E, None, largest),
                       torch.bincount(idx.reshape(-1), minlength=E))
    with pytest.raises(ValueError, match=r"pad_to \(\d+\) is smaller than the kept assignments"):
        ops.expert_counts(idx, E, None, largest - 1)


@pytest.mark.parametrize("bad_arg, match", [
    (dict(expert_idx=torch.zeros(3, 2, dtype=torch.int32)), "expert_idx must have dtype int64"),
    (dict(num_experts=0), "num_experts must be >= 1"),
])
def test_expert_counts_rejects_bad_arguments(bad_arg, match):
    args = dict(expert_idx=torch.zeros(3, 2, dtype=torch.int64), num_experts=4) | bad_arg
    with pytest.raises(ValueError, match=match):
        ops.expert_counts(**args)


@pytest.mark.parametrize("impl", ["op", "twin"])
@pytest.mark.parametrize("pad_to", [0, 30])
def test_unvalidated_ops_give_the_checked_bits(impl, pad_to):
    if impl == "op" and not ops.has_extension():
        pytest.skip("moe_parallel._C not loaded")
    x, idx, keep, probs, E = routing_case(4)
    permute = ops.permute if impl == "op" else ops.permute_torch
    unpermute = ops.unpermute if impl == "op" else ops.unpermute_torch
    checked = permute(x, idx, E, keep, pad_to)
    unchecked = permute(x, idx, E, keep, pad_to, validate=False)
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))
    y, row_map = checked[0] * 1.5 + 0.25, checked[1]
    assert torch.equal(unpermute(y, row_map, probs), unpermute(y, row_map, probs, False))
    grad = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    if impl == "op":
        backward = torch.ops.moe_parallel.unpermute_backward
    else:
        backward = ops.unpermute_backward_torch
    a = backward(grad, y, row_map, probs, y.shape[0])
    b = backward(grad, y, row_map, probs, y.shape[0], validate=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@needs_ext
def test_validated_ops_still_reject_bad_indices():
    x, idx, keep, probs, E = routing_case(5)
    bad = idx.clone()
    bad[0, 0] = E
    with pytest.raises(ValueError, match="expert_idx entries must lie in"):
        ops.permute(x, bad, E, keep)
    y, row_map, _ = ops.permute(x, idx, E, keep)
    row_map = row_map.clone()
    row_map[1, 0] = y.shape[0]
    with pytest.raises(ValueError, match="row_map entries must lie in"):
        ops.unpermute(y, row_map, probs)


@needs_ext
def test_dispatcher_checks_the_router_ids_before_permuting():
    x, idx, keep, probs, E = routing_case(6)
    idx[5, 2] = -1
    routing = Routing(probs=probs, expert_idx=idx, keep=keep, logits=torch.zeros(x.shape[0], E),
                      routed_per_expert=torch.zeros(E, dtype=torch.int64))
    with pytest.raises(ValueError, match="expert_idx entries must lie in"):
        LocalDispatcher(E).dispatch(x, routing)


@needs_ext
@pytest.mark.parametrize("expert_impl", ["grouped", "block_sparse"])
def test_layer_checks_ids_once_and_never_in_the_backward(expert_impl):
    """Forward: expert_counts once, then permute and unpermute with validate=False. Backward:
    the ops the autograd formulas call pass validate=False too."""
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2,
                    expert_impl=expert_impl, block_size=8, params_dtype=torch.float64)
    layer = MoELayer(cfg)
    x = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            if name.split(".")[0] == "moe_parallel" and "permute" in name:
                schema = [a.name for a in func._schema.arguments]
                calls.append((name, dict(zip(schema, args)) | kwargs))
            return func(*args, **kwargs)

    with Record():
        y = layer(x)
        forward = len(calls)
        y.backward(torch.randn_like(y))
    names = [n for n, _ in calls]
    assert names[:forward].count("moe_parallel.permute.default") == 1
    # permute's backward is unpermute (the combine's backward, whose weights the experts
    # apply (dispatch.pipeline), is a plain row gather)
    assert "moe_parallel.unpermute.default" in names[forward:], names[forward:]
    for name, args in calls:
        assert args.get("validate") is False, (name, args)
