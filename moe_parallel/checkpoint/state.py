"""The state dict a checkpoint holds, as DCP reads and writes it (layout in ``api.py``).

* ``model_state(model, distributed)``: ``get_model_state_dict`` with every routed-expert tensor
  annotated with its global layout (``layout.py``), the layouts by key, the MoE layers by name;
* ``optim_state(model, optimizer, by_key)``: ``get_optimizer_state_dict`` with the tensors shaped
  like a routed-expert parameter annotated with that parameter's layout;
* ``hyperparameters(optimizer)``: each parameter group's settings without its parameters;
* ``rng_state()`` / ``set_rng_state(blob)``: this process's RNG states (torch CPU and CUDA,
  Python, NumPy) as one pickle, and back;
* ``single_process_quiet()``: DCP's warning about an uninitialised process group silenced.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..layer import MoELayer
from .layout import GlobalLayout, sharded_layouts

__all__ = ["hyperparameters", "model_state", "optim_state", "rng_state", "set_rng_state",
           "single_process_quiet"]


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load, even when asked for one: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield


def _layer_names(model: nn.Module, keys: dict[int, str]) -> dict[str, MoELayer]:
    """Canonical name (the state-dict prefix, wrappers stripped) of every MoE layer."""
    return {keys[id(m.router.weight)].removesuffix(".router.weight"): m
            for m in model.modules() if isinstance(m, MoELayer)}


def _param_keys(model: nn.Module, msd: dict[str, Any]) -> dict[int, str]:
    """``id(parameter) -> key of msd`` for the plain-tensor parameters (keys are DCP's canonical
    names: DDP's ``module.`` and similar wrapper prefixes removed), matched by storage."""
    def plain(t: Any) -> bool:
        return isinstance(t, Tensor) and not isinstance(t, DTensor)

    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in msd.items() if plain(t)}
    keys = {}
    for p in model.parameters():
        key = by_storage.get((p.data_ptr(), tuple(p.shape))) if plain(p) else None
        if key is not None:
            keys[id(p)] = key
    return keys


def model_state(model: nn.Module, distributed: bool
                ) -> tuple[dict[str, Any], dict[str, GlobalLayout], dict[str, MoELayer]]:
    """The model's state dict (DCP's ``get_model_state_dict``) with the routed experts
    annotated with their global layout; the layouts by key; the MoE layers by name."""
    layouts = sharded_layouts(model, strict=distributed)
    msd = get_model_state_dict(model)
    keys = _param_keys(model, msd)
    by_key = {keys[pid]: layout for pid, layout in layouts.items()}
    for key, layout in by_key.items():
        msd[key] = layout.annotate(msd[key])
    return msd, by_key, _layer_names(model, keys)


def optim_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                by_key: dict[str, GlobalLayout]) -> dict[str, Any]:
    """The optimizer's state by parameter name (``get_optimizer_state_dict``; it creates the
    state of an optimizer that has none with a zero-learning-rate step), each tensor shaped
    like a routed-expert parameter annotated with that parameter's layout."""
    osd = get_optimizer_state_dict(model, optimizer)
    for key, entries in osd["state"].items():
        layout = by_key.get(key)
        if layout is None:
            continue
        for name, value in entries.items():
            if isinstance(value, Tensor) and tuple(value.shape) == layout.local_shape:
                entries[name] = layout.annotate(value)
    return osd


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every parameter group's settings (``lr``, ``betas``, ...), its ``params`` left out."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def rng_state() -> bytes:
    """This process's RNG states (torch CPU, CUDA when initialised, Python, NumPy), pickled."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return pickle.dumps(state)


def set_rng_state(blob: bytes) -> None:
    """Restore the RNG states ``rng_state`` pickled (CUDA's when saved and available)."""
    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
