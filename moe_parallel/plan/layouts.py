"""Parallel layouts: one ``Layout`` (the two grids of ``ParallelState`` plus the sharding and
recompute modes), the rules a layout must meet for a model, and the enumeration of candidates.

``world = pp·dp·cp·tp = pp·edp·ep·etp`` (``dp``, ``edp`` derived). A layout fits a model when
``world`` is divisible by ``tp·cp·pp`` and by ``ep·etp·pp``, ``E % ep == 0``, ``F % etp == 0``
(no ETP with expert biases: ``GroupedExperts`` refuses it), ``pp <= layers``, ``seq_len %
(tp·cp) == 0`` (each TP and CP rank routes its own slice of the sequence) and, with a
tensor-parallel dense part, ``heads % tp == kv_heads % tp == 0`` and ``dense_ffn % tp == 0``;
the built-in model runs tp, ep, etp and dp only. Sharding modes (``SHARD_MODES``): ``"none"``
(replicated over DP×CP and EDP), ``"optimizer"`` (optimizer state sharded: dense over DP×CP,
experts over EDP), ``"experts"`` (FSDP2/ZeRO-3: dense parameters, gradients and optimizer state
over DP×CP, routed experts' over EDP).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from ..config.choices import RECOMPUTE_MODES, SHARD_MODES
from .models import ModelSpec

__all__ = ["AXES", "Layout", "SHARD_MODES", "check_layout", "check_value", "enumerate_layouts",
           "layout_problem"]

AXES = ("tp", "cp", "pp", "ep", "etp")


@dataclass(frozen=True)
class Layout:
    """One candidate: ``world`` ranks as ``tp, cp, pp`` (dense) and ``ep, etp, pp`` (experts),
    a sharding mode and a recompute mode."""

    world: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    shard: str = "none"
    recompute: str = "none"

    @property
    def dp(self) -> int:
        """Dense data-parallel size ``world / (pp·cp·tp)``."""
        return self.world // (self.pp * self.cp * self.tp)

    @property
    def edp(self) -> int:
        """Expert data-parallel size ``world / (pp·ep·etp)``."""
        return self.world // (self.pp * self.ep * self.etp)

    def label(self) -> str:
        """``tp2·cp1·pp1·ep4·etp1 (dp2·edp1)``-style name of the grid."""
        return (f"tp{self.tp}·cp{self.cp}·pp{self.pp}·ep{self.ep}·etp{self.etp} "
                f"(dp{self.dp}·edp{self.edp})")

    def to_dict(self) -> dict:
        """The layout with its derived sizes, JSON-ready."""
        return {**asdict(self), "dp": self.dp, "edp": self.edp}


def check_value(model: ModelSpec, axis: str, value: int, world: int) -> None:
    """``ValueError`` naming ``--<axis>`` when ``value`` alone cannot be part of a layout of
    ``model`` on ``world`` ranks (not a positive divisor of world, experts or FFN width not
    divisible, more stages than layers, heads not divisible)."""
    flag = f"--{axis}"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag}: must be a positive int, got {value!r}")
    if world % value:
        raise ValueError(f"{flag} {value}: --gpus {world} is not divisible by it")
    if axis == "ep" and model.experts % value:
        raise ValueError(f"{flag} {value}: {model.name} has {model.experts} experts, not "
                         f"divisible by {value}")
    if axis == "etp":
        if model.expert_ffn % value:
            raise ValueError(f"{flag} {value}: {model.name}'s expert FFN width "
                             f"{model.expert_ffn} is not divisible by {value}")
        if value > 1 and model.expert_proj_bias:
            raise ValueError(f"{flag} {value}: {model.name} has expert biases, which expert "
                             f"tensor parallelism does not support (use --etp 1)")
    if axis == "pp" and value > model.layers:
        raise ValueError(f"{flag} {value}: {model.name} has {model.layers} layers, fewer than "
                         f"{value} pipeline stages")
    if axis in ("cp", "pp") and value > 1 and not model.dense_tp:
        raise ValueError(f"{flag} {value}: the built-in model runs tp, ep, etp and dp only")
    if axis == "tp" and model.dense_tp:
        a = model.attention
        for what, n in (("attention heads", a.heads), ("KV heads", a.kv_heads),
                        ("dense FFN width", model.dense_ffn)):
            if n and n % value:
                raise ValueError(f"{flag} {value}: {model.name}'s {what} ({n}) are not "
                                 f"divisible by {value}")


def layout_problem(model: ModelSpec, layout: Layout, seq_len: int) -> str | None:
    """Why ``layout`` does not fit ``model`` (module docstring), None when it does."""
    for axis in AXES:
        try:
            check_value(model, axis, getattr(layout, axis), layout.world)
        except ValueError as e:
            return str(e)
    w = layout.world
    if w % (layout.tp * layout.cp * layout.pp):
        return f"--gpus {w} is not divisible by tp·cp·pp = {layout.tp * layout.cp * layout.pp}"
    if w % (layout.ep * layout.etp * layout.pp):
        return f"--gpus {w} is not divisible by ep·etp·pp = {layout.ep * layout.etp * layout.pp}"
    if seq_len % (layout.tp * layout.cp):
        return (f"--seq-len {seq_len} is not divisible by tp·cp = {layout.tp * layout.cp} "
                f"(each TP and CP rank takes its slice of the sequence)")
    if layout.shard not in SHARD_MODES:
        return f"--shard: {layout.shard!r} is not one of {SHARD_MODES}"
    if layout.recompute not in RECOMPUTE_MODES:
        return f"--recompute: {layout.recompute!r} is not one of {RECOMPUTE_MODES}"
    return None


def check_layout(model: ModelSpec, layout: Layout, seq_len: int) -> None:
    """``ValueError`` with ``layout_problem``'s reason when ``layout`` does not fit."""
    problem = layout_problem(model, layout, seq_len)
    if problem is not None:
        raise ValueError(problem)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_values(model: ModelSpec, axis: str, world: int, gpus_per_node: int) -> list[int]:
    """The values of ``axis`` tried when the user names none: TP and ETP inside a node
    (divisors of world up to ``gpus_per_node``), CP 1, PP and EP every divisor of world that
    suits the model; each filtered by ``check_value``."""
    if axis == "cp":
        candidates = [1]
    elif axis in ("tp", "etp"):
        candidates = [d for d in _divisors(world) if d <= gpus_per_node]
    else:
        candidates = _divisors(world)
    out = []
    for v in candidates:
        try:
            check_value(model, axis, v, world)
        except ValueError:
            continue
        out.append(v)
    return out


