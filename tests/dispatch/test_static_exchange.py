"""``MoEConfig.static_exchange``: padded capacity over all-to-all with static splits.

Every rank sends every expert exactly ``C = ceil(T·k/E · capacity_factor)`` rows (padding
included), so the splits, group sizes and buffer shapes follow from the config and the token
count alone: no count exchange, and with ``verdict_scope="none"`` and ``check_finite=False`` no
host read in forward or backward (counted here: ``item``, ``tolist``, ``bool``, ``int``,
``float``, ``index``, ``nonzero`` on any tensor inside the package, 0 per step; the default
verdict's read is seen by the same counter).
* Ranks with different token counts: ``ValueError`` on every rank (through the verdict).
* ``torch.compile(layer, fullgraph=True)`` on 4 gloo ranks (ep4, tp2·ep2, ep2·etp2): forward
  and backward trace without a graph break (the exchanges are functional collectives) and equal
  eager, 1e-12 in float64.

* Nothing overflows (``capacity_factor = E / k``, so ``C = T``): output, input gradient and
  every parameter gradient equal the dynamic dropless layer's, 1e-12 in float64, on 4 ranks
  (ep4, ep2·dp2, tp2·ep2, ep2·etp2) and 8 ranks (ep8, tp2·ep4, ep4·etp2, ep2·etp2·dp2).
* Overflow (``capacity_factor`` 0.5): the excess is dropped by the drop policy and counted on
  the device (``RoutingStats.dropped``, read when logged); the result equals the one-process
  capacity layer on each rank's tokens.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from tests.helpers.dist_harness import get_pool, own_groups, parallel_state

E, K, H = 8, 2, 8
BASE = dict(hidden_size=H, ffn_hidden_size=8, num_experts=E, top_k=K,
            params_dtype=torch.float64, init_std=0.5)
STATIC = dict(capacity_factor=E / K, pad_to_capacity=True, static_exchange=True)
T = 9  # tokens per rank: the same on every rank, as static_exchange requires
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _data(rank: int):
    gen = torch.Generator().manual_seed(30 + rank)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def _step(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y, aux = layer(xg, return_aux=True)
    y.backward(gy)
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}, aux


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _layers(layout: dict, **changes):
    ps = parallel_state(**layout)
    out = []
    for extra in ({}, {**STATIC, **changes}):
        torch.manual_seed(7)
        layer = MoELayer.shard_from(MoELayer(MoEConfig(**BASE, **extra)), ps)
        layer.train()
        out.append(layer)
    return out


def run_equal_to_dropless(layouts: list[dict]) -> list[dict]:
    rank = dist.get_rank()
    x, gy = _data(rank)
    results = []
    for layout in layouts:
        dropless, static = _layers(layout)
        y0, gx0, g0, aux0 = _step(dropless, x, gy)
        y1, gx1, g1, aux1 = _step(static, x, gy)
        errs = [_rel(y1, y0), _rel(gx1, gx0)] + [_rel(g1[n], g0[n]) for n in g0]
        results.append({"err": max(errs), "dropped": aux1.stats.dropped,
                        "rows": aux1.stats.expert_rows, "capacity": static.capacity(len(x))})
    return results


LAYOUTS_4 = [dict(ep=4), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, etp=2)]
LAYOUTS_8 = [dict(ep=8), dict(tp=2, ep=4), dict(ep=4, etp=2), dict(ep=2, etp=2)]


@pytest.mark.distributed
@pytest.mark.parametrize("world,layouts", [(4, LAYOUTS_4), (8, LAYOUTS_8)], ids=["4", "8"])
def test_static_equals_dropless_when_nothing_overflows(world, layouts):
    pool = get_pool(world)
    try:
        per_rank = pool.run(run_equal_to_dropless, layouts, timeout=300)
    finally:
        if world == 8:
            pool.close()  # an idle 8-rank pool keeps its gloo threads
    for rank, results in enumerate(per_rank):
        for layout, got in zip(layouts, results):
            assert got["dropped"] == 0 and got["capacity"] == T, (rank, layout, got)
            assert got["err"] <= 1e-12, (rank, layout, got)


def run_overflow() -> dict:
    rank = dist.get_rank()
    x, gy = _data(rank)
    ps = parallel_state(ep=4)
    cfg = MoEConfig(**BASE, **{**STATIC, "capacity_factor": 0.5, "drop_policy": "probs"})
    torch.manual_seed(8)
    full = MoELayer(cfg)
    full.train()
    layer = MoELayer.shard_from(full, ps)
    layer.train()
    y1, gx1, _, aux1 = _step(layer, x, gy)
    y0, gx0, _, aux0 = _step(full, x, gy)  # one process, this rank's tokens: the same drops
    return {"dropped": (aux1.stats.dropped, aux0.stats.dropped),
            "err": max(_rel(y1, y0), _rel(gx1, gx0))}


@pytest.mark.distributed
def test_overflow_drops_by_policy_and_counts_on_the_device():
    for rank, got in enumerate(get_pool(4).run(run_overflow, timeout=120)):
        assert got["dropped"][0] == got["dropped"][1] > 0, (rank, got)
        assert got["err"] <= 1e-12, (rank, got)


def host_reads(step) -> dict[str, int]:
    """The host reads inside the package while ``step()`` runs, counted by site."""
    sites: collections.Counter = collections.Counter()
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def counted(name, fn):
        def read(self, *args, **kwargs):
            ours = [f for f in traceback.extract_stack()[:-1] if "/moe_parallel/" in f.filename]
            if ours:
                f = ours[-1]
                sites[f"{name} {f.filename.split('moe_parallel/')[-1]}:{f.lineno}"] += 1
            return fn(self, *args, **kwargs)
        return read

    try:
        for n in READS:
            setattr(torch.Tensor, n, counted(n, saved[n]))
        step()
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)
    return dict(sites)


def run_host_reads(layout: dict, sync_free: bool = True) -> dict[str, int]:
    """Host reads inside the package during one static step (forward and backward), by site;
    ``sync_free=False``: with the default verdict and finiteness check."""
    extra = dict(verdict_scope="none", check_finite=False) if sync_free else {}
    _, static = _layers(layout, **extra)
    x, gy = _data(dist.get_rank())
    _step(static, x, gy)  # the first forward compares the ranks' configs (a collective)

    def step():
        with own_groups():
            _step(static, x, gy)
    return host_reads(step)


def test_a_one_process_static_step_reads_nothing_back():
    """One process (the layer a single GPU captures in a CUDA graph): the padded dispatch takes
    its group sizes from C and reads nothing back; the dropless one reads its counts."""
    x, gy = _data(0)
    for extra, want_none in (({**STATIC, "verdict_scope": "none", "check_finite": False}, True),
                             ({"verdict_scope": "none", "check_finite": False}, False)):
        torch.manual_seed(7)
        layer = MoELayer(MoEConfig(**BASE, **extra))
        _step(layer, x, gy)
        sites = host_reads(lambda layer=layer: _step(layer, x, gy))
        assert (sites == {}) == want_none, (extra, sites)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(ep=4), dict(tp=2, ep=2), dict(ep=2, etp=2)],
                         ids=["ep4", "tp2-ep2", "ep2-etp2"])
def test_a_static_step_reads_nothing_back(layout):
    per_rank = get_pool(4).run(run_host_reads, layout, timeout=120)
    assert per_rank == [{}] * 4, per_rank
    # the counter sees reads: the default verdict reads its all-gathered table every forward
    default = get_pool(4).run(run_host_reads, dict(ep=4), False, timeout=120)
    assert all(any("agreement.py" in site for site in got) for got in default), default


def run_unequal_tokens() -> str:
    rank = dist.get_rank()
    _, static = _layers(dict(ep=4))
    x = torch.randn(T + (rank == 2), H, dtype=torch.float64)
    try:
        static(x)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.distributed
def test_unequal_token_counts_are_refused_on_every_rank():
    for got in get_pool(4).run(run_unequal_tokens, timeout=120):
        assert "static_exchange needs the same number of tokens on every rank" in got, got
        assert "2: 10" in got, got


def run_fullgraph(layout: dict) -> float:
    """Max difference of output and every gradient between the eager static layer and the
    same layer under ``torch.compile(fullgraph=True)`` (functional collectives, aot_eager)."""
    import torch._dynamo

    eager, compiled = (_layers(layout, verdict_scope="none", check_finite=False,
                               aux_loss_coeff=0.01)[1] for _ in range(2))
    x, gy = _data(dist.get_rank())
    compiled(x)  # the first forward compares the ranks' configs, eagerly
    torch._dynamo.reset()
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    try:
        y0, gx0, g0, _ = _step(eager, x, gy)
        compiled.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y1 = run(xg)
        y1.backward(gy)
        return max([_rel(y1.detach(), y0), _rel(xg.grad, gx0)]
                   + [_rel(p.grad, g0[n]) for n, p in compiled.named_parameters()])
    finally:
        torch._dynamo.reset()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(ep=4), dict(tp=2, ep=2), dict(ep=2, etp=2)],
                         ids=["ep4", "tp2-ep2", "ep2-etp2"])
def test_static_step_compiles_with_fullgraph_across_ranks(layout):
    for rank, err in enumerate(get_pool(4).run(run_fullgraph, layout, timeout=300)):
        assert err <= 1e-12, (rank, err)
