"""``python -m moe_parallel.plan``: the table and the JSON, and bad input refused with the
argument named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_parallel.plan.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", "mixtral-8x7b", "--gpus", "32", "--pp", "1,2", "--gpu-memory", "80GiB"]


def test_table_and_json_rank_the_layouts_that_fit(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    assert main(ARGS + ["--top", "5", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "model: mixtral-8x7b: 46.70B parameters" in text
    assert "layouts evaluated" in text and "tok/s/GPU" in text
    assert len([ln for ln in text.splitlines() if ln.strip()[:2] in {f"{i} " for i in
                                                                     range(1, 6)}]) == 5
    data = json.loads(out_json.read_text())
    layouts = data["layouts"]
    assert data["evaluated"] == len(layouts) and 0 < data["fitting"] < len(layouts)
    assert data["model"]["total_params"] == 46_702_792_704
    assert data["command"].startswith("python -m moe_parallel.plan --model mixtral-8x7b")
    fitting = [r for r in layouts if r["fits"]]
    assert layouts[:len(fitting)] == fitting        # the fitting ones first, fastest first
    speeds = [r["time"]["tokens_per_second_per_gpu"] for r in fitting]
    assert speeds == sorted(speeds, reverse=True)
    budget = data["cluster"]["budget_bytes"]
    assert budget == 80 * 2**30
    for r in layouts:
        lay = r["layout"]
        assert lay["tp"] * lay["cp"] * lay["pp"] * lay["dp"] == 32
        assert lay["ep"] * lay["etp"] * lay["pp"] * lay["edp"] == 32
        assert r["fits"] == (r["memory"]["total"] <= budget)
        for key in ("params", "grads", "optimizer", "activations", "dispatch"):
            assert r["memory"][key] >= 0


def test_nothing_fits_says_so(capsys):
    assert main(["--model", "deepseek-v3", "--gpus", "8", "--pp", "1", "--top", "2"]) == 0
    assert "0 fit; none fits in 74.5 GiB" in capsys.readouterr().out


def test_hf_config_and_fitted_cluster(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=1000, num_local_experts=8,
        num_experts_per_tok=2)))
    fit = ROOT / "benchmarks" / "results" / "cluster_cpu_2026-12-02_2x2.json"
    assert main(["--config", str(tmp_path), "--gpus", "4", "--gpu-memory", "1GiB",
                 "--seq-len", "512", "--alltoall-fit", str(fit)]) == 0
    text = capsys.readouterr().out
    assert "2 per node" in text and f"cost model fitted: {fit}" in text


def test_list_models(capsys):
    assert main(["--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["mixtral-8x7b", "mixtral-8x22b", "deepseek-v3",
                                                  "qwen3-30b-a3b", "qwen3-235b-a22b",
                                                  "gpt-oss-120b"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "mixtral-8x9b", "--gpus", "8"], "--model: unknown model 'mixtral-8x9b'"),
    (ARGS + ["--gpu-memory", "eighty"],
     "argument --gpu-memory: cannot parse 'eighty' as a memory size"),
    (ARGS + ["--reserve", "2 GJ"], "argument --reserve: cannot parse '2 GJ'"),
    (ARGS + ["--ep", "3"], "--ep 3: --gpus 32 is not divisible by it"),
    (ARGS + ["--ep", "16"], "--ep 16: mixtral-8x7b has 8 experts, not divisible by 16"),
    (ARGS + ["--tp", "x"], "argument --tp: 'x' is not a comma-separated list"),
    (ARGS + ["--shard", "zero3"], "argument --shard: 'zero3': each value must be one of"),
    (["--config", "/nonexistent/config.json", "--gpus", "8"], "--config: no such file"),
    (["--model", "mixtral-8x7b"], "--gpus is required"),
    (["--gpus", "8"], "one of --model or --config is required"),
    (ARGS + ["--imbalance", "0"], "--imbalance: must be a positive number"),
])
def test_bad_input_names_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.distributed  # a subprocess
def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "moe_parallel.plan", "--model", "qwen3-30b-a3b",
                           "--gpus", "16", "--pp", "1", "--top", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "qwen3-30b-a3b: 30.53B parameters" in done.stdout
