"""Reading a safetensors checkpoint directory one key, or one slice of a key, at a time.

``Reader(path)`` opens every ``*.safetensors`` file of ``path`` (the shards an index names, or
the files present) lazily and never unpickles anything; ``local_block`` reads one MoE block's
weights for this rank only: its ``El`` routed experts from ``e0`` and, with ETP, its hidden
units ``f0 .. f0+Fl``, sliced on disk so the full expert tensors are never materialised.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ...config import MoEConfig
from .families import Family
from .weights import Weights

__all__ = ["Reader", "local_block"]


class Reader:
    """The tensors of a safetensors checkpoint directory (one file or an index of shards), read
    one key (or slice of it) at a time; ``expert_bytes`` counts what was read of the experts,
    ``largest_read`` the bytes of the largest single read. ``FileNotFoundError`` when ``path``
    holds no ``*.safetensors`` file (pickled ``*.bin`` checkpoints are never read)."""

    def __init__(self, path: str) -> None:
        import json

        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
        self.handles = [safe_open(os.path.join(path, f), "pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}
        self.expert_bytes = 0
        self.largest_read = 0

    def get(self, key: str, index: tuple = ()) -> Tensor:
        """``key``'s tensor, or only ``tensor[index]`` read from disk when ``index`` is given."""
        if key not in self.where:
            raise KeyError(f"{key} is not in the checkpoint")
        t = self.where[key].get_slice(key)[index] if index else self.where[key].get_tensor(key)
        if ".experts." in key:
            self.expert_bytes += t.numel() * t.element_size()
        self.largest_read = max(self.largest_read, t.numel() * t.element_size())
        return t


def _namespace(tensors: dict[str, Tensor]) -> Any:
    """Nested attribute access over dotted keys (``gate.weight`` -> ``ns.gate.weight``), the
    shape of an HF block that ``Family.weights`` reads."""
    from types import SimpleNamespace

    root = SimpleNamespace()
    for key, value in tensors.items():
        node = root
        *path, leaf = key.split(".")
        for part in path:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, value)
    return root


def local_block(family: Family, reader: Reader, prefix: str, cfg: MoEConfig,
                 e0: int, El: int, f0: int, Fl: int) -> Weights:
    """This rank's weights of the block stored under ``prefix``: its ``El`` experts from
    ``e0`` and hidden units ``f0 .. f0+Fl`` (read slice by slice), router and shared experts
    whole."""
    F = cfg.ffn_hidden_size
    tensors = {k[len(prefix) + 1:]: reader.get(k) for k in reader.where
               if k.startswith(prefix + ".") and ".experts." not in k}
    if family.expert_names is not None:  # per expert: gate, up [F, H], down [H, F]
        gate_n, up_n, down_n = family.expert_names
        gate_up, down = [], []
        for e in range(e0, e0 + El):
            key = f"{prefix}.experts.{e}"
            gate = reader.get(f"{key}.{gate_n}.weight", (slice(f0, f0 + Fl),))
            up = reader.get(f"{key}.{up_n}.weight", (slice(f0, f0 + Fl),))
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(reader.get(f"{key}.{down_n}.weight", (slice(None), slice(f0, f0 + Fl))))
        tensors["experts.gate_up_proj"] = torch.stack(gate_up)  # [El, 2Fl, H]
        tensors["experts.down_proj"] = torch.stack(down)  # [El, H, Fl]
    else:  # fused on disk: gate_up_proj [E, H, 2F], down_proj [E, F, H]
        e = slice(e0, e0 + El)
        key = f"{prefix}.experts"
        if family.fused_gate_up == "halves":
            halves = [reader.get(f"{key}.gate_up_proj",
                                 (e, slice(None), slice(b + f0, b + f0 + Fl))) for b in (0, F)]
            tensors["experts.gate_up_proj"] = torch.cat(halves, dim=2)
        else:  # interleaved gate/up columns (expert projection biases: etp = 1, whole F)
            tensors["experts.gate_up_proj"] = reader.get(f"{key}.gate_up_proj", (e,))
            tensors["experts.gate_up_proj_bias"] = reader.get(f"{key}.gate_up_proj_bias", (e,))
            tensors["experts.down_proj_bias"] = reader.get(f"{key}.down_proj_bias", (e,))
        tensors["experts.down_proj"] = reader.get(f"{key}.down_proj",
                                                  (e, slice(f0, f0 + Fl)))
    return family.weights(_namespace(tensors))
