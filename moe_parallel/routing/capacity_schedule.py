"""The capacity factor a module's forwards use, and its dynamic schedule (``dynamic_capacity``).

    factor = eval_capacity_factor                 in eval, when set
           = capacity_factor_now                  with dynamic_capacity (a saved float64 buffer)
           = capacity_factor                      otherwise
    C = expert_capacity(T, E, k, factor, min_capacity)     (None: dropless, or expert choice)
``update_capacity_factor`` steps ``capacity_factor_now`` by ``capacity.next_capacity_factor`` from
the ``[dropped, routed, slots]`` counted since the last step (``capacity_counts``, this rank's,
not saved). A state dict holds ``capacity_factor_now`` exactly when ``dynamic_capacity`` is on:
the layer's strict ``load_state_dict`` across a change of the option is refused with an error
naming the option (so is ``checkpoint.load``, with ``dynamic_capacity_mismatch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from .capacity import expert_capacity, next_capacity_factor

FACTOR = "capacity_factor_now"


class CapacityScheduled(nn.Module):
    """A module whose forwards take a capacity factor (module docstring); ``MoELayer`` is one.
    Subclasses set ``config`` and call ``_init_capacity_schedule`` in their constructor."""

    config: MoEConfig

    def _init_capacity_schedule(self, device: torch.device | str | None) -> None:
        """With ``dynamic_capacity``: the training capacity factor (saved with the model: a
        persistent float64 buffer) and this rank's ``[dropped, routed, slots]`` since the last
        ``update_capacity_factor`` (``capacity_counts``, int64, not saved)."""
        if self.config.dynamic_capacity:
            self.register_buffer(FACTOR, torch.tensor(float(self.config.capacity_factor),
                                                      dtype=torch.float64))
            self.register_buffer("capacity_counts",
                                 torch.zeros(3, dtype=torch.int64, device=device),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        factor = self._buffers.get(FACTOR)
        super()._apply(fn, recurse)
        if factor is not None:  # stays a float64 CPU scalar (never rounded, read without sync)
            self._buffers[FACTOR] = factor
        return self

    def current_capacity_factor(self, training: bool) -> float | None:
        """The factor of a training (or eval) forward: ``eval_capacity_factor`` in eval when
        set, else the dynamic factor (``dynamic_capacity``) or ``capacity_factor``."""
        cfg = self.config
        if not training and cfg.eval_capacity_factor is not None:
            return cfg.eval_capacity_factor
        return float(self.capacity_factor_now) if cfg.dynamic_capacity else cfg.capacity_factor

    @torch.no_grad()
    def update_capacity_factor(self, counts: Optional[Tensor] = None) -> float:
        """One step of the dynamic capacity schedule (``routing.capacity.next_capacity_factor``)
        from ``counts`` = ``[dropped, routed, slots]`` (summed over the ranks; None: this rank's
        ``capacity_counts``); resets the counts and returns the new factor."""
        cfg = self.config
        if not cfg.dynamic_capacity:
            raise RuntimeError("update_capacity_factor needs a config with dynamic_capacity=True")
        c = self.capacity_counts if counts is None else counts
        dropped, routed, slots = (int(v) for v in c.tolist())
        factor = next_capacity_factor(
            float(self.capacity_factor_now), dropped, routed, slots - (routed - dropped), slots,
            cfg.target_drop_rate, cfg.capacity_update_rate, cfg.capacity_factor_min,
            cfg.capacity_factor_max)
        self.capacity_factor_now.fill_(factor)
        self.capacity_counts.zero_()
        return factor

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for ``num_tokens`` tokens in token-choice mode (None = dropless)."""
        cfg = self.config
        factor = self.current_capacity_factor(self.training)
        if cfg.router_type != "topk" or factor is None:
            return None
        return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False):
        """``nn.Module.load_state_dict``; a strict load of a state whose ``capacity_factor_now``
        presence disagrees with ``dynamic_capacity`` raises ``RuntimeError`` naming that option
        and what to do (``strict=False`` loads the rest, the factor as the option says)."""
        saved = FACTOR in state_dict
        if strict and saved != self.config.dynamic_capacity:
            start = "drop the saved factor and train with" if saved else "start the schedule at"
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"{dynamic_capacity_mismatch(saved)}, or load with strict=False to {start} "
                f"capacity_factor={self.config.capacity_factor}")
        return super().load_state_dict(state_dict, strict, assign)


def dynamic_capacity_mismatch(saved: bool) -> str:
    """The refusal of a state saved with ``dynamic_capacity=saved`` by a layer with ``not
    saved``: the option, both values, and the layer to build to resume as saved."""
    holds = f"it holds the schedule's {FACTOR}" if saved else f"it has no {FACTOR}"
    return (f"dynamic_capacity is {saved} in the saved state ({holds}), {not saved} in this "
            f"layer: build the layer with dynamic_capacity={saved} to resume as saved")
