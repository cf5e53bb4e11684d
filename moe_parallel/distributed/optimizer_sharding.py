"""``ShardedOptimizer``: optimizer state sharded over the data-parallel replicas (ZeRO-1), weights
and gradients kept whole.

Two ``torch.distributed.optim.ZeroRedundancyOptimizer`` over the two grids: the routed-expert
parameters (``sync_group == "edp"``) over the EDP group, every other parameter over DP×CP (the
ranks that hold the same value of each). Each one gives every parameter of its group to one
rank (greedily, largest first, to the rank with the fewest elements so far); that rank alone
keeps its optimizer state, updates it and broadcasts the new value over the group. A rank then
holds about ``1/EDP`` of the experts' optimizer state and ``1/(DP·CP)`` of the dense one's;
exactly that share when the tensors split evenly (e.g. two layers' ``w1`` and ``w2`` over two
ranks), never more than one tensor above it.

Gradients are reduced as without it: call ``sync_gradients(model, ps)`` (and
``clip_grad_norm``) after the backward, then ``step()``. The update is the one the inner
optimizer class computes on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .freezing import check_same_freezing
from .grads import is_expert_param
from .parallel_state import ParallelState

__all__ = ["ShardedOptimizer"]


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer_class(**defaults)`` over ``model``'s parameters with its state sharded over
    the data-parallel replicas (module docstring).

    Its ``param_groups`` are one group of every parameter that requires grad, in the model's
    order, as ``optimizer_class(model.parameters(), **defaults)`` has (learning-rate schedulers
    and checkpoints see the same optimizer as without sharding; the group's hyperparameters
    reach both inner optimizers at each step); ``state`` holds the state of the parameters this
    rank owns. ``step()`` is a collective over EDP and DP×CP (every rank calls it).
    ``owned(p)``: whether this rank keeps ``p``'s state. Frozen parameters
    (``requires_grad=False``) get no state and are never broadcast; every rank must freeze
    alike, which the constructor checks over the stage (``freezing.check_same_freezing``:
    ``ValueError`` on every rank naming each rank's frozen parameters).
    """

    def __init__(self, model: nn.Module, ps: ParallelState,
                 optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 **defaults: Any) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        check_same_freezing(model, ps)
        params = [p for p in model.parameters() if p.requires_grad]
        parts = [([p for p in params if is_expert_param(p)], "edp"),
                 ([p for p in params if not is_expert_param(p)], "dp_cp")]
        parts = [(ps_, g) for ps_, g in parts if ps_]
        if not parts:
            raise ValueError("ShardedOptimizer: the model has no parameter that requires grad")
        super().__init__(params, defaults)
        self.groups = [g for _, g in parts]
        self.parts = [ZeroRedundancyOptimizer(ps_, optimizer_class, process_group=ps.group(g),
                                              **defaults) for ps_, g in parts]
        self._check_every_rank_owns_some()
        self._link_state()

    def _check_every_rank_owns_some(self) -> None:
        """``ValueError`` on every rank when a rank would own no parameter at all (more
        replicas than tensors in both groups): it would hold no optimizer state, which
        checkpoints and DCP's state-dict helpers take for an optimizer that never stepped. One
        all-reduce over the world."""
        idle = torch.tensor([0 if any(g["params"] for zero in self.parts
                                      for g in zero.optim.param_groups) else 1])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(idle, op=dist.ReduceOp.MAX)
        if int(idle):
            sizes = ", ".join(f"{len(z._all_params)} tensors over {g} ({z.world_size} ranks)"
                              for z, g in zip(self.parts, self.groups))
            raise ValueError(f"ShardedOptimizer: a rank would own no parameter ({sizes}): "
                             "every rank needs at least one tensor to shard the optimizer "
                             "state; use fewer data-parallel replicas or shard_model")

    def _link_state(self) -> None:
        """``self.state[p]`` is the inner optimizer's state dict of every parameter this rank
        owns (the same dict: nothing is copied)."""
        for zero in self.parts:
            for p, s in zero.optim.state.items():
                self.state[p] = s

    def owned(self, p: torch.Tensor) -> bool:
        """Whether this rank keeps (and updates) the optimizer state of parameter ``p``."""
        return any(p in {q for g in zero.optim.param_groups for q in g["params"]}
                   for zero in self.parts)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One step: each rank updates the parameters it owns, then each is broadcast over its
        group (``ZeroRedundancyOptimizer.step``); the groups' hyperparameters (e.g. a scheduled
        ``lr``) are passed on first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        for zero in self.parts:
            zero.param_groups[0].update(settings)
            zero.step()
        self._link_state()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer's format (``state_dict()``, or DCP's
        ``set_optimizer_state_dict``): the state of the parameters this rank owns goes to the
        inner optimizers, the others' is dropped."""
        super().load_state_dict(state_dict)
        settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        for zero in self.parts:
            zero.param_groups[0].update(settings)
            for group in zero.optim.param_groups:
                group.update(settings)
                for p in group["params"]:
                    if p in self.state:
                        zero.optim.state[p] = self.state[p]
        for p in [p for p in self.state if not self.owned(p)]:
            del self.state[p]
