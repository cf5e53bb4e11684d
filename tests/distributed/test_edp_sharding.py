"""Routed experts sharded over EDP with FSDP2 (``shard_model``), on gloo ranks, float64.

The main job's model (two blocks: attention, an MoE layer) is built at a layout, sharded with
``shard_model`` (experts over EDP, dense parameters over DP×CP) and trained two AdamW steps with
clipping by the global norm (``train.train_step``: ``sync_gradients``, ``clip_grad_norm``);
one process trains the full model on every rank's tokens. Every parameter equals the one
process's (expert shards its slice) to 1e-10 and so does the gradient norm; each rank's bytes of
expert weights, gradients and AdamW moments are 1/(EP·ETP·EDP) of the model's, counted from the
storages the rank holds. The same for the optimizer state alone (``ShardedOptimizer``), the
global norm's 1-, 2- and inf-norms, mixed precision and ``keep_unsharded_last``; the refusals
of ``ShardedOptimizer`` and ``mp_policy`` where they cannot work."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--clip", "0.05", "--lr", "0.01"]
STEPS, TOL = 2, 1e-10


def _expert_slice(full: dict, name: str, ps) -> torch.Tensor:
    from moe_parallel.experts import shard_expert_weights

    prefix = name.rsplit(".", 1)[0]
    w1, w2 = shard_expert_weights(full[prefix + ".w1"], full[prefix + ".w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, gated=True)
    return w1 if name.endswith("w1") else w2


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors: list[torch.Tensor]) -> dict[str, int]:
    """``numel``: elements × element size of ``tensors`` (local shards); ``storage``: the bytes
    of the distinct storages behind them (FSDP's padding and shared buffers as allocated)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return {"numel": sum(t.numel() * t.element_size() for t in tensors),
            "storage": sum(storages.values())}


def _expert_bytes(model, opt) -> dict[str, dict[str, int]]:
    """Bytes this rank holds for the routed experts' weights, gradients and AdamW moments
    (``exp_avg``, ``exp_avg_sq``; a sharded optimizer holds them for the tensors it owns)."""
    from moe_parallel.distributed import is_expert_param

    experts = [p for p in model.parameters() if is_expert_param(p)]
    state = [_local(opt.state[p][k]) for p in experts if p in opt.state
             for k in ("exp_avg", "exp_avg_sq")]
    return {"weights": _bytes([_local(p) for p in experts]),
            "grads": _bytes([_local(p.grad) for p in experts]), "optimizer": _bytes(state)}


def _train(layout: dict, shard: str) -> dict:
    """``STEPS`` AdamW steps at ``layout`` (``shard``: "experts" = ``shard_model``,
    "experts_keep_last" = the same with ``keep_unsharded_last=1``, "optimizer" =
    ``ShardedOptimizer``) beside one process: the relative errors of every parameter and of the
    gradient norms, this rank's expert bytes, each parameter's type, the grid sizes."""
    from moe_parallel import train
    from moe_parallel.distributed import (
        ParallelState,
        ShardedOptimizer,
        is_expert_param,
        shard_model,
    )

    # the harness's cached groups: DTensor caches meshes by their ranks, so a group destroyed
    # and created again over the same ranks would leave a mesh naming the destroyed one
    ps = parallel_state(**layout)
    args = train._parse(ARGS)
    single = ParallelState.single()
    model, full_model = train.build_model(args, ps), train.build_model(args, single)
    if shard.startswith("experts"):
        shard_model(model, ps, dense_modules=list(model.blocks),
                    keep_unsharded_last=1 if shard == "experts_keep_last" else 0)
    opts = [ShardedOptimizer(model, ps, torch.optim.AdamW, lr=args.lr) if shard == "optimizer"
            else torch.optim.AdamW(model.parameters(), lr=args.lr),
            torch.optim.AdamW(full_model.parameters(), lr=args.lr)]
    source = train.MarkovSource(args.vocab, seed=7)
    norms = []
    for _ in range(STEPS):
        batch = source.batch(args.batch_size * ps.dp, args.seq_len)
        _, norm = train.train_step(model, opts[0], train.local_batch(batch, ps), ps,
                                   args.clip)
        _, full_norm = train.train_step(full_model, opts[1], batch, single, args.clip)
        assert float(full_norm) > args.clip  # clipping is active: the norm matters
        norms.append(abs(float(norm) - float(full_norm)) / float(full_norm))
    full = dict(full_model.named_parameters())
    errors = {}
    for name, p in model.named_parameters():
        got = p.full_tensor() if hasattr(p, "full_tensor") else p
        want = _expert_slice(full, name, ps) if is_expert_param(p) else full[name]
        errors[name] = float((got.detach() - want.detach()).norm() / want.detach().norm())
    total = sum(p.numel() for n, p in full_model.named_parameters() if "experts." in n)
    kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
    return {"errors": errors, "norms": norms, "bytes": _expert_bytes(model, opts[0]),
            "expert_elements": total, "kinds": kinds,
            "sizes": (ps.ep, ps.etp, ps.edp, ps.dp * ps.cp)}


