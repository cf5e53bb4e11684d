"""Loading never unpickles: crafted pickles in ``extra``, RNG states, hyperparameters and a
consolidated file are refused (the payload never runs), and ``upgrade`` converts a legacy
(format 1) checkpoint only with ``trust_pickles``. Single process."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_parallel import MoEConfig, MoELayer, checkpoint
from moe_parallel.checkpoint import manifest as mf
from moe_parallel.checkpoint.state import hyperparameters, single_process_quiet
from tests.helpers.payload import Payload


def _layer_and_opt(seed: int = 0, step: bool = True):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    if step:
        layer(torch.randn(4, 8)).sum().backward()
        opt.step()
    return layer, opt


def _legacy_save(directory: str, layer, opt, extra, rng=None, hyper=None) -> None:
    """A checkpoint as format 1 wrote it: ``extra``, RNG states and (for an optimizer that has
    not stepped) hyperparameters as pickled bytes entries."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    rng = rng if rng is not None else {"torch": torch.get_rng_state(), "python": random.getstate(),
                                       "numpy": np.random.get_state()}
    state = {"model": get_model_state_dict(layer), "extra": pickle.dumps(extra),
             "rng": {"rank0": pickle.dumps(rng)}}
    if hyper is not None or opt is not None:
        state["optim_hyperparameters"] = pickle.dumps(hyper if hyper is not None
                                                      else hyperparameters(opt))
    checkpoint.save(directory + ".new", layer, None)  # for its manifest's layer description
    manifest = mf.read(directory + ".new")
    with single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    mf.write(directory, {**manifest, "format": 1, "optimizer": "hyperparameters",
                         "optimizer_groups": len(opt.param_groups)})


def _snapshot(layer, opt):
    return ({k: v.clone() for k, v in layer.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
            [dict(g, params=None) for g in opt.param_groups])


def _same(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and repr(a[1]) == repr(b[1]) and a[2] == b[2])


@pytest.mark.parametrize("where", ["extra", "rng", "hyperparameters"])
def test_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, where):
    marker = str(tmp_path / "marker")
    src, src_opt = _layer_and_opt(0, step=False)
    bomb = Payload(marker)
    _legacy_save(str(tmp_path / "ckpt"), src, src_opt,
                 extra=bomb if where == "extra" else {"step": 1},
                 rng=bomb if where == "rng" else None,
                 hyper=bomb if where == "hyperparameters" else None)
    layer, opt = _layer_and_opt(1)
    before = _snapshot(layer, opt)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(tmp_path / "ckpt"), layer, opt)
    entry = {"extra": "extra", "rng": "rng.rank0",
             "hyperparameters": "optim_hyperparameters"}[where]
    assert f"entry {entry} holds pickled bytes" in str(info.value)
    assert "upgrade --trust-pickles" in str(info.value)
    assert not os.path.exists(marker)
    assert _same(before, _snapshot(layer, opt))


def test_unrepresentable_extra_is_refused_at_save(tmp_path):
    layer, opt = _layer_and_opt()
    for bad, name in (({"a": {"b": {1, 2}}}, "extra.a.b is a set"),
                      ({"x": float("nan")}, "extra.x is a float nan"),
                      ({"o": [object()]}, "extra.o.0 is a object")):
        with pytest.raises(checkpoint.CheckpointError, match=name):
            checkpoint.save(str(tmp_path / "ckpt"), layer, opt, extra=bad)
    assert not os.path.exists(tmp_path / "ckpt")


def test_extra_rng_and_hyperparameters_round_trip_bitwise(tmp_path):
    layer, opt = _layer_and_opt()
    extra = {"step": 3, "lr": [0.1, 1e-300], "t": (1, "a", None, True),
             "g": torch.Generator().manual_seed(4).get_state(), "n": {"k": {"z": 2.5}}}
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians in both states
    checkpoint.save(str(tmp_path / "ckpt"), layer, opt, extra=extra)
    after = [torch.rand(3).tolist(), random.random(), random.gauss(0, 1),
             np.random.rand(2).tolist(), np.random.standard_normal()]
    fresh, fresh_opt = _layer_and_opt(1)
    back = checkpoint.load(str(tmp_path / "ckpt"), fresh, fresh_opt)
    assert [torch.rand(3).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(2).tolist(), np.random.standard_normal()] == after
    assert back.keys() == extra.keys() and torch.equal(back["g"], extra["g"])
    assert {k: v for k, v in back.items() if k != "g"} == {k: v for k, v in extra.items()
                                                            if k != "g"}
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert isinstance(fresh_opt.param_groups[0]["betas"], tuple)


def test_crafted_consolidated_file_is_refused(tmp_path):
    marker = str(tmp_path / "marker")
    torch.save({"model": {}, "manifest": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt.*pickled objects"):
        checkpoint.shard(str(tmp_path / "evil.pt"), str(tmp_path / "out"))
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "out")


def test_upgrade_needs_trust_and_converts_a_legacy_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    src, src_opt = _layer_and_opt(0, step=False)
    _legacy_save(directory, src, src_opt, extra={"step": 2, "b": (1, 2)})
    with pytest.raises(checkpoint.CheckpointError, match="trust_pickles"):
        checkpoint.upgrade(directory)
    checkpoint.upgrade(directory, trust_pickles=True)
    layer, opt = _layer_and_opt(1)
    assert checkpoint.load(directory, layer, opt) == {"step": 2, "b": (1, 2)}
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in layer.state_dict().items())
    assert not opt.state and opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.distributed  # starts the CLI as a subprocess
def test_cli_refuses_a_crafted_file_and_an_untrusted_upgrade(tmp_path):
    marker = str(tmp_path / "marker")
    torch.save({"model": {}, "manifest": Payload(marker)}, tmp_path / "evil.pt")
    cmd = [sys.executable, "-m", "moe_parallel.checkpoint"]
    cli = subprocess.run(cmd + ["shard", str(tmp_path / "evil.pt"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "pickled objects" in cli.stderr, cli.stderr
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out")
    directory = str(tmp_path / "ckpt")
    src, src_opt = _layer_and_opt(0, step=False)
    _legacy_save(directory, src, src_opt, extra={"payload": Payload(marker)})
    cli = subprocess.run(cmd + ["upgrade", directory], capture_output=True, text=True)
    assert cli.returncode != 0 and "--trust-pickles" in cli.stderr, cli.stderr
    assert not os.path.exists(marker)
