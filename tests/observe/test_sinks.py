"""Metric sinks (``moe_parallel.observe.sinks``): a run of the main job with ``--tensorboard``
and ``--metrics-jsonl`` whose event file, read back with TensorBoard's own reader, and JSON
Lines agree with each other and with the routing recomputed here; the sinks' refusals."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from moe_parallel import train
from moe_parallel.observe import JsonlSink, MetricSinks
from tests.observe.test_metrics import E, check, reference

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

FLAGS = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
         "--experts", str(E), "--top-k", "2", "--vocab", "32", "--seq-len", "8",
         "--batch-size", "3", "--capacity-factor", "1.0", "--aux-loss-coeff", "0.01",
         "--z-loss-coeff", "0.001", "--steps", "5", "--log-every", "2"]


def _recording_routes(monkeypatch) -> list[list]:
    """Patch the job's ``build_job`` so that every layer's ``route`` (router + capacity) keeps
    what it returned, per layer and forward (one forward per step)."""
    seen: list[list] = []
    build = train.job.build_job

    def recorded(*a, **kw):
        job = build(*a, **kw)
        for layer in job.model.moe_layers():
            seen.append([])

            def route(*ra, _route=layer.route, _seen=seen[-1], **rkw):
                out = _route(*ra, **rkw)
                r = out[0]
                _seen.append((r.logits.detach().clone(), r.expert_idx.clone(),
                              None if r.keep is None else r.keep.clone()))
                return out
            layer.route = route
        return job

    monkeypatch.setattr(train.job, "build_job", recorded)
    return seen


def test_tensorboard_and_jsonl_of_a_run_equal_the_recomputed_routing(tmp_path, monkeypatch):
    seen = _recording_routes(monkeypatch)
    tb, jl = tmp_path / "tb", tmp_path / "metrics.jsonl"
    out = train.main(FLAGS + ["--tensorboard", str(tb), "--metrics-jsonl", str(jl)])
    records = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [len(s) for s in seen] == [5, 5]
    acc = event_accumulator.EventAccumulator(
        str(tb), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    dropped = 0
    for rec in records:
        step = rec["step"]
        assert rec["loss"] == out["history"][step]
        for i, layer in enumerate(rec["layers"]):
            want = reference(*seen[i][step], aux=0.01, z=0.001)
            check(layer, want | {"layer": i, "tokens": 3 * 8, "experts_per_token": 2.0})
            dropped += layer["dropped"]
            for name in ("drop_rate", "imbalance", "cv", "min_over_mean", "router_entropy",
                         "loss_aux", "loss_z", "tokens"):
                tag = f"moe/layer{i}/{name}"
                (event,) = [e for e in acc.Scalars(tag) if e.step == step]
                assert event.value == pytest.approx(layer[name], rel=1e-6), tag  # float32
            (hist,) = [h for h in acc.Histograms(f"moe/layer{i}/tokens_per_expert")
                       if h.step == step]
            assert [int(c) for c in hist.histogram_value.bucket] == want["tokens_per_expert"]
            assert hist.histogram_value.num == sum(want["tokens_per_expert"])
        (loss,) = [e for e in acc.Scalars("train/loss") if e.step == step]
        assert loss.value == pytest.approx(rec["loss"], rel=1e-6)
    assert dropped > 0  # capacity dropped assignments: drop rate and load differ from routing


def test_log_line_shows_the_collected_load_summed_over_layers(tmp_path, capsys):
    jl = tmp_path / "m.jsonl"
    train.main(FLAGS[:-4] + ["--steps", "1", "--metrics-jsonl", str(jl)])
    (rec,) = [json.loads(line) for line in jl.read_text().splitlines()]
    line = re.search(r"step\s+0 .*load/expert \[([\d, ]+)\].*drop ([\d.]+)%",
                     capsys.readouterr().out)
    load = [sum(m["tokens_per_expert"][e] for m in rec["layers"]) for e in range(E)]
    routed = sum(m["routed"] for m in rec["layers"])
    assert [int(v) for v in line.group(1).split(",")] == load
    assert float(line.group(2)) == round(100 * sum(m["dropped"] for m in rec["layers"]) / routed,
                                         1)


def test_jsonl_is_strict_json_and_appends(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    for step in (0, 1):
        sinks = MetricSinks(jsonl=str(path))
        sinks.write(step, [{"layer": 0, "router_entropy": float("nan")}], loss=float("inf"))
        sinks.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["loss"] is None and rows[0]["layers"][0]["router_entropy"] is None
    assert math.isfinite(rows[1]["wall_time"])


def test_other_ranks_open_nothing(tmp_path):
    sinks = MetricSinks(tensorboard=str(tmp_path / "tb"), jsonl=str(tmp_path / "m.jsonl"),
                        enabled=False)
    sinks.write(0, [], loss=1.0)
    sinks.close()
    assert not sinks and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--metrics-jsonl", ""], "--metrics-jsonl needs a non-empty value"),
    (["--tensorboard", ""], "--tensorboard needs a non-empty value"),
])
def test_empty_metric_flags_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        train._parse(flags)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_wandb_flag_needs_wandb(capsys):
    with pytest.raises(SystemExit):
        train._parse(["--wandb-project", "p"])
    assert "--wandb-project needs the wandb package" in capsys.readouterr().err


def test_sink_writes_one_line_per_call(tmp_path):
    sink = JsonlSink(str(tmp_path / "a.jsonl"))
    sink.write({"step": 3, "layers": [], "x": torch.tensor(1.5).item()})
    sink.close()
    assert json.loads((tmp_path / "a.jsonl").read_text()) == {"step": 3, "layers": [], "x": 1.5}
