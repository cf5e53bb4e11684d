"""Frozen parameters (``requires_grad=False``) across ranks: every rank must freeze alike.

What a rank runs in the backward follows from what requires grad there: a frozen routed expert
skips its weight-gradient GEMMs, a layer whose input and routing weights need no gradient skips
the backward of its dispatch exchanges, and the gradient all-reduces carry only trainable
parameters. Those backward exchanges and all-reduces are collectives, so the ranks that share
them must agree, or one rank waits in a collective its peers skip. Two checks make a
disagreement an error on every rank instead of a hang:

* per MoE layer, at every forward (``verdict_columns`` / ``agree_on_gradients``): two columns
  ride on the forward verdict the layer shares anyway (``agreement.share_forward_verdict``, no
  extra collective): ``[input needs grad, routing weights need grad, freezing code]``. Unequal
  freezing codes raise ``ValueError`` on every rank of the verdict group, naming each rank's
  frozen parameters of the layer. The exchange carries gradients back when they are needed on
  *any* rank: a rank whose own input needs none then takes part with a stand-in leaf (its
  gradient is dropped), so every rank runs the same backward collectives; when no rank needs
  them, none runs them.
* per model, at ``sync_gradients``'s first call for a module and whenever its freezing changes
  (``ensure_same_freezing``; at every call for a plain list of parameters): one all-gather of
  the freezing code of the parameters it was given over the pipeline stage
  (``ps.group("stage")``, every rank that reduces gradients with this one); unequal codes raise
  ``ValueError`` on every rank, naming each rank's frozen parameters. ``wrap_ddp`` and
  ``ShardedOptimizer`` run the same check before they build anything.

The freezing code of a list of parameters is ``crc32`` of, for each parameter in order, its name
(when known), ``requires_grad`` and sync tags: equal on ranks that hold the same model (an EP
rank's expert shard has the same name and tags as its peers'). A freezing change made on every
rank alike (e.g. unfreezing the experts after N steps) is checked again at the next call; a
change made on one rank only after the first check is the caller's error (that rank then runs
the check's collective alone, while the MoE layers' own check still catches their parameters
at the next forward).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..eager import eager_only
from . import collectives
from .parallel_state import ParallelState

__all__ = ["agree_on_gradients", "check_same_freezing", "ensure_same_freezing",
           "freezing_code", "frozen_names", "verdict_columns"]

def _named(params: Iterable[Tensor] | nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs: a module's ``named_parameters``, or ``#i`` for the ``i``-th
    parameter of an iterable."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    return [(f"#{i}", p) for i, p in enumerate(params)]


def freezing_code(params: Iterable[Tensor] | nn.Module) -> int:
    """``crc32`` over the parameters in order of ``name, requires_grad, sync_group,
    sequence_parallel`` (a module's parameter names; ``#i`` for an iterable): equal on every
    rank that holds the same model frozen the same way."""
    text = ";".join(f"{n}:{int(p.requires_grad)}:{getattr(p, 'sync_group', 'dp')}:"
                    f"{int(bool(getattr(p, 'sequence_parallel', False)))}"
                    for n, p in _named(params))
    return zlib.crc32(text.encode())


def frozen_names(params: Iterable[Tensor] | nn.Module) -> list[str]:
    """The names (``#i`` for an iterable) of the parameters with ``requires_grad=False``."""
    return [n for n, p in _named(params) if not p.requires_grad]


def _mismatch(ranks: Sequence[int], names: list[list[str]], what: str) -> ValueError:
    by_freezing: dict[tuple[str, ...], list[int]] = {}
    for rank, frozen in zip(ranks, names):
        by_freezing.setdefault(tuple(frozen), []).append(rank)
    detail = "; ".join(f"ranks {r} freeze [{', '.join(f) or 'nothing'}]"
                       for f, r in by_freezing.items())
    return ValueError(
        f"the ranks of {what} froze different parameters (requires_grad=False): {detail}. "
        "Freeze the same parameters on every rank (moe_parallel.train.freeze.freeze): the "
        "backward's exchanges and gradient all-reduces follow from what requires grad")


def check_same_freezing(params: Iterable[Tensor] | nn.Module, ps: ParallelState,
                        group_name: str = "stage") -> None:
    """Raise ``ValueError`` on every rank of ``ps.group(group_name)`` unless all of them pass
    parameters frozen alike (equal ``freezing_code``). One all-gather of one int64 (and, on a
    mismatch, of every rank's ``frozen_names``); nothing without a group or on one rank."""
    params = params if isinstance(params, nn.Module) else list(params)
    group = ps.group(group_name)
    if group is None or collectives.group_size(group) == 1:
        return
    code = freezing_code(params)
    table = _gather_codes([code], group, _device(params))
    if len({row[0] for row in table}) > 1:
        names = collectives.all_gather_object(frozen_names(params), group)
        raise _mismatch(ps.ranks[group_name], names, f"the {group_name} group")


def ensure_same_freezing(params: Iterable[Tensor] | nn.Module, ps: ParallelState,
                         group_name: str = "stage") -> None:
    """``check_same_freezing`` at the first call for a module and again whenever its freezing
    changes (the agreed code is kept on the module); at every call for an iterable of
    parameters (module docstring)."""
    group = ps.group(group_name)
    if group is None or collectives.group_size(group) == 1:
        return
    if not isinstance(params, nn.Module):
        check_same_freezing(params, ps, group_name)
        return
    key = (id(group), freezing_code(params))
    if getattr(params, "_agreed_freezing", None) == key:
        return
    check_same_freezing(params, ps, group_name)
    params._agreed_freezing = key


def _device(params: Iterable[Tensor] | nn.Module) -> torch.device:
    """Where a collective over the parameters' ranks runs: the first parameter's device (CPU
    for a model without parameters)."""
    first = next(iter(params.parameters() if isinstance(params, nn.Module) else params), None)
    if first is None:
        return torch.device("cpu")
    local = first.to_local() if hasattr(first, "to_local") else first
    return local.device


def _gather_codes(row: list[int], group, device: torch.device) -> list[list[int]]:
    mine = torch.tensor([row], dtype=torch.int64, device=device)
    w = collectives.group_size(group)
    return collectives.all_gather(mine, group, [1] * w).tolist()


# ---- per MoE layer, on the forward verdict ---------------------------------------------------

VERDICT_COLUMNS = 3  # input needs grad, routing weights need grad, freezing code


@eager_only
def verdict_columns(layer: nn.Module, tokens: Optional[Tensor], probs: Optional[Tensor]
                    ) -> list[int]:
    """This rank's ``[input needs grad, routing weights need grad, freezing code]`` for the
    forward verdict of MoE layer ``layer``: ``tokens`` / ``probs`` need grad when autograd is
    on and they require it (None: they do not, e.g. a refused input)."""
    grad = torch.is_grad_enabled()
    return [int(grad and tokens is not None and tokens.requires_grad),
            int(grad and probs is not None and probs.requires_grad), freezing_code(layer)]


@eager_only
def agree_on_gradients(layer: nn.Module, table: list[list[int]], ps: ParallelState,
                       group_name: str, tokens: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """From the gathered ``verdict_columns`` of every rank of ``ps.group(group_name)``: raise
    ``ValueError`` on all of them when their freezing codes differ (naming each rank's frozen
    parameters; the same table on every rank, so every rank raises); else ``(tokens, probs)``
    for the dispatch: each replaced by a stand-in leaf that requires grad when this rank's does
    not but another rank's does (so every rank joins that exchange's backward), unchanged
    otherwise."""
    if len({row[2] for row in table}) > 1:
        names = collectives.all_gather_object(frozen_names(layer), ps.group(group_name))
        raise _mismatch(ps.ranks[group_name], names,
                        f"an MoE layer's {group_name} group")
    if not torch.is_grad_enabled():
        return tokens, probs
    if any(row[0] for row in table) and not tokens.requires_grad:
        tokens = tokens.detach().requires_grad_()
    if any(row[1] for row in table) and not probs.requires_grad:
        probs = probs.detach().requires_grad_()
    return tokens, probs
