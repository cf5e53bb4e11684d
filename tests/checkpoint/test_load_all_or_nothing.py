"""A checkpoint loads whole or not at all (``moe_parallel.checkpoint.load``): a shard file that
is missing, truncated or damaged, ``.metadata`` that disagrees with the shard files (a chunk of
another shape or dtype, chunks that do not tile a tensor), a dtype that differs from the
model's, an unreadable manifest and another tool's DCP directory each raise ``CheckpointError``
naming the file or entry, and leave the model and the optimizer exactly as they were: a fresh
optimizer keeps no state, a stepped one keeps its own."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex

from moe_parallel import checkpoint
from moe_parallel.checkpoint import safe_dcp
from moe_parallel.config import MoEConfig
from moe_parallel.layer import MoELayer

CONFIG = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)
ROUTER, W1 = "model.0.router.weight", "model.0.experts.w1"


def _model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MoELayer(dataclasses.replace(CONFIG, params_dtype=dtype)))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(6, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed),
                    dtype=next(model.parameters()).dtype)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _saved(directory, dtype=torch.float32, extra=None) -> None:
    model = _model(0, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _step(model, opt, 0)
    checkpoint.save(directory, model, opt, extra=extra or {"step": 1})


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    state = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, p in enumerate(model.parameters()):
        for name, v in opt.state.get(p, {}).items():
            state[f"s.{i}.{name}"] = v.clone() if isinstance(v, torch.Tensor) else v
    state["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _refused(directory, match: str, dtype=torch.float32) -> None:
    """Loading ``directory`` raises ``CheckpointError`` matching ``match`` into a fresh and
    into a stepped optimizer; model and optimizer are unchanged either way."""
    for stepped in (False, True):
        model = _model(1, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=0.5)
        if stepped:
            _step(model, opt, 1)
        before = _snapshot(model, opt)
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(directory, model, opt)
        assert _same(before, _snapshot(model, opt))
        assert bool(opt.state) == stepped


def _metadata(directory):
    return safe_dcp.SafeFileSystemReader(directory).read_metadata()


def _write_metadata(directory, metadata) -> None:
    with open(os.path.join(directory, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def _shard(directory) -> str:
    (name,) = [f for f in os.listdir(directory) if f.endswith(".distcp")]
    return os.path.join(directory, name)


def test_missing_and_truncated_shard_files_are_named(tmp_path):
    _saved(tmp_path / "a")
    shard = _shard(tmp_path / "a")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    _refused(tmp_path / "a", rf"damaged.*{shard} is truncated: {size // 2} bytes, .* {size}")
    os.remove(shard)
    _refused(tmp_path / "a", rf"damaged.*{shard} is missing")


def test_damaged_last_chunk_leaves_the_chunks_read_before_it_unused(tmp_path):
    """The chunks before the damaged one are read (into new tensors) and then dropped."""
    _saved(tmp_path / "a")
    info = max(_metadata(tmp_path / "a").storage_data.values(), key=lambda i: i.offset)
    shard = _shard(tmp_path / "a")
    data = bytearray(open(shard, "rb").read())
    for i in range(info.offset, info.offset + info.length):
        data[i] ^= 0x5A
    open(shard, "wb").write(bytes(data))
    _refused(tmp_path / "a", rf"shard file {shard} cannot be read")


def test_chunk_of_another_shape_or_dtype_than_the_metadata_is_refused(tmp_path):
    """``.metadata`` that points an entry at the bytes of another: never reshaped or cast."""
    _saved(tmp_path / "a", extra={"t": torch.randn(CONFIG.num_experts, CONFIG.hidden_size,
                                                  dtype=torch.float64)})
    metadata = _metadata(tmp_path / "a")
    index = {k.fqn: k for k in metadata.storage_data}
    router = MetadataIndex(ROUTER, (0, 0))
    metadata.storage_data[router] = metadata.storage_data[index[W1]]
    _write_metadata(tmp_path / "a", metadata)
    _refused(tmp_path / "a", rf"{_shard(tmp_path / 'a')} holds entry {ROUTER}'s chunk at "
                             r"\[0, 0\] with shape \[4, 16, 32\], the metadata says \[4, 16\]")
    extra_t = next(k for k in index if k.startswith("extra") and
                   tuple(metadata.state_dict_metadata[k].size) == (4, 16))
    metadata.storage_data[router] = metadata.storage_data[index[extra_t]]
    _write_metadata(tmp_path / "a", metadata)
    _refused(tmp_path / "a", rf"holds entry {ROUTER} as torch.float64, the metadata says "
                             "torch.float32")


def test_chunks_that_do_not_tile_a_tensor_are_refused(tmp_path):
    _saved(tmp_path / "a")
    metadata = _metadata(tmp_path / "a")
    entry = metadata.state_dict_metadata[W1]
    entry.size = torch.Size([8, *entry.size[1:]])
    _write_metadata(tmp_path / "a", metadata)
    _refused(tmp_path / "a", rf"damaged.*entry {W1} of global shape \[8, 16, 64\] is saved as "
                             "chunks of 4096 elements in all, not 8192")


def test_dtype_other_than_the_models_is_refused(tmp_path):
    _saved(tmp_path / "a", dtype=torch.float64)
    _refused(tmp_path / "a", rf"{W1} is torch.float64 in the checkpoint, torch.float32 in this "
                             "model")


def test_unreadable_manifest_and_another_tools_checkpoint(tmp_path):
    _saved(tmp_path / "a")
    manifest = tmp_path / "a" / "moe_parallel.json"
    manifest.write_text(manifest.read_text()[:20])
    _refused(tmp_path / "a", rf"{manifest} cannot be read as JSON")
    manifest.write_text(json.dumps({"format": 99}))
    _refused(tmp_path / "a", r"checkpoint format 99, this version reads formats \[1, 2\]")
    dcp.save({"w": torch.randn(3)}, checkpoint_id=str(tmp_path / "b"))
    _refused(tmp_path / "b", r"torch.distributed.checkpoint directory without "
                             r"moe_parallel.json: it was not written by moe_parallel")


def test_fresh_optimizer_with_gradients_still_receives_its_state(tmp_path):
    """An optimizer without state whose parameters hold gradients gets the saved state (and
    the gradients are kept)."""
    _saved(tmp_path / "a")
    reference = _model(0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    _step(reference, ref_opt, 0)
    model = _model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    model(torch.randn(6, CONFIG.hidden_size)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    checkpoint.load(tmp_path / "a", model, opt)
    assert _same(_snapshot(reference, ref_opt), _snapshot(model, opt))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