# (world, layout, mode): edp = world / (ep·etp), dp = world / tp; ep4 on 4 ranks has edp 1
# (experts left to sync_gradients, the dense part sharded over dp 4)
CASES = [(4, dict(ep=2), "experts"), (4, dict(ep=2), "experts_keep_last"),
         (4, dict(ep=4), "experts"),
         (4, dict(tp=2, ep=2), "experts"), (8, dict(ep=2, etp=2), "experts"),
         (8, dict(tp=2, ep=2), "experts"), (8, dict(ep=4), "experts")]


@pytest.mark.parametrize("world,layout,shard", CASES,
                         ids=[f"{w}ranks_" + "_".join(f"{k}{v}" for k, v in d.items()) + (
                             "_keep_last" if s.endswith("last") else "") for w, d, s in CASES])
def test_two_adamw_steps_with_edp_sharded_experts_equal_one_process(world, layout, shard):
    results = get_pool(world).run(_train, layout, shard, timeout=300)
    for rank, r in enumerate(results):
        ep, etp, edp, dp_cp = r["sizes"]
        assert max(r["norms"]) < TOL, (rank, r["norms"])
        assert len(r["errors"]) == 2 * 9 + 5, r["errors"]  # 9 per block, 5 outside
        for name, err in r["errors"].items():
            assert err < TOL, f"rank {rank} {name}: relative error {err:.3e}"
        # every parameter is a DTensor where its grid has more than one rank
        for name, kind in r["kinds"].items():
            sharded = (edp if "experts." in name else dp_cp) > 1
            assert kind == ("DTensor" if sharded else "Parameter"), (rank, name, kind)
        # weights, gradients, two AdamW moments: float64, 1/(EP·ETP·EDP) of the model's
        share = 8 * r["expert_elements"] // (ep * etp * edp)
        want = {"weights": share, "grads": share, "optimizer": 2 * share}
        assert r["bytes"] == {k: {"numel": v, "storage": v} for k, v in want.items()}, (
            rank, r["bytes"], want)


@pytest.mark.parametrize("world,layout", [(4, dict(ep=2)), (8, dict(ep=2, etp=2))],
                         ids=["4ranks_ep2", "8ranks_ep2_etp2"])
def test_two_adamw_steps_with_sharded_optimizer_state_equal_one_process(world, layout):
    results = get_pool(world).run(_train, layout, "optimizer", timeout=300)
    for rank, r in enumerate(results):
        ep, etp, edp, dp_cp = r["sizes"]
        assert edp == 2
        assert max(r["norms"]) < TOL, (rank, r["norms"])
        for name, err in r["errors"].items():
            assert err < TOL, f"rank {rank} {name}: relative error {err:.3e}"
        assert set(r["kinds"].values()) == {"Parameter"}  # weights stay whole
        # weights and gradients: this rank's EP/ETP shard whole; AdamW's moments: 1/EDP of it
        # (each of the two layers' w1 and w2 goes to one of the two EDP ranks)
        shard = 8 * r["expert_elements"] // (ep * etp)
        want = {"weights": shard, "grads": shard, "optimizer": 2 * shard // edp}
        assert {k: v["numel"] for k, v in r["bytes"].items()} == want, (rank, r["bytes"], want)


def _norms(layout: dict) -> list[tuple[float, float]]:
    """``global_grad_norm`` of the sharded model (DTensor gradients over EDP and over DP×CP)
    for the 1-, 2- and inf-norms, beside the one process's norm of its gradients."""
    from moe_parallel import train
    from moe_parallel.distributed import ParallelState, global_grad_norm, shard_model

    ps = parallel_state(**layout)
    args = train._parse(ARGS)
    single = ParallelState.single()
    model, full_model = train.build_model(args, ps), train.build_model(args, single)
    shard_model(model, ps, dense_modules=list(model.blocks))
    batch = train.MarkovSource(args.vocab, seed=7).batch(args.batch_size * ps.dp, args.seq_len)
    train.backward_step(model, train.local_batch(batch, ps), ps)
    train.backward_step(full_model, batch, single)
    grads = [p.grad for p in full_model.parameters()]
    out = []
    for norm_type in (1.0, 2.0, float("inf")):
        want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), norm_type)
        out.append((float(global_grad_norm(model, ps, norm_type)), float(want)))
    return out


def test_global_grad_norm_of_sharded_gradients_equals_one_process():
    """The float32 norm is the one process's float64 norm correctly rounded (within half a
    float32 ulp): the sums run in float64, whatever the sharding."""
    for rank, norms in enumerate(get_pool(4).run(_norms, dict(ep=2), timeout=300)):
        for got, want in norms:
            assert abs(got - want) <= 2.0**-24 * want, (rank, norms)


