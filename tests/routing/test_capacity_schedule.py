"""Resuming across a change of ``dynamic_capacity`` is refused with an error naming the option
(and what to do), by ``load_state_dict`` and by ``checkpoint.load``; a matching resume and a
non-strict load go through."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer
from moe_parallel import checkpoint as ck
from moe_parallel.checkpoint import CheckpointError

BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, capacity_factor=1.0)


def _layers(saved: bool) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    src = MoELayer(MoEConfig(**BASE, dynamic_capacity=saved))
    if saved:
        src.capacity_factor_now.fill_(1.5)
    return src, MoELayer(MoEConfig(**BASE, dynamic_capacity=not saved))


@pytest.mark.parametrize("saved", [True, False])
def test_load_state_dict_names_dynamic_capacity(saved):
    src, dst = _layers(saved)
    with pytest.raises(RuntimeError) as err:
        dst.load_state_dict(src.state_dict())
    msg = str(err.value)
    assert f"dynamic_capacity is {saved} in the saved state" in msg, msg
    assert f"build the layer with dynamic_capacity={saved}" in msg and "strict=False" in msg
    assert "Unexpected key" not in msg and "Missing key" not in msg, msg
    dst.load_state_dict(src.state_dict(), strict=False)  # the documented way around
    assert torch.equal(dst.router.weight, src.router.weight)
    if not saved:
        assert float(dst.capacity_factor_now) == 1.0


@pytest.mark.parametrize("saved", [True, False])
def test_checkpoint_load_names_dynamic_capacity(saved, tmp_path):
    src, dst = _layers(saved)
    ck.save(tmp_path, src)
    with pytest.raises(CheckpointError, match=f"dynamic_capacity is {saved} in the saved state"
                       f".*build the layer with dynamic_capacity={saved}"):
        ck.load(tmp_path, dst)


def test_matching_resume_keeps_the_factor(tmp_path):
    src, _ = _layers(True)
    dst = MoELayer(MoEConfig(**BASE, dynamic_capacity=True))
    dst.load_state_dict(src.state_dict())
    assert float(dst.capacity_factor_now) == 1.5
