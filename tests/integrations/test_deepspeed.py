"""integrations.deepspeed on 4 gloo ranks (ep2, EDP 2) under the real DeepSpeed engine
(``DS_ACCELERATOR=cpu``): two optimizer steps of ZeRO 0, 1 and 2 equal one process trained on
all ranks' tokens; the engine reduces expert gradients over EDP (Σ_EDP / world, not over the
world); its clipping norm is the single-process global norm (clip active); ZeRO-3 and other
unsupported settings are refused with errors naming them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="pip install moe_parallel[deepspeed] (DS_BUILD_OPS=0)")

from tests.helpers.dist_harness import get_pool, parallel_state  # noqa: E402
from tests.helpers.training_parity import data, loss, nets  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
DS_ENV = {"DS_ACCELERATOR": "cpu",
          "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions")}
LR, CLIP = 0.1, 0.05
STEPS = 2


def _ds_env() -> None:
    """DeepSpeed's environment, set before its first import in this process (and the
    LOCAL_RANK that DeepSpeedEngine requires; a launcher would set it)."""
    import logging

    import torch.distributed as dist

    for k, v in DS_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


@pytest.fixture(scope="module", autouse=True)
def shm_op_built():
    """JIT-build DeepSpeed's CPU shm comm op once, in a child (not in every rank at once, and
    without importing DeepSpeed into the test process); cached under build/torch_extensions."""
    code = ("import deepspeed\nfrom deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):\n"
            "    b.load(verbose=False)\n")
    env = {**os.environ, **DS_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _config(stage: int, clip: float, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "gradient_clipping": clip,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **extra}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _engine_vs_one_process(stage: int, clip: float, dtype: str) -> dict:
    """STEPS SGD steps under the engine (this rank's tokens) and on one process (every rank's
    tokens); the worst relative errors of the reduced gradients, the engine's grad norm and the
    parameter updates (after - before), and both runs' norms."""
    _ds_env()
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from moe_parallel import set_aux_loss_scale
    from moe_parallel.experts import shard_expert_weights
    from moe_parallel.integrations import deepspeed as ds_moe

    ps = parallel_state(ep=2)
    rank, world = dist.get_rank(), dist.get_world_size()
    full, model = nets(ps, params_dtype=getattr(torch, dtype))
    full, model = full.to(getattr(torch, dtype)), model.to(getattr(torch, dtype))
    opt = torch.optim.SGD(ds_moe.moe_param_groups(model, ps), lr=LR)
    engine, *_ = ds_moe.initialize(model, ps, _config(stage, clip), optimizer=opt)
    ref_opt = torch.optim.SGD(full.parameters(), lr=LR)
    set_aux_loss_scale(full, 1.0 / world)

    def expert_slices(tensors: dict) -> dict:
        w1, w2 = shard_expert_weights(tensors["moe.experts.w1"], tensors["moe.experts.w2"],
                                      ps.ep_rank, ps.ep, ps.etp_rank, ps.etp, True)
        return {**tensors, "moe.experts.w1": w1, "moe.experts.w2": w2}

    start = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ref_start = expert_slices({n: p.detach().clone() for n, p in full.named_parameters()})
    out = {"grad": 0.0, "norm": 0.0, "param": 0.0, "ref_norms": [], "norms": []}
    for step in range(STEPS):
        x, y = data(step, rank)
        engine.backward(loss(engine, x.to(getattr(torch, dtype)), y.to(getattr(torch, dtype))))
        ref_opt.zero_grad()
        sum(loss(full, *(t.to(getattr(torch, dtype)) for t in data(step, r)))
            for r in range(world)).div(world).backward()
        want = expert_slices({n: p.grad for n, p in full.named_parameters()})
        for n, p in engine.module.named_parameters():
            out["grad"] = max(out["grad"], _rel(safe_get_full_grad(p), want[n]))
        engine.step()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(full.parameters(), clip)) if clip else 0
        ref_opt.step()
        if clip:
            norm = float(engine.get_global_grad_norm())
            out["norm"] = max(out["norm"], abs(norm - ref_norm) / ref_norm)
            out["norms"].append(norm)
            out["ref_norms"].append(ref_norm)
    want = expert_slices({n: p.detach() for n, p in full.named_parameters()})
    for n, p in engine.module.named_parameters():  # the updates, not the weights: sensitive
        out["param"] = max(out["param"], _rel(p.detach() - start[n], want[n] - ref_start[n]))
    return out


# float32 (DeepSpeed reduces no float64 gradient; ZeRO 1/2 keep float32 master weights). The
# updates (after - before) lose ~|w|/|update| of float32's precision to the subtraction.
GRAD_TOL, UPDATE_TOL = 1e-6, 2e-5


