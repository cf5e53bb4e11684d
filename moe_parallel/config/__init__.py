"""MoEConfig: every knob of an MoE layer, validated in one place at construction.

Field names follow Megatron-Core's ``moe_*`` arguments where one exists, without the prefix.
Each field's docstring gives its meaning, unit, default and its Megatron-Core
(``TransformerConfig``), DeepSpeed (``deepspeed.moe.layer.MoE``) and Hugging Face (model config)
counterparts; ``integrations/megatron/config.py`` and ``integrations/hf/families.py`` implement
those maps. Every invalid value raises ``ValueError`` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .choices import (
    ACTIVATIONS,
    DISPATCHERS,
    DROP_POLICIES,
    EXPERT_IMPLS,
    GROUP_SCORES,
    RECOMPUTE_MODES,
    ROUTER_TYPES,
    ROW_OVERFLOWS,
    SCORE_FUNCTIONS,
    SHARD_MODES,
    Activation,
    DispatcherType,
    DropPolicy,
    ExpertImpl,
    GroupScore,
    Recompute,
    RouterType,
    RowOverflow,
    ScoreFunction,
)
from .fields import MoEConfigFields
from .validation import validate
from .values import (
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "ACTIVATIONS", "DISPATCHERS", "DROP_POLICIES", "EXPERT_IMPLS", "GROUP_SCORES",
    "RECOMPUTE_MODES", "ROUTER_TYPES", "ROW_OVERFLOWS", "SCORE_FUNCTIONS", "SHARD_MODES",
    "Activation",
    "DispatcherType", "DropPolicy", "ExpertImpl", "GroupScore", "MoEConfig", "Recompute",
    "RouterType", "RowOverflow", "ScoreFunction", "check_choice", "check_nonneg_float",
    "check_nonneg_int", "check_positive_float", "check_positive_int",
]


@dataclass(frozen=True)
class MoEConfig(MoEConfigFields):
    """Configuration of one MoE layer: the fields of ``MoEConfigFields`` (``config/fields.py``,
    each documented under it, with the formulas that span several fields), validated at
    construction (``config/validation.py``): every invalid value raises ``ValueError`` naming
    the field and the allowed values."""

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes) -> MoEConfig:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)
