"""Checkpoints of sharded models (``distributed.shard_model``: FSDP2, routed experts over EDP;
``distributed.ShardedOptimizer``: ZeRO-1) on the main job's model in float64.

One process trains ``STEPS`` AdamW steps and saves: the reference. A layout, sharded or not,
loads it (every tensor it holds then equals its part of the reference, bit for bit), and saves
again: that checkpoint consolidates to the reference's tensors, bit for bit, model and AdamW
state. Another layout loads the second checkpoint and takes one more step, which equals the
reference process's next step (1e-10).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist_harness import get_pool, parallel_state

pytestmark = pytest.mark.distributed

ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--expert-bias", "--clip", "0.05", "--lr", "0.01"]
GLOBAL_BATCH, STEPS, TOL = 8, 2, 1e-10
SIZES = ("tp", "ep", "etp")


def _ps(layout: dict):
    from moe_parallel.distributed import ParallelState

    sizes = {k: v for k, v in layout.items() if k in SIZES}
    return parallel_state(**sizes) if layout.get("world", 1) > 1 else ParallelState.single()


def _build(layout: dict, ps, seed: int = 0):
    """The main job's model at ``layout`` (``shard``: none, experts or optimizer) and its
    AdamW, as ``train.build_job`` makes them."""
    from moe_parallel import train

    flags = [f"--{k}={v}" for k, v in layout.items() if k in SIZES + ("shard",)]
    args = train._parse(ARGS + flags + [f"--batch-size={GLOBAL_BATCH // ps.dp}",
                                        f"--seed={seed}"])
    model = train.shard_for_memory(train.build_model(args, ps), args.shard, ps)
    return args, model, train.build_optimizer(model, args, ps)


def _reference(steps: int):
    """One process: the model and AdamW after ``steps`` steps."""
    from moe_parallel import train
    from moe_parallel.distributed import ParallelState

    single = ParallelState.single()
    args, model, opt = _build({}, single)
    source = train.MarkovSource(args.vocab, seed=7)
    for _ in range(steps):
        train.train_step(model, opt, source.batch(GLOBAL_BATCH, args.seq_len), single, args.clip)
    return args, model, opt, source


def _part(name: str, full: dict, ps) -> torch.Tensor:
    """This rank's (EP, ETP) part of the global tensor ``full[name]``."""
    from moe_parallel.experts import shard_expert_weights

    if not (name.endswith("experts.w1") or name.endswith("experts.w2")):
        return full[name]
    prefix = name.rsplit(".", 1)[0]
    w1, w2 = shard_expert_weights(full[prefix + ".w1"], full[prefix + ".w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, gated=True)
    return w1 if name.endswith("w1") else w2


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_loaded(model, opt, ps, consolidated: str) -> int:
    """Every parameter, buffer and AdamW moment this rank holds equals its part of the
    consolidated reference, bit for bit; returns how many tensors were compared."""
    from moe_parallel import checkpoint

    full = checkpoint.read_consolidated(consolidated)
    moments = {m: {k: v[m] for k, v in full["optim"]["state"].items()}
               for m in ("exp_avg", "exp_avg_sq")}
    named = dict(model.named_parameters())
    compared = 0
    for name, t in model.state_dict().items():
        assert torch.equal(_whole(t), _part(name, full["model"], ps)), name
        compared += 1
        if name in named and named[name] in opt.state:  # a sharded optimizer: its own
            state = opt.state[named[name]]
            for moment, want in moments.items():
                assert torch.equal(_whole(state[moment]), _part(name, want, ps)), name
                compared += 1
            assert float(state["step"]) == STEPS, name
    return compared


def _round_trip(layout: dict, source_dir: str, consolidated: str, out_dir: str) -> int:
    """Load the reference at ``layout`` (other initial weights), check it, save it again."""
    from moe_parallel import checkpoint

    ps = _ps(layout)
    _, model, opt = _build(layout, ps, seed=5)
    extra = checkpoint.load(source_dir, model, opt, ps)
    assert extra["step"] == STEPS
    compared = _check_loaded(model, opt, ps, consolidated)
    checkpoint.save(out_dir, model, opt, ps, extra=extra)
    return compared


def _resume(layout: dict, source_dir: str, consolidated: str) -> float:
    """Load at ``layout``, check it, take the next step: its worst relative difference from
    the reference process's next step."""
    from moe_parallel import checkpoint, train
    from moe_parallel.distributed import ParallelState

    ps = _ps(layout)
    args, model, opt = _build(layout, ps, seed=5)
    extra = checkpoint.load(source_dir, model, opt, ps)
    _check_loaded(model, opt, ps, consolidated)
    _, ref, ref_opt, ref_source = _reference(STEPS)
    source = train.MarkovSource(args.vocab, seed=7)
    source.generator.set_state(extra["data"])
    batch = source.batch(GLOBAL_BATCH, args.seq_len)
    assert torch.equal(batch, ref_source.batch(GLOBAL_BATCH, args.seq_len))
    train.train_step(model, opt, train.local_batch(batch, ps), ps, args.clip)
    train.train_step(ref, ref_opt, batch, ParallelState.single(), args.clip)
    want = dict(ref.named_parameters())
    return max(float((_whole(p).detach() - _part(n, want, ps).detach()).norm()
                     / want[n].detach().norm()) for n, p in model.named_parameters())


def _run(layout: dict, fn, *args):
    world = layout.get("world", 1)
    if world == 1:
        return [fn(layout, *args)]
    return get_pool(world).run(fn, layout, *args, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference checkpoint (one process, ``STEPS`` steps) and its consolidation."""
    from moe_parallel import checkpoint

    directory = str(tmp_path_factory.mktemp("reference") / "ckpt")
    _, model, opt, source = _reference(STEPS)
    checkpoint.save(directory, model, opt, None,
                    extra={"step": STEPS, "data": source.generator.get_state()})
    checkpoint.consolidate(directory, directory + ".state")
    return directory, directory + ".state"


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


# (layout that loads the reference and saves again, layout that resumes from that save)
CASES = [
    (dict(world=4, ep=2, shard="experts"), dict(world=4, ep=4, shard="experts")),
    (dict(world=4, ep=2, shard="experts"), dict()),
    (dict(world=4, tp=2, ep=2, shard="experts"), dict(world=4, ep=2, shard="optimizer")),
    (dict(world=4, ep=2, shard="optimizer"), dict(world=4, ep=2, etp=2, shard="experts")),
    (dict(world=8, ep=2, etp=2, shard="experts"), dict(world=4, ep=2)),
    (dict(world=4, ep=4), dict(world=8, ep=4, shard="experts")),
]


def _id(layout: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in layout.items() if k != "world") or "single"


@pytest.mark.parametrize("saver,loader", CASES, ids=[f"{_id(a)}_to_{_id(b)}" for a, b in CASES])
def test_sharded_save_consolidates_bitwise_and_resumes_at_another_layout(saver, loader,
                                                                         reference, tmp_path):
    from moe_parallel import checkpoint

    directory, consolidated = reference
    out = str(tmp_path / "resaved")
    compared = _run(saver, _round_trip, directory, consolidated, out)
    assert min(compared) > 2 * 9 + 5  # every parameter (and buffers, moments) was compared
    got = _tensors(checkpoint.consolidate(out, out + ".state"))
    want = _tensors(checkpoint.read_consolidated(consolidated))
    for key in ("model.", "optim.state."):
        names = sorted(k for k in want if k.startswith(key))
        assert names and sorted(k for k in got if k.startswith(key)) == names, key
        for k in names:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for err in _run(loader, _resume, out, consolidated):
        assert err < TOL, err