def enumerate_layouts(model: ModelSpec, world: int, seq_len: int,
                      values: dict[str, list[int] | None], shards: list[str],
                      recomputes: list[str], gpus_per_node: int = 8) -> list[Layout]:
    """Every layout of the given axis values (``values[axis]``; None: ``default_values``),
    sharding and recompute modes that fits ``model`` (``layout_problem``). A value the user
    named that cannot fit on its own raises ``ValueError`` naming its flag; when no
    combination fits, ``ValueError`` says why the first ones did not."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"--gpus: must be a positive int, got {world!r}")
    for name, modes, allowed in (("--shard", shards, SHARD_MODES),
                                 ("--recompute", recomputes, RECOMPUTE_MODES)):
        for mode in modes:
            if mode not in allowed:
                raise ValueError(f"{name}: {mode!r} is not one of {allowed}")
    grid = {}
    for axis in AXES:
        given = values.get(axis)
        if given:
            for v in given:
                check_value(model, axis, v, world)
            grid[axis] = sorted(set(given))
        else:
            grid[axis] = default_values(model, axis, world, gpus_per_node)
    out, problems = [], []
    for tp, cp, pp, ep, etp in itertools.product(*(grid[a] for a in AXES)):
        base = Layout(world, tp, cp, pp, ep, etp)
        problem = layout_problem(model, base, seq_len)
        if problem is not None:
            problems.append(f"{base.label()}: {problem}")
            continue
        out += [Layout(world, tp, cp, pp, ep, etp, s, r) for s in shards for r in recomputes]
    if not out:
        raise ValueError("no layout of the given sizes fits " + model.name + ": "
                         + "; ".join(problems[:3]))
    return out
