"""Router replay, one layer's part: record each forward's assignment, or route with a recorded
one (``routing.record`` holds the data).

``RouterReplay.mode``:

* ``"off"``: the router chooses.
* ``"record"``: the router chooses; the forward's ``(expert_idx, selected, kept)`` (and, when
  asked, the combine weights and logits) are kept per token key. A key routed again later is
  kept with its later routing. A forward run inside a backward (activation recomputation of a
  checkpointed block) does not record: it replays what the first forward recorded.
* ``"replay"``: ``expert_idx`` (and with top-p the selected slots) come from the recording; the
  combine weights are the current router's scores at those experts, so the router's gradient
  flows through the replayed experts. Capacity keeps at most what was kept: the recorded kept
  assignments compete for the capacity of this forward (at the recorded grouping none drops).

The tokens' keys ``(seq_id, position)`` (``routing.record``) are set before the forward
(``TokenKeys``): two integer tensors that broadcast to the layer input's shape without the
hidden dimension (e.g. ``[1, B]`` sequence ids and ``[S, 1]`` positions for ``[S, B, H]``), or
whose broadcast has that many elements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .record import LayerRouting

__all__ = ["REPLAY_MODES", "RouterReplay", "TokenKeys", "recomputing"]

REPLAY_MODES = ("off", "record", "replay")


def recomputing() -> bool:
    """True inside a backward pass (a forward run there is an activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True)
