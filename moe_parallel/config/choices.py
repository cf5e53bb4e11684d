"""The allowed values of every choice field of ``MoEConfig``: each a ``Literal`` type, and its
runtime tuple read from it (``typing.get_args``), so the two never disagree."""

from __future__ import annotations

from typing import Literal, get_args

import torch

Activation = Literal["swiglu", "clamped_swiglu", "gelu", "relu"]
RouterType = Literal["topk", "expert_choice"]
ScoreFunction = Literal["softmax", "sigmoid"]
GroupScore = Literal["sum_topk", "sum_top2", "max"]
DropPolicy = Literal["probs", "position", "k_major", "batch_priority"]
DispatcherType = Literal["alltoall", "alltoall_hierarchical", "allgather"]
ExpertImpl = Literal["block_sparse", "grouped"]
RowOverflow = Literal["error", "capacity"]
VerdictScope = Literal["stage", "layer", "none"]
Recompute = Literal["none", "activation", "experts"]
# what is sharded over the data-parallel replicas (distributed.shard_model: "experts",
# distributed.ShardedOptimizer: "optimizer"); train --shard, the planner's layouts
ShardMode = Literal["none", "experts", "optimizer"]

# The allowed values of each choice field: one definition, the Literal above.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
ROUTER_TYPES: tuple[str, ...] = get_args(RouterType)
SCORE_FUNCTIONS: tuple[str, ...] = get_args(ScoreFunction)
GROUP_SCORES: tuple[str, ...] = get_args(GroupScore)
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
DISPATCHERS: tuple[str, ...] = get_args(DispatcherType)
EXPERT_IMPLS: tuple[str, ...] = get_args(ExpertImpl)
ROW_OVERFLOWS: tuple[str, ...] = get_args(RowOverflow)
VERDICT_SCOPES: tuple[str, ...] = get_args(VerdictScope)
RECOMPUTE_MODES: tuple[str, ...] = get_args(Recompute)
SHARD_MODES: tuple[str, ...] = get_args(ShardMode)
ROUTER_DTYPES = (None, torch.float32, torch.float64)
