"""MoEConfig.recompute ("none" | "activation" | "experts"): the same layer, less kept.

* Every mode equals "none" to 1e-12 (float64, relative): output, input gradient and every
  parameter gradient, for both expert computations, every activation, expert projection biases,
  capacity padding, scale_expert_input and pipelined chunks; on one process and on 4 gloo ranks
  (ep4, ep2 with edp2; all-to-all and all-gather dispatch).
* Bytes saved for backward (``benchmarks.memory.saved_tensor_bytes``, exact): each mode keeps
  strictly less than the one before it, by exactly the activation ``a`` (``N·F·s``) and then
  the first GEMM's output ``h`` (``N·F1·s``) of the ``N`` expert rows; the grouped FFN alone
  keeps exactly ``experts.memory.expert_saved_bytes``.
* A bad value is refused naming the field and the allowed values.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from benchmarks.memory import saved_tensor_bytes
from moe_parallel import MoEConfig, MoELayer
from moe_parallel.config.choices import RECOMPUTE_MODES
from moe_parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from moe_parallel.experts.grouped_ffn import grouped_ffn
from moe_parallel.experts.memory import expert_saved_bytes
from tests.helpers.dist_harness import get_pool, parallel_state

TOL = 1e-12
BASE = dict(hidden_size=12, ffn_hidden_size=8, num_experts=6, top_k=2,
            params_dtype=torch.float64, init_std=0.3)
CASES = {
    "swiglu": {},
    "clamped_swiglu": dict(activation="clamped_swiglu", swiglu_limit=0.5),
    "gelu": dict(activation="gelu"),
    "relu_top3": dict(activation="relu", top_k=3),
    "proj_bias": dict(activation="clamped_swiglu", expert_proj_bias=True),
    "capacity_padded": dict(capacity_factor=1.0, pad_to_capacity=True),
    "scale_expert_input": dict(scale_expert_input=True),
    "chunks_shared": dict(overlap_chunks=2, num_shared_experts=1),
    "wide_ffn": dict(ffn_hidden_size=16),  # F > H: the weights scale the second GEMM's output
}
IMPLS = ("grouped", "block_sparse")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    if b.numel() == 0:  # a rank without tokens
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _layer(cfg: MoEConfig, seed: int = 0, ps=None) -> MoELayer:
    """The layer of ``cfg`` from ``seed``, with random (nonzero) expert projection biases."""
    torch.manual_seed(seed)
    full = MoELayer(cfg)
    if cfg.expert_proj_bias:
        with torch.no_grad():
            full.experts.b1.normal_(0, 0.3)
            full.experts.b2.normal_(0, 0.3)
    return full if ps is None else MoELayer.shard_from(full, ps)


def _run(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(gy)
    out = {"output": y.detach(), "input_grad": x.grad}
    out.update({f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    return out


def _compare(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    return {k: _rel(got[k], want[k]) for k in want}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_equals_no_recompute(case, impl):
    cfg = MoEConfig(**{**BASE, **CASES[case], "expert_impl": impl})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, cfg.hidden_size, generator=gen, dtype=torch.float64)
    gy = torch.randn(10, cfg.hidden_size, generator=gen, dtype=torch.float64)
    want = _run(_layer(cfg), x, gy)
    assert all(v.abs().max() > 0 for v in want.values()), "a vacuous gradient"
    for mode in ("activation", "experts"):
        got = _run(_layer(cfg.replace(recompute=mode)), x, gy)
        for key, err in _compare(got, want).items():
            assert err <= TOL, f"{mode} {key}: relative error {err:.2e}"


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_each_mode_saves_less_by_exactly_what_it_recomputes(activation):
    cfg = MoEConfig(**BASE, activation=activation)
    T, s = 10, 8
    x = torch.randn(T, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    saved = {}
    for mode in RECOMPUTE_MODES:
        layer = _layer(cfg.replace(recompute=mode))
        saved[mode] = saved_tensor_bytes(partial(layer, x), layer.parameters())["activations"]
    N, F = T * cfg.top_k, cfg.ffn_hidden_size
    F1 = 2 * F if cfg.gated else F
    assert saved["none"] - saved["activation"] == N * F * s  # a = act(h)
    assert saved["activation"] - saved["experts"] == N * F1 * s  # h
    assert saved["experts"] > N * cfg.hidden_size * s  # the expert rows stay


def test_block_sparse_modes_save_strictly_less():
    cfg = MoEConfig(**BASE, expert_impl="block_sparse")
    x = torch.randn(10, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    saved = []
    for mode in RECOMPUTE_MODES:
        layer = _layer(cfg.replace(recompute=mode))
        saved.append(saved_tensor_bytes(partial(layer, x), layer.parameters())["activations"])
    assert saved[0] > saved[1] > saved[2] > 0, saved


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_grouped_ffn_keeps_exactly_the_documented_bytes(mode, activation):
    cfg = MoEConfig(**BASE, activation=activation, recompute=mode)
    gen = torch.Generator().manual_seed(5)
    sizes = torch.tensor([3, 0, 5, 1, 4, 2])
    N, H, F = int(sizes.sum()), cfg.hidden_size, cfg.ffn_hidden_size
    F1 = 2 * F if cfg.gated else F
    x = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(6, H, F1, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(6, F, H, generator=gen, dtype=torch.float64, requires_grad=True)
    saved = saved_tensor_bytes(lambda: grouped_ffn(x, w1, w2, sizes, cfg, w), [w1, w2])
    assert saved["activations"] == expert_saved_bytes(cfg, N)
    assert saved["params"] == (w1.numel() + w2.numel()) * 8


@pytest.mark.parametrize("ffn", [8, 20])  # F < H and F > H (the weights scale a, or a·w2)
def test_grouped_ffn_gradients_match_autograd_of_the_formula(ffn):
    """y[i] = w[i]·(act(x_e w1[e] + b1[e]) w2[e] + b2[e]) by per-expert autograd, float64."""
    from moe_parallel.experts.activation import activate

    cfg = MoEConfig(**{**BASE, "ffn_hidden_size": ffn}, activation="clamped_swiglu",
                    swiglu_limit=0.7, expert_proj_bias=True)
    gen = torch.Generator().manual_seed(9)
    sizes = torch.tensor([4, 0, 3, 6, 1, 2])
    N, H, F, E = int(sizes.sum()), cfg.hidden_size, cfg.ffn_hidden_size, 6

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, w, w1, w2, b1, b2 = leaf(N, H), leaf(N), leaf(E, H, 2 * F), leaf(E, F, H), \
        leaf(E, 2 * F), leaf(E, H)
    gy = torch.randn(N, H, generator=gen, dtype=torch.float64)
    leaves = [x, w, w1, w2, b1, b2]
    parts, start = [], 0
    for e, n in enumerate(sizes.tolist()):
        rows = slice(start, start + n)
        h = x[rows] @ w1[e] + b1[e]
        parts.append(w[rows, None] * (activate(h, cfg) @ w2[e] + b2[e]))
        start += n
    want = torch.autograd.grad(torch.cat(parts), leaves, gy)
    for mode in RECOMPUTE_MODES:
        y = grouped_ffn(x, w1, w2, sizes, cfg, w, b1, b2, recompute=mode)
        assert _rel(y, torch.cat(parts)) <= TOL
        got = torch.autograd.grad(y, leaves, gy)
        for name, g, r in zip(["x", "w", "w1", "w2", "b1", "b2"], got, want):
            assert _rel(g, r) <= TOL, f"{mode} grad {name}"


def test_bad_recompute_is_refused():
    with pytest.raises(ValueError, match=r"recompute must be one of \('none', 'activation', "
                                         r"'experts'\), got 'moe_act'"):
        MoEConfig(**BASE, recompute="moe_act")


# ---- 4 gloo ranks ---------------------------------------------------------------------------

TOKENS = [7, 0, 11, 4]
LAYOUTS = {"ep4": dict(ep=4), "ep2_edp2": dict(ep=2)}
DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
DIST_CASES = {  # num_experts divisible by 4
    "top2": dict(top_k=2, num_experts=4),
    "fine_shared": dict(num_experts=8, top_k=4, ffn_hidden_size=4, num_shared_experts=1),
    "capacity": dict(top_k=2, num_experts=4, capacity_factor=1.0, pad_to_capacity=True),
    "block_sparse": dict(top_k=2, num_experts=4, expert_impl="block_sparse"),
}


def run_modes(layout: str) -> dict:
    """On every rank: {(dispatcher, case, mode): {metric: relative error vs "none"}}."""
    ps = parallel_state(**LAYOUTS[layout])
    rank = dist.get_rank()
    out = {}
    for dname, cls in DISPATCHERS.items():
        for name, case in DIST_CASES.items():
            cfg = MoEConfig(**{**BASE, **case})
            gen = torch.Generator().manual_seed(10 + rank)
            x = torch.randn(TOKENS[rank], cfg.hidden_size, generator=gen, dtype=torch.float64)
            gy = torch.randn(TOKENS[rank], cfg.hidden_size, generator=gen, dtype=torch.float64)
            results = {}
            for mode in RECOMPUTE_MODES:
                layer = _layer(cfg.replace(recompute=mode), seed=1, ps=ps)
                layer.dispatcher = cls(cfg.num_experts, ps)
                results[mode] = _run(layer, x, gy)
            for mode in ("activation", "experts"):
                out[dname, name, mode] = _compare(results[mode], results["none"])
            out[dname, name, "nonzero"] = {
                k: float(v.abs().max()) for k, v in results["none"].items() if v.numel()}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_mode_equals_no_recompute_on_4_ranks(layout):
    per_rank = get_pool(4).run(run_modes, layout, timeout=120)
    for rank, metrics in enumerate(per_rank):
        for (dname, name, mode), errs in metrics.items():
            if mode == "nonzero":
                continue
            for key, err in errs.items():
                assert err <= TOL, f"rank {rank} {dname} {name} {mode} {key}: {err:.2e}"
    for dname in DISPATCHERS:  # not vacuous: the expert gradients are nonzero somewhere
        for name in DIST_CASES:
            for key in ("grad experts.w1", "grad experts.w2", "grad router.weight"):
                assert max(m[dname, name, "nonzero"].get(key, 0.0) for m in per_rank) > 0
