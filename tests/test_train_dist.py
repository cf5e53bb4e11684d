"""The training job across processes: one optimizer step on 4 ranks equals the single-process
step; a rank that fails mid-step ends the whole job with an error instead of a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.dist_harness import get_pool, own_groups, parallel_state

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "8", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
        "--capacity-factor", "0", "--aux-loss-coeff", "0", "--z-loss-coeff", "0.01",
        "--clip", "0.05", "--lr", "0.01"]
LAYOUTS = [dict(ep=4), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, etp=2), dict(tp=2, ep=4)]
STEP_CASES = LAYOUTS + [dict(tp=2, ep=2, dispatcher="allgather"),
                        dict(ep=2, etp=2, dispatcher="allgather"),
                        # 2 simulated nodes x 2 ranks, layers pipelined in 3 chunks
                        {"ep": 4, "dispatcher": "alltoall_hierarchical", "ranks-per-node": 2,
                         "overlap-chunks": 3}]


def _steps_match(layout: dict, steps: int) -> float:
    """Train ``steps`` steps distributed and on one process; return the largest relative
    difference over all parameters (expert shards compared with the full model's slice)."""
    from moe_parallel.distributed.parallel_state import ParallelState

    sizes = {k: v for k, v in layout.items() if k in ("tp", "ep", "etp")}
    if "ranks-per-node" in layout:
        with own_groups():
            ps = ParallelState.build(**sizes, ranks_per_node=layout["ranks-per-node"])
            return _match(layout, steps, ps)
    return _match(layout, steps, parallel_state(**sizes))


def _match(layout: dict, steps: int, ps) -> float:
    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState
    args = train._parse(ARGS + [f"--{k}={v}" for k, v in layout.items()])
    single = ParallelState.single()
    dist_model, full_model = train.build_model(args, ps), train.build_model(args, single)
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (dist_model, full_model)]
    source = train.MarkovSource(args.vocab, seed=7)
    for _ in range(steps):
        batch = source.batch(args.batch_size * ps.dp, args.seq_len)
        _, norm = train.train_step(dist_model, opts[0], train.local_batch(batch, ps), ps, args.clip)
        _, full_norm = train.train_step(full_model, opts[1], batch, single, args.clip)
        assert abs(float(norm) - float(full_norm)) <= 1e-10 * float(full_norm)
        assert float(full_norm) > args.clip  # clipping is active, so the norm matters
    return _worst_error(dist_model, full_model, ps)


def _worst_error(dist_model, full_model, ps) -> float:
    """The largest relative difference between ``dist_model``'s parameters on this rank and
    ``full_model``'s (one process): expert shards against the full model's slice."""
    from moe_parallel.experts import shard_expert_weights

    full = dict(full_model.named_parameters())
    worst = 0.0
    for name, p in dist_model.named_parameters():
        want = full[name]
        if name.endswith("experts.w1") or name.endswith("experts.w2"):
            prefix = name.rsplit(".", 1)[0]
            w1, w2 = shard_expert_weights(full[prefix + ".w1"], full[prefix + ".w2"], ps.ep_rank,
                                          ps.ep, ps.etp_rank, ps.etp, gated=True)
            want = w1 if name.endswith("w1") else w2
        worst = max(worst, float((p.detach() - want.detach()).norm() / want.detach().norm()))
    return worst


