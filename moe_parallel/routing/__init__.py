"""Routing: which experts each token goes to, with which weight, and which assignments are kept.

* ``router.py``: ``Routing`` (the result), ``TopKRouter`` (token choice: softmax/sigmoid top-k,
  expert bias, group-limited selection, noisy gating), ``ExpertChoiceRouter``, ``build_router``;
* ``capacity.py``: ``C = max(ceil(T·k / E · capacity_factor), min_capacity)`` and the drop
  policies that enforce it;
* ``losses.py``: the Switch and per-sequence load-balancing losses and the router z-loss.
"""

from .capacity import DROP_POLICIES, apply_capacity, expert_capacity, next_capacity_factor
from .losses import full_scores, sequence_load_balancing_loss, switch_load_balancing_loss, z_loss
from .router import ExpertChoiceRouter, Routing, TopKRouter, build_router

__all__ = [
    "DROP_POLICIES",
    "ExpertChoiceRouter",
    "Routing",
    "TopKRouter",
    "apply_capacity",
    "next_capacity_factor",
    "build_router",
    "expert_capacity",
    "full_scores",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
    "z_loss",
]
