"""The marker DeepSpeed needs to take its MoE code paths, and ``prepare``, which sets it up.

``prepare(model, ps)`` tags every routed-expert parameter with ``allreduce = False`` and
``group_name = moe_group_name(ps)``, registers ``ps``'s expert groups, and attaches one
parameter-less ``DeepSpeedMoEHost`` (a ``deepspeed.moe.layer.MoE`` by type) to the model's first
``MoELayer`` as ``deepspeed_moe_host``. When an engine adopts the model, the host re-registers
the groups and checks the engine (``check_engine``: ZeRO stage, precision, data-parallel group,
ZeRO-0 clipping only through ``initialize``).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any, Optional

import torch.distributed as dist
from torch import nn

from ...distributed.grads import is_expert_param
from ...distributed.parallel_state import ParallelState
from ...layer import MoELayer
from .checks import check_parallel_state, check_settings
from .groups import moe_group_name, register_groups

__all__ = ["HOST_NAME", "check_engine", "find_host", "host_class", "moe_layers", "prepare"]

HOST_NAME = "deepspeed_moe_host"  # the submodule prepare() attaches to the first MoELayer
PUBLIC_MODULE = __name__.rpartition(".")[0]  # where DeepSpeedMoEHost is importable from


def _find_engine(frame) -> Any:
    """The DeepSpeedEngine whose method is on the call stack above ``frame``, or None."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, DeepSpeedEngine):
            return owner
        frame = frame.f_back
    return None


@lru_cache(maxsize=1)
def host_class() -> type:
    """``DeepSpeedMoEHost``, built on first use (it subclasses DeepSpeed's ``MoE``)."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEHost(MoE):
        """A parameter-less stand-in for our MoE layers in DeepSpeed's eyes (``prepare``
        attaches one to the model's first ``MoELayer`` as ``deepspeed_moe_host``).

        DeepSpeedEngine sets ``has_moe_layers`` (and with it the EDP reduction of parameters
        with ``allreduce=False``) only for a model holding a ``deepspeed.moe.layer.MoE``; this
        module is one by type but holds nothing and is never called. When the engine adopts the
        model it calls ``set_deepspeed_parallelism``, which (re)registers our groups under
        ``expert_group_name`` and checks the engine's settings (``ValueError`` otherwise).
        """

        def __init__(self, parallel_state: ParallelState, num_experts: int) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
            ps = parallel_state
            self.parallel_state = ps
            self.ep_size = ps.ep
            self.expert_group_name = moe_group_name(ps)
            self.num_experts = num_experts
            self.num_local_experts = num_experts // ps.ep
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self.engine_configured_by_us = False  # initialize() sets it (ZeRO-0 clipping)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False
                                      ) -> None:
            """Called by ``DeepSpeedEngine._configure_distributed_model``: register the groups
            and check the adopting engine's configuration."""
            if use_data_before_expert_parallel_:
                raise ValueError("use_data_before_expert_parallel_ is not supported with "
                                 "moe_parallel's MoELayer (our grid fixes the rank order); "
                                 "allowed: false")
            register_groups(self.parallel_state)
            engine = _find_engine(sys._getframe(1))
            if engine is not None:
                check_engine(engine, self)

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEHost is a marker for DeepSpeed, not a layer: the "
                               "model's MoELayers do the work")

        def extra_repr(self) -> str:
            return f"group={self.expert_group_name!r}, num_experts={self.num_experts}"

    DeepSpeedMoEHost.__module__ = PUBLIC_MODULE
    DeepSpeedMoEHost.__qualname__ = "DeepSpeedMoEHost"
    return DeepSpeedMoEHost


def _engine_half(engine) -> Optional[str]:
    if engine.fp16_enabled():
        return "fp16"
    return "bf16" if engine.bfloat16_enabled() else None


