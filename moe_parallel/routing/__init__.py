"""Routing: which experts each token goes to, with which weight, and which assignments are kept.

* ``base.py``: ``Routing`` (what every router returns) and the steps routers share (input
  checks, logits, the per-expert assignment count);
* ``router.py``: ``TopKRouter`` (token choice: softmax/sigmoid top-k, expert bias,
  group-limited selection, noisy gating, top-p, forced balance), ``build_router``;
* ``expert_choice.py``: ``ExpertChoiceRouter`` (each expert takes its top-C tokens);
* ``capacity.py``: ``C = max(ceil(T·k / E · capacity_factor), min_capacity)`` and the drop
  policies that enforce it;
* ``capacity_schedule.py``: the capacity factor a module's forwards use, and its dynamic
  schedule;
* ``losses.py``: the Switch and per-sequence load-balancing losses, the router z-loss and the
  dynamic (entropy) loss.
"""

from .base import Routing
from .capacity import DROP_POLICIES, apply_capacity, expert_capacity, next_capacity_factor
from .expert_choice import ExpertChoiceRouter
from .losses import full_scores, sequence_load_balancing_loss, switch_load_balancing_loss, z_loss
from .router import TopKRouter, build_router, forced_assignment

__all__ = [
    "DROP_POLICIES",
    "ExpertChoiceRouter",
    "Routing",
    "TopKRouter",
    "apply_capacity",
    "next_capacity_factor",
    "build_router",
    "expert_capacity",
    "forced_assignment",
    "full_scores",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
    "z_loss",
]
