"""Host moe_parallel's expert-parallel MoE layers in a DeepSpeed engine (ZeRO stages 0, 1, 2).

DeepSpeed reduces a parameter's gradient over its data-parallel group unless the parameter
says otherwise: ``param.allreduce = False`` marks an expert parameter, and ``param.group_name``
names the expert-data-parallel (EDP) group, looked up in ``deepspeed.utils.groups``, over which
the engine (ZeRO 0: ``DeepSpeedEngine._reduce_expert_gradients``; ZeRO 1/2: the reduce-scatter
of ``DeepSpeedZeroOptimizer``) reduces and partitions it. This module gives our layers exactly
that, from a :class:`~moe_parallel.distributed.ParallelState`:

* :func:`prepare` tags every routed-expert parameter (``sync_group == "edp"``) with
  ``allreduce=False`` and ``group_name = moe_group_name(ps)``, registers ``ps``'s EDP group and
  its ETP×EP block under that name in DeepSpeed's expert group registries, and attaches one
  parameter-less :class:`DeepSpeedMoEHost` submodule (a ``deepspeed.moe.layer.MoE`` by type) to
  the model's first ``MoELayer`` (not to the model: an ``nn.Sequential`` would call it) so
  that the engine sets ``has_moe_layers`` and takes its MoE code paths. When the engine adopts
  the model, the host checks the engine's configuration (ZeRO stage, precision, data-parallel
  group) and raises ``ValueError`` naming the setting and its allowed values;
* :func:`moe_param_groups` gives the optimizer parameter groups DeepSpeed needs (a dense group,
  and one ``{"moe": True, "name": group_name}`` group of the expert parameters), as DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer`` would;
* :func:`configure_engine` makes the engine's gradient clipping count every parameter once
  (below) and sets the layers' aux-loss gradient to ``1 / gradient_accumulation_steps``;
* :func:`initialize` is ``prepare`` + ``moe_param_groups`` + ``deepspeed.initialize`` +
  ``configure_engine``: the one call most users want.

Gradients (tp = pp = 1, so DeepSpeed's data-parallel group is the whole world, ``dp·cp`` ranks):
dense ``g = Σ_world / world``; expert ``g = Σ_EDP / world`` (DeepSpeed divides every gradient by
its data-parallel world size): the gradient of the mean of the ranks' losses, as
``distributed.sync_gradients`` computes it.

Gradient clipping: ZeRO 1/2 sum the squared norms of every rank's gradient partition over the
whole world, so each element of every expert shard counts once and their norm is the global
one. ZeRO 0 in fp32 (``DeepSpeedEngine.clip_fp32_gradients`` -> ``runtime.utils.clip_grad_norm_``)
averages the ranks' local norms, which is not the global norm when ranks hold different experts;
``configure_engine`` replaces that engine's ``clip_fp32_gradients`` (an attribute of this engine
only) with ``distributed.clip_grad_norm`` and records the norm for ``get_global_grad_norm()``.
An engine with ZeRO 0 and ``gradient_clipping > 0`` that was not built through
:func:`initialize` is refused when it adopts the model, so the wrong norm is never used.

Not supported (a clear ``ValueError``): ZeRO stage 3, a ``ParallelState`` with tp > 1 or pp > 1
(DeepSpeed would reduce the dense gradients over a group that is not our DP×CP), an ``mpu``,
fp16/bf16 with ZeRO 0 (its optimizers' norm paths are not verified). Checkpoints: save and load
``engine.module`` with ``moe_parallel.checkpoint``; ``engine.save_checkpoint`` is not tested.

DeepSpeed is imported only inside this module's functions (``pip install moe_parallel[deepspeed]``;
on CPU set ``DS_ACCELERATOR=cpu`` before the first import).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.grads import clip_grad_norm, is_expert_param
from ..distributed.parallel_state import ParallelState
from ..layer import MoELayer, set_aux_loss_scale

__all__ = [
    "SUPPORTED_ZERO_STAGES",
    "DeepSpeedMoEHost",  # noqa: F822 - built on first use by the module's __getattr__
    "check_config",
    "configure_engine",
    "initialize",
    "moe_group_name",
    "moe_param_groups",
    "prepare",
]

SUPPORTED_ZERO_STAGES = (0, 1, 2)
HOST_NAME = "deepspeed_moe_host"  # the submodule prepare() attaches to the first MoELayer

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


# ---- names, checks ----------------------------------------------------------------------------


def moe_group_name(parallel_state: ParallelState) -> str:
    """The DeepSpeed expert group name of ``parallel_state``'s expert grid: ``"ep_size_<ep>"``
    (DeepSpeed's own naming; with etp = 1 DeepSpeed would build the same groups under it), and
    ``"ep_size_<ep>_etp_<etp>"`` when etp > 1."""
    ps = parallel_state
    return f"ep_size_{ps.ep}" if ps.etp == 1 else f"ep_size_{ps.ep}_etp_{ps.etp}"


def _check_parallel_state(ps: ParallelState) -> None:
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


def _check_settings(stage: Any, half: Optional[str], clip: float, reduce_scatter: bool,
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
    _check_parallel_state(parallel_state)
    cfg = _load_config(config)
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ValueError(f"zero_optimization must be a JSON object, got {zero!r}")
    half = next((k for k in ("fp16", "bf16") if _enabled(cfg, k)), None)
    _check_settings(zero.get("stage", 0), half, float(cfg.get("gradient_clipping", 0.0)),
                    bool(zero.get("reduce_scatter", True)),
                    bool(zero.get("contiguous_gradients", True)))
    return cfg


# ---- the host module --------------------------------------------------------------------------


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
def _host_class() -> type:
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
            _register_groups(self.parallel_state)
            engine = _find_engine(sys._getframe(1))
            if engine is not None:
                _check_engine(engine, self)

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEHost is a marker for DeepSpeed, not a layer: the "
                               "model's MoELayers do the work")

        def extra_repr(self) -> str:
            return f"group={self.expert_group_name!r}, num_experts={self.num_experts}"

    DeepSpeedMoEHost.__module__ = __name__
    DeepSpeedMoEHost.__qualname__ = "DeepSpeedMoEHost"
    return DeepSpeedMoEHost


def __getattr__(name: str):  # module attribute DeepSpeedMoEHost, imported lazily
    if name == "DeepSpeedMoEHost":
        return _host_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_groups(ps: ParallelState) -> str:
    """Put ``ps``'s EDP group and ETP×EP block in ``deepspeed.utils.groups``'s expert-data-
    parallel and expert-parallel registries under ``moe_group_name(ps)``. A different group
    already registered under that name is a ``ValueError``."""
    from deepspeed.utils import groups

    name = moe_group_name(ps)
    for groups_, ranks_, ours in (
        (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, "edp"),
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, "tp_ep"),
    ):
        known = ranks_.get(name)
        if known is not None and sorted(known) != ps.ranks[ours]:
            raise ValueError(
                f"DeepSpeed already has an expert group {name!r} with ranks {sorted(known)}, "
                f"but this ParallelState's {ours} group is {ps.ranks[ours]} (a DeepSpeed MoE "
                "layer with another rank order?); use one layout per expert group name")
        groups_[name] = ps.group(ours)
        ranks_[name] = list(ps.ranks[ours])
    return name


def _engine_half(engine) -> Optional[str]:
    if engine.fp16_enabled():
        return "fp16"
    return "bf16" if engine.bfloat16_enabled() else None


def _check_engine(engine, host) -> None:
    """The adopting engine's settings against what the integration supports."""
    from deepspeed.utils import groups

    ps = host.parallel_state
    zero = engine._config.zero_config
    _check_settings(engine.zero_optimization_stage(), _engine_half(engine),
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


# ---- public API -------------------------------------------------------------------------------


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _find_host(model: nn.Module):
    """The ``DeepSpeedMoEHost`` that ``prepare`` attached somewhere in ``model``, or None."""
    return next((getattr(m, HOST_NAME) for m in _moe_layers(model)
                 if isinstance(getattr(m, HOST_NAME, None), nn.Module)), None)


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
    _check_parallel_state(ps)
    layers = _moe_layers(model)
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
    name = _register_groups(ps)
    for p in model.parameters():
        if is_expert_param(p):
            p.allreduce = False
            p.group_name = name
    host = _find_host(model)
    if host is None:
        host = _host_class()(ps, max(layer.config.num_experts for layer in layers))
        layers[0].add_module(HOST_NAME, host)
    elif host.parallel_state is not ps:
        raise ValueError(f"model was prepared for another ParallelState ({host.parallel_state})")
    return name


def moe_param_groups(model: nn.Module | Iterable[nn.Parameter], parallel_state: ParallelState,
                     **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups for DeepSpeed: ``{"name": "dense", "params": [...]}`` (every
    trainable parameter that is not a routed expert's) and ``{"name": moe_group_name(ps),
    "moe": True, "params": [...]}`` (the routed experts), each with ``group_options`` (``lr``,
    ``weight_decay``, ...); empty groups are left out. Pass them as ``model_parameters`` to
    ``deepspeed.initialize`` or to a torch optimizer given as ``optimizer``. ZeRO 1/2 need the
    MoE group (it reduces and partitions its parameters over EDP).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    params = [p for p in params if p.requires_grad]
    name = moe_group_name(parallel_state)
    expert = [p for p in params if is_expert_param(p)]
    wrong = [p for p in expert if getattr(p, "group_name", name) != name]
    if wrong:
        raise ValueError(f"{len(wrong)} expert parameter(s) carry group_name "
                         f"{wrong[0].group_name!r}, not {name!r}: prepare(model, ps) with the "
                         "same ParallelState")
    groups_ = [{**group_options, "name": "dense",
                "params": [p for p in params if not is_expert_param(p)]},
               {**group_options, "name": name, "moe": True, "params": expert}]
    return [g for g in groups_ if g["params"]]


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
    host = _find_host(engine.module)
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
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(optimizer, torch.optim.Optimizer) and stage in (1, 2):
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
    if model_parameters is None and not isinstance(optimizer, torch.optim.Optimizer):
        model_parameters = moe_param_groups(model, ps)
    host = _find_host(model)
    host.engine_configured_by_us = True  # configure_engine follows: ZeRO-0 clipping allowed
    try:
        out = deepspeed.initialize(model=model, optimizer=optimizer,
                                   model_parameters=model_parameters, config=cfg, **kwargs)
    finally:
        host.engine_configured_by_us = False
    configure_engine(out[0], ps)
    return out
