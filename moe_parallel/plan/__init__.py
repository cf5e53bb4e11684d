"""The layout planner: which parallel layouts of an MoE model fit a cluster's GPUs, and which
is predicted fastest (``python -m moe_parallel.plan``).

For each candidate layout (``layouts.Layout``: ``tp, cp, pp, ep, etp`` with ``dp`` and ``edp``
derived, a sharding mode and a recompute mode) the planner predicts the bytes of the most
loaded rank and the time of a training step:

* model (``models.py``): parameters by piece from the model's shape, for the presets
  (``PRESETS``: the published configs of Mixtral-8x7B/8x22B, DeepSeek-V3, Qwen3-30B-A3B and
  -235B-A22B, GPT-OSS-120B) or a Hugging Face ``config.json`` (``hf_config.py``);
* memory (``memory.py``, formulas in its docstring): parameters, gradients and AdamW state per
  rank for each sharding mode; ``"none"`` replicates them over the data-parallel ranks,
  ``"optimizer"`` shards the optimizer state (dense over DP×CP, routed experts over EDP),
  ``"experts"`` shards parameters, gradients and optimizer state as FSDP2 does (dense over
  DP×CP, routed experts over EDP) and adds the gathered buffers; the activations of one
  micro-batch (``activations.py``: the tensors each layer saves for its backward, a table of
  per-token coefficients measured on ``MoELayer``), times the micro-batches a pipeline stage
  holds in flight; the dispatch buffers of one MoE layer at the given routing imbalance;
* time (``cost.py``, formulas in its docstring): compute at an achieved TFLOP/s, the EP
  all-to-alls in the fitted all-to-all model of ``python -m benchmarks cluster``, the TP, ETP,
  CP, PP and FSDP collectives, the pipeline bubble and the gradient synchronisation.

``planner.evaluate`` ranks the layouts (fitting ones by predicted tokens/s per GPU);
``report.py`` prints them and writes JSON. The memory predictions are validated against exact
counts on small layouts (``tests/plan/test_validation.py``: tensor bytes of the model and
AdamW state, ``benchmarks.memory.saved_tensor_bytes`` for the activations, 4 and 8 gloo ranks).
"""

from .activations import RECOMPUTE_MODES
from .cost import Cluster, cluster_from_fit, step_time
from .hf_config import model_from_hf_config
from .layouts import SHARD_MODES, Layout, check_layout, enumerate_layouts
from .memory import PRECISIONS, MemoryOptions, layout_memory, stage_memory
from .models import (
    PRESETS,
    AttentionSpec,
    ModelSpec,
    active_params,
    builtin_model,
    preset,
    total_params,
)
from .planner import Evaluation, evaluate
from .units import format_bytes, parse_bytes

__all__ = [
    "PRECISIONS", "PRESETS", "RECOMPUTE_MODES", "SHARD_MODES", "AttentionSpec", "Cluster",
    "Evaluation", "Layout", "MemoryOptions", "ModelSpec", "active_params", "builtin_model",
    "check_layout", "cluster_from_fit", "enumerate_layouts", "evaluate", "format_bytes",
    "layout_memory", "model_from_hf_config", "parse_bytes", "preset", "stage_memory",
    "step_time", "total_params",
]