class TokenKeys:
    """The keys of a forward's tokens: ``seq_id`` and ``position``, integer tensors (module
    docstring for their shapes)."""

    seq_id: Tensor
    position: Tensor

    def __post_init__(self) -> None:
        for name in ("seq_id", "position"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"token keys: {name} must be an integer tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")

    def expanded(self, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``seq_id`` and ``position`` of each of the ``prod(shape)`` tokens, ``[T]`` int64."""
        shape = tuple(shape)
        try:
            s, p = torch.broadcast_tensors(self.seq_id, self.position)
        except RuntimeError:
            raise ValueError(f"token keys: seq_id {list(self.seq_id.shape)} and position "
                             f"{list(self.position.shape)} do not broadcast together") from None
        n = 1
        for d in shape:
            n *= d
        try:
            s, p = s.expand(shape), p.expand(shape)
        except RuntimeError:
            if s.numel() != n:
                raise ValueError(
                    f"token keys: seq_id and position (broadcast {list(s.shape)}) do not match "
                    f"the layer input's tokens {list(shape)}") from None
        return s.reshape(-1).to(torch.int64), p.reshape(-1).to(torch.int64)

    def narrow(self, shape: Sequence[int], dim: int, start: int, length: int) -> TokenKeys:
        """The keys of ``x.narrow(dim, start, length)`` for an input ``x`` of leading shape
        ``shape`` (e.g. a tensor-parallel rank's slice of the sequence)."""
        s, p = self.expanded(shape)
        s, p = s.view(tuple(shape)), p.view(tuple(shape))
        return TokenKeys(s.narrow(dim, start, length), p.narrow(dim, start, length))


class RouterReplay:
    """One layer's replay state (module docstring): ``mode``, the ``keys`` of the next forward,
    the recorded rows, the replayed table, and an error to raise at the next forward (a
    recording that does not fit the layer), which the layer raises on every rank of its
    verdict group."""

    def __init__(self) -> None:
        self.mode = "off"
        self.keys: Optional[TokenKeys] = None
        self.with_weights = False
        self.with_logits = False
        self.max_bytes: Optional[int] = None
        self.truncated = False  # a forward was left out: max_bytes reached
        self.error: Optional[str] = None
        self._parts: list[LayerRouting] = []
        self._bytes = 0
        self._table: Optional[LayerRouting] = None  # replay: the recording; record: own rows

    def set_mode(self, mode: str, table: Optional[LayerRouting] = None, *,
                 with_weights: bool = False, with_logits: bool = False,
                 max_bytes: Optional[int] = None, error: Optional[str] = None) -> None:
        """Enter ``mode``; ``"replay"`` routes with ``table`` (sorted by key, one row each);
        ``"record"`` starts an empty recording."""
        self.mode, self.error = mode, error
        self.with_weights, self.with_logits, self.max_bytes = with_weights, with_logits, max_bytes
        self._parts, self._bytes, self.truncated = [], 0, False
        self._table = table if mode == "replay" else None

    @property
    def active(self) -> bool:
        return self.mode != "off"

    @contextlib.contextmanager
    def narrowed(self, shape: Sequence[int], dim: int, start: int, length: int
                 ) -> Iterator[None]:
        """Within the block, the keys are those of ``x.narrow(dim, start, length)``."""
        keys = self.keys
        if keys is None or not self.active:
            yield
            return
        self.keys = keys.narrow(shape, dim, start, length)
        try:
            yield
        finally:
            self.keys = keys

    def _token_keys(self, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        if self.keys is None:
            raise ValueError(
                f"router replay mode {self.mode!r} needs the keys of the forward's tokens: "
                f"set_token_keys(model, seq_ids, positions) before the forward")
        return self.keys.expanded(shape)

    def assignment(self, shape: Sequence[int], num_experts: int, top_k: int,
                   top_p: Optional[float], device: torch.device
                   ) -> Optional[tuple[Tensor, Optional[Tensor], Tensor]]:
        """The recorded ``(expert_idx, selected or None, kept)`` ``[T, k]`` of this forward's
        tokens (input leading ``shape``) on ``device``, or None when the router chooses.
        ``ValueError`` (raised on every rank by the layer) when the recording lacks a token or
        does not fit the layer."""
        if self.error is not None:
            raise ValueError(self.error)
        if self.mode == "off" or (self.mode == "record" and not recomputing()):
            return None
        seq_id, position = self._token_keys(shape)
        table = self._table if self.mode == "replay" else self._own_table()
        if table is None:
            raise ValueError("router replay: a recomputed forward found no recorded routing "
                             "of its tokens (record mode)")
        if table.top_k != top_k:
            raise ValueError(f"router replay: the recording has {table.top_k} experts per "
                             f"token, this layer top_k={top_k}")
        idx, selected, kept = table.lookup(seq_id, position)
        if idx.numel() and int(idx.max()) >= num_experts:
            raise ValueError(f"router replay: the recording names expert {int(idx.max())}, this "
                             f"layer has num_experts={num_experts}")
        if top_p is None and not bool(selected.all()):
            raise ValueError("router replay: the recording was made with top-p selection, this "
                             "layer has top_p=None")
        return (idx.to(device), None if top_p is None else selected.to(device), kept.to(device))

    def _own_table(self) -> Optional[LayerRouting]:
        if self._table is None and self._parts:
            self._table = LayerRouting.cat(self._parts).unique(later_wins=True)
        return self._table

    def add(self, shape: Sequence[int], expert_idx: Tensor, selected: Optional[Tensor],
            kept: Optional[Tensor], weights: Tensor, logits: Tensor) -> None:
        """Record mode, outside a backward: keep this forward's routing (detached); nothing once
        ``max_bytes`` would be exceeded (``truncated``)."""
        if self.mode != "record" or recomputing():
            return
        seq_id, position = self._token_keys(shape)
        all_true = torch.ones_like(expert_idx, dtype=torch.bool)
        part = LayerRouting(
            seq_id=seq_id.to(expert_idx.device), position=position.to(expert_idx.device),
            expert_idx=expert_idx.detach(),
            selected=all_true if selected is None else selected.detach(),
            kept=(all_true if selected is None else selected.detach()) if kept is None
            else kept.detach(),
            weights=weights.detach() if self.with_weights else None,
            logits=logits.detach() if self.with_logits else None)
        if self.max_bytes is not None and self._bytes + part.nbytes > self.max_bytes:
            self.truncated = True
            return
        self._parts.append(part)
        self._bytes += part.nbytes
        self._table = None

    def recording(self, clear: bool = True) -> Optional[LayerRouting]:
        """The recorded rows, one per key (the latest routing of a key), sorted by key; None
        when nothing was recorded. ``clear`` starts a new recording."""
        table = self._own_table()
        if clear:
            self._parts, self._bytes, self._table, self.truncated = [], 0, None, False
        return table
