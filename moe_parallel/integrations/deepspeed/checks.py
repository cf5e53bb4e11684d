"""What the DeepSpeed integration supports, checked on a config, a live engine's settings and a
``ParallelState``; every refusal is a ``ValueError`` naming the setting and its allowed values.

* ZeRO stage in ``SUPPORTED_ZERO_STAGES`` (0, 1, 2); fp16/bf16 only with stage 1 or 2;
  ``zero_optimization.reduce_scatter`` true at stages 1 and 2, ``contiguous_gradients`` true at
  stage 2; ``gradient_clipping >= 0``;
* a ``ParallelState`` built over this torch.distributed world with tp = pp = 1 (DP×CP is then
  the whole world, DeepSpeed's data-parallel group) and its ``edp``, ``tp_ep``, ``dp_cp`` groups.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch.distributed as dist

from ...distributed.parallel_state import ParallelState

__all__ = ["SUPPORTED_ZERO_STAGES", "ConfigLike", "check_config", "check_parallel_state",
           "check_settings"]

SUPPORTED_ZERO_STAGES = (0, 1, 2)

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


def check_parallel_state(ps: ParallelState) -> None:
    """``ValueError`` unless ``ps`` is a built state over this torch.distributed world whose
    dense data-parallel group (DP×CP) is the whole world, as DeepSpeed's is."""
    if not isinstance(ps, ParallelState):
        raise TypeError(f"parallel_state must be a ParallelState, got {type(ps).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call moe_parallel."
                           "init_distributed() (or deepspeed.init_distributed()) first")
    world = dist.get_world_size()
    if ps.world_size != world or ps.rank != dist.get_rank():
        raise ValueError(f"parallel_state {ps} does not describe this torch.distributed world "
                         f"(rank {dist.get_rank()} of {world})")
    if ps.tp != 1 or ps.pp != 1:
        raise ValueError(
            f"parallel_state has tp={ps.tp}, pp={ps.pp}; the DeepSpeed integration supports "
            "tp=1 and pp=1 only: DeepSpeed reduces dense gradients over its data-parallel group, "
            "the whole world, which equals our DP×CP group only then")
    missing = [n for n in ("edp", "tp_ep", "dp_cp") if ps.groups.get(n) is None]
    if missing:
        raise ValueError(
            f"parallel_state has no process group for {missing}: build it with "
            "ParallelState.build(...) on every rank after init_distributed() (not "
            "ParallelState.single() or create_groups=False)")


def _load_config(config: ConfigLike) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    with open(config) as f:
        return json.load(f)


def _enabled(cfg: Mapping, key: str) -> bool:
    section = cfg.get(key)
    return bool(section.get("enabled", False)) if isinstance(section, Mapping) else False


def check_settings(stage: Any, half: Optional[str], clip: float, reduce_scatter: bool,
                   contiguous: bool) -> None:
    """The checks shared by ``check_config`` (a config dict) and the host (a live engine)."""
    if isinstance(stage, bool) or stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"zero_optimization.stage {stage!r} is not supported with moe_parallel's MoELayer; "
            f"allowed: {', '.join(map(str, SUPPORTED_ZERO_STAGES))} (ZeRO-3 would partition the "
            "expert parameters over the whole data-parallel world, not over their EDP group)")
    if stage == 0 and half is not None:
        raise ValueError(
            f"{half}.enabled with zero_optimization.stage 0 is not supported with moe_parallel's "
            "MoELayer (DeepSpeed's fp16/bf16 optimizers' MoE gradient norms are not verified); "
            "allowed: fp32 with stage 0, or fp16/bf16 with stage 1 or 2")
    if stage in (1, 2) and not reduce_scatter:
        raise ValueError("zero_optimization.reduce_scatter must be true with MoE parameters at "
                         f"ZeRO stage {stage} (DeepSpeed's MoE path requires it); allowed: true")
    if stage == 2 and not contiguous:
        raise ValueError("zero_optimization.contiguous_gradients must be true with MoE "
                         "parameters at ZeRO stage 2 (DeepSpeed's MoE path requires it); "
                         "allowed: true")
    if clip < 0:
        raise ValueError(f"gradient_clipping must be >= 0, got {clip}")


def check_config(config: ConfigLike, parallel_state: ParallelState) -> dict:
    """Validate a DeepSpeed config (a dict or a JSON file path) for a model with our MoE layers
    and ``parallel_state``; return it as a dict.

    ``ValueError`` naming the setting and its allowed values: ``zero_optimization.stage`` not in
    ``SUPPORTED_ZERO_STAGES``; ``fp16``/``bf16`` enabled with stage 0;
    ``zero_optimization.reduce_scatter`` false (stages 1, 2) or ``contiguous_gradients`` false
    (stage 2); ``gradient_clipping`` < 0; a ``parallel_state`` with tp or pp > 1 or without
    process groups, or not over this world.
    """
    check_parallel_state(parallel_state)
    cfg = _load_config(config)
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ValueError(f"zero_optimization must be a JSON object, got {zero!r}")
    half = next((k for k in ("fp16", "bf16") if _enabled(cfg, k)), None)
    check_settings(zero.get("stage", 0), half, float(cfg.get("gradient_clipping", 0.0)),
                   bool(zero.get("reduce_scatter", True)),
                   bool(zero.get("contiguous_gradients", True)))
    return cfg
