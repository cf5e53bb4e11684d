"""A run's checkpoint series (``save_step``, ``latest_step``): ``latest`` names the newest
committed step, the oldest beyond ``keep`` are removed, and so are the unfinished
``step_<N>.tmp`` directories that killed saves left behind, whatever their step."""

from __future__ import annotations

import os

import torch

from moe_parallel import checkpoint
from moe_parallel.config import MoEConfig
from moe_parallel.distributed import ParallelState
from moe_parallel.layer import MoELayer


def test_commit_keeps_the_newest_and_removes_leftovers_of_killed_saves(tmp_path):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2))
    ps = ParallelState.single()
    for step in (3, 9):  # killed inside their writes: a later or an earlier step than the next
        os.makedirs(tmp_path / f"step_{step:08d}.tmp" / "junk")
    for step in (2, 4, 6):
        checkpoint.save_step(tmp_path, step, layer, None, ps, {"step": step}, keep=2)
        assert checkpoint.latest_step(tmp_path) == step
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000004", "step_00000006"]
    fresh = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2))
    assert checkpoint.load(checkpoint.step_dir(tmp_path, 6), fresh) == {"step": 6}
    assert torch.equal(fresh.experts.w1, layer.experts.w1)
