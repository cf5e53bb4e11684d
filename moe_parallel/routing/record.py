"""Recorded routing: the token-to-expert assignment of MoE layers, keyed by token, not by rank.

A token is named by its key ``(seq_id, position)``: ``seq_id`` (int64, ``0 <= seq_id < 2^31``)
names its sequence (e.g. the sample's index in the dataset or the rollout), ``position``
(``0 <= position < 2^32``) its place in it. Whatever rank, layout or batch order routes a token,
its key is the same, so a recording made in one run can be replayed in another.

``LayerRouting`` holds the routing of ``N`` tokens of one layer, one row per key, sorted by key
``seq_id · 2^32 + position``:

* ``seq_id`` ``[N]`` int64, ``position`` ``[N]`` int64;
* ``expert_idx`` ``[N, k]`` int64, the global expert ids of the token's ``k = top_k`` slots;
* ``selected`` ``[N, k]`` bool, the router's selection (top-p: the dynamic-k slots; all True
  otherwise);
* ``kept`` ``[N, k]`` bool, the assignments that survived capacity (``selected`` when nothing
  dropped);
* optionally ``weights`` ``[N, k]`` (the combine weights) and ``logits`` ``[N, E]``, for traces.

``RoutingRecord`` is a list of them, one per MoE layer in the model's order, with the
``num_experts`` and ``top_k`` they were recorded with. ``merge`` forms the global view of
per-rank records (a key recorded on two ranks must carry the same assignment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LayerRouting", "RoutingRecord", "token_key"]

_POSITION_BITS = 32
_MAX_SEQ_ID = 2**31


def token_key(seq_id: Tensor, position: Tensor) -> Tensor:
    """``seq_id · 2^32 + position`` (int64), after checking both ranges; ``ValueError`` naming
    the parameter otherwise."""
    for name, t, hi in (("seq_id", seq_id, _MAX_SEQ_ID), ("position", position,
                                                          2**_POSITION_BITS)):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"token keys: {name} must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
            raise ValueError(f"token keys: {name} must lie in [0, {hi}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    return (seq_id.to(torch.int64) << _POSITION_BITS) | position.to(torch.int64)


@dataclass
class LayerRouting:
    """The routing of ``N`` tokens of one layer (fields in the module docstring)."""

    seq_id: Tensor
    position: Tensor
    expert_idx: Tensor
    selected: Tensor
    kept: Tensor
    weights: Optional[Tensor] = None
    logits: Optional[Tensor] = None

    def __post_init__(self) -> None:
        n = self.seq_id.shape[0]
        k = self.expert_idx.shape[1] if self.expert_idx.dim() == 2 else -1
        shapes = {"seq_id": (n,), "position": (n,), "expert_idx": (n, k), "selected": (n, k),
                  "kept": (n, k), "weights": (n, k)}
        for name, want in shapes.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"LayerRouting.{name} must be {list(want)} for {n} tokens of "
                                 f"{k} slots, got {list(t.shape)}")
        if self.logits is not None and (self.logits.dim() != 2 or self.logits.shape[0] != n):
            raise ValueError(f"LayerRouting.logits must be [{n}, num_experts], got "
                             f"{list(self.logits.shape)}")
        for name in ("selected", "kept"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"LayerRouting.{name} must be bool, got "
                                 f"{getattr(self, name).dtype}")

    @property
    def num_tokens(self) -> int:
        return int(self.seq_id.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.expert_idx.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def keys(self) -> Tensor:
        return token_key(self.seq_id, self.position)

    def to(self, device: torch.device | str) -> LayerRouting:
        return LayerRouting(**{k: v.to(device) for k, v in self.tensors().items()})

    def take(self, rows: Tensor) -> LayerRouting:
        return LayerRouting(**{k: v[rows] for k, v in self.tensors().items()})

    @classmethod
    def cat(cls, parts: Sequence[LayerRouting]) -> LayerRouting:
        """The rows of ``parts`` one after the other (the optional fields kept only when every
        part has them)."""
        if not parts:
            raise ValueError("LayerRouting.cat needs at least one part")
        names = set.intersection(*(set(p.tensors()) for p in parts))
        return cls(**{n: torch.cat([p.tensors()[n] for p in parts]) for n in names})

    def unique(self, later_wins: bool) -> LayerRouting:
        """Sorted by key, one row per key. A key found on several rows: with ``later_wins`` the
        last row counts (a later forward re-routed the token); otherwise every row must carry
        the same assignment (``expert_idx``, ``selected``, ``kept``), else ``ValueError``."""
        keys = self.keys()
        order = torch.sort(keys, stable=True).indices
        sk = keys[order]
        last = torch.ones_like(sk, dtype=torch.bool)
        last[:-1] = sk[1:] != sk[:-1]
        if not later_wins and not bool(last.all()):
            a, b = order[:-1][~last[:-1]], order[1:][~last[:-1]]
            same = ((self.expert_idx[a] == self.expert_idx[b]).all(1)
                    & (self.selected[a] == self.selected[b]).all(1)
                    & (self.kept[a] == self.kept[b]).all(1))
            if not bool(same.all()):
                i = int(a[~same][0])
                raise ValueError(
                    f"routing record: token (seq_id={int(self.seq_id[i])}, position="
                    f"{int(self.position[i])}) was recorded twice with different assignments")
        return self.take(order[last])

    def lookup(self, seq_id: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(expert_idx, selected, kept)`` ``[T, k]`` of the ``T`` tokens named by ``seq_id``
        and ``position`` (``[T]`` each), on this record's device. This record must be ``unique``
        (sorted by key). ``ValueError`` naming the first token it does not hold."""
        keys = self.keys()
        want = token_key(seq_id, position).to(keys.device)
        if keys.numel() == 0:
            found = torch.zeros_like(want, dtype=torch.bool)
            at = torch.zeros_like(want)
        else:
            at = torch.searchsorted(keys, want).clamp_(max=keys.numel() - 1)
            found = keys[at] == want
        if not bool(found.all()):
            i = int((~found).nonzero()[0])
            raise ValueError(
                f"router replay: the recording holds no token (seq_id={int(seq_id[i])}, "
                f"position={int(position[i])}); {int((~found).sum())} of this forward's "
                f"{want.numel()} tokens are missing from its {keys.numel()} (replay needs the "
                f"keys the recording was made with: set_token_keys)")
        return self.expert_idx[at], self.selected[at], self.kept[at]


