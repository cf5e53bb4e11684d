"""Freezing under expert parallelism on 4 gloo ranks (float64).

* The main job's model with each freezing (routed experts, routers, the dense part, whole MoE
  layers, and combinations) trains 2 AdamW steps (gradient sync, clipping by the global norm)
  exactly as one process does on all ranks' tokens (relative error 1e-10: the parameters, the
  trainable ones' synced gradients, the global norm) on ep4, ep2·dp2, tp2·ep2, ep2·etp2, with
  the all-to-all and all-gather dispatchers, grouped and block-sparse experts, ``--shard
  optimizer`` and ``--shard experts`` (FSDP2); the frozen parameters stay bitwise unchanged
  without a gradient, every trainable one moves. The main job itself (``train.main``) on
  ep2·dp2 with ``--shard experts --freeze experts``.
* A layer with shared experts and expert biases under ``wrap_ddp``: the same parity.
* No wasted work, counted with ``torch.profiler`` in the backward: no weight-gradient op of
  frozen experts (``moe_parallel::grouped_gemm_wgrad`` / ``bsr_wgrad``, with the extension);
  the exchanges whose gradient no rank needs are not run (an input without gradient: not the
  dispatch's; a frozen router too: not the routing weights'), while a rank whose own input needs
  none still joins them when another rank's does; ``sync_gradients`` all-reduces exactly the
  trainable parameters; FSDP2 reduce-scatters only units holding a trainable parameter.
* Freezing that differs between ranks is refused on every rank, without a hang: in an MoE
  layer at its first forward, in the dense part at ``sync_gradients``, and by ``wrap_ddp``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from moe_parallel import ops
from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

TOL = 1e-10
ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--clip", "1e-4", "--lr", "0.01"]
E, R, D, M = ("experts",), ("router",), ("dense",), ("moe",)
RD, ED = ("router", "dense"), ("experts", "dense")
FREEZINGS = [E, R, D, M, RD, ED]
# layout -> (flags, freezings): every freezing on ep2·dp2, two or three on each other layout
LAYOUTS = {
    "ep2_dp2": (["--ep", "2"], FREEZINGS),
    "ep4": (["--ep", "4"], [E, RD]),
    "tp2_ep2": (["--tp", "2", "--ep", "2"], [D, M, ED]),
    "tp2_ep2_allgather": (["--tp", "2", "--ep", "2", "--dispatcher", "allgather"], [R, ED]),
    "ep2_etp2": (["--ep", "2", "--etp", "2"], [E, RD]),
    "ep2_etp2_block_sparse": (["--ep", "2", "--etp", "2", "--expert-impl", "block_sparse"],
                              [D, E]),
    "ep4_allgather_block_sparse": (["--ep", "4", "--dispatcher", "allgather",
                                    "--expert-impl", "block_sparse"], [RD, M]),
    "ep2_dp2_shard_optimizer": (["--ep", "2", "--shard", "optimizer"], [E, D, RD]),
    "ep2_dp2_shard_experts": (["--ep", "2", "--shard", "experts"], [E, RD, M]),
}


def _whole(p: torch.Tensor) -> torch.Tensor:
    """This rank's value of a parameter (an FSDP2 shard gathered over its mesh)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _slice(full: dict[str, torch.Tensor], name: str, ps) -> torch.Tensor:
    """The one-process tensor ``full[name]`` (a parameter or its gradient) as this rank holds
    it: routed experts' ``w1``/``w2`` sliced to its (EP, ETP) shard."""
    from moe_parallel.experts import shard_expert_weights

    if not name.endswith(("experts.w1", "experts.w2")):
        return full[name]
    prefix = name.rsplit(".", 1)[0]
    w1, w2 = shard_expert_weights(full[prefix + ".w1"], full[prefix + ".w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, gated=True)
    return w1 if name.endswith("w1") else w2


def _train_frozen(flags: list[str], freezings: list[tuple[str, ...]]) -> dict[str, tuple]:
    """Per freezing, after 2 steps: (largest relative error of a parameter, and of a trainable
    parameter's last gradient, against one process; relative error of the global norm; frozen
    parameters bitwise unchanged and without a gradient; every trainable one changed)."""
    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState
    from moe_parallel.train.freeze import freeze

    args = train._parse(ARGS + flags)
    ps = parallel_state(tp=args.tp, ep=args.ep, etp=args.etp)
    single = ParallelState.single()
    results = {}
    for parts in freezings:
        model, full = train.build_model(args, ps), train.build_model(args, single)
        freeze(model, parts)
        freeze(full, parts)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        model = train.shard_for_memory(model, args.shard, ps)
        opt, full_opt = train.build_optimizer(model, args, ps), train.build_optimizer(
            full, args, single)
        source = train.MarkovSource(args.vocab, seed=7)
        norm_err = 0.0
        for _ in range(2):
            batch = source.batch(args.batch_size * ps.dp, args.seq_len)
            _, norm = train.train_step(model, opt, train.local_batch(batch, ps), ps, args.clip)
            _, full_norm = train.train_step(full, full_opt, batch, single, args.clip)
            assert float(full_norm) > args.clip  # clipping is active: the norm matters
            norm_err = max(norm_err, abs(float(norm) - float(full_norm)) / float(full_norm))
        want = {n: p.detach() for n, p in full.named_parameters()}
        want_grad = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
        worst = grad_worst = 0.0
        same = moved = True
        for name, p in model.named_parameters():
            got, ref = _whole(p), _slice(want, name, ps)
            worst = max(worst, float((got - ref).norm() / ref.norm()))
            if name in frozen:
                same = same and torch.equal(got, before[name]) and p.grad is None
                same = same and name not in want_grad
            else:
                moved = moved and not torch.equal(got, before[name])
                ref_grad = _slice(want_grad, name, ps)
                grad_worst = max(grad_worst,
                                 float((_whole(p.grad) - ref_grad).norm() / ref_grad.norm()))
        results[",".join(parts)] = (worst, grad_worst, norm_err, same, moved)
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_frozen_training_equals_one_process(layout):
    flags, freezings = LAYOUTS[layout]
    for rank, results in enumerate(get_pool(4).run(_train_frozen, flags, freezings,
                                                    timeout=300)):
        assert set(results) == {",".join(f) for f in freezings}
        for parts, (worst, grad_worst, norm_err, same, moved) in results.items():
            assert worst < TOL, (rank, parts, worst)
            assert grad_worst < TOL, (rank, parts, grad_worst)
            assert norm_err < TOL, (rank, parts, norm_err)
            assert same, (rank, parts, "a frozen parameter changed or has a gradient")
            assert moved, (rank, parts, "a trainable parameter did not change")


# ---- a layer with shared experts and expert biases, under wrap_ddp --------------------------

LAYER_CFG = dict(num_shared_experts=1, expert_proj_bias=True)
LAYER_FREEZINGS = [("experts",), ("dense",), ("router", "experts"), ("moe",)]


def _ddp_frozen(parts: tuple[str, ...]) -> dict[str, float]:
    """``wrap_ddp`` + ``sync_gradients(dense=False)`` on ep2·dp2 with ``parts`` frozen: each
    parameter's relative error against one process after 2 SGD steps (frozen ones included)."""
    from moe_parallel.distributed import sync_gradients, wrap_ddp
    from moe_parallel.experts import shard_expert_weights
    from moe_parallel.experts.grouped import shard_expert_bias
    from moe_parallel.train.freeze import freeze
    from tests.helpers.training_parity import STEPS, data, loss, nets

    ps = parallel_state(ep=2)
    full, model = nets(ps, **LAYER_CFG)
    freeze(full, parts)
    freeze(model, parts)
    ddp = wrap_ddp(model, ps)
    world = dist.get_world_size()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        loss(ddp, *data(step, dist.get_rank())).backward()
        sync_gradients(model, ps, dense=False)
        opt.step()
        ref_opt.zero_grad()
        # one process runs every rank's forward: the layer's aux loss weighs each 1/world
        full.moe.aux_loss_scale = 1.0 / world
        sum(loss(full, *data(step, r)) for r in range(world)).div(world).backward()
        ref_opt.step()
    want = {n: p.detach() for n, p in full.named_parameters()}
    w1, w2 = shard_expert_weights(want["moe.experts.w1"], want["moe.experts.w2"], ps.ep_rank,
                                  ps.ep, 0, 1, True)
    want.update({"moe.experts.w1": w1, "moe.experts.w2": w2,
                 "moe.experts.b1": shard_expert_bias(want["moe.experts.b1"], ps.ep_rank, ps.ep),
                 "moe.experts.b2": shard_expert_bias(want["moe.experts.b2"], ps.ep_rank, ps.ep)})
    errors = {}
    for name, p in model.named_parameters():
        ref = want[name]
        scale = float(ref.norm()) or 1.0  # the biases start at zero
        errors[name] = float((p.detach() - ref).norm()) / scale
    return errors


@pytest.mark.parametrize("parts", LAYER_FREEZINGS, ids=",".join)
def test_frozen_layer_under_wrap_ddp_equals_one_process(parts):
    for rank, errors in enumerate(get_pool(4).run(_ddp_frozen, parts, timeout=120)):
        # inp weight/bias, router, experts w1/w2/b1/b2, shared w1/w2, out weight/bias
        assert len(errors) == 11, errors
        for name, err in errors.items():
            assert err < TOL, (rank, parts, name, err)


# ---- no wasted work ---------------------------------------------------------------------------

# name -> (frozen parts of the layer, ranks whose input requires grad)
SCENARIOS = {
    "trainable": ((), (0, 1, 2, 3)),
    "experts_frozen": (("experts",), (0, 1, 2, 3)),
    "input_without_grad": ((), ()),
    "input_without_grad_router_frozen": (("router",), ()),
    "input_without_grad_routed_part_frozen": (("router", "experts"), ()),
    "input_without_grad_on_rank_2_only": ((), (0, 1, 3)),
}


def _backward_counts(impl: str) -> dict[str, dict[str, int]]:
    """Per scenario: this rank's backward (profiled) exchanges, collectives and weight-gradient
    ops of an ep2·dp2 layer (shared experts, expert biases), and the all-reduces of
    ``sync_gradients`` (one parameter per bucket) against its trainable parameters, with every
    frozen parameter holding a stale gradient (as if frozen after a step)."""
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.distributed import global_grad_norm, sync_gradients
    from moe_parallel.train.freeze import freeze

    ps = parallel_state(ep=2)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2,
                    params_dtype=torch.float64, init_std=0.3, expert_impl=impl, block_size=4,
                    num_shared_experts=1, expert_proj_bias=True)
    wgrad = "moe_parallel::bsr_wgrad" if impl == "block_sparse" else \
        "moe_parallel::grouped_gemm_wgrad"
    out = {}
    for name, (parts, with_grad) in SCENARIOS.items():
        torch.manual_seed(0)
        layer = MoELayer(cfg, parallel_state=ps)
        if parts:
            freeze(layer, parts)
        x = torch.randn(5 + dist.get_rank(), 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(dist.get_rank()))
        x.requires_grad_(dist.get_rank() in with_grad)
        y = layer(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            (y.square().sum() + 0.0).backward()
        bwd = Counter(e.name for e in prof.events())
        expert_grads = sum(p.grad is not None for p in layer.experts.parameters())
        stale = [p for p in layer.parameters() if not p.requires_grad]
        for p in stale:  # as if frozen after a step: a gradient no one may reduce or count
            p.grad = torch.ones_like(p)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sync_gradients(layer, ps, bucket_mb=1e-6)  # one parameter per bucket
        sync = Counter(e.name for e in prof.events())
        norm = float(global_grad_norm(layer, ps))
        for p in stale:
            p.grad = None
        out[name] = {
            "exchanges": bwd["_AllToAllBackward"],
            "all_to_all": bwd["c10d::alltoall_base_"],
            "wgrad": bwd[wgrad],
            "expert_grads": expert_grads,
            "all_reduce": sync["c10d::allreduce_"],
            "trainable": sum(p.requires_grad for p in layer.parameters()),
            "norm_unchanged_by_stale_grads": norm == float(global_grad_norm(layer, ps)),
        }
    return out


_COUNTS: dict[str, list] = {}


def _counts(impl: str) -> list[dict[str, dict[str, int]]]:
    if impl not in _COUNTS:
        _COUNTS[impl] = get_pool(4).run(_backward_counts, impl, timeout=120)
    return _COUNTS[impl]


@pytest.mark.parametrize("impl", ["grouped", "block_sparse"])
def test_backward_runs_only_the_exchanges_some_rank_needs(impl):
    for rank, counts in enumerate(_counts(impl)):
        per = {name: c["exchanges"] for name, c in counts.items()}
        # combine, routing weights, tokens: the dispatch's backward only when an input needs it
        assert per == {"trainable": 3, "experts_frozen": 3, "input_without_grad": 2,
                       "input_without_grad_router_frozen": 1,
                       "input_without_grad_routed_part_frozen": 0,
                       "input_without_grad_on_rank_2_only": 3}, (rank, per)
        # 4 local experts on CPU: one all-to-all per local expert and exchange
        for name, c in counts.items():
            assert c["all_to_all"] == 4 * c["exchanges"], (rank, name, c)


@pytest.mark.parametrize("impl", ["grouped", "block_sparse"])
def test_sync_gradients_all_reduces_the_trainable_parameters_only(impl):
    for rank, counts in enumerate(_counts(impl)):
        for name, c in counts.items():
            # ep2·dp2: experts over EDP (2 ranks), router and shared expert over DP (2 ranks);
            # frozen parameters holding a stale gradient are neither reduced nor counted
            assert c["all_reduce"] == c["trainable"], (rank, name, c)
            assert c["norm_unchanged_by_stale_grads"], (rank, name, c)
        assert counts["trainable"]["trainable"] == 7  # router, w1, w2, b1, b2, shared w1, w2
        assert counts["experts_frozen"]["expert_grads"] == 0


@pytest.mark.skipif(not ops.has_extension(), reason="counts the moe_parallel._C wgrad ops")
@pytest.mark.parametrize("impl", ["grouped", "block_sparse"])
def test_frozen_experts_run_no_weight_gradient_op(impl):
    for rank, counts in enumerate(_counts(impl)):
        wgrad = {name: c["wgrad"] for name, c in counts.items()}
        frozen = {n for n, (parts, _) in SCENARIOS.items() if "experts" in parts}
        for name, n in wgrad.items():
            if name in frozen:
                assert n == 0, (rank, name, wgrad)
            else:  # both expert GEMMs, whether or not any row reached this rank's experts
                assert n == 2, (rank, name, wgrad)


def _fsdp_reduce_scatters(parts: tuple[str, ...]) -> tuple[int, int]:
    """(reduce-scatters in one profiled backward of the main job's model under
    ``--shard experts`` with ``parts`` frozen, FSDP2 units holding a trainable parameter)."""
    from moe_parallel import train
    from moe_parallel.distributed.fsdp import _fsdp_params
    from moe_parallel.train.freeze import freeze

    ps = parallel_state(ep=2)
    args = train._parse(ARGS + ["--ep", "2", "--shard", "experts"])
    model = train.build_model(args, ps)
    if parts:
        freeze(model, parts)
    model = train.shard_for_memory(model, "experts", ps)
    batch = train.MarkovSource(args.vocab, seed=7).batch(args.batch_size * ps.dp, args.seq_len)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train.backward_step(model, train.local_batch(batch, ps), ps)
    count = Counter(e.name for e in prof.events())["c10d::_reduce_scatter_base_"]
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    trainable = sum(any(r.sharded_param.requires_grad for r in _fsdp_params(u)) for u in units)
    return count, trainable


@pytest.mark.parametrize("parts", [(), ("experts",), ("dense",)], ids=lambda p: ",".join(p)
                         or "none")
def test_fsdp_reduce_scatters_only_units_with_trainable_parameters(parts):
    answers = get_pool(4).run(_fsdp_reduce_scatters, parts, timeout=120)
    counts = {c for c, _ in answers}
    assert len(counts) == 1, answers
    count, trainable = answers[0]
    assert count == trainable > 0, answers
    if parts:
        assert count < get_pool(4).run(_fsdp_reduce_scatters, (), timeout=120)[0][0]


# ---- freezing that differs between ranks ------------------------------------------------------


def _router_frozen_on_rank_1() -> str:
    from moe_parallel import MoEConfig, MoELayer

    ps = parallel_state(ep=4)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2,
                               params_dtype=torch.float64), parallel_state=ps)
    if dist.get_rank() == 1:
        layer.router.weight.requires_grad_(False)
    try:
        layer(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_layer_frozen_differently_on_one_rank_is_refused_on_every_rank():
    for rank, msg in enumerate(get_pool(4).run(_router_frozen_on_rank_1, timeout=60)):
        assert "froze different parameters" in msg, (rank, msg)
        assert "ranks [1] freeze [router.weight]" in msg, (rank, msg)
        assert "ranks [0, 2, 3] freeze [nothing]" in msg, (rank, msg)


def _dense_frozen_on_rank_2(use_ddp: bool) -> str:
    from moe_parallel.distributed import sync_gradients, wrap_ddp
    from tests.helpers.training_parity import data, loss, nets

    ps = parallel_state(ep=2)
    _, model = nets(ps)
    if dist.get_rank() == 2:
        model.inp.weight.requires_grad_(False)
    try:
        if use_ddp:
            wrap_ddp(model, ps)
            return "no error"
        loss(model, *data(0, dist.get_rank())).backward()  # same exchanges on every rank
        sync_gradients(model, ps)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("use_ddp", [False, True], ids=["sync_gradients", "wrap_ddp"])
def test_dense_part_frozen_differently_is_refused_on_every_rank(use_ddp):
    for rank, msg in enumerate(get_pool(4).run(_dense_frozen_on_rank_2, use_ddp, timeout=60)):
        assert "froze different parameters" in msg, (rank, msg)
        assert "ranks [2] freeze [inp.weight]" in msg, (rank, msg)


def _main_with_freeze() -> tuple[bool, bool]:
    """``train.main`` on ep2·dp2 with ``--shard experts --freeze experts``: (the frozen experts
    bitwise unchanged, every other parameter moved), against the model the job starts from."""
    from moe_parallel import train
    from tests.helpers.dist_harness import own_groups

    flags = ARGS + ["--ep", "2", "--shard", "experts", "--freeze", "experts", "--steps", "2",
                    "--log-every", "100"]
    start = {n: p.detach().clone() for n, p in
             train.build_model(train._parse(flags), parallel_state(ep=2)).named_parameters()}
    frozen_same = moved = True
    with own_groups():  # the job's own groups, used by the shards' full_tensor too
        model = train.main(flags)["model"]
        for name, p in model.named_parameters():
            same = torch.equal(_whole(p), start[name])
            if ".experts." in name:
                frozen_same = frozen_same and same and not p.requires_grad
            else:
                moved = moved and not same
    return frozen_same, moved


def test_the_main_job_trains_with_frozen_experts_on_four_ranks():
    assert get_pool(4).run(_main_with_freeze, timeout=180) == [(True, True)] * 4
