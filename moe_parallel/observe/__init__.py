"""Watching the router while a model trains.

``metrics``: every MoE layer's load per expert, imbalance, drops, experts per token, router
entropy and loss terms, summed over the ranks of the stage by one collective on the steps the
caller chooses (``RouterMetrics``, ``collect_layer_metrics``). ``sinks``: where they are
written, by the lead rank: JSON Lines, TensorBoard, Weights & Biases offline (``MetricSinks``).
``report``: PNGs of a run's JSON Lines (``python -m moe_parallel.report``). ``traces``: routing
traces, a safetensors file per rank and step, read back as the global view (``save_trace``,
``load_trace``).
"""

from .metrics import LOSS_TERMS, RouterMetrics, collect_layer_metrics, load_figures, moe_layers
from .sinks import (
    LAYER_SCALARS,
    JsonlSink,
    MetricSinks,
    TensorBoardSink,
    WandbSink,
    metrics_record,
    scalar_items,
)
from .traces import TraceInfo, load_trace, save_trace, trace_info, trace_steps

__all__ = ["LAYER_SCALARS", "LOSS_TERMS", "JsonlSink", "MetricSinks", "RouterMetrics",
           "TensorBoardSink", "TraceInfo", "WandbSink", "collect_layer_metrics", "load_figures",
           "load_trace", "metrics_record", "moe_layers", "save_trace", "scalar_items",
           "trace_info", "trace_steps"]
