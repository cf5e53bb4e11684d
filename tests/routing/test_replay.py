"""Router replay (moe_parallel.replay, routing.replay, routing.record), one process.

* Record then replay with unchanged weights: output, input gradient and every parameter
  gradient bitwise equal to the recorded forward's, in dropless and capacity modes (every drop
  policy, padded or not), top-p, forced balance, scale_expert_input, the three recompute modes,
  2-D and 3-D inputs.
* After a weight update, plain routing picks other experts while replay keeps the recorded ones,
  with the current router's scores at them as weights (float64 formula) and a router gradient.
* Keyed by (sequence id, position): the batch's sequences permuted, each token still gets its
  recorded experts.
* torch.utils.checkpoint around the layer: the recomputed forward replays (record mode records
  each token once; gradients equal the plain run's bitwise).
* Refusals: wrong mode, a record in the wrong mode, expert choice, unknown layer index; at the
  forward: a record of another layer count, top_k or num_experts, a token the record lacks, no
  keys, keys of another shape, a top-p record in a layer without top-p.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.replay import (
    router_recording,
    set_router_replay,
    set_token_keys,
)
from moe_parallel.routing.record import LayerRouting, RoutingRecord

BASE = dict(hidden_size=8, ffn_hidden_size=6, num_experts=6, top_k=2,
            params_dtype=torch.float64, init_std=0.5)
S, B = 5, 3

CASES = {
    "dropless": {},
    "capacity-probs": dict(capacity_factor=0.75, drop_policy="probs"),
    "capacity-position-padded": dict(capacity_factor=0.75, drop_policy="position",
                                     pad_to_capacity=True),
    "capacity-k_major": dict(capacity_factor=1.0, drop_policy="k_major"),
    "top_p": dict(top_p=0.6, top_k=3),
    "top_p-capacity-norm": dict(top_p=0.6, top_k=3, norm_topk_prob=True, capacity_factor=0.75),
    "sigmoid-renorm": dict(score_function="sigmoid", norm_topk_prob=True, aux_loss_coeff=0.01),
    "force_balance": dict(force_balance=True),
    "scale_expert_input": dict(scale_expert_input=True, top_k=1),
    "shared-aux-z": dict(num_shared_experts=1, aux_loss_coeff=0.01, z_loss_coeff=0.001),
    "recompute-experts": dict(recompute="experts", capacity_factor=1.0),
    "recompute-activation": dict(recompute="activation"),
}


def _layer(**changes) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**{**BASE, **changes}))
    layer.train()
    return layer


def _keys(seq_ids=None):
    seq = torch.arange(100, 100 + B) if seq_ids is None else seq_ids
    return seq.view(1, -1), torch.arange(S).view(-1, 1)


def _run(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    """Output, routing aux, input gradient and every parameter gradient of one step."""
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y, aux = layer(xg, return_aux=True)
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), aux, xg.grad.clone(), grads


def _inputs(shape=(S, B), seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, BASE["hidden_size"], generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:top_p with norm_topk_prob=True")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dims", [2, 3])
def test_replay_with_unchanged_weights_is_bitwise_the_recorded_forward(case, dims):
    layer = _layer(**CASES[case])
    x, gy = _inputs()
    if dims == 2:
        x, gy = x.reshape(S * B, -1), gy.reshape(S * B, -1)
        set_token_keys(layer, torch.full((S * B,), 7), torch.arange(S * B))
    else:
        set_token_keys(layer, *_keys())
    set_router_replay(layer, "record")
    y0, aux0, gx0, g0 = _run(layer, x, gy)
    record = router_recording(layer)
    assert record.num_layers == 1 and record.layers[0].num_tokens == S * B
    set_router_replay(layer, "replay", record)
    y1, aux1, gx1, g1 = _run(layer, x, gy)
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    assert g1.keys() == g0.keys() and all(torch.equal(g1[n], g0[n]) for n in g0)
    assert torch.equal(aux1.routing.expert_idx, aux0.routing.expert_idx)
    assert aux1.stats.dropped == aux0.stats.dropped
    assert torch.equal(aux1.stats.tokens_per_expert, aux0.stats.tokens_per_expert)
    if "capacity" in case and "top_p" not in case:
        assert aux0.stats.dropped > 0  # the drops are replayed, not just absent
    if "top_p" in case:
        assert aux0.routing.keep is not None and not bool(aux0.routing.keep.all())
    assert float(g0["router.weight"].abs().max()) > 0


def test_after_an_update_replay_keeps_the_recorded_experts():
    layer = _layer()
    x, gy = _inputs(seed=3)
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "record")
    _, aux0, _, _ = _run(layer, x, gy)
    record = router_recording(layer)
    with torch.no_grad():  # the update: a different router
        layer.router.weight.copy_(torch.randn_like(layer.router.weight))
    set_router_replay(layer, "off")
    _, aux_plain, _, _ = _run(layer, x, gy)
    changed = (aux_plain.routing.expert_idx != aux0.routing.expert_idx).any(1)
    assert int(changed.sum()) >= 5, "plain routing should move tokens after the update"
    set_router_replay(layer, "replay", record)
    _, aux_replay, _, g = _run(layer, x, gy)
    assert torch.equal(aux_replay.routing.expert_idx, aux0.routing.expert_idx)
    # weights: the current router's softmax at the recorded experts, renormalised (float64)
    tokens = x.reshape(-1, BASE["hidden_size"])
    probs = torch.softmax(tokens @ layer.router.weight.detach().t(), -1)
    picked = probs.gather(1, aux0.routing.expert_idx)
    picked = picked / picked.sum(-1, keepdim=True)
    assert torch.allclose(aux_replay.routing.probs.detach(), picked, rtol=0, atol=1e-15)
    assert not torch.allclose(aux_replay.routing.probs.detach(), aux0.routing.probs.detach())
    assert float(g["router.weight"].abs().max()) > 0


def test_keyed_by_sequence_and_position_not_by_batch_order():
    layer = _layer(capacity_factor=None)
    x, gy = _inputs(seed=4)
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "record")
    _, aux0, _, _ = _run(layer, x, gy)
    record = router_recording(layer)
    with torch.no_grad():
        layer.router.weight.mul_(-1.0)
    perm = torch.tensor([2, 0, 1])
    set_router_replay(layer, "replay", record)
    set_token_keys(layer, *_keys(torch.arange(100, 100 + B)[perm]))
    _, aux1, _, _ = _run(layer, x[:, perm], gy[:, perm])
    want = aux0.routing.expert_idx.view(S, B, -1)[:, perm].reshape(S * B, -1)
    assert torch.equal(aux1.routing.expert_idx, want)
    # a sub-batch: one sequence's last three positions
    set_token_keys(layer, torch.tensor([101]).view(1, 1), torch.arange(2, S).view(-1, 1))
    _, aux2, _, _ = _run(layer, x[2:, 1:2].contiguous(), gy[2:, 1:2].contiguous())
    assert torch.equal(aux2.routing.expert_idx, aux0.routing.expert_idx.view(S, B, -1)[2:, 1])


def test_a_later_forward_of_a_key_replaces_its_record():
    layer = _layer()
    x, gy = _inputs(seed=5)
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "record")
    _run(layer, x, gy)
    with torch.no_grad():
        layer.router.weight.mul_(-1.0)
    _, aux1, _, _ = _run(layer, x, gy)
    rec = router_recording(layer).layers[0]
    assert rec.num_tokens == S * B
    seq, pos = _keys()
    idx, _, _ = rec.lookup(seq.expand(S, B).reshape(-1), pos.expand(S, B).reshape(-1))
    assert torch.equal(idx, aux1.routing.expert_idx)


class _Checkpointed(nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.moe = layer

    def forward(self, x):
        return checkpoint(self.moe, x, use_reentrant=False)


@pytest.mark.parametrize("capacity", [None, 0.75])
def test_checkpointed_layer_records_once_and_recomputes_what_it_recorded(capacity):
    x, gy = _inputs(seed=6)
    plain = _layer(capacity_factor=capacity)
    set_token_keys(plain, *_keys())
    set_router_replay(plain, "record")
    y0, _, gx0, g0 = _run(plain, x, gy)
    record = router_recording(plain)

    wrapped = _Checkpointed(_layer(capacity_factor=capacity))
    set_token_keys(wrapped, *_keys())
    for mode in ("record", "replay"):
        set_router_replay(wrapped, mode, record if mode == "replay" else None)
        wrapped.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = wrapped(xg)
        y.backward(gy)
        assert torch.equal(y, y0) and torch.equal(xg.grad, gx0), mode
        for n, p in wrapped.moe.named_parameters():
            assert torch.equal(p.grad, g0[n]), (mode, n)
        if mode == "record":
            rec = router_recording(wrapped, clear=False).layers[0]
            assert rec.num_tokens == S * B
            assert len(wrapped.moe.replay._parts) == 1  # the recomputed forward added nothing
            assert torch.equal(rec.expert_idx, record.layers[0].expert_idx)


class _Two(nn.Module):
    def __init__(self, **changes) -> None:
        super().__init__()
        self.a, self.b = _layer(**changes), _layer(**changes)

    def forward(self, x):
        return self.b(self.a(x))


def _recorded(model, x):
    set_token_keys(model, *_keys())
    set_router_replay(model, "record")
    model(x)
    return router_recording(model)


def test_layers_pick_which_record_and_replay():
    model = _Two()
    x, _ = _inputs(seed=7)
    set_token_keys(model, *_keys())
    assert set_router_replay(model, "record", layers=[1]) == 1
    model(x)
    rec = router_recording(model)
    assert rec.num_layers == 1 and rec.layer_names == ["b"]
    assert model.a.replay.mode == "off" and model.b.replay.mode == "record"
    set_router_replay(model, "replay", rec, layers=[1])
    model(x)  # fits


@pytest.mark.parametrize("what,match", [
    ("layers", r"recording holds 1 MoE layers, replay was set on 2"),
    ("top_k", r"num_experts=6, top_k=1; this layer has num_experts=6, top_k=2"),
    ("experts", r"num_experts=4, top_k=2; this layer has num_experts=6"),
    ("missing", r"holds no token \(seq_id=100, position=4\)"),
    ("no_keys", r"needs the keys of the forward's tokens: set_token_keys"),
    ("key_shape", r"do not match the layer input's tokens \[5, 3\]"),
])
def test_a_record_that_does_not_fit_raises_at_the_forward(what, match):
    model = _Two()
    x, _ = _inputs(seed=8)
    rec = _recorded(model, x)
    if what == "layers":
        rec = RoutingRecord(rec.layers[:1], rec.num_experts, rec.top_k)
    elif what == "top_k":
        rec = RoutingRecord([LayerRouting(r.seq_id, r.position, r.expert_idx[:, :1],
                                          r.selected[:, :1], r.kept[:, :1]) for r in rec.layers],
                            6, 1)
    elif what == "experts":
        rec = RoutingRecord(rec.layers, 4, 2)
    elif what == "missing":
        keep = ~((rec.layers[0].seq_id == 100) & (rec.layers[0].position == 4))
        rec = RoutingRecord([r.take(keep) for r in rec.layers], 6, 2)
    set_router_replay(model, "replay", rec)
    if what == "no_keys":
        for m in (model.a, model.b):
            m.replay.keys = None
    if what == "key_shape":
        set_token_keys(model, torch.arange(4).view(1, 4), torch.arange(S).view(-1, 1))
    with pytest.raises(ValueError, match=match):
        model(x)


def test_a_top_p_record_refused_without_top_p():
    x, _ = _inputs(seed=9)
    rec = _recorded(_layer(top_p=0.5, top_k=3), x)
    assert not bool(rec.layers[0].selected.all())
    layer = _layer(top_k=3)
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "replay", rec)
    with pytest.raises(ValueError, match=r"made with top-p selection, this layer has top_p=None"):
        layer(x)


@pytest.mark.parametrize("call,match", [
    (lambda m, r: set_router_replay(m, "replays"), r"mode must be one of \('off', 'record', "),
    (lambda m, r: set_router_replay(m, "replay"), r"mode 'replay' takes a RoutingRecord"),
    (lambda m, r: set_router_replay(m, "record", r), r"mode 'replay' takes a RoutingRecord"),
    (lambda m, r: set_router_replay(m, "record", layers=[2]), r"layers must be distinct indices "
                                                               r"in \[0, 2\)"),
    (lambda m, r: set_router_replay(m, "record", max_bytes=0), r"max_bytes must be a positive"),
    (lambda m, r: set_token_keys(m, torch.ones(3), torch.arange(3)), r"seq_id must be an integ"),
    (lambda m, r: router_recording(nn.Sequential(_layer())), r"no MoE layer is in 'record'"),
    (lambda m, r: set_router_replay(nn.Linear(2, 2), "off"), r"holds no MoELayer"),
])
def test_refusals_at_set_time(call, match):
    model = _Two()
    x, _ = _inputs(seed=10)
    rec = _recorded(model, x)
    with pytest.raises(ValueError, match=match):
        call(model, rec)


def test_expert_choice_refused():
    layer = MoELayer(MoEConfig(**{**BASE, "router_type": "expert_choice",
                                  "capacity_factor": 1.0}))
    with pytest.raises(ValueError, match=r"router replay needs router_type='topk'"):
        set_router_replay(layer, "record")


def test_max_bytes_bounds_the_recording():
    layer = _layer()
    x, _ = _inputs(seed=11)
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "record", weights=True, logits=True, max_bytes=2000)
    per_forward = S * B * (8 + 8 + 2 * 8 + 2 + 2 + 2 * 8 + 6 * 8)  # keys, idx, masks, w, logits
    assert per_forward <= 2000 < 2 * per_forward
    layer(x)
    set_token_keys(layer, torch.arange(200, 200 + B).view(1, -1), torch.arange(S).view(-1, 1))
    layer(x)
    assert layer.replay.truncated
    rec = router_recording(layer).layers[0]
    assert rec.num_tokens == S * B and rec.nbytes == per_forward
    assert int(rec.seq_id.min()) == 100
