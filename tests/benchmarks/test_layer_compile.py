"""``python -m benchmarks layer --compile``: the compiled contenders at tiny sizes (aot_eager).

* The JSON holds ``dense_compiled`` and ``grouped_compiled`` next to their eager twins, with
  positive times and compile seconds, ``compiled_speedup`` = t(eager) / t(compiled) and the
  backend; their output and gradients equal eager's (float64, 1e-12 relative), and dynamo did
  compile graphs. Without ``--compile`` the run has neither contender nor compile entries.
* The recorded difference is a real comparison: a perturbed weight shows in it.
* A compiled contender without a backend is refused, naming the parameter and the choices.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.__main__ import main as bench_main
from benchmarks.layer_bench import COMPILE_BACKENDS, build, compiled_vs_eager

TINY = ["layer", "--tokens", "48", "--hidden", "16", "--ffn", "24", "--experts", "4",
        "--top-k", "2", "--dtype", "float64", "--threads", "1", "--repeats", "1", "--no-memory",
        "--contenders", "grouped"]
CASE = dict(tokens=48, hidden=16, ffn=24, experts=4, top_k=2, dtype="float64", device="cpu",
            threads=1, compile="aot_eager")


def test_compile_adds_both_compiled_contenders_equal_to_eager(tmp_path):
    out = tmp_path / "layer.json"
    torch._dynamo.reset()
    counters.clear()
    bench_main([*TINY, "--compile", "aot_eager", "--out", str(out)])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    record = json.loads(out.read_text())
    assert record["case"]["compile"] == "aot_eager"
    assert [r["contender"] for r in record["results"]] == [
        "dense", "dense_compiled", "grouped", "grouped_compiled"]
    rows = {r["contender"]: r for r in record["results"]}
    assert graphs >= 2, dict(counters["stats"])  # the dense FFN and the layer were compiled
    for name in ("dense", "grouped"):
        eager, comp = rows[name], rows[f"{name}_compiled"]
        assert eager["seconds"] > 0 and comp["seconds"] > 0 and comp["compile_seconds"] > 0
        assert comp["compile_backend"] == "aot_eager"
        assert isinstance(comp["compile_caches_disabled"], bool)
        assert comp["compiled_speedup"] == eager["seconds"] / comp["seconds"]
        assert 0 <= comp["max_rel_diff"] <= 1e-12, comp
        assert 0 <= comp["max_rel_diff_grad"] <= 1e-12, comp
        assert "compiled_speedup" not in eager


def test_without_compile_nothing_is_compiled(tmp_path):
    out = tmp_path / "layer.json"
    bench_main([*TINY, "--out", str(out)])
    record = json.loads(out.read_text())
    assert "compile" not in record["case"]
    assert [r["contender"] for r in record["results"]] == ["dense", "grouped"]
    assert not any("compiled_speedup" in r for r in record["results"])


@pytest.mark.parametrize("contender", ["grouped_compiled", "dense_compiled"])
def test_the_recorded_difference_sees_a_perturbed_weight(contender):
    torch._dynamo.reset()
    compiled = build(CASE, contender)
    compiled.step()
    assert compiled_vs_eager(CASE, contender, compiled)["max_rel_diff"] <= 1e-12
    with torch.no_grad():
        compiled.params[-1].mul_(1 + 1e-6)  # the last weight every output row goes through
    diff = compiled_vs_eager(CASE, contender, compiled)
    torch._dynamo.reset()
    assert 1e-9 < diff["max_rel_diff"] < 1e-4, diff
    assert 1e-9 < diff["max_rel_diff_grad"], diff


def test_compiled_contender_needs_a_backend(capsys):
    with pytest.raises(ValueError, match=r"case\['compile'\] in \('inductor', 'aot_eager'\)"):
        build({**CASE, "compile": None}, "grouped_compiled")
    with pytest.raises(SystemExit):
        bench_main([*TINY, "--profile", "grouped_compiled"])
    assert "--profile of a compiled contender needs --compile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main([*TINY, "--compile", "eager"])
    err = capsys.readouterr().err
    assert all(b in err for b in COMPILE_BACKENDS) and "--compile" in err