@pytest.mark.parametrize("stage", [0, 1, 2], ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("clip", [0.0, CLIP], ids=["noclip", "clip"])
def test_engine_steps_equal_one_process(stage, clip):
    results = get_pool(4).run(_engine_vs_one_process, stage, clip, "float32", timeout=240)
    for rank, r in enumerate(results):
        assert r["grad"] < GRAD_TOL and r["param"] < UPDATE_TOL, (rank, r)
        if clip:
            assert r["norm"] < GRAD_TOL, (rank, r)
            assert min(r["ref_norms"]) > 4 * CLIP, r  # the clip bites on every step


def _expert_grads_over_edp(stage: int) -> dict:
    """After engine.backward, each expert gradient against Σ_EDP(local)/world (what it must be)
    and Σ_world(local)/world (what a world all-reduce would give)."""
    _ds_env()
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from moe_parallel.integrations import deepspeed as ds_moe

    ps = parallel_state(ep=2)
    rank, world = dist.get_rank(), dist.get_world_size()
    _, model = nets(ps, params_dtype=torch.float32)
    _, twin = nets(ps, params_dtype=torch.float32)  # the same weights: the local gradients
    model, twin = model.float(), twin.float()
    opt = torch.optim.SGD(ds_moe.moe_param_groups(model, ps), lr=LR)
    engine, *_ = ds_moe.initialize(model, ps, _config(stage, 0.0), optimizer=opt)
    x, y = (t.float() for t in data(0, rank))
    engine.backward(loss(engine, x, y))
    loss(twin, x, y).backward()
    out = {}
    for (n, p), t in zip(engine.module.named_parameters(), twin.parameters()):
        if not n.startswith("moe.experts."):
            continue
        edp, every = t.grad.clone(), t.grad.clone()
        dist.all_reduce(edp, group=ps.group("edp"))
        dist.all_reduce(every)
        got = safe_get_full_grad(p)
        out[n] = (_rel(got, edp / world), _rel(got, every / world))
    engine.step()
    return out


@pytest.mark.parametrize("stage", [0, 1, 2], ids=lambda s: f"zero{s}")
def test_expert_grads_are_reduced_over_edp_only(stage):
    for rank, errors in enumerate(get_pool(4).run(_expert_grads_over_edp, stage, timeout=240)):
        assert len(errors) == 2, errors  # w1, w2
        for name, (edp, world) in errors.items():
            assert edp < 1e-6, (rank, name, edp)
            assert world > 1e-2, (rank, name, world)  # a world reduction would be detected


def _refusal(what: str) -> str:
    """The error of one unsupported setup (every rank)."""
    _ds_env()
    import deepspeed
    import torch.distributed as dist
    from torch import nn

    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.integrations import deepspeed as ds_moe

    ps = parallel_state(ep=2)
    _, model = nets(ps, params_dtype=torch.float32)
    model = model.float()
    try:
        if what == "zero3":
            ds_moe.initialize(model, ps, _config(3, 0.0))
        elif what == "zero3_direct":  # deepspeed.initialize on a prepared model
            ds_moe.prepare(model, ps)
            deepspeed.initialize(model=model, config=_config(3, 0.0),
                                 model_parameters=ds_moe.moe_param_groups(model, ps))
        elif what == "zero0_clip_direct":
            ds_moe.prepare(model, ps)
            opt = torch.optim.SGD(ds_moe.moe_param_groups(model, ps), lr=LR)
            deepspeed.initialize(model=model, config=_config(0, 1.0), optimizer=opt)
        elif what == "no_layers":
            ds_moe.prepare(nn.Linear(2, 2), ps)
        elif what == "tp2":
            ds_moe.prepare(model, parallel_state(tp=2, ep=2))
        elif what == "wrong_layout":
            layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8),
                             parallel_state=parallel_state(ep=4))
            ds_moe.prepare(nn.Sequential(layer), ps)
        elif what == "bf16_zero0":
            ds_moe.initialize(model, ps, {**_config(0, 0.0), "bf16": {"enabled": True}})
        elif what == "flat_optimizer":
            opt = torch.optim.AdamW(model.parameters())
            ds_moe.initialize(model, ps, _config(2, 0.0), optimizer=opt)
        else:
            raise AssertionError(what)
    except ValueError as exc:
        dist.barrier()
        return str(exc)
    return "no error"


REFUSALS = {
    "zero3": ["zero_optimization.stage 3", "allowed: 0, 1, 2"],
    "zero3_direct": ["zero_optimization.stage 3", "allowed: 0, 1, 2"],
    "zero0_clip_direct": ["gradient_clipping 1.0 with zero_optimization.stage 0", "initialize"],
    "no_layers": ["holds no moe_parallel MoELayer"],
    "tp2": ["tp=2", "tp=1 and pp=1 only"],
    "wrong_layout": ["MoELayer '0' was built for", "ep=4"],
    "bf16_zero0": ["bf16.enabled with zero_optimization.stage 0", "allowed:"],
    "flat_optimizer": ["optimizer:", "moe_param_groups"],
}


