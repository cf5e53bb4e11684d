"""The cost models of expert-parallel communication, pure functions (no torch needed).

* :mod:`.layer`: one MoE layer on a GPU cluster, forward + backward (all-to-all volume over
  NVLink and InfiniBand, expert GEMM FLOPs, overlap, chunked pipelining);
* :mod:`.alltoall`: the all-to-all model fitted to measurements (``python -m benchmarks
  cluster``), flat and hierarchical predictions, and the layer model's parameters from a fit;
* :mod:`.checks`: the argument checks they share.

Every public name of the submodules is importable from here.
"""

from benchmarks.cost_model.alltoall import (
    FIT_MODEL,
    FIT_TERMS,
    all_to_all_flat_seconds,
    all_to_all_hierarchical_seconds,
    alltoall_volumes,
    fit_alltoall,
    fitted_assumptions,
    load_fit,
    predictions,
)
from benchmarks.cost_model.layer import (
    ACTIVATION_MATRICES,
    DEFAULT_ASSUMPTIONS,
    DEFAULT_MODEL,
    EP_SIZES,
    a2a_bytes,
    all_to_all_seconds,
    cost_model_rows,
    expert_gemm_flops,
    link_fractions,
    pipelined_step_seconds,
    predict_layer,
)

__all__ = [
    "ACTIVATION_MATRICES", "DEFAULT_ASSUMPTIONS", "DEFAULT_MODEL", "EP_SIZES", "FIT_MODEL",
    "FIT_TERMS", "a2a_bytes", "all_to_all_flat_seconds", "all_to_all_hierarchical_seconds",
    "all_to_all_seconds", "alltoall_volumes", "cost_model_rows", "expert_gemm_flops",
    "fit_alltoall", "fitted_assumptions", "link_fractions", "load_fit", "pipelined_step_seconds",
    "predict_layer", "predictions",
]
