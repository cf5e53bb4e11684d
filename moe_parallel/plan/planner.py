"""Evaluate candidate layouts: predicted memory per rank, whether it fits, predicted step time,
and the ranking (fitting layouts first, fastest first by tokens per second per GPU; then the
ones that do not fit, smallest first)."""

from __future__ import annotations

from dataclasses import dataclass

from .cost import Cluster, step_time
from .layouts import Layout
from .memory import MemoryOptions, layout_memory
from .models import ModelSpec

__all__ = ["Evaluation", "evaluate", "rank"]


@dataclass(frozen=True)
class Evaluation:
    """One layout's prediction: ``memory`` (``layout_memory``), ``time`` (``step_time``), and
    ``fits``: ``memory["total"] <= budget`` (GPU memory minus the reserve)."""

    layout: Layout
    memory: dict
    time: dict
    budget: int

    @property
    def fits(self) -> bool:
        """The predicted bytes of the most loaded rank fit the budget."""
        return self.memory["total"] <= self.budget

    def to_dict(self) -> dict:
        """JSON-ready record."""
        return {"layout": self.layout.to_dict(), "fits": self.fits,
                "memory": self.memory, "time": self.time}


def evaluate(model: ModelSpec, layouts: list[Layout], opts: MemoryOptions, cluster: Cluster,
             budget: int) -> list[Evaluation]:
    """The prediction of every layout, in ``rank`` order."""
    return rank([Evaluation(lay, layout_memory(model, lay, opts),
                            step_time(model, lay, opts, cluster), budget) for lay in layouts])


def rank(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Fitting layouts by predicted tokens/s per GPU (highest first), then the others by
    predicted bytes (smallest first)."""
    fit = sorted((e for e in evaluations if e.fits),
                 key=lambda e: -e.time["tokens_per_second_per_gpu"])
    rest = sorted((e for e in evaluations if not e.fits), key=lambda e: e.memory["total"])
    return fit + rest
