"""``python -m moe_parallel.train --freeze``: each part (and combinations) trains a few steps on
one process with the frozen parameters bitwise unchanged, every trainable one moved and the
optimizer holding exactly the trainable ones; a frozen run resumes bit for bit from a
checkpoint that holds every parameter; invalid values and freezing everything are refused."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import checkpoint, train
from moe_parallel.distributed import ParallelState
from moe_parallel.train.freeze import freeze, part_parameters
from tests.helpers.training_parity import assert_same_run

SMALL = ["--steps", "3", "--layers", "2", "--hidden", "16", "--ffn", "16", "--heads", "2",
         "--experts", "4", "--top-k", "2", "--vocab", "32", "--seq-len", "8", "--batch-size", "2",
         "--log-every", "100", "--device", "cpu"]


def _initial() -> dict[str, torch.Tensor]:
    """The parameters the job starts from (``build_model`` seeds itself with ``--seed``)."""
    model = train.build_model(train._parse(SMALL), ParallelState.single())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("parts", ["moe", "dense", "router", "experts", "router,dense",
                                   "experts,dense"])
def test_each_freeze_value_trains_the_other_parameters_only(parts, capsys):
    start = _initial()
    out = train.main(SMALL + ["--freeze", parts])
    model = out["model"]
    frozen = {id(p) for part in parts.split(",") for p in part_parameters(model, part)}
    assert frozen and len(frozen) < len(start)
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and torch.equal(p.detach(), start[name]), name
        else:
            assert p.requires_grad and not torch.equal(p.detach(), start[name]), name
    in_optimizer = {id(p) for g in out["optimizer"].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert f"frozen: {parts.split(',')[0]} (" in capsys.readouterr().out


def test_freeze_counts_each_part_and_refuses_bad_parts():
    model = train.build_model(train._parse(SMALL), ParallelState.single())
    numel = {part: sum(p.numel() for p in part_parameters(model, part))
             for part in ("moe", "dense", "router", "experts")}
    assert numel["moe"] == numel["router"] + numel["experts"]  # no shared experts here
    assert numel["moe"] + numel["dense"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="parts must be a comma-separated list of moe, dense, "
                                         "router, experts"):
        freeze(model, "routers")
    with pytest.raises(ValueError, match="would leave no trainable parameter"):
        freeze(model, ["dense", "router", "experts"])
    assert all(p.requires_grad for p in model.parameters())  # a refusal changes nothing
    assert freeze(model, ["router", "experts"]) == {"router": numel["router"],
                                                    "experts": numel["experts"]}
    with pytest.raises(ValueError, match="the model has no MoELayer"):
        freeze(torch.nn.Linear(2, 2), "router")


def _refusal(capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as exc:
        train._parse(list(flags))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["routers", "", "moe,,dense"])
def test_invalid_freeze_values_are_refused_naming_the_flag(value, capsys):
    err = _refusal(capsys, "--freeze", value)
    assert "argument --freeze:" in err and "moe, dense, router, experts" in err, err


def test_freezing_everything_is_refused(capsys):
    assert "--freeze moe,dense freezes every parameter" in _refusal(capsys, "--freeze",
                                                                     "dense,moe")
    # the built-in model has no shared experts: these three are every parameter too
    with pytest.raises(SystemExit) as exc:
        train.main(SMALL + ["--freeze", "dense,router,experts"])
    assert exc.value.code == 2
    assert "would leave no trainable parameter" in capsys.readouterr().err


def test_freeze_with_deepspeed_is_refused(capsys):
    assert "--freeze is not supported with --deepspeed" in _refusal(
        capsys, "--freeze", "router", "--deepspeed", "ds.json")


def test_a_frozen_run_resumes_bitwise_from_a_full_checkpoint(tmp_path):
    flags = SMALL[2:] + ["--steps", "4", "--freeze", "experts", f"--save-dir={tmp_path}"]
    first = train.main(flags + ["--save-every=2"])
    resumed = train.main(flags + ["--resume=2"])
    assert_same_run(first, resumed)
    # the checkpoint holds every parameter, the frozen experts too
    blank = train.build_model(train._parse(SMALL), ParallelState.single())
    with torch.no_grad():
        for p in blank.parameters():
            p.zero_()
    checkpoint.load(checkpoint.step_dir(str(tmp_path), 4), blank)
    trained = dict(first["model"].named_parameters())
    assert any(".experts." in n for n in trained)
    for n, p in blank.named_parameters():
        assert torch.equal(p, trained[n].detach()), n
