"""Where router metrics go: JSON Lines, TensorBoard, Weights & Biases (offline).

One record per logging step (``metrics_record``), the same for every sink::

    {"step": 25, "wall_time": 1767225600.0, "loss": 2.31, "tokens_per_s": 18000.0,
     "layers": [{"layer": 0, "tokens": 4096, "tokens_per_expert": [...], ...}, ...]}

``step`` is the 0-based optimizer step, ``wall_time`` Unix seconds, then the caller's step
scalars (the main job: ``loss``, ``tokens_per_s``), and ``layers`` the list of
``collect_layer_metrics`` dicts, one per MoE layer in model order (keys and formulas in
``observe.metrics``: ``layer, tokens, tokens_per_expert [E], routed_per_expert [E], routed,
processed, dropped, drop_rate, unrouted_tokens, mean_load, max_load, min_load, imbalance,
min_over_mean, cv, experts_per_token, experts_per_token_histogram, router_entropy (null when
not watched), overflowed_ranks, ranks`` and ``loss_<term>`` for the terms the layer computed).

* ``JsonlSink(path)``: one JSON object per line, appended (a resumed run continues the file);
  non-finite floats are written as ``null`` (strict JSON).
* ``TensorBoardSink(log_dir)``: ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard``
  package: the ``observe`` extra). Scalars ``train/<name>`` for the step scalars and
  ``moe/layer{i}/<name>`` for each of ``LAYER_SCALARS`` and ``loss_<term>``; the load over the
  experts as the histogram ``moe/layer{i}/tokens_per_expert`` (bucket ``e`` = expert ``e``, its
  count = the expert's processed assignments; bucket upper limits ``e + 0.5``). Flushed at
  every record.
* ``WandbSink(project, run_dir)``: ``wandb.init(mode="offline")`` (``wandb sync`` uploads
  later); the same scalar names as TensorBoard; needs the ``wandb`` package (not in any extra).

``MetricSinks`` fans a record out to the sinks given; only the lead rank builds it enabled.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional, Protocol

__all__ = ["LAYER_SCALARS", "JsonlSink", "MetricSinks", "TensorBoardSink", "WandbSink",
           "metrics_record", "scalar_items"]

# The per-layer figures written as TensorBoard / W&B scalars (besides loss_<term>).
LAYER_SCALARS = ("tokens", "drop_rate", "dropped", "unrouted_tokens", "imbalance", "cv",
                 "min_over_mean", "max_load", "min_load", "mean_load", "experts_per_token",
                 "router_entropy", "overflowed_ranks")


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def metrics_record(step: int, layers: list[dict[str, Any]], **scalars: float) -> dict[str, Any]:
    """The record of ``step`` (module docstring): ``step``, ``wall_time``, ``scalars``,
    ``layers``."""
    return {"step": int(step), "wall_time": time.time(),
            **{k: float(v) for k, v in scalars.items()}, "layers": layers}


def scalar_items(record: dict[str, Any]) -> dict[str, float]:
    """The record's scalars by TensorBoard tag: ``train/<name>`` and ``moe/layer{i}/<name>``
    (None values left out)."""
    out = {f"train/{k}": v for k, v in record.items()
           if k not in ("step", "wall_time", "layers") and v is not None}
    for layer in record["layers"]:
        i = layer["layer"]
        names = list(LAYER_SCALARS) + sorted(k for k in layer if k.startswith("loss_"))
        out.update({f"moe/layer{i}/{name}": float(layer[name]) for name in names
                    if layer.get(name) is not None})
    return out


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats (also inside lists and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


class JsonlSink:
    """Appends each record as one line of JSON to ``path`` (its folder is created)."""

    def __init__(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(_strict(record), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Writes each record's scalars and per-expert load histograms to an event file in
    ``log_dir`` (module docstring for the tags)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises this when tensorboard is missing
            raise ImportError("TensorBoard output needs the tensorboard package: "
                              "pip install 'moe_parallel[observe]'") from exc
        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, record: dict[str, Any]) -> None:
        step, wall = record["step"], record["wall_time"]
        for tag, value in scalar_items(record).items():
            self.writer.add_scalar(tag, value, step, walltime=wall)
        for layer in record["layers"]:
            load = layer["tokens_per_expert"]
            total = sum(load)
            if not total:
                continue
            used = [e for e, c in enumerate(load) if c]
            self.writer.add_histogram_raw(
                f"moe/layer{layer['layer']}/tokens_per_expert", min=used[0], max=used[-1],
                num=total, sum=sum(e * c for e, c in enumerate(load)),
                sum_squares=sum(e * e * c for e, c in enumerate(load)),
                bucket_limits=[e + 0.5 for e in range(len(load))], bucket_counts=load,
                global_step=step, walltime=wall)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs each record's scalars (``scalar_items``) to an offline Weights & Biases run of
    ``project`` under ``run_dir``."""

    def __init__(self, project: str, run_dir: Optional[str] = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("Weights & Biases output needs the wandb package: "
                              "pip install wandb") from exc
        self.run = wandb.init(project=project, mode="offline", dir=run_dir)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalar_items(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """The sinks given (``tensorboard``: a log dir, ``jsonl``: a file, ``wandb_project``: an
    offline W&B project); ``enabled=False`` (every rank but the lead) opens and writes nothing.
    ``write(step, layers, **scalars)`` sends ``metrics_record`` to each."""

    def __init__(self, tensorboard: Optional[str] = None, jsonl: Optional[str] = None,
                 wandb_project: Optional[str] = None, enabled: bool = True) -> None:
        self.sinks: list[Sink] = []
        if not enabled:
            return
        if jsonl:
            self.sinks.append(JsonlSink(jsonl))
        if tensorboard:
            self.sinks.append(TensorBoardSink(tensorboard))
        if wandb_project:
            self.sinks.append(WandbSink(wandb_project, tensorboard))

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def write(self, step: int, layers: list[dict[str, Any]], **scalars: float) -> None:
        """Send the record of ``step`` to every sink."""
        if not self.sinks:
            return
        record = metrics_record(step, layers, **scalars)
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