def check_engine(engine, host) -> None:
    """The adopting engine's settings against what the integration supports."""
    from deepspeed.utils import groups

    ps = host.parallel_state
    zero = engine._config.zero_config
    check_settings(engine.zero_optimization_stage(), _engine_half(engine),
                   float(engine.gradient_clipping()), bool(zero.reduce_scatter),
                   bool(zero.contiguous_gradients))
    if engine.mpu is not None:
        raise ValueError("mpu: a DeepSpeed engine with an mpu is not supported with "
                         "moe_parallel's MoELayer (tp=1, pp=1 only); allowed: mpu=None")
    dp_ranks = sorted(dist.get_process_group_ranks(groups._get_data_parallel_group()))
    if dp_ranks != ps.ranks["dp_cp"] or groups._get_sequence_parallel_world_size() != 1:
        raise ValueError(
            f"DeepSpeed's data-parallel group {dp_ranks} is not this ParallelState's DP×CP "
            f"group {ps.ranks['dp_cp']} (sequence parallel size "
            f"{groups._get_sequence_parallel_world_size()}): the engine would reduce the "
            "dense gradients over the wrong ranks")
    if (engine.zero_optimization_stage() == 0 and engine.gradient_clipping() > 0
            and not host.engine_configured_by_us):
        raise ValueError(
            f"gradient_clipping {engine.gradient_clipping()} with zero_optimization.stage 0: "
            "DeepSpeed's ZeRO-0 clipping averages the ranks' local norms, which is not the "
            "global norm when ranks hold different experts. Build the engine with "
            "moe_parallel.integrations.deepspeed.initialize(...) (it installs the global norm, "
            "configure_engine), or use stage 1 or 2, or gradient_clipping 0")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every ``MoELayer`` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def find_host(model: nn.Module):
    """The ``DeepSpeedMoEHost`` that ``prepare`` attached somewhere in ``model``, or None."""
    return next((getattr(m, HOST_NAME) for m in moe_layers(model)
                 if isinstance(getattr(m, HOST_NAME, None), nn.Module)), None)


def _check_layers(model: nn.Module, layers: list[MoELayer], ps: ParallelState) -> None:
    """``ValueError`` when ``model`` has no ``MoELayer`` or one was built for another layout
    than ``ps`` (naming it)."""
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no moe_parallel MoELayer: "
                         "nothing to host in DeepSpeed (use deepspeed.initialize directly)")
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        lps = layer.parallel_state
        layout = (lps.ep, lps.etp, lps.rank, lps.world_size) if lps is not None else (1, 1)
        if layout[:2] != (ps.ep, ps.etp) or (lps is not None and layout[2:] != (ps.rank,
                                                                             ps.world_size)):
            raise ValueError(
                f"MoELayer {names[id(layer)] or '<model>'!r} was built for "
                f"{lps if lps is not None else 'one process (no parallel_state)'}, not for "
                f"parallel_state {ps}: build every layer with parallel_state=ps (or "
                "MoELayer.shard_from(full, ps))")


def prepare(model: nn.Module, parallel_state: ParallelState) -> str:
    """Make ``model`` (holding our ``MoELayer``s) ready for ``deepspeed.initialize``; returns the
    expert group name (``moe_group_name(parallel_state)``). Idempotent; not a collective.

    Every routed-expert parameter (``sync_group == "edp"``) gets ``allreduce = False`` and
    ``group_name``; ``parallel_state``'s EDP group and ETP×EP block are registered under that
    name in ``deepspeed.utils.groups``; a :class:`DeepSpeedMoEHost` is attached to the first
    ``MoELayer`` as ``deepspeed_moe_host`` (no parameters or buffers: the state dict is
    unchanged).
    ``ValueError``: ``model`` has no ``MoELayer``, a layer was built for another layout than
    ``parallel_state`` (naming it), or ``parallel_state`` is unsupported (tp/pp > 1, no groups,
    another world).
    """
    ps = parallel_state
    check_parallel_state(ps)
    layers = moe_layers(model)
    _check_layers(model, layers, ps)
    name = register_groups(ps)
    for p in model.parameters():
        if is_expert_param(p):
            p.allreduce = False
            p.group_name = name
    host = find_host(model)
    if host is None:
        host = host_class()(ps, max(layer.config.num_experts for layer in layers))
        layers[0].add_module(HOST_NAME, host)
    elif host.parallel_state is not ps:
        raise ValueError(f"model was prepared for another ParallelState ({host.parallel_state})")
    return name
