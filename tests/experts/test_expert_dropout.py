"""Expert dropout (``MoEConfig.expert_dropout``) in the layer and the main job.

One process (float64):
* eval is an exact no-op (bitwise the layer without dropout); training changes the output;
* a training forward and its gradients equal a loop over tokens and experts that applies the
  twin's mask (``ops.dropout.expert_dropout_keep_torch``) to each row's activation, with the row
  hash of the documented formula (token keys, step, layer, seed) - for SwiGLU, GELU, clamped
  SwiGLU with projection biases, F > H, capacity with padding, top-p, shared experts and
  ``scale_expert_input``; grouped and block-sparse experts alike (1e-12);
* every recompute mode equals "none" (1e-12) and keeps no mask, only the [N] row hashes more;
  grouped equals block-sparse;
* the mask follows (seed, step, layer, token key): another step, layer or seed changes it, the
  same ones repeat it bitwise; permuting the tokens with their keys permutes the output;
* ``torch.compile`` (aot_eager) equals eager at two steps (the step is not baked in);
* bad values are refused naming the field; experts without row hashes are refused.
4 gloo ranks: the main job's training steps (forward, backward, AdamW) with ``--expert-dropout
0.3`` on ep4, ep2 (dp4, edp2), tp2·ep2, ep2·etp2, all-gather and hierarchical dispatch,
block-sparse experts and recompute equal one process on the global batch (loss and every
parameter, 1e-10).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel import MoEConfig, MoELayer, ops, set_expert_dropout_step
from moe_parallel.experts import GroupedExperts
from moe_parallel.ops.dropout import expert_dropout_keep_torch
from moe_parallel.replay import set_token_keys
from tests.helpers.dist_harness import get_pool, own_groups, parallel_state

TOL = 1e-12
BASE = dict(hidden_size=12, ffn_hidden_size=8, num_experts=6, top_k=2,
            params_dtype=torch.float64, init_std=0.3, expert_dropout=0.3,
            expert_dropout_seed=11)
CASES = {
    "swiglu": {},
    "gelu": dict(activation="gelu"),
    "clamped_bias": dict(activation="clamped_swiglu", swiglu_limit=0.6, expert_proj_bias=True),
    "wide_ffn": dict(ffn_hidden_size=16),  # F > H: the weights scale the second GEMM's output
    "capacity_padded": dict(capacity_factor=1.0, pad_to_capacity=True),
    "top_p": dict(top_p=0.6, top_k=3),
    "shared": dict(num_shared_experts=1, shared_expert_gate=True),
    "scale_expert_input": dict(scale_expert_input=True),
}
IMPLS = ("grouped", "block_sparse")
T, S_LEN, STEP, LAYER = 12, 4, 5, 2  # tokens [S_LEN, T / S_LEN] sequence-major


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-300))


def _layer(cfg: MoEConfig, step: int = STEP, layer_index: int = LAYER) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    if cfg.expert_proj_bias:
        with torch.no_grad():
            layer.experts.b1.normal_(0, 0.3)
            layer.experts.b2.normal_(0, 0.3)
    layer.set_expert_dropout_step(step, layer_index)
    return layer


def _keys(layer: nn.Module, batch: int, first_seq: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Token keys of a sequence-major [S_LEN, batch] input; set on ``layer``, also returned
    flattened ([T])."""
    seq = torch.arange(first_seq, first_seq + batch).view(1, batch)
    pos = torch.arange(S_LEN).view(S_LEN, 1)
    set_token_keys(layer, seq, pos)
    s, p = torch.broadcast_tensors(seq, pos)
    return s.reshape(-1), p.reshape(-1)


