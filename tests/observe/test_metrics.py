"""Router metrics across ranks (``moe_parallel.observe.metrics``): every figure against counts
and formulas computed here in float64, on one process and on 4 gloo ranks (ep2·dp2, tp2·ep2,
tp2·ep4) against the one-process model on the whole batch; one collective per logging step and
none on the others."""

from __future__ import annotations

import sys

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.observe import RouterMetrics, collect_layer_metrics
from tests.helpers.dist_harness import get_pool, own_groups, parallel_state

E = 8


def reference(logits: torch.Tensor, expert_idx: torch.Tensor, keep, *, aux: float = 0.0,
              z: float = 0.0) -> dict:
    """The figures of one layer from its routing, computed from scratch in float64."""
    T, k = expert_idx.shape
    keep = torch.ones_like(expert_idx, dtype=torch.bool) if keep is None else keep
    routed = torch.bincount(expert_idx.reshape(-1), minlength=E)
    processed = torch.bincount(expert_idx[keep], minlength=E)
    c = processed.double()
    mean = c.sum() / E
    logits = logits.detach().double()
    p = torch.softmax(logits, dim=-1)
    out = {
        "tokens": T, "routed_per_expert": routed.tolist(), "tokens_per_expert": processed.tolist(),
        "dropped": int(routed.sum() - processed.sum()),
        "drop_rate": float((routed.sum() - processed.sum()).double() / routed.sum()),
        "imbalance": float(c.max() / mean), "min_over_mean": float(c.min() / mean),
        "cv": float(((c - mean) ** 2).mean().sqrt() / mean),
        "max_load": int(c.max()), "min_load": int(c.min()),
        "router_entropy": float(-(p * p.log()).sum(-1).mean()),
    }
    if z:
        out["loss_z"] = float(z * torch.logsumexp(logits, -1).square().mean())
    if aux:
        f = routed.double() / (T * k)
        out["loss_aux"] = float(aux * E * (f * p.mean(0)).sum())
    return out


def check(got: dict, want: dict) -> None:
    """Counts exactly, floats to 1e-12 relative."""
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (key, got[key], value)
        else:
            assert got[key] == value, (key, got[key], value)


def _config(**kw) -> MoEConfig:
    return MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=E, params_dtype=torch.float64,
                     init_std=0.5, **kw)


def test_one_process_figures_equal_float64_formulas():
    torch.manual_seed(0)
    capped = MoELayer(_config(top_k=2, capacity_factor=1.0, aux_loss_coeff=0.01,
                              z_loss_coeff=0.001))
    dynamic = MoELayer(_config(top_k=3, top_p=0.5, z_loss_coeff=0.002))
    watch = RouterMetrics([capped, dynamic])
    x = torch.randn(40, 16, dtype=torch.float64)
    _, aux_a = capped(x, return_aux=True)
    _, aux_b = dynamic(torch.randn(3, 10, 16, dtype=torch.float64), return_aux=True)
    got = watch.collect()
    watch.close()
    ra, rb = aux_a.routing, aux_b.routing
    want_a = reference(ra.logits, ra.expert_idx, ra.keep, aux=0.01, z=0.001)
    assert want_a["dropped"] > 0 and want_a["imbalance"] > 1.0  # capacity drops, uneven load
    check(got[0], want_a | {"layer": 0, "experts_per_token": 2.0, "ranks": 1})
    assert "loss_seq_aux" not in got[0] and "loss_dynamic" not in got[0]
    # top-p: experts per token vary; nothing dropped, so processed = the kept selections
    kept = rb.keep.sum(1)
    want_b = reference(rb.logits, rb.expert_idx, rb.keep, z=0.002)
    want_b["routed_per_expert"] = want_b["tokens_per_expert"]
    want_b["dropped"], want_b["drop_rate"] = 0, 0.0
    check(got[1], want_b | {"layer": 1, "experts_per_token": float(kept.double().mean()),
                            "experts_per_token_histogram":
                                torch.bincount(kept, minlength=4).tolist()})
    assert len(set(kept.tolist())) > 1
    # without the watcher: the same counts, no entropy
    plain = collect_layer_metrics([capped, dynamic])
    assert plain[0]["router_entropy"] is None
    assert plain[0]["tokens_per_expert"] == got[0]["tokens_per_expert"]


def test_a_layer_that_never_ran_is_named():
    with pytest.raises(ValueError, match="MoE layer 0 has run no forward"):
        collect_layer_metrics([MoELayer(_config())])


