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

Modules: ``checks.py`` (what is supported: config, engine settings, ``ParallelState``),
``groups.py`` (expert group names and registries, optimizer parameter groups), ``host.py``
(``DeepSpeedMoEHost`` and ``prepare``), ``engine.py`` (``configure_engine``, ``initialize``).

DeepSpeed is imported only inside this package's functions (``pip install moe_parallel[deepspeed]``;
on CPU set ``DS_ACCELERATOR=cpu`` before the first import).
"""

from __future__ import annotations

from .checks import SUPPORTED_ZERO_STAGES, ConfigLike, check_config
from .engine import configure_engine, initialize
from .groups import moe_group_name, moe_param_groups
from .host import HOST_NAME, host_class, prepare

__all__ = [
    "SUPPORTED_ZERO_STAGES",
    "ConfigLike",
    "DeepSpeedMoEHost",  # noqa: F822 - built on first use by the module's __getattr__
    "HOST_NAME",
    "check_config",
    "configure_engine",
    "initialize",
    "moe_group_name",
    "moe_param_groups",
    "prepare",
]


def __getattr__(name: str):  # module attribute DeepSpeedMoEHost, imported lazily
    if name == "DeepSpeedMoEHost":
        return host_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