@pytest.mark.parametrize("what", list(REFUSALS))
def test_unsupported_setups_are_refused(what):
    for rank, msg in enumerate(get_pool(4).run(_refusal, what, timeout=240)):
        for part in REFUSALS[what]:
            assert part in msg, (rank, what, msg)


def test_param_groups_and_tags():
    """One process: moe_param_groups splits dense / expert parameters; prepare tags them and
    leaves the state dict alone (the host module holds nothing)."""
    code = """
import os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch
from torch import nn
from moe_parallel import MoEConfig, MoELayer, ParallelState, init_distributed
from moe_parallel.integrations import deepspeed as ds_moe
init_distributed("gloo")
ps = ParallelState.build()
model = nn.Sequential(nn.Linear(4, 8), MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8,
                                                          num_experts=4), parallel_state=ps))
keys = list(model.state_dict())
name = ds_moe.prepare(model, ps)
assert list(model.state_dict()) == keys and name == "ep_size_1"
assert model(torch.randn(3, 4)).shape == (3, 8)  # the host is not a stage of the Sequential
groups = ds_moe.moe_param_groups(model, ps, lr=0.5)
assert [g["name"] for g in groups] == ["dense", "ep_size_1"] and groups[1]["moe"]
assert all(g["lr"] == 0.5 for g in groups)
assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model[1].experts.parameters()}
assert all(p.allreduce is False and p.group_name == name for p in groups[1]["params"])
assert not any(hasattr(p, "allreduce") for p in groups[0]["params"])
from deepspeed.utils import groups as g
assert g._get_expert_data_parallel_group(name) is ps.group("edp")
print("OK")
"""
    env = {**os.environ, **DS_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# aux loss 0: the Switch loss of a rank's tokens is not that of the global batch, which the
# one-process run sees (test_train_dist does the same); the z-loss is a per-token mean.
TRAIN_ARGS = ["--dtype", "float32", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads",
              "2", "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8",
              "--batch-size", "2", "--capacity-factor", "0", "--aux-loss-coeff", "0",
              "--z-loss-coeff", "0.01", "--clip", "0.05", "--lr", "0.01", "--ep", "2",
              "--steps", "20"]


def _train_under_engine(stage: int) -> dict:
    """moe_parallel.train's model: STEPS engine steps (train.deepspeed_engine, AdamW, warm-up
    schedule, clip 0.05) against train.train_step on one process with every rank's batch."""
    _ds_env()
    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState
    from moe_parallel.experts import shard_expert_weights

    ps = parallel_state(ep=2)
    args = train._parse(TRAIN_ARGS + ["--deepspeed", "unused.json"])
    args.deepspeed = _config(stage, 0.0) | {"train_micro_batch_size_per_gpu": 2}
    del args.deepspeed["gradient_clipping"]  # from --clip
    single = ParallelState.single()
    model, full = train.build_model(args, ps), train.build_model(args, single)
    engine, _ = train.deepspeed_engine(args, model, ps)
    opt = torch.optim.AdamW(full.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(args))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_start = {n: p.detach().clone() for n, p in full.named_parameters()}
    source = train.MarkovSource(args.vocab, seed=7)
    out = {"norm": 0.0, "param": 0.0, "ref_norms": []}
    for _ in range(STEPS):
        batch = source.batch(args.batch_size * ps.dp, args.seq_len)
        _, norm = train.engine_train_step(engine, train.local_batch(batch, ps), ps)
        _, ref_norm = train.train_step(full, opt, batch, single, args.clip)
        sched.step()
        out["norm"] = max(out["norm"], abs(float(norm) - float(ref_norm)) / float(ref_norm))
        out["ref_norms"].append(float(ref_norm))
    full_params = dict(full.named_parameters())
    for n, p in model.named_parameters():
        want, want0 = full_params[n].detach(), ref_start[n]
        if n.endswith(("experts.w1", "experts.w2")):
            prefix = n.rsplit(".", 1)[0]
            pair = [shard_expert_weights(t[prefix + ".w1"], t[prefix + ".w2"], ps.ep_rank, ps.ep,
                                         ps.etp_rank, ps.etp, True)
                    for t in ({k: v.detach() for k, v in full_params.items()}, ref_start)]
            i = 0 if n.endswith("w1") else 1
            want, want0 = pair[0][i], pair[1][i]
        out["param"] = max(out["param"], _rel(p.detach() - start[n], want - want0))
    return out


@pytest.mark.parametrize("stage", [0, 2], ids=lambda s: f"zero{s}")
def test_train_job_under_the_engine_equals_one_process(stage):
    for rank, r in enumerate(get_pool(4).run(_train_under_engine, stage, timeout=240)):
        assert r["norm"] < GRAD_TOL and r["param"] < UPDATE_TOL, (rank, r)
        assert min(r["ref_norms"]) > 0.05, r  # the clip bites
