"""moe_parallel: an expert-parallel Mixture-of-Experts runtime for PyTorch."""

from .config import MoEConfig
from .distributed import ParallelState, init_distributed
from .layer import MoEAux, MoELayer, set_aux_loss_scale, set_expert_dropout_step
from .metrics import RoutingStats
from .reference import ReferenceMoE

__all__ = [
    "MoEConfig",
    "MoELayer",
    "MoEAux",
    "ParallelState",
    "ReferenceMoE",
    "RoutingStats",
    "init_distributed",
    "set_aux_loss_scale",
    "set_expert_dropout_step",
]
__version__ = "0.1.0"
