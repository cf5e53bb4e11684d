"""Parts ``layer`` (weak and strong scaling of one MoE layer over EP sizes) and ``overlap``
(the same layer with a shared expert, in every overlap variant), inside the ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# part ``overlap``: MoEConfig overrides of each variant (every variant has one shared expert)
OVERLAP_VARIANTS = {
    "none": {},
    "shared_overlap": {"shared_expert_overlap": True},
    "chunks2": {"overlap_chunks": 2},
    "chunks4": {"overlap_chunks": 4},
    "shared_overlap+chunks2": {"shared_expert_overlap": True, "overlap_chunks": 2},
}


def run_layer(cfg: dict, states: dict, dtype: torch.dtype, device: torch.device,
           timer: Callable) -> dict:
    """Part ``layer`` (package docstring); rank 0's rows."""
    from moe_parallel import MoEConfig, MoELayer

    rank = dist.get_rank()
    H = cfg["layer_hidden"]
    fns, meta = {}, {}
    for ep in [1, *cfg["ep_sizes"]]:
        torch.manual_seed(cfg["seed"])
        mcfg = MoEConfig(hidden_size=H, ffn_hidden_size=cfg["layer_ffn"],
                         num_experts=cfg["experts"], top_k=cfg["top_k"], params_dtype=dtype,
                         token_dispatcher_type=cfg["layer_dispatcher"])
        layer = MoELayer(mcfg, device=device, parallel_state=states[ep]).train()
        for mode, tokens in (("weak", cfg["layer_tokens"]),
                             ("strong", cfg["global_tokens"] // ep)):
            g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
            x = torch.randn(tokens, H, generator=g, device=device,
                            dtype=torch.float32).to(dtype).requires_grad_(True)

            def step(layer=layer, x=x):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).sum().backward()

            fns[f"{ep}:{mode}"] = step
            meta[f"{ep}:{mode}"] = {"ep": ep, "mode": mode, "tokens_per_rank": tokens,
                                    "tokens_per_group": tokens * ep}
    times = timer(fns, iters=cfg["layer_iters"], rounds=cfg["layer_rounds"], warmup=1)
    rows = []
    for name, t in times.items():
        m = meta[name]
        rows.append({**m, "time": t, "tokens_per_s_per_rank": m["tokens_per_rank"]
                     / t["seconds"]})
    for mode in ("weak", "strong"):
        mine = [r for r in rows if r["mode"] == mode]
        base = next(r for r in mine if r["ep"] == 1)
        for r in mine:
            t1, tn = base["time"]["seconds"], r["time"]["seconds"]
            r["efficiency"] = t1 / tn if mode == "weak" else t1 / (r["ep"] * tn)
    return {"config": {"hidden": H, "ffn": cfg["layer_ffn"], "experts": cfg["experts"],
                       "top_k": cfg["top_k"], "dispatcher": cfg["layer_dispatcher"],
                       "weak_tokens_per_rank": cfg["layer_tokens"],
                       "strong_tokens_per_group": cfg["global_tokens"]},
            "rows": sorted(rows, key=lambda r: (r["mode"] != "weak", r["ep"]))}


def run_overlap(cfg: dict, states: dict, dtype: torch.dtype, device: torch.device,
             timer: Callable) -> dict:
    """Part ``overlap`` (package docstring); rank 0's rows."""
    from moe_parallel import MoEConfig, MoELayer

    rank, H, tokens = dist.get_rank(), cfg["layer_hidden"], cfg["layer_tokens"]
    fns, meta = {}, {}
    for ep in [1, *cfg["ep_sizes"]]:
        g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
        x = torch.randn(tokens, H, generator=g, device=device,
                        dtype=torch.float32).to(dtype).requires_grad_(True)
        for name, over in OVERLAP_VARIANTS.items():
            torch.manual_seed(cfg["seed"])
            mcfg = MoEConfig(hidden_size=H, ffn_hidden_size=cfg["layer_ffn"],
                             num_experts=cfg["experts"], top_k=cfg["top_k"], params_dtype=dtype,
                             token_dispatcher_type=cfg["layer_dispatcher"],
                             num_shared_experts=1, **over)
            layer = MoELayer(mcfg, device=device, parallel_state=states[ep]).train()

            def step(layer=layer, x=x):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).sum().backward()

            fns[f"{ep}:{name}"] = step
            meta[f"{ep}:{name}"] = {"ep": ep, "variant": name, "config": over}
    times = timer(fns, iters=cfg["layer_iters"], rounds=cfg["layer_rounds"], warmup=1)
    rows = [{**meta[k], "time": t, "tokens_per_s_per_rank": tokens / t["seconds"]}
            for k, t in times.items()]
    for r in rows:
        base = next(b for b in rows if b["ep"] == r["ep"] and b["variant"] == "none")
        r["vs_none"] = r["time"]["seconds"] / base["time"]["seconds"]
    return {"config": {"hidden": H, "ffn": cfg["layer_ffn"], "shared_ffn": cfg["layer_ffn"],
                       "experts": cfg["experts"], "top_k": cfg["top_k"],
                       "dispatcher": cfg["layer_dispatcher"], "tokens_per_rank": tokens},
            "rows": sorted(rows, key=lambda r: (r["ep"], list(OVERLAP_VARIANTS).index(
                r["variant"])))}
