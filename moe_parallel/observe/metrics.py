"""Router metrics of every MoE layer, summed over the ranks that route its tokens.

``collect_layer_metrics(model, ps)`` is a collective over ``ps.group("stage")`` (the
``tp·cp·dp = ep·etp·edp`` ranks of this pipeline stage: the whole world when ``pp = 1``): every
rank of it calls it at the same step. It packs every layer's figures into ONE flat float64
buffer (integer counts are exact below 2**53) and sums it with ONE ``all_reduce``, then copies
the result to the host once. A token is counted once: each rank of the stage routes its own
tokens through a layer (data-parallel ranks their own batches, the TP ranks of a data shard
their own ``1/tp`` slice of its sequence, as ``MoELayer`` and the main job's blocks do), and
``RoutingStats`` counts only the assignments of this rank's tokens. Between logging steps
nothing is reduced and nothing waits for the device: the figures are those of each layer's last
forward (``MoELayer.last_stats``, ``last_losses``), i.e. of the logging step, not accumulated
over the steps since the previous one.

Per layer ``i`` (``E`` experts; ``c`` = ``tokens_per_expert``, the global assignments each
expert processed after capacity; ``r`` = ``routed_per_expert``, those the router asked for):

* ``tokens``: tokens routed (all ranks); ``routed = Σ r``, ``processed = Σ c``,
  ``dropped = routed − processed``, ``drop_rate = dropped / routed`` (0 when nothing routed);
  ``unrouted_tokens``: tokens that reached no expert.
* ``mean_load = Σ c / E``, ``max_load = max c``, ``min_load = min c``;
  ``imbalance = max_load / mean_load``, ``min_over_mean = min_load / mean_load``,
  ``cv = sqrt(Σ_e (c_e − mean_load)² / E) / mean_load`` (population standard deviation); the
  three are 0.0 when nothing was processed.
* ``experts_per_token = Σ_j j·h_j / Σ_j h_j``, ``h`` = ``experts_per_token_histogram``
  (tokens that selected ``j`` experts, before capacity).
* ``router_entropy``: ``(1/T) Σ_t −Σ_e p_te log p_te`` in nats over the ``T`` tokens of every
  rank, ``p_t`` the router's score distribution (``routing.losses.full_scores``: softmax of the
  logits, or sigmoid scores normalised to sum 1); only layers watched by ``RouterMetrics`` (a
  forward hook that adds one ``[T]`` reduction per router forward, kept on the device), else
  None.
* ``loss_<term>`` for each term of ``LOSS_TERMS`` that the layer computed (coefficient-scaled,
  as in ``MoELayer.last_losses``): the mean over the stage's ranks of each rank's value.
* ``overflowed_ranks``: ranks whose dropless row budget overflowed in that forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layer import MoELayer
from ..routing.losses import full_scores

if TYPE_CHECKING:
    from ..distributed import ParallelState

__all__ = ["LOSS_TERMS", "RouterMetrics", "collect_layer_metrics", "load_figures", "moe_layers"]

# The loss terms a layer may report (``MoELayer.last_losses`` keys), in buffer order.
LOSS_TERMS = ("aux", "seq_aux", "z", "dynamic")

# The values after each layer's histogram in the buffer (``_layer_buffer``).
TAIL = 1 + len(LOSS_TERMS) + 1 + len(LOSS_TERMS) + 2

# One layer's router entropy on this rank: (Σ_t H_t as a float64 device scalar, T).
Entropy = tuple[Tensor, int]


def moe_layers(model: Union[nn.Module, Sequence[MoELayer]]) -> list[MoELayer]:
    """``model.moe_layers()`` when the model has it, every ``MoELayer`` among its modules
    otherwise, or the given sequence of layers."""
    if isinstance(model, nn.Module):
        if hasattr(model, "moe_layers"):
            return list(model.moe_layers())
        return [m for m in model.modules() if isinstance(m, MoELayer)]
    return list(model)


def token_entropy_sum(logits: Tensor, score_function: str) -> Tensor:
    """``Σ_t −Σ_e p_te log p_te`` (float64 scalar on ``logits``' device), ``p = full_scores``."""
    with torch.no_grad():
        p = full_scores(logits.detach(), score_function)
        return -torch.special.xlogy(p, p).sum(dtype=torch.float64)


def load_figures(load: Sequence[float]) -> dict[str, float]:
    """``mean_load``, ``max_load``, ``min_load``, ``imbalance``, ``min_over_mean`` and ``cv``
    of the per-expert counts ``load`` (formulas in the module docstring)."""
    n = len(load)
    mean = sum(load) / n if n else 0.0
    hi, lo = (max(load), min(load)) if n else (0.0, 0.0)
    var = sum((c - mean) ** 2 for c in load) / n if n else 0.0
    return {"mean_load": mean, "max_load": hi, "min_load": lo,
            "imbalance": hi / mean if mean else 0.0,
            "min_over_mean": lo / mean if mean else 0.0,
            "cv": math.sqrt(var) / mean if mean else 0.0}


def _layer_buffer(layer: MoELayer, index: int, entropy: Optional[Entropy],
                  device: torch.device) -> Tensor:
    """This rank's part of layer ``index``'s figures, float64 on ``device``: ``[routed E |
    processed E | unrouted | histogram | TAIL]``, ``TAIL = [entropy sum | loss value ×
    LOSS_TERMS | entropy tokens | loss present × LOSS_TERMS | overflowed | tokens]``."""
    st = layer.last_stats
    if st is None:
        raise ValueError(f"collect_layer_metrics: MoE layer {index} has run no forward yet")
    losses = layer.last_losses
    counts = torch.cat([st.routed_per_expert, st.tokens_per_expert,  # host: waits for the copy
                        torch.tensor([st.unrouted_tokens]), st.experts_per_token_histogram]
                       ).to(device=device, dtype=torch.float64)
    ent_sum, ent_tokens = entropy if entropy is not None else (None, 0)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    device_values = torch.stack(
        [zero if ent_sum is None else ent_sum.to(device, torch.float64).reshape(())]
        + [losses[t].detach().to(device, torch.float64).reshape(()) if t in losses else zero
           for t in LOSS_TERMS])
    host_values = torch.tensor(
        [float(ent_tokens)] + [float(t in losses) for t in LOSS_TERMS]
        + [float(st.overflow), float(st.num_tokens)], dtype=torch.float64, device=device)
    tail = torch.cat([device_values, host_values])
    return torch.cat([counts, tail])


def _layer_metrics(index: int, buf: list[float], num_experts: int, ranks: int) -> dict[str, Any]:
    """Layer ``index``'s figures (module docstring) from its summed buffer ``buf``."""
    E, n_loss = num_experts, len(LOSS_TERMS)
    routed = [int(v) for v in buf[:E]]
    processed = [int(v) for v in buf[E:2 * E]]
    unrouted = int(buf[2 * E])
    tail = buf[len(buf) - TAIL:]
    hist = [int(v) for v in buf[2 * E + 1:len(buf) - TAIL]]
    ent_sum, loss_sum = tail[0], tail[1:1 + n_loss]
    ent_tokens, loss_count = int(tail[1 + n_loss]), tail[2 + n_loss:2 + 2 * n_loss]
    overflowed, tokens = int(tail[-2]), int(tail[-1])
    n_routed, n_processed = sum(routed), sum(processed)
    selected = sum(hist)
    out: dict[str, Any] = {
        "layer": index, "tokens": tokens,
        "tokens_per_expert": processed, "routed_per_expert": routed,
        "routed": n_routed, "processed": n_processed,
        "dropped": max(n_routed - n_processed, 0),
        "drop_rate": max(n_routed - n_processed, 0) / n_routed if n_routed else 0.0,
        "unrouted_tokens": unrouted,
        **load_figures(processed),
        "experts_per_token": sum(j * h for j, h in enumerate(hist)) / selected if selected
        else 0.0,
        "experts_per_token_histogram": hist,
        "router_entropy": ent_sum / ent_tokens if ent_tokens else None,
        "overflowed_ranks": overflowed, "ranks": ranks,
    }
    for term, total, count in zip(LOSS_TERMS, loss_sum, loss_count):
        if count:
            out[f"loss_{term}"] = total / count
    return out


def collect_layer_metrics(model: Union[nn.Module, Sequence[MoELayer]],
                          ps: Optional[ParallelState] = None,
                          entropy: Optional[Sequence[Optional[Entropy]]] = None
                          ) -> list[dict[str, Any]]:
    """Every MoE layer's figures of its last forward, summed over ``ps``'s stage group (module
    docstring; ``ps`` None or one process: this rank's alone). A collective: every rank of the
    stage calls it at the same point, with the same layers. ``entropy[i]``: layer ``i``'s
    ``(Σ_t H_t, T)`` (``RouterMetrics`` keeps it); None: no ``router_entropy``.
    Returns one dict per layer, in ``moe_layers(model)`` order."""
    layers = moe_layers(model)
    if not layers:
        return []
    entropy = list(entropy) if entropy is not None else [None] * len(layers)
    if len(entropy) != len(layers):
        raise ValueError(f"entropy must hold one entry per MoE layer ({len(layers)}), got "
                         f"{len(entropy)}")
    device = next(layers[0].router.parameters()).device
    parts = [_layer_buffer(layer, i, entropy[i], device) for i, layer in enumerate(layers)]
    buf = torch.cat(parts)
    ranks = 1
    if ps is not None and ps.world_size // ps.pp > 1:
        group = ps.group("stage")
        ranks = dist.get_world_size(group)
        dist.all_reduce(buf, group=group)
    flat = buf.cpu().tolist()
    out, at = [], 0
    for i, (layer, part) in enumerate(zip(layers, parts)):
        n = part.numel()
        out.append(_layer_metrics(i, flat[at:at + n], layer.config.num_experts, ranks))
        at += n
    return out


class RouterMetrics:
    """Watches every MoE layer of ``model`` (``moe_layers``) for ``collect``.

    A forward hook on each layer's router keeps the last forward's ``Σ_t H_t`` (router entropy,
    module docstring) as a float64 device scalar: no host synchronisation, no collective.
    ``collect()`` is ``collect_layer_metrics`` with that entropy (a collective over the stage
    group, on the steps the caller chooses, the same on every rank); ``close()`` removes the
    hooks."""

    def __init__(self, model: Union[nn.Module, Sequence[MoELayer]],
                 ps: Optional[ParallelState] = None) -> None:
        self.layers = moe_layers(model)
        self.ps = ps
        self.entropy: list[Optional[Entropy]] = [None] * len(self.layers)
        self._hooks = [layer.router.register_forward_hook(self._hook(i, layer))
                       for i, layer in enumerate(self.layers)]

    def _hook(self, index: int, layer: MoELayer):
        cfg = layer.config
        score = cfg.score_function if cfg.router_type == "topk" else "softmax"

        def keep_entropy(_module: nn.Module, _inputs: Any, output: Any) -> None:
            logits = output[0].logits
            self.entropy[index] = (token_entropy_sum(logits, score), logits.shape[0])
        return keep_entropy

    def collect(self) -> list[dict[str, Any]]:
        """Every layer's figures of its last forward over the stage group (a collective)."""
        return collect_layer_metrics(self.layers, self.ps, self.entropy)

    def close(self) -> None:
        """Remove the router hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