@pytest.mark.parametrize("layout", STEP_CASES,
                         ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
def test_training_steps_equal_single_process(layout):
    errors = get_pool(4).run(_steps_match, layout, 2, timeout=300)
    assert max(errors) < 1e-10, errors


def _skip_matches(layout: dict, steps: int, nan_step: int) -> tuple[list[int], float]:
    """Train ``steps`` steps where rank 1 feeds a NaN into the first MoE layer at ``nan_step``
    and the loop skips every batch whose step raises ``FloatingPointError``: the steps this rank
    skipped, and the largest relative difference between its parameters and one process that
    skipped batch ``nan_step`` (expert shards compared with the full model's slice)."""
    import torch.distributed as dist

    from moe_parallel import train
    from moe_parallel.distributed.parallel_state import ParallelState

    ps = parallel_state(**layout)
    args = train._parse(ARGS + [f"--{k}={v}" for k, v in layout.items()])
    single = ParallelState.single()
    dist_model, full_model = train.build_model(args, ps), train.build_model(args, single)
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (dist_model, full_model)]
    source = train.MarkovSource(args.vocab, seed=7)
    step_now = [0]

    def poison(module, inputs):
        if dist.get_rank() == 1 and step_now[0] == nan_step:
            return (inputs[0] * float("nan"), *inputs[1:])
        return None

    dist_model.moe_layers()[0].register_forward_pre_hook(poison)
    skipped = []
    for step in range(steps):
        step_now[0] = step
        batch = source.batch(args.batch_size * ps.dp, args.seq_len)
        try:
            train.train_step(dist_model, opts[0], train.local_batch(batch, ps), ps, args.clip)
        except FloatingPointError:
            skipped.append(step)
            continue
        train.train_step(full_model, opts[1], batch, single, args.clip)
    return skipped, _worst_error(dist_model, full_model, ps)


@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2, ep=2), dict(ep=4)],
                         ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
def test_a_skipped_nan_batch_keeps_every_rank_in_step(layout):
    """The non-finite verdict reaches the whole stage (the gradient-sync group), not only the
    NaN rank's ETP×EP group: every rank skips step 2, the ranks stay at the same step, and the
    replicas equal one process that skipped that batch."""
    answers = get_pool(4).run(_skip_matches, layout, 4, 2, timeout=300)
    for rank, (skipped, worst) in enumerate(answers):
        assert skipped == [2], (rank, skipped)
        assert worst < 1e-10, (rank, worst)


def _init_matches(layout: dict) -> float:
    """One seed builds the same layer on every layout: largest relative difference between this
    rank's parameters and the matching slice of a single-process layer."""
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.experts import shard_expert_weights

    ps = parallel_state(**layout)
    cfg = MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=8, top_k=2,
                    num_shared_experts=1, shared_expert_gate=True)
    torch.manual_seed(3)
    layer = MoELayer(cfg, parallel_state=ps)
    torch.manual_seed(3)
    full = dict(MoELayer(cfg).named_parameters())
    w1, w2 = shard_expert_weights(full["experts.w1"], full["experts.w2"], ps.ep_rank, ps.ep,
                                  ps.etp_rank, ps.etp, cfg.gated)
    full["experts.w1"], full["experts.w2"] = w1, w2
    return max(float((p - full[n]).norm() / full[n].norm()) for n, p in layer.named_parameters())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
def test_initialisation_is_layout_invariant(layout):
    assert max(get_pool(4).run(_init_matches, layout)) == 0.0


FAILING_RANK = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch
    from moe_parallel import MoEConfig, MoELayer, ParallelState, init_distributed

    rank, world, _ = init_distributed("gloo", timeout=timedelta(seconds=float(sys.argv[1])))
    ps = ParallelState.build(ep=world)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2 * world, top_k=2)
    layer = MoELayer(cfg, parallel_state=ps)
    layer(torch.randn(16, 8)).sum().backward()          # step 1: every rank
    if rank == 2:
        raise RuntimeError("injected failure on rank 2")
    layer(torch.randn(16, 8)).sum().backward()          # step 2: rank 2 never arrives
    print("UNREACHABLE", rank, flush=True)
""")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "OMPI_", "PMI_", "SLURM_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_failing_rank_ends_torchrun_job(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(script), "600"],
        env=_env(), capture_output=True, text=True, timeout=240,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "injected failure on rank 2" in proc.stdout + proc.stderr
    assert "UNREACHABLE" not in proc.stdout
    assert elapsed < 120, elapsed  # the agent ends the others; no 600 s collective timeout


def test_failing_rank_ends_every_rank_by_timeout_without_launcher(tmp_path):
    """Bare processes (no launcher watching): the survivors' collective times out."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    port = 29000 + os.getpid() % 1000
    procs = []
    for rank in range(4):
        env = _env() | {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), "10"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    elapsed = time.monotonic() - t0
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode != 0, f"rank {rank} exited 0:\n{out[-2000:]}"
        assert "UNREACHABLE" not in out
    assert "injected failure on rank 2" in outs[2]
    assert elapsed < 150, elapsed