@dataclass
class RoutingRecord:
    """The routing of every recorded MoE layer, in the model's layer order (module docstring).
    ``layer_names``: the layers' module names, for the reader (not used to match layers)."""

    layers: list[LayerRouting]
    num_experts: int
    top_k: int
    layer_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, layer in enumerate(self.layers):
            if layer.top_k != self.top_k:
                raise ValueError(f"routing record: layer {i} has {layer.top_k} slots per token, "
                                 f"the record says top_k={self.top_k}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def to(self, device: torch.device | str) -> RoutingRecord:
        return replace(self, layers=[layer.to(device) for layer in self.layers])

    @classmethod
    def merge(cls, records: Sequence[RoutingRecord]) -> RoutingRecord:
        """The global view of per-rank records: each layer's rows of every record, one per key
        (a key on several records must carry the same assignment). Every record must have the
        same layer count, ``num_experts`` and ``top_k``."""
        if not records:
            raise ValueError("RoutingRecord.merge needs at least one record")
        first = records[0]
        for i, r in enumerate(records[1:], 1):
            if (r.num_layers, r.num_experts, r.top_k) != (first.num_layers, first.num_experts,
                                                          first.top_k):
                raise ValueError(
                    f"routing records disagree: record {i} has {r.num_layers} layers, "
                    f"num_experts={r.num_experts}, top_k={r.top_k}; record 0 has "
                    f"{first.num_layers}, {first.num_experts}, {first.top_k}")
        layers = [LayerRouting.cat([r.layers[i] for r in records]).unique(later_wins=False)
                  for i in range(first.num_layers)]
        return replace(first, layers=layers)
