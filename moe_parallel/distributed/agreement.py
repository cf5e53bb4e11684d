"""Every rank of a layer's ETP×EP group must build that layer the same way.

``check_agreement(config, ps)`` compares, over the ``tp_ep`` group, one CRC32 per field of the
``MoEConfig`` and of the layout (``world_size, tp, cp, ep, etp, pp``): one all-gather of
``[fields]`` int64 per layer, at its first forward, before any other collective of the layer.
Any difference raises ``ValueError`` on every rank of the group (they all hold the same gathered
table), naming each differing field with its value on each rank. On NCCL the table is a tensor
on the current device and the error path gathers the values with ``all_gather_object``; the
check is the same.

``share_forward_verdict(ps, refused, finite, device, scope)`` is the same idea for one forward:
one all-gather of ``[input ok, logits finite]`` over the ranks of ``verdict_group(ps, scope)``
(``MoEConfig.verdict_scope``: the pipeline stage by default, else the ``tp_ep`` group), so that
every rank of it raises, or none does: no rank enters an exchange, or a gradient all-reduce,
that its peers skipped.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Optional

import torch

from ..config import MoEConfig
from . import collectives
from .parallel_state import ParallelState

__all__ = ["VERDICT_GROUPS", "check_agreement", "share_forward_verdict", "verdict_group"]

LAYOUT_FIELDS = ("world_size", "tp", "cp", "ep", "etp", "pp")


def _fields(config: MoEConfig, ps: ParallelState) -> dict[str, str]:
    values = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    values.update({name: repr(getattr(ps, name)) for name in LAYOUT_FIELDS})
    return values


def check_agreement(config: MoEConfig, ps: ParallelState, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank of ``ps``'s ``tp_ep`` group unless all of them hold
    the same ``config`` and layout. A collective over that group (a no-op without one)."""
    group = ps.group("tp_ep")
    if group is None or collectives.group_size(group) == 1:
        return
    mine = _fields(config, ps)
    codes = torch.tensor([zlib.crc32(v.encode()) for v in mine.values()], dtype=torch.int64,
                         device=device)
    w = collectives.group_size(group)
    table = collectives.all_gather(codes.view(1, -1), group, [1] * w)  # [w, fields]
    if bool((table == table[:1]).all()):
        return
    everyone: list[dict[str, str]] = collectives.all_gather_object(mine, group)
    ranks = ps.ranks["tp_ep"]
    differ = [name for name in mine if len({values[name] for values in everyone}) > 1]
    detail = "; ".join(
        f"{name}: " + ", ".join(f"rank {ranks[i]} {values[name]}" for i, values in
                                enumerate(everyone))
        for name in differ
    )
    raise ValueError(
        f"the ranks of an MoE layer's ETP×EP group (ranks {ranks}) were built differently: "
        f"{detail}. Every rank must construct the layer with the same MoEConfig and layout"
    )


VERDICT_GROUPS = {"stage": ("stage", "pipeline stage"), "layer": ("tp_ep", "ETP×EP group")}


def verdict_group(ps: Optional[ParallelState], scope: str) -> Optional[str]:
    """The group (a ``ParallelState`` group name) that shares a forward's verdict for
    ``MoEConfig.verdict_scope`` ``scope``: ``stage`` (every rank of the pipeline stage) or
    ``tp_ep`` (the layer's ETP×EP group); ``None`` when it is this rank alone or ``scope`` is
    ``none`` (no collective)."""
    if scope == "none":
        return None
    name = VERDICT_GROUPS[scope][0]
    if ps is None or len(ps.ranks[name]) == 1:
        return None
    return name


def share_forward_verdict(ps: ParallelState, refused: Optional[ValueError],
                          finite: bool | torch.Tensor, device: torch.device,
                          scope: str = "stage", tokens: Optional[int] = None,
                          extra: Sequence[int] = ()) -> list[list[int]]:
    """All-gather ``[input ok, logits finite]`` over the ``verdict_group(ps, scope)``: a rank
    whose input was ``refused`` raises that error, its peers ``ValueError`` naming it; when any
    rank's router logits are not ``finite`` every rank raises ``FloatingPointError`` naming
    those ranks. ``finite`` may be a 0-d bool tensor on ``device`` (no host read before the
    gathered table's). ``tokens`` (``MoEConfig.static_exchange``: every rank passes its token
    count): unless all are equal, every rank raises ``ValueError`` naming them. A collective
    every rank of the group joins at every forward (local when the group is this rank alone).
    ``extra``: more int64 columns of this rank (as many on every rank; e.g. the freezing
    columns of ``freezing.verdict_columns``); returns every rank's ``extra``, in group order."""
    name = verdict_group(ps, scope)
    what = VERDICT_GROUPS[scope][1]
    row = [refused is None, True] + ([] if tokens is None else [tokens]) + [int(v) for v in extra]
    mine = torch.tensor([row], dtype=torch.int64, device=device)
    if isinstance(finite, torch.Tensor):
        mine[0, 1] = finite
    elif not finite:
        mine[0, 1] = 0
    if name is None:
        table, ranks = mine.tolist(), [ps.rank if ps is not None else 0]
    else:
        group = ps.group(name)
        w = collectives.group_size(group)
        table = collectives.all_gather(mine, group, [1] * w).tolist()  # one host read
        ranks = ps.ranks[name]
    if refused is not None:
        raise refused
    bad_input = [ranks[i] for i, (ok, *_) in enumerate(table) if not ok]
    if bad_input:
        raise ValueError(
            f"the input of rank(s) {bad_input} of this layer's {what} {ranks} was refused "
            f"(their error says why): every rank of the {what} skips this forward")
    bad = [ranks[i] for i, (_, ok, *_) in enumerate(table) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite router logits on rank(s) {bad} of this layer's {what} {ranks}: every "
            f"rank of the {what} skips this forward (NaN/Inf in the input or the router "
            "weight; check_finite=False lets them propagate)"
        )
    if tokens is not None and len({r[2] for r in table}) > 1:
        counts = {ranks[i]: r[2] for i, r in enumerate(table)}
        raise ValueError(
            f"static_exchange needs the same number of tokens on every rank of this layer's "
            f"{what}, got {counts} (rank: tokens): every rank of the {what} skips this forward")
    return [r[len(r) - len(extra):] for r in table]