def _sharded_run(layout: dict, shard: str) -> dict:
    """The main job for 3 steps with ``--shard shard``: its losses, every parameter whole (an
    FSDP2 shard gathered), and what was sharded (the parameters FSDP2 holds as DTensors, the
    optimizer's class)."""
    from moe_parallel import train

    out = train.main(ARGS + [f"--{k}={v}" for k, v in layout.items()] + [
        "--steps=3", "--log-every=100", f"--shard={shard}"])
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in out["model"].named_parameters()}
    return {"history": out["history"], "params": params,
            "dtensors": sum(hasattr(p, "full_tensor") for p in out["model"].parameters()),
            "optimizer": type(out["optimizer"]).__name__}


@pytest.mark.parametrize("shard", ["experts", "optimizer"])
def test_sharded_run_equals_unsharded_run(shard):
    """``--shard experts`` (FSDP2: experts over EDP, the rest over DP) and ``--shard
    optimizer`` (ZeRO-1) train as ``--shard none`` does: the same losses and parameters to
    1e-10 (float64, ep2 on 4 ranks: edp 2, dp 4)."""
    pool = get_pool(4)
    plain = pool.run(_sharded_run, dict(ep=2), "none", timeout=300)
    sharded = pool.run(_sharded_run, dict(ep=2), shard, timeout=300)
    for rank, (a, b) in enumerate(zip(plain, sharded)):
        assert (a["dtensors"], a["optimizer"]) == (0, "AdamW")
        # every parameter is sharded (FSDP2), or the optimizer is
        assert (b["dtensors"], b["optimizer"]) == (
            (len(b["params"]), "AdamW") if shard == "experts" else (0, "ShardedOptimizer"))
        assert len(a["history"]) == 3
        for x, y in zip(a["history"], b["history"]):
            assert abs(x - y) <= 1e-10 * abs(x), (rank, a["history"], b["history"])
        assert a["params"].keys() == b["params"].keys()
        for name, want in a["params"].items():
            err = float((b["params"][name] - want).norm() / want.norm())
            assert err < 1e-10, (rank, name, err)


def _compiled_run(layout: dict, backend: str | None) -> dict:
    """The main job for 3 steps, its blocks compiled with ``backend`` (None: eager): its losses
    and parameters."""
    import torch._dynamo

    from moe_parallel import train

    flags = ARGS + [f"--{k}={v}" for k, v in layout.items()] + ["--steps=3", "--log-every=100"]
    out = train.main(flags + ([] if backend is None else [f"--compile={backend}"]))
    torch._dynamo.reset()
    return {"history": out["history"],
            "params": {n: p.detach().clone() for n, p in out["model"].named_parameters()}}


@pytest.mark.parametrize("layout", [dict(tp=2, ep=2), dict(ep=2, etp=2)])
def test_compiled_blocks_train_as_eager(layout):
    """``--compile aot_eager`` on 4 ranks: the same losses and parameters as eager, 1e-10
    (float64); the exchanges between a block's graphs are graph breaks."""
    pool = get_pool(4)
    eager = pool.run(_compiled_run, layout, None, timeout=300)
    compiled = pool.run(_compiled_run, layout, "aot_eager", timeout=300)
    for rank, (a, b) in enumerate(zip(eager, compiled)):
        assert len(a["history"]) == 3
        for x, y in zip(a["history"], b["history"]):
            assert abs(x - y) <= 1e-10 * abs(x), (rank, a["history"], b["history"])
        for name, want in a["params"].items():
            err = float((b["params"][name] - want).norm() / want.norm())
            assert err < 1e-10, (rank, name, err)