def _inputs(cfg: MoEConfig, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S_LEN, T // S_LEN, cfg.hidden_size, generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def _act(h: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """The activation, written out."""
    if cfg.activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    if cfg.activation == "clamped_swiglu":
        L = cfg.swiglu_limit
        gate, up = gate.clamp(max=L), up.clamp(min=-L, max=L)
        return (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)
    return F.silu(gate) * up


def reference(layer: MoELayer, x: torch.Tensor, routing, row_hash: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their kept assignments: row ``a = act(x w1[e] + b1[e])`` dropped out
    with the twin's mask of (row hash, e, unit), then ``w · (a w2[e] + b2[e])`` (with
    ``scale_expert_input``: the expert of ``w · x``, weight 1), plus the shared expert."""
    cfg, ex = layer.config, layer.experts
    p, F_ = cfg.expert_dropout, cfg.ffn_hidden_size
    tokens = x.reshape(-1, cfg.hidden_size)
    out = []
    for t in range(tokens.shape[0]):
        y = torch.zeros(cfg.hidden_size, dtype=torch.float64)
        for j in range(routing.expert_idx.shape[1]):
            if routing.keep is not None and not bool(routing.keep[t, j]):
                continue
            e, w = int(routing.expert_idx[t, j]), routing.probs[t, j]
            row = tokens[t] * w if cfg.scale_expert_input else tokens[t]
            h = row @ ex.w1[e] + (ex.b1[e] if ex.b1 is not None else 0)
            keep = expert_dropout_keep_torch(row_hash[t:t + 1], [1], e, 0, F_, p)[0]
            a = _act(h, cfg) * keep / (1 - p)
            o = a @ ex.w2[e] + (ex.b2[e] if ex.b2 is not None else 0)
            y = y + (o if cfg.scale_expert_input else w * o)
        out.append(y)
    y = torch.stack(out)
    if layer.shared_expert is not None:
        y = y + layer.shared_expert(tokens)
    return y.view(x.shape)


def _hashes(cfg: MoEConfig, seq: torch.Tensor, pos: torch.Tensor, step: int = STEP,
            layer_index: int = LAYER) -> torch.Tensor:
    """The documented row hash of each token."""
    return ops.token_hash(ops.stream_key(cfg.expert_dropout_seed, step, layer_index), seq, pos)


def _grads(y: torch.Tensor, leaves: list[torch.Tensor], gy: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, leaves, gy, retain_graph=True, allow_unused=True))


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_is_an_exact_no_op(impl):
    cfg = MoEConfig(**BASE, expert_impl=impl)
    x, _ = _inputs(cfg)
    layer, plain = _layer(cfg), _layer(cfg.replace(expert_dropout=0.0))
    _keys(layer, T // S_LEN)
    _keys(plain, T // S_LEN)
    layer.eval()
    plain.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    plain.train()
    assert _rel(layer(x), plain(x)) > 1e-3  # in training the dropout acts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_forward_and_gradients_equal_the_reference_loop(case, impl):
    cfg = MoEConfig(**{**BASE, **CASES[case], "expert_impl": impl})
    x, gy = _inputs(cfg)
    layer = _layer(cfg)
    seq, pos = _keys(layer, T // S_LEN)
    xg = x.clone().requires_grad_()
    y, aux = layer(xg, return_aux=True)
    ref = reference(layer, xg, aux.routing, _hashes(cfg, seq, pos))
    assert _rel(y, ref) <= TOL
    leaves = [xg] + [p for p in layer.parameters()]
    got, want = _grads(y, leaves, gy), _grads(ref, leaves, gy)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    checked = 0
    for name, g, r in zip(names, got, want):
        if r is None:
            assert g is None or not bool(g.any()), name
            continue
        assert g is not None and _rel(g, r) <= TOL, f"grad {name}: {_rel(g, r):.2e}"
        checked += 1
    assert checked >= 4  # x, router, w1, w2 at least
    # another row hash gives another output: the mask is the one of the documented hash
    assert _rel(reference(layer, xg, aux.routing, _hashes(cfg, seq, pos) + 1), y) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["swiglu", "gelu", "capacity_padded", "scale_expert_input"])
def test_every_recompute_mode_equals_none(case, impl):
    cfg = MoEConfig(**{**BASE, **CASES[case], "expert_impl": impl})
    x, gy = _inputs(cfg)
    results = {}
    for mode in ("none", "activation", "experts"):
        layer = _layer(cfg.replace(recompute=mode))
        _keys(layer, T // S_LEN)
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(gy)
        results[mode] = [y.detach(), xg.grad] + [p.grad for p in layer.parameters()]
    for mode in ("activation", "experts"):
        for got, want in zip(results[mode], results["none"]):
            assert _rel(got, want) <= TOL, mode


@pytest.mark.parametrize("mode", ["none", "activation", "experts"])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_the_grouped_ffn_keeps_only_the_row_hashes_more(mode, activation):
    """No mode saves the mask: exactly ``expert_saved_bytes``, which counts 8 bytes per row for
    the row hashes with ``expert_dropout`` (and none without)."""
    from benchmarks.memory import saved_tensor_bytes
    from moe_parallel.experts.grouped_ffn import RowDropout, grouped_ffn
    from moe_parallel.experts.memory import expert_saved_bytes

    cfg = MoEConfig(**BASE, activation=activation, recompute=mode)
    gen = torch.Generator().manual_seed(5)
    sizes = torch.tensor([3, 0, 5, 1, 4, 2])
    N, H, F_ = int(sizes.sum()), cfg.hidden_size, cfg.ffn_hidden_size
    F1 = 2 * F_ if cfg.gated else F_

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, w, w1, w2 = leaf(N, H), leaf(N), leaf(6, H, F1), leaf(6, F_, H)
    drop = RowDropout(torch.randint(0, 2**32, (N,), generator=gen), 0.3, 0, 0)
    saved = saved_tensor_bytes(lambda: grouped_ffn(x, w1, w2, sizes, cfg, w, dropout=drop),
                               [w1, w2])
    assert saved["activations"] == expert_saved_bytes(cfg, N)
    assert expert_saved_bytes(cfg, N) == expert_saved_bytes(cfg.replace(expert_dropout=0.0),
                                                             N) + 8 * N


def test_grouped_equals_block_sparse():
    cfg = MoEConfig(**{**BASE, "ffn_hidden_size": 16, "block_size": 4})
    x, gy = _inputs(cfg)
    out = {}
    for impl in IMPLS:
        layer = _layer(cfg.replace(expert_impl=impl))
        _keys(layer, T // S_LEN)
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(gy)
        out[impl] = [y.detach(), xg.grad, layer.experts.w1.grad, layer.experts.w2.grad]
    for got, want in zip(out["block_sparse"], out["grouped"]):
        assert _rel(got, want) <= TOL


def test_the_mask_follows_seed_step_layer_and_token_keys():
    cfg = MoEConfig(**BASE)
    x, _ = _inputs(cfg)

    def output(cfg=cfg, step=STEP, layer_index=LAYER, first_seq=100):
        layer = _layer(cfg, step, layer_index)
        _keys(layer, T // S_LEN, first_seq)
        return layer(x).detach()

    base = output()
    assert torch.equal(output(), base)  # a pure function: the same again, bitwise
    for other in (output(step=STEP + 1), output(layer_index=LAYER + 1),
                  output(cfg=cfg.replace(expert_dropout_seed=12)), output(first_seq=101)):
        assert _rel(other, base) > 1e-3
    # without keys: (0, index of the token in the input), another mask
    layer = _layer(cfg)
    assert _rel(layer(x).detach(), base) > 1e-3


def test_permuting_tokens_with_their_keys_permutes_the_output():
    cfg = MoEConfig(**BASE)
    x, _ = _inputs(cfg)
    tokens = x.reshape(T, -1)
    layer = _layer(cfg)
    seq, pos = _keys(layer, T // S_LEN)
    y = layer(tokens).detach()
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(4))
    set_token_keys(layer, seq[perm], pos[perm])
    assert _rel(layer(tokens[perm]).detach(), y[perm]) <= TOL


def test_set_expert_dropout_step_numbers_the_layers_in_model_order():
    cfg = MoEConfig(**BASE)
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(cfg), nn.Linear(12, 12, dtype=torch.float64), MoELayer(cfg))
    assert set_expert_dropout_step(model, 7) == 2
    assert [(m.expert_dropout_step, m.expert_dropout_layer) for m in (model[0], model[2])] == [
        (7, 0), (7, 1)]
    assert int(model[2]._dropout_key) == ops.stream_key(11, 7, 1)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        set_expert_dropout_step(model, -1)


def test_sharded_layer_keeps_the_step():
    from moe_parallel import ParallelState

    layer = _layer(MoEConfig(**BASE), step=9, layer_index=4)
    copy_ = MoELayer.shard_from(layer, ParallelState.single())
    assert (copy_.expert_dropout_step, copy_.expert_dropout_layer) == (9, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_layer_equals_eager_at_two_steps(impl):
    cfg = MoEConfig(**BASE, expert_impl=impl)
    x, gy = _inputs(cfg)
    eager, compiled_layer = _layer(cfg), _layer(cfg)
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    outs = []
    for step in (1, 2):
        for layer, run in ((eager, eager), (compiled_layer, compiled)):
            layer.set_expert_dropout_step(step, 0)
            _keys(layer, T // S_LEN)
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            y = run(xg)
            y.backward(gy)
            outs.append([y.detach(), xg.grad, layer.experts.w1.grad])
    for i in (0, 2):
        for got, want in zip(outs[i + 1], outs[i]):
            assert _rel(got, want) <= TOL
    assert _rel(outs[2][0], outs[0][0]) > 1e-3  # step 2 has another mask, also compiled


@pytest.mark.parametrize("field,value,match", [
    ("expert_dropout", 1.0, r"expert_dropout must be a number in \[0, 1\) \(0: off\), got 1.0"),
    ("expert_dropout", -0.5, r"expert_dropout must be a number in \[0, 1\)"),
    ("expert_dropout", "0.1", r"expert_dropout must be a number in \[0, 1\)"),
    ("expert_dropout_seed", -1, r"expert_dropout_seed must be an int in \[0, 2\^64\), got -1"),
    ("expert_dropout_seed", 2**64, r"expert_dropout_seed must be an int in \[0, 2\^64\)"),
    ("expert_dropout_seed", True, r"expert_dropout_seed must be an int"),
])
def test_bad_config_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, field: value})


def test_experts_without_row_hashes_are_refused():
    class Plain(GroupedExperts):
        takes_row_hashes = False

    cfg = MoEConfig(**BASE)
    with pytest.raises(ValueError, match="expert_dropout=0.3 needs experts that take row "
                                         "hashes"):
        MoELayer(cfg, experts=Plain(cfg))


def test_main_job_trains_with_expert_dropout():
    """One process: ``--expert-dropout`` changes the losses (it acts), is deterministic, and
    with ``--hf-model`` is refused naming the flag."""
    from moe_parallel import train

    argv = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads",
            "2", "--experts", "4", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
            "--steps", "2", "--log-every", "100"]
    runs = [train.main(argv + extra)["history"]
            for extra in ([], ["--expert-dropout", "0.3"], ["--expert-dropout", "0.3"])]
    assert runs[1] == runs[2]
    # the experts' share of the loss is small at initialisation, far above float64 noise
    assert all(abs(a - b) > 1e-9 for a, b in zip(runs[0], runs[1]))
    with pytest.raises(SystemExit):
        train._parse(argv + ["--expert-dropout", "0.3", "--hf-model", "/nonexistent"])
    with pytest.raises(SystemExit):
        train._parse(argv + ["--expert-dropout", "1.5"])


# ---------------------------------------------------------------- 4 gloo ranks (main job)

ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--clip", "0.05", "--lr", "0.01", "--expert-dropout", "0.3", "--seed", "3"]
LAYOUTS = [dict(ep=4), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, etp=2),
           dict(ep=4, dispatcher="allgather"), dict(ep=2, etp=2, dispatcher="allgather"),
           {"ep": 4, "dispatcher": "alltoall_hierarchical", "ranks-per-node": 2,
            "overlap-chunks": 2},
           {"ep": 2, "etp": 2, "expert-impl": "block_sparse", "recompute": "experts"}]


def _job(args, ps, model, source):
    """What ``train.job.prepare_expert_dropout`` reads of a job."""
    return SimpleNamespace(args=args, ps=ps, device=torch.device("cpu"), model=model,
                           source=source)


def dropout_steps_match(layout: dict, steps: int) -> dict[str, float]:
    """``steps`` training steps of the main job's model with expert dropout, on this layout
    and on one process on the global batch (the job's own per-step keys and step): the largest
    relative difference of the dp-mean loss and of the parameters."""
    from moe_parallel.distributed.parallel_state import ParallelState

    sizes = {k: v for k, v in layout.items() if k in ("tp", "ep", "etp")}
    if "ranks-per-node" in layout:
        with own_groups():
            return _match(layout, steps,
                          ParallelState.build(**sizes, ranks_per_node=layout["ranks-per-node"]))
    return _match(layout, steps, parallel_state(**sizes))


def _match(layout: dict, steps: int, ps) -> dict[str, float]:
    import torch.distributed as dist

    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState
    from moe_parallel.train.job import prepare_expert_dropout
    from tests.test_train_dist import _worst_error

    args = train._parse(ARGS + [f"--{k}={v}" for k, v in layout.items()])
    full_args = copy.copy(args)
    full_args.batch_size = args.batch_size * ps.dp
    single = ParallelState.single()
    dist_model, full_model = train.build_model(args, ps), train.build_model(args, single)
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (dist_model, full_model)]
    source = train.MarkovSource(args.vocab, seed=7)
    loss_err = 0.0
    for step in range(steps):
        batch = source.batch(args.batch_size * ps.dp, args.seq_len)
        prepare_expert_dropout(_job(args, ps, dist_model, source), step)
        loss, _ = train.train_step(dist_model, opts[0], train.local_batch(batch, ps), ps,
                                   args.clip)
        dist.all_reduce(loss, group=ps.group("dp"))
        prepare_expert_dropout(_job(full_args, single, full_model, source), step)
        full_loss, _ = train.train_step(full_model, opts[1], batch, single, args.clip)
        loss_err = max(loss_err, abs(float(loss) / ps.dp - float(full_loss)) / float(full_loss))
    return {"loss": loss_err, "params": _worst_error(dist_model, full_model, ps)}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
def test_training_with_expert_dropout_equals_one_process(layout):
    errors = get_pool(4).run(dropout_steps_match, layout, 2, timeout=300)
    for rank, err in enumerate(errors):
        assert err["loss"] < 1e-10 and err["params"] < 1e-10, (rank, err)
