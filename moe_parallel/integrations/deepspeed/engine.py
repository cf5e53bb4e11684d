"""Build and finish a DeepSpeed engine around a model holding our ``MoELayer``s.

* ``configure_engine(engine, ps)``: ZeRO 0 with clipping clips by the global norm
  (``distributed.clip_grad_norm``); every layer's aux-loss gradient is
  ``1 / gradient_accumulation_steps``;
* ``initialize(model, ps, config)``: ``check_config`` + ``prepare`` + ``deepspeed.initialize``
  (parameter groups from ``moe_param_groups``) + ``configure_engine``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ...distributed.grads import clip_grad_norm, is_expert_param
from ...distributed.parallel_state import ParallelState
from ...layer import set_aux_loss_scale
from .checks import ConfigLike, check_config
from .groups import moe_group_name, moe_param_groups
from .host import find_host, prepare

__all__ = ["configure_engine", "initialize"]


def configure_engine(engine, parallel_state: ParallelState) -> None:
    """Finish an engine built on a ``prepare``d model (``initialize`` calls it).

    * ZeRO 0 with ``gradient_clipping > 0``: this engine's ``clip_fp32_gradients`` becomes
      ``distributed.clip_grad_norm(engine.module, ps, clip)`` (the global norm, every parameter
      counted once), and each step's norm (before clipping) is what
      ``engine.get_global_grad_norm()`` returns. ZeRO 1/2 already compute the global norm.
    * Every ``MoELayer``'s aux-loss gradient (``set_aux_loss_scale``) becomes
      ``1 / gradient_accumulation_steps``, as ``engine.backward`` scales the loss.
    """
    ps = parallel_state
    host = find_host(engine.module)
    if host is None:
        raise ValueError("engine.module was not prepared: call prepare(model, ps) before "
                         "deepspeed.initialize (or use initialize)")
    if host.parallel_state is not ps:
        raise ValueError(f"engine.module was prepared for another ParallelState "
                         f"({host.parallel_state})")
    if engine.zero_optimization_stage() == 0 and engine.gradient_clipping() > 0:
        def clip_fp32_gradients(self) -> None:
            """Clip by the global norm over the dense and expert grids (moe_parallel)."""
            norm = clip_grad_norm(self.module, ps, self.gradient_clipping())
            self._global_grad_norm = float(norm)

        engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    set_aux_loss_scale(engine.module, 1.0 / engine.gradient_accumulation_steps())


def _check_optimizer_groups(model: nn.Module, optimizer: torch.optim.Optimizer,
                            ps: ParallelState, stage: Any) -> None:
    """``ValueError`` unless, at ZeRO stage 1 or 2, the expert parameters of ``model`` form
    their own param group(s) of ``optimizer`` with ``moe=True`` and the expert group name."""
    if stage not in (1, 2):
        return
    name = moe_group_name(ps)
    expert = {id(p) for p in model.parameters() if is_expert_param(p)}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        is_moe = bool(group.get("moe")) and group.get("name") == name
        if (ids & expert and not is_moe) or (is_moe and ids - expert):
            raise ValueError(
                f"optimizer: at ZeRO stage {stage} the expert parameters must form their "
                f"own param group(s) with moe=True and name={name!r}; build the optimizer "
                "from moe_param_groups(model, ps)")


def initialize(model: nn.Module, parallel_state: ParallelState, config: ConfigLike, *,
               optimizer: Any = None, model_parameters: Any = None, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` for a model holding our ``MoELayer``s; returns its
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    ``check_config(config, ps)``, ``prepare(model, ps)``, then ``deepspeed.initialize(model=model,
    config=config, optimizer=optimizer, model_parameters=...)`` with ``model_parameters``
    defaulting to ``moe_param_groups(model, ps)`` (when ``optimizer`` is a built torch optimizer,
    build it from ``moe_param_groups`` too), then ``configure_engine(engine, ps)``. ``kwargs``
    go to ``deepspeed.initialize`` (``lr_scheduler``, ``training_data``, ...; not ``mpu``).
    A collective: call it on every rank.
    """
    import deepspeed

    ps = parallel_state
    cfg = check_config(config, ps)
    if kwargs.get("mpu") is not None:
        raise ValueError("mpu is not supported with moe_parallel's MoELayer (tp=1, pp=1 "
                         "only); allowed: None")
    prepare(model, ps)
    if isinstance(optimizer, torch.optim.Optimizer):
        stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
        _check_optimizer_groups(model, optimizer, ps, stage)
    if model_parameters is None and not isinstance(optimizer, torch.optim.Optimizer):
        model_parameters = moe_param_groups(model, ps)
    host = find_host(model)
    host.engine_configured_by_us = True  # configure_engine follows: ZeRO-0 clipping allowed
    try:
        out = deepspeed.initialize(model=model, optimizer=optimizer,
                                   model_parameters=model_parameters, config=cfg, **kwargs)
    finally:
        host.engine_configured_by_us = False
    configure_engine(out[0], ps)
    return out
