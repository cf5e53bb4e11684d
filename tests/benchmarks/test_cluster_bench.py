"""benchmarks/cluster/: its pure pieces, a bare self-spawned 4-rank run and a torchrun
run as 2 "nodes" x 2 ranks on 127.0.0.1 (c10d rendezvous), both at tiny sizes, checked through
their JSON (not timed tests: only that every figure is there and consistent)."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
from argparse import Namespace

import pytest
import torch

from benchmarks import cost_model as cm
from benchmarks import harness
from benchmarks.cluster import cli
from benchmarks.cluster import dispatch as cdispatch
from benchmarks.cluster import layer as clayer
from benchmarks.cluster import main as cmain
from benchmarks.cluster import routings as croutings
from benchmarks.cluster import sweep as csweep
from benchmarks.cluster import topology as ctopology
from benchmarks.cluster import train as ctrain
from moe_parallel.dispatch import DISPATCHERS
from tests.helpers.proc_utils import free_port, launcher_free_env, run_sessions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_TIMEOUT_S = 150
T, H, E, K = 32, 16, 8, 2
TINY = ["--tokens", str(T), "--hidden", str(H), "--experts", str(E), "--top-k", str(K),
        "--layer-tokens", "16", "--layer-hidden", "16", "--layer-ffn", "32", "--rounds", "2",
        "--iters", "1", "--warmup", "1", "--sweep-bytes", "2048", "65536"]
KINDS = cli.default_dispatchers()


def _env(**extra) -> dict:
    return launcher_free_env(**extra)


def _run_all(commands: list[tuple[list[str], dict]]) -> list[tuple[int, str]]:
    return run_sessions(commands, RUN_TIMEOUT_S)


def _check_stats(t: dict, rounds: int = 2) -> None:
    assert len(t["rounds"]) == rounds and all(v > 0 for v in t["rounds"])
    assert t["min"] <= t["q1"] <= t["seconds"] <= t["q3"] <= t["max"]
    assert t["iqr"] == pytest.approx(t["q3"] - t["q1"])


def _check_record(rec: dict, nodes: int, ranks_per_node: int) -> None:
    """What every tiny 4-rank record must hold (the figures recomputed from its bytes/times)."""
    topo, cfg, res = rec["topology"], rec["config"], rec["results"]
    assert (topo["world"], topo["nodes"], topo["ranks_per_node"]) == (4, nodes, ranks_per_node)
    assert topo["hostnames"] == [socket.gethostname()]
    assert topo["node_of_rank"] == [r // ranks_per_node for r in range(4)]
    assert topo["backend"] == "gloo" and topo["torch"] == torch.__version__
    assert len(topo["devices"]) == 4 and rec["machine"]["cpu"]
    assert cfg["ep_sizes"] == [2, 4] and cfg["dispatchers"] == KINDS
    assert (cli.HIERARCHICAL in KINDS) == (cli.HIERARCHICAL in DISPATCHERS)
    assert [m["hostname"] for m in topo["node_machines"]] == [socket.gethostname()] * nodes

    sweep = res["sweep"]
    assert sorted({r["ep"] for r in sweep}) == [2, 4]
    for r in sweep:
        _check_stats(r["time"])
        alg = r["bytes"] / r["time"]["seconds"] / 1e9
        assert r["algbw_gbps"] == pytest.approx(alg, rel=1e-12)
        assert r["busbw_gbps"] == pytest.approx(alg * (r["ep"] - 1) / r["ep"], rel=1e-12)
        assert r["messages"] == r["ep"] - 1
        assert r["intra_bytes"] + r["inter_bytes"] == pytest.approx(
            r["bytes"] * (r["ep"] - 1) / r["ep"])
    assert sum(r["dispatch_volume"] for r in sweep) == 2  # T·k·H·4 B at each EP size

    rows = {(r["ep"], r["routing"]): r for r in res["dispatch"]}
    assert set(rows) == {(ep, kind) for ep in (2, 4) for kind in croutings.ROUTINGS}
    for (ep, routing), r in rows.items():
        assert set(r["variants"]) == {*KINDS, "raw"}, r["not_available"]
        s_mean = sum(r["send_bytes_per_rank"]) / 4
        assert r["bytes_per_rank"] == pytest.approx(s_mean)
        assert sum(r["send_bytes_per_rank"]) == sum(r["recv_bytes_per_rank"])
        if routing == "balanced":  # every rank sends T·k rows of H float32
            assert r["send_bytes_per_rank"] == [T * K * H * 4] * 4
            assert r["recv_bytes_per_rank"] == [T * K * H * 4] * 4
        if routing == "single_hot":  # EP rank 0 of each group receives the most
            assert r["recv_bytes_per_rank"][0] == max(r["recv_bytes_per_rank"])
            assert r["max_recv_over_mean"] > 1
        raw = r["variants"]["raw"]
        for kind, modes in r["variants"].items():
            for mode, factor in (("fwd", 2), ("fwd_bwd", 4)):
                v = modes[mode]
                _check_stats(v["time"])
                alg = factor * s_mean / v["time"]["seconds"] / 1e9
                assert v["algbw_gbps"] == pytest.approx(alg, rel=1e-12)
                assert v["busbw_gbps"] == pytest.approx(alg * (ep - 1) / ep, rel=1e-12)
                if kind != "raw":
                    assert v["ratio"] == pytest.approx(
                        v["time"]["seconds"] / raw[mode]["time"]["seconds"], rel=1e-12)

    layer = res["layer"]["rows"]
    assert [(r["mode"], r["ep"]) for r in layer] == [
        (m, ep) for m in ("weak", "strong") for ep in (1, 2, 4)]
    for r in layer:
        _check_stats(r["time"])
        assert r["tokens_per_s_per_rank"] == pytest.approx(
            r["tokens_per_rank"] / r["time"]["seconds"])
        assert r["tokens_per_rank"] == (16 if r["mode"] == "weak" else 64 // r["ep"])
        if r["ep"] == 1:
            assert r["efficiency"] == 1.0

    over = res["overlap"]["rows"]
    assert [(r["ep"], r["variant"]) for r in over] == [
        (ep, v) for ep in (1, 2, 4) for v in clayer.OVERLAP_VARIANTS]
    for r in over:
        _check_stats(r["time"])
        assert r["config"] == clayer.OVERLAP_VARIANTS[r["variant"]]
        base = next(b for b in over if b["ep"] == r["ep"] and b["variant"] == "none")
        assert r["vs_none"] == pytest.approx(r["time"]["seconds"] / base["time"]["seconds"],
                                             rel=1e-12)

    fit = rec["fit"]
    assert "error" not in fit, fit
    for key in ("latency_us", "call_us", "intra_gbps", "inter_gbps", "rel_rms",
                "max_rel_error", "terms", "warnings"):
        assert key in fit
    assert fit["ranks_per_node"] == ranks_per_node and len(fit["points"]) == len(sweep)
    assert fit["max_rel_error"] >= fit["rel_rms"] * 0.999 and fit["rel_rms"] >= 0
    for p in fit["points"]:
        assert p["rel_error"] == pytest.approx((p["predicted_s"] - p["seconds"]) / p["seconds"])
    pred = rec["predictions"]
    if "error" not in pred:
        assert pred["rows"][-1]["ep"] == 256 and pred["ranks_per_node"] == ranks_per_node
        assert {r["winner"] for r in pred["rows"]} <= {"flat", "hierarchical", "same (one node)"}


@pytest.mark.distributed
def test_bare_run_self_spawns_four_ranks(tmp_path):
    out = tmp_path / "cluster.json"
    [(rc, text)] = _run_all([([sys.executable, "-m", "benchmarks", "cluster", "--nproc", "4",
                               *TINY, "--out", str(out)], _env())])
    assert rc == 0, text[-4000:]
    rec = json.loads(out.read_text())
    _check_record(rec, nodes=1, ranks_per_node=4)
    assert rec["topology"]["launcher"] == "self-spawn"
    assert rec["fit"]["inter_gbps"] is None and "inter" not in rec["fit"]["terms"]
    assert rec["command"].startswith("python -m benchmarks cluster --nproc 4")
    for heading in ("All-to-all sweep", "Dispatch + combine", "MoE layer forward+backward",
                    "Overlap, measured", "All-to-all cost model fitted"):
        assert heading in text
    if rec.get("plot"):
        assert os.path.getsize(rec["plot"]) > 1000


@pytest.mark.distributed
def test_torchrun_two_nodes_of_two(tmp_path):
    """torchrun c10d, 2 "nodes" x 2 ranks on 127.0.0.1: LOCAL_WORLD_SIZE = 2 and GROUP_RANK make
    2 nodes on one host, so ep 4 crosses nodes (inter-node bytes, the hierarchical exchange in
    two stages) and the fit has an inter-node term; the training part runs too."""
    out = tmp_path / "cluster.json"
    port = free_port()
    script = os.path.join(ROOT, "launch", "torchrun_multi_node.sh")
    args = [script, "2", "cluster", *TINY, "--out", str(out), "--train-model", "--train-args",
            "--layers 1 --hidden 16 --ffn 16 --experts 4 --heads 2 --seq-len 8 --batch-size 2"]
    results = _run_all([(args, _env(NNODES=2, NODE_RANK=n, RDZV_ENDPOINT=f"127.0.0.1:{port}",
                                    LOCAL_ADDR="127.0.0.1", RDZV_ID=f"cluster{port}",
                                    RDZV_TIMEOUT=60, MODULE="benchmarks"))
                         for n in range(2)])
    for rc, text in results:
        assert rc == 0, text[-4000:]
    rec = json.loads(out.read_text())
    _check_record(rec, nodes=2, ranks_per_node=2)
    assert rec["topology"]["launcher"] == "torchrun"
    assert rec["topology"]["launcher_local_world"] == [2, 2, 2, 2]
    ep4 = [r for r in rec["results"]["sweep"] if r["ep"] == 4]
    assert all(r["inter_bytes"] == r["bytes"] / 2 and r["intra_bytes"] == r["bytes"] / 4
               for r in ep4)
    assert "inter" in rec["fit"]["terms"]
    train = rec["results"]["train"]
    assert train["ep"] == 4 and train["tokens_per_rank_per_step"] == 16
    assert train["tokens_per_s_per_rank"] == pytest.approx(16 / train["time"]["seconds"])
    assert train["mfu"] is None and "--peak-tflops" in train["mfu_note"]
    assert train["flops_per_token"] == ctrain.model_flops_per_token(16, 16, 1, 64, 8, 4, 2)


FAKE_SRUN = """\
#!/usr/bin/env bash
# Fake srun: runs the command SLURM_NTASKS times on this host with srun's per-task variables.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _free_slurm_port() -> int:
    """A free port in [20000, 30000), the range init_distributed derives from a SLURM job id."""
    for port in random.Random().sample(range(20000, 30000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in [20000, 30000)")


@pytest.mark.distributed
def test_slurm_bench_sbatch_under_a_fake_srun(tmp_path):
    """launch/slurm_bench.sbatch: 2 srun tasks join through SLURM_* (the all-to-all sweep only)."""
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    job_id = _free_slurm_port() - 20000  # init_distributed's port: 20000 + SLURM_JOB_ID % 10000
    out = tmp_path / "cluster.json"
    env = _env(SLURM_NTASKS=2, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost",
               PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cmd = ["bash", os.path.join(ROOT, "launch", "slurm_bench.sbatch"), *TINY, "--parts", "sweep",
           "--out", str(out)]
    [(rc, text)] = _run_all([(cmd, env)])
    assert rc == 0, text[-4000:]
    rec = json.loads(out.read_text())
    topo = rec["topology"]
    assert (topo["launcher"], topo["world"], topo["nodes"], topo["ranks_per_node"]) == (
        "slurm", 2, 1, 2)
    assert [r["ep"] for r in rec["results"]["sweep"]] == [2, 2, 2]
    assert set(rec["results"]) == {"sweep"} and "error" not in rec["fit"]


@pytest.mark.distributed
def test_nproc_1_runs_in_process_at_ep_1(tmp_path):
    out = tmp_path / "cluster.json"
    [(rc, text)] = _run_all([([sys.executable, "-m", "benchmarks", "cluster", "--nproc", "1",
                               *TINY, "--out", str(out)], _env())])
    assert rc == 0, text[-4000:]
    rec = json.loads(out.read_text())
    assert rec["topology"]["world"] == 1 and rec["topology"]["launcher"] == "single"
    assert rec["config"]["ep_sizes"] == [] and rec["results"]["sweep"] == []
    assert rec["results"]["dispatch"] == []
    assert [(r["mode"], r["ep"]) for r in rec["results"]["layer"]["rows"]] == [
        ("weak", 1), ("strong", 1)]
    assert "no all-to-all was measured" in rec["fit"]["error"]
    assert rec["predictions"] is None and "no fit: no all-to-all" in text


def test_hierarchical_reported_not_available(monkeypatch):
    """Without the hierarchical kind, or with a ParallelState.build that has no ranks_per_node,
    the bench says why instead of failing."""
    import moe_parallel.dispatch as dispatch
    from moe_parallel import ParallelState

    monkeypatch.setattr(dispatch, "DISPATCHERS", ("alltoall", "allgather"))
    assert cli.HIERARCHICAL not in cli.default_dispatchers()
    states, why = cdispatch.hierarchical_states([2, 4], 2, {2: None, 4: None})
    assert states == {} and all("not in moe_parallel.dispatch.DISPATCHERS" in why[e]
                                for e in (2, 4))

    def old_build(cls, **kw):
        if "ranks_per_node" in kw:
            raise TypeError("build() got an unexpected keyword argument 'ranks_per_node'")

    monkeypatch.setattr(dispatch, "DISPATCHERS", ("alltoall", cli.HIERARCHICAL))
    monkeypatch.setattr(ParallelState, "build", classmethod(old_build))
    states, why = cdispatch.hierarchical_states([2], 2, {2: object()})
    assert states == {} and why[2].startswith("not available") and "ranks_per_node" in why[2]


# ---- pure pieces --------------------------------------------------------------------------
def test_routings():
    r = croutings.make_routing("balanced", 12, 8, 2)
    assert r.routed_per_expert.tolist() == [3] * 8 and r.keep is None
    assert torch.equal(r.probs, torch.full((12, 2), 0.5))
    hot = croutings.make_routing("single_hot", 10, 8, 3)
    assert (hot.expert_idx[:, 0] == 0).all() and (hot.expert_idx[:, 1:] != 0).all()
    assert int(hot.routed_per_expert[0]) == 10
    z1 = croutings.make_routing("zipf", 500, 8, 2, rank=1, seed=3)
    assert torch.equal(z1.expert_idx, croutings.make_routing("zipf", 500, 8, 2, rank=1, seed=3)
                       .expert_idx)
    assert not torch.equal(z1.expert_idx, croutings.make_routing("zipf", 500, 8, 2, rank=2, seed=3)
                           .expert_idx)
    assert (z1.expert_idx[:, 0] != z1.expert_idx[:, 1]).all()  # distinct per token
    pop = croutings.zipf_popularity(8, 1.2, 3)
    assert float(pop.sum()) == pytest.approx(1.0)
    ranked = sorted(pop.tolist(), reverse=True)
    assert ranked[0] / ranked[1] == pytest.approx(2 ** 1.2)
    hottest = int(pop.argmax())  # sampled most often
    assert int(z1.routed_per_expert.argmax()) == hottest
    with pytest.raises(ValueError, match="routing kind"):
        croutings.make_routing("uniform", 4, 8, 2)
    with pytest.raises(ValueError, match="top_k"):
        croutings.make_routing("balanced", 4, 2, 3)


def test_sweep_iters():
    assert [csweep.sweep_iters(3, b) for b in (4096, 65536, 2 ** 19, 2 ** 20, 2 ** 25)] == [
        30, 30, 6, 3, 3]


def test_summarize_and_bandwidth():
    s = harness.summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["seconds"], s["min"], s["max"]) == (2.5, 1.0, 4.0)
    assert (s["q1"], s["q3"], s["iqr"]) == (1.75, 3.25, 1.5)
    assert harness.summarize([2.0])["iqr"] == 0.0
    assert csweep.bandwidth(8e9, 2.0, 4) == (4.0, 3.0)
    with pytest.raises(ValueError, match="seconds"):
        csweep.bandwidth(1.0, 0.0, 2)


def test_node_layout_and_volumes():
    host = [{"hostname": "a", "node_index": None}] * 4
    assert ctopology.node_layout(host)["node_of"] == [0, 0, 0, 0]
    torchrun = [{"hostname": "a", "node_index": n} for n in (0, 0, 1, 1)]
    lay = ctopology.node_layout(torchrun)
    assert (lay["nodes"], lay["ranks_per_node"], lay["node_of"]) == (2, 2, [0, 0, 1, 1])
    assert ctopology.node_layout(host, ranks_per_node=2)["node_of"] == [0, 0, 1, 1]
    two_hosts = [{"hostname": h, "node_index": None} for h in "aabb"]
    assert ctopology.node_layout(two_hosts)["hostnames"] == ["a", "b"]
    with pytest.raises(cli.PlanError, match="uneven ranks per node"):
        ctopology.node_layout([{"hostname": h, "node_index": None} for h in "aab"])
    with pytest.raises(cli.PlanError, match="--ranks-per-node 3"):
        ctopology.node_layout(host, ranks_per_node=3)
    v = ctopology.layout_volumes(800.0, 4, [0, 0, 1, 1, 2, 2, 3, 3])
    assert v == {"messages": 3, "intra_bytes": 200.0, "inter_bytes": 400.0}
    assert ctopology.layout_volumes(800.0, 2, [0, 0, 1, 1])["inter_bytes"] == 0.0


def _args(**kw) -> Namespace:
    base = dict(ep_sizes=None, experts=None, top_k=2, global_tokens=None, layer_tokens=16,
                dispatchers=None, layer_rounds=None, rounds=3, layer_hidden=16, layer_ffn=32,
                layer_dispatcher="alltoall")
    return Namespace(**{**base, **kw})


def test_make_plan():
    plan = cli.make_plan(_args(), 8)
    assert plan["ep_sizes"] == [2, 4, 8] and plan["experts"] == 16
    assert plan["global_tokens"] == 128 and plan["layer_rounds"] == 3
    assert plan["dispatchers"] == cli.default_dispatchers()
    assert cli.make_plan(_args(), 12)["ep_sizes"] == [2, 4]
    assert cli.make_plan(_args(), 1)["ep_sizes"] == []
    assert cli.make_plan(_args(ep_sizes=[3]), 6)["experts"] == 9
    assert cli.make_plan(_args(dispatchers=["allgather"]), 4)["dispatchers"] == [
        "alltoall", "allgather"]
    for kw, world, option in ((dict(ep_sizes=[3]), 4, "--ep-sizes"),
                              (dict(ep_sizes=[1]), 4, "--ep-sizes"),
                              (dict(experts=6), 4, "--experts 6"),
                              (dict(top_k=9), 4, "--top-k 9"),
                              (dict(global_tokens=6), 4, "--global-tokens 6"),
                              (dict(dispatchers=["nope"]), 4, "--dispatchers"),
                              (dict(layer_dispatcher="ring"), 4, "--layer-dispatcher")):
        with pytest.raises(cli.PlanError, match=option):
            cli.make_plan(_args(**kw), world)


@pytest.mark.parametrize("argv, option", [
    (["--tokens", "0"], "--tokens"), (["--rounds", "x"], "--rounds"),
    (["--routings", "uniform"], "--routings"), (["--zipf-s", "-1"], "--zipf-s"),
    (["--predict-ep-max", "1"], "--predict-ep-max"), (["--experts", "6"], "--experts 6"),
])
def test_bad_cli_input_names_the_option(argv, option, capsys, monkeypatch):
    for name in cli.LAUNCHER_VARS:  # bare: main checks the plan before spawning anything
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        cmain.main([*argv, "--nproc", "4"])
    assert exc.value.code == 2 and option in capsys.readouterr().err


def test_model_flops_and_peak():
    # L=1, H=16, F=16, E=4, k=2, V=64, S=8, SwiGLU: N = 4·256 + 64 + 2·3·256 + 1024 = 3648
    assert ctrain.model_flops_per_token(16, 16, 1, 64, 8, 4, 2) == 6 * 3648 + 12 * 16 * 8
    assert ctrain.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert ctrain.peak_tflops_for("NVIDIA A100-SXM4-40GB") == 312.0
    assert ctrain.peak_tflops_for(None) is None and ctrain.peak_tflops_for("Tesla T4") is None


def test_predictions_flat_vs_hierarchical():
    """Per-message latency dominates: hierarchical wins across nodes; bandwidth dominates
    (no latency): the flat exchange wins (hierarchical moves more bytes inside the node)."""
    pts = [{"ep": ep, "bytes": b, "seconds": cm.all_to_all_flat_seconds(b, ep, 4, 50.0, 10.0)}
           for ep in (2, 4) for b in (1e3, 1e6)]
    fit = cm.fit_alltoall(pts, 4)
    pred = cm.predictions(fit, 1e4, 64, {4: 1e-3})
    rows = {r["ep"]: r for r in pred["rows"]}
    assert sorted(rows) == [2, 4, 8, 16, 32, 64]
    assert rows[4]["winner"] == "same (one node)" and rows[4]["measured_s"] == 1e-3
    assert rows[4]["rel_error"] == pytest.approx((rows[4]["flat_s"] - 1e-3) / 1e-3)
    assert all(rows[ep]["winner"] == "hierarchical" for ep in (8, 16, 32, 64))
    assert pred["inter_source"].startswith("ASSUMED") and pred["inter_gbps"] == pytest.approx(10)
    # n - 1 = 1 inter message and 3 intra ones vs 7 flat messages at ep 8: 50 us x 3 saved
    assert rows[8]["flat_s"] - rows[8]["hierarchical_s"] == pytest.approx(
        150e-6 - 1e4 * 3 * (1 / 4 - 1 / 8) / 10e9, rel=1e-6)
    bw = [{"ep": ep, "bytes": b, "seconds": cm.all_to_all_flat_seconds(b, ep, 4, 1e-3, 10.0)}
          for ep in (2, 4) for b in (1e6, 1e8)]
    pred = cm.predictions(cm.fit_alltoall(bw, 4), 1e8, 32, {}, inter_gbps=5.0)
    assert pred["inter_source"] == "--predict-inter-gbps"
    assert {r["winner"] for r in pred["rows"] if r["ep"] > 4} == {"flat"}
    assert "flat wins at ep [8, 16, 32]" in pred["verdict"]
    assert math.isfinite(pred["rows"][-1]["flat_s"])
