"""The synthetic routings of the dispatch part: ``balanced``, ``zipf`` and ``single_hot`` (the
package docstring says what each is)."""

from __future__ import annotations

import torch

ROUTINGS = ("balanced", "zipf", "single_hot")


def zipf_popularity(experts: int, s: float, seed: int) -> torch.Tensor:
    """``[E]`` float64 probabilities: the expert of popularity rank ``i`` gets ``∝ 1/(i+1)^s``;
    ranks are a permutation of the experts drawn with ``seed`` (the same on every rank)."""
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
    weight = 1.0 / (torch.arange(experts, dtype=torch.float64) + 1) ** s
    pop = torch.empty(experts, dtype=torch.float64)
    pop[order] = weight
    return pop / pop.sum()


def make_routing(kind: str, tokens: int, experts: int, top_k: int, rank: int = 0, seed: int = 0,
                 zipf_s: float = 1.2, device: torch.device | str = "cpu"):
    """A ``moe_parallel.routing.Routing`` of ``tokens`` tokens (see the package docstring for
    ``balanced``, ``zipf`` and ``single_hot``): uniform combine weights ``1/k``, every
    assignment kept, zero logits. ValueError on an unknown kind or ``top_k > experts``."""
    from moe_parallel.routing.router import Routing, count_assignments

    if kind not in ROUTINGS:
        raise ValueError(f"routing kind must be one of {ROUTINGS}, got {kind!r}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    t = torch.arange(tokens)
    if kind == "balanced":
        idx = (t[:, None] * top_k + torch.arange(top_k)) % experts
    elif kind == "single_hot":
        rest = 1 + (t[:, None] * (top_k - 1) + torch.arange(top_k - 1)) % max(experts - 1, 1)
        idx = torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), rest], dim=1)
    else:
        pop = zipf_popularity(experts, zipf_s, seed)
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
        idx = torch.multinomial(pop.expand(tokens, -1), top_k, replacement=False, generator=g)
    idx = idx.to(torch.int64)
    return Routing(probs=torch.full((tokens, top_k), 1.0 / top_k, device=device),
                   expert_idx=idx.to(device), keep=None,
                   logits=torch.zeros(tokens, experts, device=device),
                   routed_per_expert=count_assignments(idx, experts).to(device))
