"""Checkpoints across layouts (``moe_parallel.checkpoint``), on the main job's model in float64.

A layout saves after ``STEPS`` AdamW steps; another layout loads it. The loaded model's outputs
and gradients equal those of one process trained the same steps without a checkpoint, its next
optimizer step equals that process's next step (AdamW state resharded, not reset), and every
rank's expert shard equals its slice of the consolidated global tensor, exactly.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers.dist_harness import DistFailure, get_pool, parallel_state
from tests.helpers.training_parity import assert_same_run

ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--expert-bias", "--clip", "0.05", "--lr", "0.01"]
GLOBAL_BATCH, STEPS, TOL = 8, 2, 1e-10
_RUNTIME = ("dispatcher", "expert_impl")  # run options, not layout sizes


def _ps(layout: dict):
    from moe_parallel.distributed import ParallelState

    sizes = {k: v for k, v in layout.items() if k not in _RUNTIME}
    return parallel_state(**sizes) if sizes else ParallelState.single()


def _args(layout: dict, ps, *extra: str):
    from moe_parallel import train

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in layout.items()]
    return train._parse(ARGS + flags + [f"--batch-size={GLOBAL_BATCH // ps.dp}", *extra])


def _trained(args, ps, steps: int):
    """The main job's model and AdamW after ``steps`` steps on ``ps``, and the data source."""
    from moe_parallel import train

    model = train.build_model(args, ps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    source = train.MarkovSource(args.vocab, seed=7)
    for _ in range(steps):
        batch = source.batch(GLOBAL_BATCH, args.seq_len)
        train.train_step(model, opt, train.local_batch(batch, ps), ps, args.clip)
    return model, opt, source


def _save(layout: dict, directory: str) -> None:
    from moe_parallel import checkpoint

    ps = _ps(layout)
    model, opt, source = _trained(_args(layout, ps), ps, STEPS)
    checkpoint.save(directory, model, opt, ps,
                    extra={"step": STEPS, "data": source.generator.get_state()})


def _expected_shard(name: str, full: dict, ps):
    """This rank's part of the full (single-process) tensor ``full[name]``."""
    from moe_parallel.experts import shard_expert_weights

    if not (name.endswith("experts.w1") or name.endswith("experts.w2")):
        return full[name]
    prefix = name.rsplit(".", 1)[0]
    w1, w2 = shard_expert_weights(full[prefix + ".w1"], full[prefix + ".w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, gated=True)
    return w1 if name.endswith("w1") else w2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _load_and_step(layout: dict, directory: str, consolidated: str) -> dict[str, float]:
    """Load at ``layout``; check shards exactly against the consolidated file; return the
    worst relative errors of outputs, gradients and the next step against one process."""
    from moe_parallel import checkpoint, train
    from moe_parallel.distributed import ParallelState

    ps, single = _ps(layout), ParallelState.single()
    args = _args(layout, ps, "--seed=5")  # other initial weights: the load must replace them all
    model = train.build_model(args, ps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    extra = checkpoint.load(directory, model, opt, ps)
    assert extra["step"] == STEPS

    full = checkpoint.read_consolidated(consolidated)
    exp_avg = {k: v["exp_avg"] for k, v in full["optim"]["state"].items()}
    named = dict(model.named_parameters())
    for name, t in model.state_dict().items():  # parameters and the expert-bias buffers
        assert torch.equal(t, _expected_shard(name, full["model"], ps)), name
        if name in named:
            state = opt.state[named[name]]
            assert torch.equal(state["exp_avg"], _expected_shard(name, exp_avg, ps)), name
            assert float(state["step"]) == STEPS, name

    ref, ref_opt, ref_source = _trained(_args(layout, single, "--ep=1", "--etp=1", "--tp=1"),
                                        single, STEPS)
    source = train.MarkovSource(args.vocab, seed=7)
    source.generator.set_state(extra["data"])
    batch = source.batch(GLOBAL_BATCH, args.seq_len)
    assert torch.equal(batch, ref_source.batch(GLOBAL_BATCH, args.seq_len))  # data position
    local = train.local_batch(batch, ps)
    errors = {}
    with torch.no_grad():
        mine = model(local[:, :-1])
        want = train.local_batch(ref(batch[:, :-1]), ps)
    errors["outputs"] = _rel(mine, want)
    opt.zero_grad(set_to_none=True)
    ref_opt.zero_grad(set_to_none=True)
    train.backward_step(model, local, ps)
    train.backward_step(ref, batch, single)
    ref_named = dict(ref.named_parameters())
    ref_grads = {n: p.grad for n, p in ref_named.items()}
    errors["grads"] = max(_rel(p.grad, _expected_shard(n, ref_grads, ps))
                          for n, p in named.items())
    train.optimizer_step(model, opt, ps, args.clip)
    train.optimizer_step(ref, ref_opt, single, args.clip)
    errors["next_step"] = max(_rel(p.detach(), _expected_shard(n, ref_named, ps).detach())
                              for n, p in named.items())
    return errors


def _in_world(layout: dict, fn, *args):
    """``fn(layout, *args)`` on the ranks the layout needs (this process when it needs one)."""
    world = layout.pop("world", 4 if layout else 1)
    if world == 1:
        return [fn(layout, *args)]
    return get_pool(world).run(fn, layout, *args, timeout=180)


_SAVED: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(layout)``: the checkpoint directory the layout wrote, and its consolidation."""
    from moe_parallel import checkpoint

    base = tmp_path_factory.mktemp("checkpoints")

    def get(layout: dict) -> tuple[str, str]:
        key = "_".join(f"{k}{v}" for k, v in layout.items()) or "single"
        if key not in _SAVED:
            directory = str(base / key)
            _in_world(dict(layout), _save, directory)
            checkpoint.consolidate(directory, directory + ".state")
            _SAVED[key] = directory, directory + ".state"
        return _SAVED[key]

    yield get
    _SAVED.clear()


CASES = [
    (dict(ep=4), dict(ep=2)),                  # ep4 -> ep2 dp2
    (dict(ep=4), dict()),                      # -> one process
    (dict(), dict(ep=4)),                      # one process ->
    (dict(ep=2, etp=2), dict(ep=4)),
    (dict(tp=2, ep=2), dict(ep=4)),
    (dict(world=8, ep=8), dict(ep=2, etp=2)),  # 8 ranks -> 4 ranks
    (dict(ep=4), dict(ep=2, expert_impl="block_sparse", dispatcher="allgather")),
]


def _id(case) -> str:
    return " to ".join("_".join(f"{k}{v}" for k, v in d.items()) or "single" for d in case)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_load_at_another_layout(case, saved):
    directory, consolidated = saved(case[0])
    for errors in _in_world(dict(case[1]), _load_and_step, directory, consolidated):
        assert max(errors.values()) < TOL, errors


def _resume_bitwise(layout: dict, root: str) -> str:
    """The main job for 7 steps (checkpoints after steps 4 and 7), then resumed from step 4:
    the same losses and parameters, bit for bit."""
    from moe_parallel import train

    flags = ARGS + [f"--{k}={v}" for k, v in layout.items()] + [
        "--batch-size=2", "--steps=7", "--log-every=100", f"--save-dir={root}"]
    first = train.main(flags + ["--save-every=4"] + (["--async-save"] if layout.get("tp") else []))
    resumed = train.main(flags + ["--resume=4"])
    assert_same_run(first, resumed)
    return "ok"


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(ep=4), dict(tp=2, ep=2)],
                         ids=["ep4", "tp2_ep2_async_save"])
def test_resume_same_layout_is_bitwise(layout, tmp_path):
    assert get_pool(4).run(_resume_bitwise, layout, str(tmp_path), timeout=180) == ["ok"] * 4
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000004", "step_00000007"]


def _load_mismatch(layout: dict, directory: str, flags: list[str]) -> str:
    """Load into a model built with ``flags``: the error every rank raises (model untouched)."""
    from moe_parallel import checkpoint, train

    ps = _ps(layout)
    model = train.build_model(_args(layout, ps, *flags), ps)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        checkpoint.load(directory, model, None, ps)
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        return f"{type(e).__name__}: {e}"
    return "loaded"


def _load_damaged(layout: dict, directory: str) -> str:
    """Load with a fresh AdamW: the error this rank raises; its model and optimizer are
    checked untouched."""
    from moe_parallel import checkpoint, train

    ps = _ps(layout)
    model = train.build_model(_args(layout, ps), ps)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        checkpoint.load(directory, model, opt, ps)
    except checkpoint.CheckpointError as e:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not opt.state and opt.param_groups[0]["lr"] == 0.5
        return f"{type(e).__name__}: {e}"
    return "loaded"


@pytest.mark.distributed
def test_damaged_shard_raises_on_every_rank_and_loads_nothing(saved, tmp_path):
    """One rank's shard file damaged in its last chunk: only the ranks that read that chunk
    find it, every rank raises naming the file, no rank's model or optimizer changes."""
    from moe_parallel.checkpoint import safe_dcp

    directory, _ = saved(dict(ep=4))
    damaged = str(tmp_path / "damaged")
    shutil.copytree(directory, damaged)
    infos = safe_dcp.SafeFileSystemReader(damaged).read_metadata().storage_data.values()
    last = max((i for i in infos if i.relative_path == "__3_0.distcp"), key=lambda i: i.offset)
    file = os.path.join(damaged, "__3_0.distcp")
    data = bytearray(open(file, "rb").read())
    data[last.offset:last.offset + last.length] = bytes(b ^ 0x5A for b in
                                                       data[last.offset:last.offset + last.length])
    open(file, "wb").write(bytes(data))
    answers = get_pool(4).run(_load_damaged, dict(ep=2), damaged, timeout=60)
    assert all(a.startswith(f"CheckpointError: shard file {file} cannot be read")
               for a in answers), answers


@pytest.mark.distributed
@pytest.mark.parametrize("flags, message", [
    (["--experts=16"], "num_experts is 8 in the checkpoint, 16 in this model"),
    (["--ffn=16"], "ffn_hidden_size is 8 in the checkpoint, 16 in this model"),
    (["--layers=3"], "MoE layer blocks.2.moe is in this model but not in the checkpoint"),
], ids=["experts", "ffn", "layers"])
def test_mismatched_model_raises_on_every_rank(flags, message, saved):
    directory, _ = saved(dict(ep=4))
    for answer in get_pool(4).run(_load_mismatch, dict(ep=2), directory, flags, timeout=60):
        assert answer.startswith("CheckpointError") and message in answer, answer


@pytest.mark.distributed
def test_mismatched_activation_and_shared_experts(saved):
    """In one process: a model that differs in activation or shared experts is refused by name."""
    from moe_parallel import MoEConfig, MoELayer, checkpoint

    directory, _ = saved(dict(ep=4))
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, expert_bias=True,
                params_dtype=torch.float64)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList()
    for changes, message in [
        (dict(activation="gelu"), "activation is 'swiglu' in the checkpoint, 'gelu' in this"),
        (dict(num_shared_experts=1), "num_shared_experts is 0 in the checkpoint, 1 in this"),
    ]:
        cfg = MoEConfig(**base, **changes)
        model.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for block in model.blocks:
            block.moe = MoELayer(cfg)
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load(directory, model)


@pytest.mark.distributed
def test_missing_or_partial_directory_raises_on_every_rank(saved, tmp_path):
    directory, _ = saved(dict(ep=4))
    partial = str(tmp_path / "partial")
    shutil.copytree(directory, partial)
    os.remove(os.path.join(partial, "moe_parallel.json"))
    answers = get_pool(4).run(_load_mismatch, dict(ep=4), str(tmp_path / "absent"), [],
                              timeout=60)
    assert all(a.startswith("FileNotFoundError: no checkpoint at") for a in answers), answers
    answers = get_pool(4).run(_load_mismatch, dict(ep=4), partial, [], timeout=60)
    assert all(a.startswith("CheckpointError") and "directory without moe_parallel.json" in a
               for a in answers), answers


def _save_then_die(layout: dict, directory: str) -> None:
    """Save after ``STEPS`` steps, train one more, save again: rank 1 dies inside the write."""
    import torch.distributed.checkpoint as dcp

    from moe_parallel import checkpoint, train

    ps = _ps(layout)
    args = _args(layout, ps)
    model, opt, source = _trained(args, ps, STEPS)
    checkpoint.save(directory, model, opt, ps,
                    extra={"step": STEPS, "data": source.generator.get_state()})
    batch = source.batch(GLOBAL_BATCH, args.seq_len)
    train.train_step(model, opt, train.local_batch(batch, ps), ps, args.clip)
    if ps.rank == 1:
        def die(self, *a, **k):
            os._exit(3)
        dcp.FileSystemWriter.write_data = die
    checkpoint.save(directory, model, opt, ps, extra={"step": STEPS + 1})


@pytest.mark.distributed
def test_killed_save_leaves_previous_checkpoint(tmp_path):
    from moe_parallel import checkpoint, train
    from moe_parallel.distributed import ParallelState

    directory = str(tmp_path / "ckpt")
    with pytest.raises(DistFailure):
        get_pool(2).run(_save_then_die, dict(ep=2), directory, timeout=60)
    assert os.path.isdir(directory + ".tmp")  # the second save had begun
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.load(directory + ".tmp", torch.nn.Linear(1, 1))
    single = ParallelState.single()
    args = _args({}, single)
    model = train.build_model(args, single)
    assert checkpoint.load(directory, model)["step"] == STEPS
    ref, _, _ = _trained(args, single, STEPS)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert _rel(p.detach(), ref_params[name].detach()) < TOL, name


@pytest.mark.distributed
def test_consolidate_and_shard_round_trip(saved, tmp_path):
    """CLI: consolidate to safetensors (model) and safetensors + JSON (all state); shard the
    latter back; both describe the same global tensors as the directory, and the sharded
    directory loads at ep4."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from moe_parallel import checkpoint

    directory, consolidated = saved(dict(ep=2, etp=2))
    out = str(tmp_path / "model.safetensors")
    cmd = [sys.executable, "-m", "moe_parallel.checkpoint"]
    subprocess.run(cmd + ["consolidate", directory, out], check=True, capture_output=True)
    subprocess.run(cmd + ["shard", consolidated, str(tmp_path / "resharded")], check=True,
                   capture_output=True)
    full = checkpoint.read_consolidated(consolidated)
    tensors = load_file(out)
    assert tensors.keys() == full["model"].keys()
    assert all(torch.equal(tensors[k], full["model"][k]) for k in tensors)
    assert tuple(tensors["blocks.0.moe.experts.w1"].shape) == (8, 16, 16)  # [E, H, 2F]
    assert tuple(tensors["blocks.0.moe.experts.w2"].shape) == (8, 8, 16)   # [E, F, H]
    for errors in _in_world(dict(ep=4), _load_and_step, str(tmp_path / "resharded"),
                            consolidated):
        assert max(errors.values()) < TOL, errors


def _async_save_and_load(layout: dict, directory: str, consolidated: str) -> dict[str, float]:
    from moe_parallel import checkpoint

    ps = _ps(layout)
    model, opt, source = _trained(_args(layout, ps), ps, STEPS)
    pending = checkpoint.save(directory, model, opt, ps, async_save=True,
                              extra={"step": STEPS, "data": source.generator.get_state()})
    with torch.no_grad():  # training goes on while the snapshot is written
        for p in model.parameters():
            p.add_(1.0)
    pending.wait()
    return _load_and_step(dict(ep=4), directory, consolidated)


@pytest.mark.distributed
def test_async_save(saved, tmp_path):
    _, consolidated = saved(dict(ep=2, etp=2))
    for errors in get_pool(4).run(_async_save_and_load, dict(ep=2, etp=2),
                                  str(tmp_path / "async"), consolidated, timeout=120):
        assert max(errors.values()) < TOL, errors


def test_save_before_the_first_step_keeps_the_optimizer_fresh(tmp_path):
    """An optimizer that has not stepped is saved as its hyperparameters, without creating
    state: the resumed step equals the uninterrupted one bit for bit."""
    from moe_parallel import checkpoint, train
    from moe_parallel.distributed import ParallelState

    single = ParallelState.single()
    args = _args({}, single)
    model = train.build_model(args, single)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    checkpoint.save(tmp_path / "ckpt", model, opt)
    assert not opt.state
    other = train.build_model(_args({}, single, "--seed=5"), single)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    checkpoint.load(tmp_path / "ckpt", other, other_opt)
    assert not other_opt.state and other_opt.param_groups[0]["lr"] == args.lr
    batch = train.MarkovSource(args.vocab, seed=7).batch(GLOBAL_BATCH, args.seq_len)
    for m, o in ((model, opt), (other, other_opt)):
        train.train_step(m, o, batch, single, args.clip)
    b = dict(other.named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in model.named_parameters())


def _wrapped_save(wrapper: str, directory: str) -> dict:
    """One AdamW step of the parity net under ``wrap_ddp`` or the FSDP2 recipe at ep2, saved
    through the wrapper; returns this rank's parameters (dense ones whole) and coordinates."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from moe_parallel import checkpoint
    from moe_parallel.distributed import sync_gradients, wrap_ddp
    from tests.helpers.training_parity import data, loss, nets

    ps = parallel_state(ep=2)
    _, model = nets(ps, num_shared_experts=1)
    if wrapper == "ddp":
        forward = wrap_ddp(model, ps)
    else:
        for dense in (model.inp, model.out):
            fully_shard(dense, mesh=DeviceMesh.from_group(ps.group("dp_cp"), "cpu"))
        forward = model
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loss(forward, *data(0, ps.rank)).backward()
    if wrapper == "ddp":  # the recipes of tests/distributed/test_ddp.py and test_fsdp.py
        sync_gradients(model, ps, dense=False)
    else:
        sync_gradients(model.moe, ps)
    opt.step()
    checkpoint.save(directory, forward, opt, ps)
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    return {"params": params, "ep_rank": ps.ep_rank, "ep": ps.ep, "etp_rank": 0, "etp": 1}


@pytest.mark.distributed
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_wrapped_models_save_and_load_unwrapped(wrapper, tmp_path):
    """Saved through ``wrap_ddp`` (``module.`` prefixes) or with FSDP2-sharded dense
    submodules (DTensors), the checkpoint loads into the plain single-process net."""
    from types import SimpleNamespace

    from moe_parallel import MoEConfig, MoELayer, checkpoint
    from tests.helpers.training_parity import CFG, Net

    directory = str(tmp_path / wrapper)
    ranks = get_pool(4).run(_wrapped_save, wrapper, directory, timeout=120)
    torch.manual_seed(11)
    net = Net(MoELayer(MoEConfig(**{**CFG, "num_shared_experts": 1})))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    checkpoint.load(directory, net, opt)
    loaded = dict(net.named_parameters())
    for got in ranks:
        coords = SimpleNamespace(**{k: v for k, v in got.items() if k != "params"})
        for name, want in got["params"].items():
            assert torch.equal(_expected_shard(name, loaded, coords), want), (wrapper, name)
    assert all(float(opt.state[p]["step"]) == 1 for p in net.parameters())


def _save_differing_extra(layout: dict, directory: str) -> str:
    from moe_parallel import checkpoint, train

    ps = _ps(layout)
    model = train.build_model(_args(layout, ps), ps)
    try:
        checkpoint.save(directory, model, None, ps, extra={"rank": ps.rank})
    except checkpoint.CheckpointError as e:
        return str(e)
    return "saved"


@pytest.mark.distributed
def test_extra_that_differs_between_ranks_is_refused(tmp_path):
    directory = str(tmp_path / "ckpt")
    for answer in get_pool(4).run(_save_differing_extra, dict(ep=4), directory, timeout=60):
        assert "extra differs between ranks" in answer, answer
    assert not os.path.exists(directory)


def _rng_round_trip(layout: dict, directory: str) -> list:
    """Each rank's RNG draws after a load equal those right after the save (same layout)."""
    import random

    from moe_parallel import checkpoint, train

    ps = _ps(layout)
    model = train.build_model(_args(layout, ps), ps)
    torch.manual_seed(100 + ps.rank)
    random.seed(200 + ps.rank)
    checkpoint.save(directory, model, None, ps)
    after_save = [torch.rand(2).tolist(), random.random()]
    checkpoint.load(directory, model, None, ps)
    assert [torch.rand(2).tolist(), random.random()] == after_save
    return after_save


@pytest.mark.distributed
def test_rng_states_are_restored_per_rank(tmp_path):
    draws = get_pool(4).run(_rng_round_trip, dict(ep=2), str(tmp_path / "ckpt"), timeout=60)
    assert len({repr(d) for d in draws}) == 4  # each rank its own stream
