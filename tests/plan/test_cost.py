"""The step-time model: its all-to-all formula is the fitted model of ``benchmarks.cost_model``
(restated in the package, which does not import the benchmarks), fitted parameters load from
a cluster benchmark result, and the step composes compute, communication and the pipeline as
documented."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from moe_parallel.plan import Cluster, Layout, MemoryOptions, cluster_from_fit, preset, step_time
from moe_parallel.plan.cost import all_to_all_seconds, ring_seconds

ROOT = Path(__file__).resolve().parents[2]
FIT_RESULT = ROOT / "benchmarks" / "results" / "cluster_cpu_2026-12-02_2x2.json"


def test_all_to_all_is_the_fitted_model_of_the_benchmarks():
    from benchmarks.cost_model import all_to_all_flat_seconds

    rng = random.Random(0)
    for _ in range(200):
        g = rng.choice([1, 2, 4, 8])
        ep = rng.choice([2, 4, 8, 16, 32, 64])
        if ep > g and ep % g:
            continue
        c = Cluster(gpus_per_node=g, intra_gbps=rng.uniform(1, 900),
                    inter_gbps=rng.uniform(1, 100), call_us=rng.uniform(0, 50),
                    message_us=rng.uniform(0, 20))
        volume = rng.uniform(1e3, 1e9)
        ours = all_to_all_seconds(volume, ep, g, c)
        theirs = all_to_all_flat_seconds(volume, ep, g, c.message_us, c.intra_gbps, c.inter_gbps,
                                         c.call_us)
        assert ours == pytest.approx(theirs, rel=1e-12)
    assert all_to_all_seconds(1e9, 1, 8, Cluster()) == 0.0


def test_ring_collectives():
    c = Cluster(gpus_per_node=8, intra_gbps=100, inter_gbps=10, call_us=5, message_us=1)
    assert ring_seconds(8e9, 8, 8, c) == pytest.approx(5e-6 + 7e-6 + 7e9 / 100e9)
    assert ring_seconds(8e9, 16, 8, c) == pytest.approx(5e-6 + 15e-6 + 7.5e9 / 10e9)
    assert ring_seconds(8e9, 1, 8, c) == 0.0


def test_fitted_parameters_load_from_a_cluster_benchmark_result(tmp_path):
    fit = json.loads(FIT_RESULT.read_text())["fit"]
    c = cluster_from_fit(FIT_RESULT, tflops=100.0, gpus_per_node=None)
    assert (c.gpus_per_node, c.intra_gbps, c.inter_gbps, c.call_us, c.message_us, c.tflops) == (
        fit["ranks_per_node"], fit["intra_gbps"], fit["inter_gbps"], fit["call_us"],
        fit["latency_us"], 100.0)
    (tmp_path / "other.json").write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="--alltoall-fit: .* holds no all-to-all fit"):
        cluster_from_fit(tmp_path / "other.json")


def test_step_composes_compute_communication_and_the_pipeline():
    model = preset("mixtral-8x7b")
    opts = MemoryOptions(seq_len=4096, global_batch=512)
    c = Cluster()
    base = step_time(model, Layout(64, ep=8, pp=2), opts, c)
    assert base["microbatches"] == 512 // 32
    faster = step_time(model, Layout(64, ep=8, pp=2), opts, replace(c, tflops=1200.0))
    assert faster["compute_seconds"] == pytest.approx(base["compute_seconds"] / 2)
    comm = sum(base["comm_seconds"].values())
    assert base["stage_seconds"] == pytest.approx(base["compute_seconds"] + comm)
    assert base["step_seconds"] == pytest.approx((16 + 2 - 1) * base["stage_seconds"]
                                                 + base["grad_sync_seconds"])
    assert base["comm_seconds"]["ep_alltoall"] > 0
    local = step_time(model, Layout(64, pp=2), opts, c)
    assert local["comm_seconds"]["ep_alltoall"] == 0
    hidden = step_time(model, Layout(64, ep=8, pp=2), opts, replace(c, overlap=1.0))
    assert hidden["stage_seconds"] == pytest.approx(max(base["compute_seconds"], comm))
    recomputed = step_time(model, Layout(64, ep=8, pp=2, recompute="experts"), opts, c)
    assert recomputed["compute_seconds"] > base["compute_seconds"]
    assert base["tokens_per_second_per_gpu"] == pytest.approx(
        base["tokens_per_step"] / base["step_seconds"] / 64)


@pytest.mark.parametrize("field,value,message", [
    ("tflops", 0, "--tflops: must be a positive number"),
    ("overlap", 1.5, r"--overlap: must be in \[0, 1\]"),
    ("message_us", -1, "--message-us: must be a number >= 0"),
    ("gpus_per_node", 0, "--gpus-per-node: must be a positive int"),
])
def test_bad_cluster_figures_name_the_argument(field, value, message):
    with pytest.raises(ValueError, match=message):
        Cluster(**{field: value})
