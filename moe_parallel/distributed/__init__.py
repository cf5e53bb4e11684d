"""Distributed plumbing: process grids, process bootstrap, autograd collectives, gradient sync.

* ``parallel_state.py``: ``ParallelState``, the dense (PP×DP×CP×TP) and expert (PP×EDP×EP×ETP)
  grids over one world and this rank's groups in them;
* ``init.py``: ``init_distributed`` (torchrun, mpirun, SLURM or a single process) and the pure
  ``detect_launch_env``;
* ``collectives.py``: differentiable all-to-all, all-gather and reduce-scatter with uneven sizes;
* ``grads.py``: ``sync_gradients`` (dense parameters over DP×CP, experts over EDP) and the
  global gradient-norm clipping ``clip_grad_norm``;
* ``ddp.py``: ``wrap_ddp``, DistributedDataParallel over the dense parameters only (experts
  synced over EDP), and the detection of a DDP that manages expert parameters;
* ``sharding.py``: ``shard_model``, FSDP2 over both grids (routed experts over EDP, dense
  parameters over DP×CP);
* ``optimizer_sharding.py``: ``ShardedOptimizer``, the optimizer state sharded over EDP (experts)
  and DP×CP (the rest) with ``ZeroRedundancyOptimizer``, weights and gradients kept whole;
* ``fsdp.py``: the detection of an FSDP unit that manages expert parameters over any other
  group than EDP (and the hand-made recipe: dense submodules sharded over DP×CP, MoE layers
  left to ``sync_gradients``);
* ``agreement.py``: ``check_agreement``, every rank of a layer's group built it the same way;
* ``layout_agreement.py``: ``check_same_layout``, every rank builds the same process grid;
* ``expert_bias.py``: ``update_expert_biases``, the aux-loss-free balancing step of every layer.
* ``capacity_schedule.py``: ``update_capacity_factors``, the dynamic capacity step of every layer.
"""

from . import collectives
from .agreement import check_agreement
from .capacity_schedule import update_capacity_factors
from .ddp import find_ddp_managing_experts, wrap_ddp
from .expert_bias import update_expert_biases
from .fsdp import find_fsdp_managing_experts
from .grads import clip_grad_norm, global_grad_norm, is_expert_param, sync_gradients
from .init import LaunchEnv, detect_launch_env, init_distributed, job_timeout
from .optimizer_sharding import ShardedOptimizer
from .parallel_state import GROUP_NAMES, NODE_GROUP_NAMES, ParallelState, grid_groups
from .sharding import expert_modules, shard_model

__all__ = [
    "GROUP_NAMES",
    "NODE_GROUP_NAMES",
    "check_agreement",
    "LaunchEnv",
    "ParallelState",
    "ShardedOptimizer",
    "clip_grad_norm",
    "collectives",
    "detect_launch_env",
    "expert_modules",
    "global_grad_norm",
    "grid_groups",
    "init_distributed",
    "is_expert_param",
    "job_timeout",
    "shard_model",
    "sync_gradients",
    "update_capacity_factors",
    "update_expert_biases",
    "wrap_ddp",
    "find_ddp_managing_experts",
    "find_fsdp_managing_experts",
]