# ---- across ranks ------------------------------------------------------------------------------

ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", str(E), "--top-k", "2", "--vocab", "32", "--seq-len", "8",
        "--batch-size", "2", "--capacity-factor", "0", "--aux-loss-coeff", "0",
        "--z-loss-coeff", "0.01"]


def _capture_routers(model) -> list[list]:
    """Every router forward's (logits, expert_idx) of ``model``'s layers, per layer."""
    seen: list[list] = [[] for _ in model.moe_layers()]
    for i, layer in enumerate(model.moe_layers()):
        layer.router.register_forward_hook(
            lambda _m, _i, out, i=i: seen[i].append((out[0].logits.detach().clone(),
                                                     out[0].expert_idx.clone())))
    return seen


def _across_ranks(layout: dict) -> list:
    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState

    ps = parallel_state(**layout)
    args = train._parse(ARGS + [f"--{k}={v}" for k, v in layout.items()])
    model, full = train.build_model(args, ps), train.build_model(args, ParallelState.single())
    seen = _capture_routers(full)
    watch = RouterMetrics(model, ps)
    batch = train.MarkovSource(args.vocab, seed=3).batch(args.batch_size * ps.dp,
                                                         args.seq_len)[:, :-1]
    model(train.local_batch(batch, ps))
    full(batch)
    got = watch.collect()
    watch.close()
    for i, layer_seen in enumerate(seen):
        (logits, idx), = layer_seen
        want = reference(logits, idx, None, z=0.01)
        assert want["imbalance"] > 1.0
        check(got[i], want | {"layer": i, "tokens": batch.numel(), "experts_per_token": 2.0,
                              "ranks": 4, "dropped": 0, "drop_rate": 0.0})
    return got


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2, ep=2), dict(tp=2, ep=4)])
def test_global_figures_equal_the_one_process_model_on_the_whole_batch(layout):
    """Each token counted once: ep2·dp2 sums data shards, tp2 ranks route distinct slices."""
    got = get_pool(4).run(_across_ranks, layout, timeout=120)
    assert all(g == got[0] for g in got)  # every rank returns the same figures


def _count_collectives(steps: int, log_every: int, root: str) -> tuple[int, int]:
    """(every all_reduce/all_gather-type call of a run, those made by observe.metrics)."""
    import torch.distributed as dist

    from moe_parallel import train

    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all",
             "all_to_all_single", "broadcast", "reduce_scatter_tensor", "all_gather_object",
             "barrier")
    calls = {"all": 0, "metrics": 0}
    saved = {n: getattr(dist, n) for n in names}

    def wrap(fn):
        def counted(*a, **kw):
            calls["all"] += 1
            calls["metrics"] += sys._getframe(1).f_globals["__name__"] == (
                "moe_parallel.observe.metrics")
            return fn(*a, **kw)
        return counted

    flags = ARGS + ["--ep", "2", "--steps", str(steps), f"--log-every={log_every}",
                    f"--metrics-jsonl={root}/m{log_every}.jsonl"]
    try:
        for n in names:
            setattr(dist, n, wrap(saved[n]))
        with own_groups():
            train.main(flags)
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return calls["all"], calls["metrics"]


@pytest.mark.distributed
def test_one_collective_per_logging_step_and_none_on_the_others(tmp_path):
    pool = get_pool(2)
    every = pool.run(_count_collectives, 4, 1, str(tmp_path), timeout=120)  # 4 logging steps
    ends = pool.run(_count_collectives, 4, 100, str(tmp_path), timeout=120)  # steps 0 and 3
    assert [m for _, m in every] == [4, 4] and [m for _, m in ends] == [2, 2]
    assert [a - b for (a, _), (b, _) in zip(every, ends)] == [2, 2]
    lines = (tmp_path / "m1.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank 0 alone writes


def _unwritable_sinks(root: str) -> str:
    import torch.distributed as dist

    from moe_parallel import train

    blocker = f"{root}/a_file"
    if dist.get_rank() == 0:
        open(blocker, "w").close()  # a file where the sink wants a folder
    flags = ARGS + ["--ep", "2", "--steps", "2", f"--metrics-jsonl={blocker}/m.jsonl"]
    try:
        with own_groups():
            train.main(flags)
    except SystemExit as e:
        return str(e)
    return "no error"


@pytest.mark.distributed
def test_a_sink_rank_0_cannot_open_stops_every_rank(tmp_path):
    got = get_pool(2).run(_unwritable_sinks, str(tmp_path), timeout=120)
    assert got[0].startswith("rank 0: cannot open the metric sinks") and "a_file" in got[0]
    assert got[1].startswith("rank 1: rank 0 could not open the metric sinks"), got[1]
