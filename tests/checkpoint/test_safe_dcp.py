"""DCP reads run no code (``moe_parallel.checkpoint.safe_dcp``): a checkpoint written by
``checkpoint.save`` loads through the restricted reader and planner; a ``.metadata`` or a bytes
item holding a pickled payload, or a truncated ``.metadata``, raises ``CheckpointError`` naming
what was refused and where, the payload never runs and the model is left as it was."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from moe_parallel import checkpoint
from moe_parallel.checkpoint import safe_dcp
from moe_parallel.checkpoint.agreement import CheckpointError
from moe_parallel.config import MoEConfig
from moe_parallel.layer import MoELayer
from tests.helpers.payload import REFUSED, Payload

CONFIG = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MoELayer(CONFIG))


def _trained_and_saved(directory) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after one AdamW step, saved with its optimizer to ``directory``."""
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(6, CONFIG.hidden_size)).square().sum().backward()
    opt.step()
    checkpoint.save(directory, model, opt, extra={"step": 1})
    return model, opt


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_saved_checkpoint_loads_through_the_safe_reader(tmp_path):
    """Every global ``.metadata`` references is allowed; the load is exact, optimizer too."""
    model, opt = _trained_and_saved(tmp_path / "ckpt")
    metadata = safe_dcp.SafeFileSystemReader(tmp_path / "ckpt").read_metadata()
    assert "extra" in metadata.state_dict_metadata and metadata.storage_meta.load_id
    other = _model(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
    assert checkpoint.load(tmp_path / "ckpt", other, other_opt) == {"step": 1}
    assert _same(_params(model), _params(other))
    assert other_opt.param_groups[0]["lr"] == 0.01
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], other_opt.state[q]["exp_avg"])


def test_metadata_with_a_payload_is_refused_before_anything_is_read(tmp_path):
    _trained_and_saved(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / ".metadata"
    with open(file, "rb") as f:
        metadata = pickle.load(f)  # our own file: trusted
    marker = tmp_path / "marker"
    metadata.planner_data = {"hook": Payload(marker)}
    with open(file, "wb") as f:
        pickle.dump(metadata, f)
    model = _model(1)
    before = _params(model)
    with pytest.raises(CheckpointError, match=rf"{file}.*{REFUSED}.*refused"):
        checkpoint.load(tmp_path / "ckpt", model)
    assert not marker.exists()
    assert _same(before, _params(model))


def test_truncated_metadata_names_the_file(tmp_path):
    _trained_and_saved(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / ".metadata"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    model = _model(1)
    before = _params(model)
    with pytest.raises(CheckpointError, match=rf"{file} is truncated"):
        checkpoint.load(tmp_path / "ckpt", model)
    assert _same(before, _params(model))


def test_bytes_item_with_a_payload_is_refused(tmp_path):
    """A non-tensor value is read with ``torch.load(weights_only=True)``: plain data loads, a
    pickled object is refused naming its key and never runs."""
    marker = tmp_path / "marker"
    dcp.save({"t": torch.arange(4.0), "plain": {"lr": 0.5, "betas": (0.9, 0.99), "name": "x"},
              "hook": Payload(marker)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    state = {"t": torch.zeros(4), "plain": {"lr": None, "betas": None, "name": None}}
    safe_dcp.load(state, tmp_path / "ckpt", no_dist=True)
    assert torch.equal(state["t"], torch.arange(4.0))
    assert state["plain"] == {"lr": 0.5, "betas": (0.9, 0.99), "name": "x"}
    with pytest.raises(CheckpointError, match=rf"'hook'.*{REFUSED}.*refused"):
        safe_dcp.load({"hook": None}, tmp_path / "ckpt", no_dist=True,
                      planner=safe_dcp.SafeLoadPlanner())
    assert not marker.exists()
