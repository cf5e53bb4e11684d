"""One file for one process, and back: ``consolidate`` and ``shard``.

``consolidate(dir, out)`` reads a checkpoint in one process (no process group) and writes its
full, single-process state:
    ``*.safetensors``: the model's tensors (routed experts as global ``w1 [E, H, (2)F]``,
        ``w2 [E, F, H]``), the manifest in the file's metadata (key ``moe_parallel``);
    anything else (``torch.save``): ``{"model": {...}, "optim": {...} (when saved),
        "extra": {...}, "manifest": {...}}``, the optimizer state keyed by parameter name as
        ``get_optimizer_state_dict`` gives it (``set_optimizer_state_dict`` loads it).
``shard(file, dir)`` writes either file back as a checkpoint directory that ``load`` reads at
any layout (without RNG states: they belong to the job that saved).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import manifest as mf
from .loading import resolve
from .state import single_process_quiet

META_KEY = "moe_parallel"


def _read_all(path: str) -> dict[str, Any]:
    """Every entry of a checkpoint as full tensors, nested as saved (what DCP's
    ``format_utils.dcp_to_torch_save`` reads)."""
    state: dict[str, Any] = {}
    with single_process_quiet():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def consolidate(directory: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the checkpoint at ``directory`` as one single-process state dict to ``out``
    (module docstring); returns what was written."""
    path = resolve(directory)
    manifest = mf.read(path)
    state = _read_all(path)
    out = os.fspath(out)
    result: dict[str, Any] = {"model": state["model"], "extra": pickle.loads(state["extra"]),
                              "manifest": manifest}
    if "optim" in state:
        result["optim"] = state["optim"]
    if "optim_hyperparameters" in state:  # saved before the optimizer's first step
        result["optim_hyperparameters"] = pickle.loads(state["optim_hyperparameters"])
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state["model"].items()}
        save_file(tensors, out, metadata={META_KEY: json.dumps(manifest)})
        return {"model": tensors, "manifest": manifest}
    torch.save(result, out)
    return result


def _read_file(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise ValueError(f"{path} has no {META_KEY!r} metadata: it was not written by "
                             "consolidate, so its MoE layers are not described")
        return {"model": load_file(path), "manifest": json.loads(meta)}
    return torch.load(path, map_location="cpu", weights_only=False)


def shard(file: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Write a consolidated file (``consolidate``'s output) as a checkpoint directory."""
    src = _read_file(os.fspath(file))
    for key in ("model", "manifest"):
        if key not in src:
            raise ValueError(f"{file} has no {key!r} entry: not a consolidated checkpoint")
    directory = os.fspath(directory)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {"model": src["model"], "extra": pickle.dumps(src.get("extra", {}))}
    kind = None
    if "optim" in src:
        state["optim"], kind = src["optim"], "state"
    elif "optim_hyperparameters" in src:
        state["optim_hyperparameters"] = pickle.dumps(src["optim_hyperparameters"])
        kind = "hyperparameters"
    with single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
    manifest = {**src["manifest"], "layout": None, "rng": False, "optimizer": kind}
    if kind is None:
        manifest["optimizer_groups"] = 0
    mf.write(tmp, manifest)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
