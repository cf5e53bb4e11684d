"""Freezing parts of a model with MoE layers (``--freeze``), for fine-tuning recipes such as
ST-MoE's (train everything but the MoE layers, or only the experts).

The parts, by module (each a set of parameters; a comma-separated list names their union):

    moe      every ``MoELayer``'s parameters: router, routed experts, shared experts
    dense    every parameter outside the MoE layers (embeddings, attention, norms, head)
    router   the routers only (``MoELayer.router``)
    experts  the routed experts only (``MoELayer.experts``: w1, w2 and their biases)

``freeze(model, parts)`` sets ``requires_grad=False`` on them and returns how many parameters
(elements, this rank's shards) each part holds; it refuses to freeze every parameter. Works on
any module holding ``MoELayer``s (the main job's models, a converted Hugging Face model, a
user's own): call it on every rank alike, before building the optimizer (give it the trainable
parameters only) and before wrapping the model (``wrap_ddp``, ``shard_model``). What follows
from the freezing (no weight-gradient GEMM for frozen experts, no gradient all-reduce for
frozen parameters, no backward exchange for an MoE input that needs no gradient) is
``distributed.freezing``'s; checkpoints still hold every parameter.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from torch import nn

from ..layer import MoELayer

__all__ = ["FREEZE_PARTS", "describe_freezing", "freeze", "parse_parts", "part_parameters",
           "parts_arg"]

FREEZE_PARTS = ("moe", "dense", "router", "experts")


def parse_parts(parts: str | Iterable[str], name: str = "parts") -> tuple[str, ...]:
    """``"router,dense"`` (or an iterable of names) -> ``("router", "dense")``: distinct
    names of ``FREEZE_PARTS`` in the given order; ``ValueError`` naming ``name`` and the allowed
    values for an empty list or an unknown name."""
    items = parts.split(",") if isinstance(parts, str) else list(parts)
    items = [p.strip() for p in items]
    bad = [p for p in items if p not in FREEZE_PARTS]
    if not items or bad:
        raise ValueError(f"{name} must be a comma-separated list of {', '.join(FREEZE_PARTS)} "
                         f"(e.g. router,dense), got {','.join(items)!r}")
    return tuple(dict.fromkeys(items))


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def part_parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    """The parameters of ``part`` (one of ``FREEZE_PARTS``, module docstring) in ``model``, in
    ``model.parameters()`` order."""
    parse_parts([part], "part")
    layers = _moe_layers(model)
    if part == "dense":
        inside = {id(p) for layer in layers for p in layer.parameters()}
        return [p for p in model.parameters() if id(p) not in inside]
    owners = {"moe": layers, "router": [layer.router for layer in layers],
              "experts": [layer.experts for layer in layers]}[part]
    chosen = {id(p) for m in owners for p in m.parameters()}
    return [p for p in model.parameters() if id(p) in chosen]


def freeze(model: nn.Module, parts: str | Iterable[str]) -> dict[str, int]:
    """Set ``requires_grad=False`` on the parameters of ``parts`` (``"router,dense"`` or an
    iterable of ``FREEZE_PARTS`` names; module docstring) and return, per part, the number of
    parameter elements it holds on this rank (parts may overlap: ``moe`` holds ``router``).

    ``ValueError`` (nothing is changed) for an unknown part, for ``moe``/``router``/``experts``
    on a model without ``MoELayer``, and when no trainable parameter would be left."""
    names = parse_parts(parts)
    if not _moe_layers(model) and any(p != "dense" for p in names):
        raise ValueError(f"freeze {','.join(names)}: the model has no MoELayer")
    chosen = {part: part_parameters(model, part) for part in names}
    frozen = {id(p) for params in chosen.values() for p in params}
    if not any(p.requires_grad and id(p) not in frozen for p in model.parameters()):
        raise ValueError(f"freeze {','.join(names)} would leave no trainable parameter: "
                         "freeze fewer parts")
    for params in chosen.values():
        for p in params:
            p.requires_grad_(False)
    return {part: sum(p.numel() for p in params) for part, params in chosen.items()}


def describe_freezing(model: nn.Module, parts: str | Iterable[str]) -> str:
    """One line: the parameter elements of each frozen part and the trainable ones left, of
    all (this rank's shards)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = ", ".join(f"{part} ({sum(p.numel() for p in part_parameters(model, part)):,} "
                     "parameters)" for part in parse_parts(parts))
    return f"frozen: {held}; trainable {trainable:,} of {total:,} (this rank's)"


def parts_arg(text: str) -> tuple[str, ...]:
    """The argparse type of ``--freeze``: ``parse_parts``, its error argparse's."""
    try:
        return parse_parts(text, "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