def _mixed_precision(layout: dict) -> dict:
    """Two AdamW steps of the model built in bfloat16 (its compute dtype), its weights made
    float32 masters, sharded with bfloat16 compute and float32 reduction: the dtypes each rank
    holds, whether every parameter moved, and the first step's loss beside that of one process
    running the same bfloat16 weights on this rank's tokens."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moe_parallel import train
    from moe_parallel.distributed import ParallelState, shard_model

    ps = parallel_state(**layout)
    args = train._parse(ARGS + ["--dtype", "bfloat16"])
    model = train.build_model(args, ps).float()
    shard_model(model, ps, dense_modules=list(model.blocks), mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    single = ParallelState.single()
    ref = train.build_model(args, single)  # the same bfloat16 weights, whole
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    source = train.MarkovSource(args.vocab, seed=7)
    losses = []
    for _ in range(STEPS):
        local = train.local_batch(source.batch(args.batch_size * ps.dp, args.seq_len), ps)
        if not losses:
            with torch.no_grad():
                ref_loss = float(train.lm_loss(ref(local[:, :-1]), local))
        loss, _ = train.train_step(model, opt, local, ps, args.clip)
        losses.append(float(loss))
    dtypes = {str(t.dtype) for p in model.parameters()
              for t in (p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])}
    moved = all(not torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    return {"dtypes": dtypes, "losses": losses, "ref_loss": ref_loss, "moved": moved}


def test_mixed_precision_keeps_float32_masters_and_trains():
    for rank, r in enumerate(get_pool(4).run(_mixed_precision, dict(ep=2), timeout=300)):
        assert r["dtypes"] == {"torch.float32"}, (rank, r["dtypes"])  # weights, grads, AdamW
        assert r["moved"], rank
        # the first forward is the one process's bfloat16 forward on these tokens, exactly: the
        # float32 masters cast back to bfloat16 are the weights it was built with
        assert r["losses"][0] == r["ref_loss"], (rank, r)


def _kept_unsharded(layout: dict) -> dict:
    """``keep_unsharded_last=1``: between forward and backward the last MoE layer's experts
    and router are held gathered (plain tensors), the first layer's sharded (DTensors); after
    the backward both are sharded again (its training equals one process: ``CASES``)."""
    from torch.distributed.tensor import DTensor

    from moe_parallel import train
    from moe_parallel.distributed import shard_model

    ps = parallel_state(**layout)
    args = train._parse(ARGS)
    model = train.build_model(args, ps)
    shard_model(model, ps, dense_modules=list(model.blocks), keep_unsharded_last=1)
    first, last = model.blocks[0].moe, model.blocks[1].moe

    def kinds() -> list[bool]:
        return [isinstance(m.experts.w1, DTensor) and isinstance(m.router.weight, DTensor)
                for m in (first, last)]

    batch = train.MarkovSource(args.vocab, seed=7).batch(args.batch_size * ps.dp, args.seq_len)
    local = train.local_batch(batch, ps)
    loss = train.lm_loss(model(local[:, :-1]), local)
    after_forward = kinds()
    loss.backward()
    return {"after_forward": after_forward, "after_backward": kinds()}


def test_keep_unsharded_last_holds_the_last_layer_gathered_until_its_backward():
    for rank, r in enumerate(get_pool(4).run(_kept_unsharded, dict(ep=2), timeout=300)):
        assert r == {"after_forward": [True, False], "after_backward": [True, True]}, (rank, r)


def _idle_rank_refused() -> str:
    """A lone MoE layer on 4 ranks with ep=1: 2 expert tensors over EDP = 4 ranks and 1
    router tensor over DP = 4 ranks leave ranks 2 and 3 without any."""
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.distributed import ShardedOptimizer

    ps = parallel_state(ep=1)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2),
                     parallel_state=ps)
    try:
        ShardedOptimizer(layer, ps, torch.optim.AdamW, lr=0.1)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_sharded_optimizer_that_leaves_a_rank_idle_is_refused_on_every_rank():
    for rank, msg in enumerate(get_pool(4).run(_idle_rank_refused, timeout=60)):
        assert "a rank would own no parameter" in msg, (rank, msg)
        assert "2 tensors over edp (4 ranks), 1 tensors over dp_cp (4 ranks)" in msg, msg


def _mixed_precision_on_one_rank_grid() -> str:
    """ep4 on 4 ranks: edp = 1, so the experts would stay outside FSDP and its casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moe_parallel import train
    from moe_parallel.distributed import shard_model

    ps = parallel_state(ep=4)
    model = train.build_model(train._parse(ARGS + ["--dtype", "bfloat16"]), ps).float()
    try:
        shard_model(model, ps, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_mixed_precision_with_a_one_rank_grid_is_refused():
    for msg in get_pool(4).run(_mixed_precision_on_one_rank_grid, timeout=60):
        assert "mp_policy needs both grids sharded (edp = 1, dp·cp = 4)" in msg, msg
