"""The planner's output: a table for the terminal and the JSON record."""

from __future__ import annotations

from .planner import Evaluation
from .units import format_bytes

__all__ = ["table", "to_json"]

_COLUMNS = ("#", "tp", "cp", "pp", "ep", "etp", "dp", "edp", "shard", "recompute", "params",
            "grads", "optim", "fsdp", "act x n", "dispatch", "total GiB", "fits", "step s",
            "tok/s/GPU")


def _row(i: int, e: Evaluation) -> list[str]:
    lay, mem, t = e.layout, e.memory, e.time
    gib = lambda b: format_bytes(b, "GiB")  # noqa: E731
    return [str(i), str(lay.tp), str(lay.cp), str(lay.pp), str(lay.ep), str(lay.etp),
            str(lay.dp), str(lay.edp), lay.shard, lay.recompute, gib(mem["params"]),
            gib(mem["grads"]), gib(mem["optimizer"]), gib(mem["fsdp_buffers"]),
            f"{gib(mem['activations'])} x{mem['in_flight']}", gib(mem["dispatch"]),
            gib(mem["total"]), "yes" if e.fits else "no", f"{t['step_seconds']:.3g}",
            f"{t['tokens_per_second_per_gpu']:.4g}"]


def table(evaluations: list[Evaluation], top: int) -> str:
    """The first ``top`` evaluations (in their order) as an aligned text table."""
    rows = [list(_COLUMNS)] + [_row(i + 1, e) for i, e in enumerate(evaluations[:top])]
    widths = [max(len(r[c]) for r in rows) for c in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(header: dict, evaluations: list[Evaluation]) -> dict:
    """``header`` (command, model, cluster, options) with every evaluation, in rank order."""
    return {**header, "fitting": sum(e.fits for e in evaluations),
            "evaluated": len(evaluations), "layouts": [e.to_dict() for e in evaluations]}
