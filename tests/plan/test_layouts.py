"""Layouts: a size that cannot divide the model or the world is refused naming its flag; the
enumeration yields only layouts whose grids tile the world."""

from __future__ import annotations

import pytest

from moe_parallel.plan import Layout, builtin_model, check_layout, enumerate_layouts, preset

ALL_MODES = (["none", "experts", "optimizer"], ["none", "activation", "experts"])


@pytest.mark.parametrize("model,world,layout,message", [
    ("mixtral-8x7b", 64, dict(ep=3), r"--ep 3: --gpus 64 is not divisible by it"),
    ("mixtral-8x7b", 64, dict(ep=16), r"--ep 16: mixtral-8x7b has 8 experts, not divisible"),
    ("qwen3-30b-a3b", 1024, dict(etp=512), r"--etp 512: .*expert FFN width 768 is not divisible"),
    ("gpt-oss-120b", 64, dict(etp=2), r"--etp 2: gpt-oss-120b has expert biases"),
    ("mixtral-8x7b", 64, dict(tp=16), r"--tp 16: .*KV heads \(8\) are not divisible by 16"),
    ("qwen3-30b-a3b", 64, dict(pp=64), r"--pp 64: .*has 48 layers"),
    ("mixtral-8x7b", 48, dict(tp=4, ep=8, pp=4), r"--gpus 48 is not divisible by ep·etp·pp = 32"),
])
def test_a_layout_that_does_not_divide_names_the_argument(model, world, layout, message):
    with pytest.raises(ValueError, match=message):
        check_layout(preset(model), Layout(world, **layout), seq_len=4096)


def test_sequence_and_builtin_model_rules():
    with pytest.raises(ValueError, match=r"--seq-len 100 is not divisible by tp·cp = 8"):
        check_layout(preset("mixtral-8x7b"), Layout(8, tp=8), seq_len=100)
    small = builtin_model(vocab=64, hidden=32, ffn=48, experts=8, top_k=2, layers=2, heads=4,
                          seq_len=32)
    with pytest.raises(ValueError, match="--cp 2: the built-in model runs tp, ep, etp and dp"):
        check_layout(small, Layout(4, cp=2), seq_len=32)
    check_layout(small, Layout(4, tp=2, ep=2), seq_len=32)  # its TP slices the sequence


def test_enumeration_tiles_the_world_and_refuses_a_named_size_that_cannot():
    model = preset("mixtral-8x7b")
    layouts = enumerate_layouts(model, 64, 4096, {"pp": [1, 2]}, *ALL_MODES)
    assert layouts and len({(lay.shard, lay.recompute) for lay in layouts}) == 9
    for lay in layouts:
        assert lay.pp * lay.dp * lay.cp * lay.tp == 64 == lay.pp * lay.edp * lay.ep * lay.etp
        assert model.experts % lay.ep == 0 and lay.tp <= 8 and lay.etp <= 8
    assert {lay.ep for lay in layouts} == {1, 2, 4, 8}
    with pytest.raises(ValueError, match="--ep 3"):
        enumerate_layouts(model, 64, 4096, {"ep": [2, 3]}, *ALL_MODES)
    with pytest.raises(ValueError, match="--shard: 'zero3' is not one of"):
        enumerate_layouts(model, 64, 4096, {}, ["zero3"], ["none"])
    with pytest.raises(ValueError, match="no layout of the given sizes fits"):
        enumerate_layouts(model, 64, 4096, {"tp": [8], "ep": [8], "pp": [2], "etp": [8]},
                          ["none"], ["none"])
