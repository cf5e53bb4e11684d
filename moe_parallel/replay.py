"""Router replay over a model: set each MoE layer's mode, the tokens' keys, and collect or
gather the recording (the per-layer part is ``routing.replay``, the data ``routing.record``).

    set_router_replay(model, "record")            # every MoE layer records
    set_token_keys(model, seq_ids, positions)     # the keys of the next forward's tokens
    model(x)                                      # e.g. a rollout
    record = router_recording(model)              # this rank's RoutingRecord
    record = gather_recording(record, group)      # the group's global view
    set_router_replay(model, "replay", record)    # later forwards route as recorded
    set_router_replay(model, "off")

A layer is a ``MoELayer`` found in ``model.modules()``, in that order; ``layers`` picks some of
them by index. A recording that does not fit the chosen layers (layer count, ``num_experts``,
``top_k``, a token it lacks) raises ``ValueError`` at the next forward on every rank of the
layer's verdict group (``MoEConfig.verdict_scope``), never a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from .distributed import collectives
from .layer import MoELayer
from .routing.record import LayerRouting, RoutingRecord
from .routing.replay import REPLAY_MODES, TokenKeys

__all__ = [
    "gather_recording",
    "named_moe_layers",
    "router_recording",
    "set_router_replay",
    "set_token_keys",
]


def named_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(name, layer)`` of every ``MoELayer`` in ``model.modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def _chosen(model: nn.Module, layers: Optional[Sequence[int]]) -> list[tuple[str, MoELayer]]:
    found = named_moe_layers(model)
    if not found:
        raise ValueError(f"model {type(model).__name__} holds no MoELayer")
    if layers is None:
        return found
    picked = list(layers)
    bad = [i for i in picked if not isinstance(i, int) or not 0 <= i < len(found)]
    if bad or len(set(picked)) != len(picked):
        raise ValueError(f"layers must be distinct indices in [0, {len(found)}) (the model's MoE "
                         f"layers), got {picked}")
    return [found[i] for i in sorted(picked)]


def set_router_replay(model: nn.Module, mode: str, record: Optional[RoutingRecord] = None, *,
                      layers: Optional[Sequence[int]] = None, weights: bool = False,
                      logits: bool = False, max_bytes: Optional[int] = None) -> int:
    """Put the chosen MoE layers (all, or ``layers`` by index) in ``mode`` (``"off"``,
    ``"record"``, ``"replay"``) and the others in ``"off"``; returns the number chosen.

    ``record`` mode starts an empty recording; ``weights`` / ``logits`` also keep the combine
    weights / router logits (traces); ``max_bytes`` bounds each layer's recording (later
    forwards are left out once reached, ``RouterReplay.truncated``). ``replay`` mode needs
    ``record``, one ``LayerRouting`` per chosen layer in order."""
    if mode not in REPLAY_MODES:
        raise ValueError(f"mode must be one of {REPLAY_MODES}, got {mode!r}")
    if (record is None) != (mode != "replay"):
        raise ValueError("set_router_replay: mode 'replay' takes a RoutingRecord (record=...), "
                         f"the other modes none; got mode={mode!r}, record="
                         f"{type(record).__name__}")
    if record is not None and not isinstance(record, RoutingRecord):
        raise ValueError(f"record must be a RoutingRecord, got {type(record).__name__}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    chosen = _chosen(model, layers)
    for _, layer in chosen:
        if mode != "off" and layer.config.router_type != "topk":
            raise ValueError(f"router replay needs router_type='topk', got router_type="
                             f"{layer.config.router_type!r}")
    ids = {id(m) for _, m in chosen}
    for _, layer in named_moe_layers(model):
        if id(layer) not in ids:
            layer.replay.set_mode("off")
    for i, (_, layer) in enumerate(chosen):
        table, error = None, None
        if record is not None:
            table, error = _table_for(layer, i, len(chosen), record)
        layer.replay.set_mode(mode, table, with_weights=weights, with_logits=logits,
                              max_bytes=max_bytes, error=error)
    return len(chosen)


def _table_for(layer: MoELayer, i: int, n: int, record: RoutingRecord
               ) -> tuple[Optional[LayerRouting], Optional[str]]:
    """Layer ``i`` of ``n``'s part of ``record`` on the layer's device, or the reason it
    cannot be replayed there (raised at the forward, on every rank)."""
    cfg = layer.config
    if record.num_layers != n:
        return None, (f"router replay: the recording holds {record.num_layers} MoE layers, "
                      f"replay was set on {n}")
    if (record.num_experts, record.top_k) != (cfg.num_experts, cfg.top_k):
        return None, (f"router replay: the recording was made with num_experts="
                      f"{record.num_experts}, top_k={record.top_k}; this layer has "
                      f"num_experts={cfg.num_experts}, top_k={cfg.top_k}")
    try:
        table = record.layers[i].unique(later_wins=False)
    except ValueError as e:
        return None, str(e)
    device = next(layer.parameters()).device
    return table.to(device), None


def set_token_keys(model: nn.Module, seq_ids: Tensor, positions: Tensor) -> None:
    """The keys ``(seq_id, position)`` of the next forwards' tokens, for every MoE layer of
    ``model``: integer tensors that broadcast to each layer input's leading shape (``[1, B]``
    and ``[S, 1]`` for sequence-major ``[S, B, H]``), or whose broadcast has as many elements
    (see ``routing.replay``). A model that hands a layer part of its tokens (e.g. a tensor-
    parallel rank's slice of the sequence) narrows the keys with ``RouterReplay.narrowed``."""
    keys = TokenKeys(torch.as_tensor(seq_ids), torch.as_tensor(positions))
    for _, layer in _chosen(model, None):
        layer.replay.keys = keys


def router_recording(model: nn.Module, clear: bool = True) -> RoutingRecord:
    """This rank's recording of the layers in ``"record"`` mode, in model order: one row per
    token key (its latest routing), sorted by key. ``clear`` starts a new recording."""
    recording = [(n, m) for n, m in named_moe_layers(model) if m.replay.mode == "record"]
    if not recording:
        raise ValueError("router_recording: no MoE layer is in 'record' mode "
                         "(set_router_replay(model, 'record'))")
    cfg = recording[0][1].config
    layers = []
    for _, m in recording:
        part = m.replay.recording(clear=clear)
        if part is None:
            device = next(m.parameters()).device
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            none = torch.zeros(0, cfg.top_k, dtype=torch.bool, device=device)
            part = LayerRouting(empty, empty, empty.view(0, cfg.top_k).clone(), none, none)
        layers.append(part)
    return RoutingRecord(layers, cfg.num_experts, cfg.top_k, [n for n, _ in recording])


def gather_recording(record: RoutingRecord, group: collectives.Group,
                     device: torch.device | str = "cpu") -> RoutingRecord:
    """The union of every rank's ``record`` over ``group`` (``RoutingRecord.merge``), on every
    rank: all-gathers of each field (``device`` suits the backend: CPU for gloo, the rank's GPU
    for NCCL). The optional fields are kept when every rank has them."""
    world = collectives.group_size(group)
    if world == 1:
        return RoutingRecord.merge([record])
    layers = []
    for layer in record.layers:
        sizes = collectives.all_gather_sizes(layer.num_tokens, group, device)
        have = torch.tensor([[layer.weights is not None, layer.logits is not None]],
                            dtype=torch.int64, device=device)
        both = collectives.all_gather(have, group, [1] * world).all(0).tolist()
        parts = {}
        for name, t in layer.tensors().items():
            if (name == "weights" and not both[0]) or (name == "logits" and not both[1]):
                continue
            wire = t.to(device=device, dtype=torch.int64 if t.dtype == torch.bool else t.dtype)
            got = collectives.all_gather(wire.contiguous(), group, sizes)
            parts[name] = got.to(torch.bool) if t.dtype == torch.bool else got
        layers.append(LayerRouting(**parts).unique(later_wins=False))
    return replace(record, layers=layers)
