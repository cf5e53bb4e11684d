"""moe_parallel inside Megatron-Core trainers (the ``[megatron]`` extra).

* ``groups.py``: ``parallel_state_from_megatron`` adopts the process groups of an initialised
  Megatron-Core ``parallel_state`` as a ``ParallelState`` (needs no megatron-core import when
  given an ``mpu`` object).
* ``config.py``: ``moe_config_from_megatron``, ``TransformerConfig`` → ``MoEConfig``.
* ``mlp.py``: ``MoEMLP``, the MoE layer as a ``TransformerLayer``'s ``mlp``, and
  ``get_moe_layer_spec``.
* ``losses.py``: the router losses with Megatron's functions, scaling and tracker.
* ``sharded.py``: the dist-checkpointing ``sharded_state_dict`` with global expert offsets.

``MoEMLP``, ``get_moe_layer_spec`` and ``moe_config_from_megatron`` import megatron-core when
first used.
"""

from __future__ import annotations

from typing import Any

from .groups import MEGATRON_GROUPS, parallel_state_from_megatron

__all__ = [
    "MEGATRON_GROUPS",
    "MoEMLP",
    "get_moe_layer_spec",
    "moe_config_from_megatron",
    "parallel_state_from_megatron",
]

_LAZY = {"MoEMLP": "mlp", "get_moe_layer_spec": "mlp", "moe_config_from_megatron": "config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
