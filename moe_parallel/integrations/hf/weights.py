"""Weight layouts: an HF MoE block's tensors in our names, and our weights as HF's disk keys.

Ours (``Weights``): ``router.weight [E, H]`` (``router.bias``, ``router.expert_bias``),
``experts.w1 [E, H, 2F]`` (``[gate | up]`` columns), ``experts.w2 [E, F, H]``
(``experts.b1``, ``experts.b2``), shared expert ``shared_expert.w1 [H, 2Fs]``,
``shared_expert.w2 [Fs, H]`` (``shared_expert.gate_weight``).

HF's: fused experts ``gate_up_proj [E, 2F, H]`` -> ``w1 = gate_up_proj^T``, ``down_proj
[E, H, F]`` -> ``w2 = down_proj^T`` (GPT-OSS and Llama-4 store ``[E, H, 2F]`` and ``[E, F, H]``
as is; GPT-OSS interleaves the gate and up columns); a gated MLP ``gate_proj, up_proj [Fs, H]``,
``down_proj [H, Fs]`` -> ``w1 = [gate^T | up^T]``, ``w2 = down^T``; on disk, per expert ``e``:
``experts.{e}.{gate,up,down}.weight`` (``[F, H]``, ``[F, H]``, ``[H, F]``).

Each family has a ``*_weights(block)`` (the block's full weights in our names; ``block`` may be
any object with the block's attribute paths) and a ``*_disk(weights)`` (HF's on-disk keys,
relative to the block, for our weights).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

Weights = dict[str, Tensor]  # our names: router.weight, experts.w1, ... (full, all experts)


def dtype_pattern(key: str) -> str:
    """A per-expert key with its expert index replaced by ``*`` (one dtype per projection)."""
    return re.sub(r"experts\.\d+\.", "experts.*.", key)


# ---- layout conversions -----------------------------------------------------------------------


def _fused_transposed(experts: Any) -> Weights:
    """Mixtral-style fused experts: gate_up_proj [E, 2F, H], down_proj [E, H, F]."""
    return {"experts.w1": experts.gate_up_proj.detach().transpose(1, 2),
            "experts.w2": experts.down_proj.detach().transpose(1, 2)}


def _deinterleave(t: Tensor) -> Tensor:
    """GPT-OSS's [..., 2F] with gate at even and up at odd columns -> [gate | up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave(t: Tensor) -> Tensor:
    """[gate | up] -> gate at even, up at odd columns (inverse of ``_deinterleave``)."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _mlp_weights(mlp: Any, prefix: str) -> Weights:
    """A dense gated MLP (gate_proj, up_proj, down_proj Linears) as our shared expert."""
    return {f"{prefix}.w1": torch.cat([mlp.gate_proj.weight.detach().t(),
                                        mlp.up_proj.weight.detach().t()], dim=1),
            f"{prefix}.w2": mlp.down_proj.weight.detach().t()}


def _mlp_keys(w: Weights, prefix: str, name: str) -> dict[str, Tensor]:
    """Our shared expert as HF's gated MLP keys ``{name}.{gate,up,down}_proj.weight``."""
    gate, up = w[f"{prefix}.w1"].t().chunk(2, dim=0)
    return {f"{name}.gate_proj.weight": gate, f"{name}.up_proj.weight": up,
            f"{name}.down_proj.weight": w[f"{prefix}.w2"].t()}


def _per_expert_keys(w: Weights, names: tuple[str, str, str]) -> dict[str, Tensor]:
    """Routed experts as HF's on-disk per-expert keys ``experts.{e}.{gate,up,down}.weight``
    (``names``: HF's names of the gate, up and down projections)."""
    gate_name, up_name, down_name = names
    out = {}
    for e, (w1, w2) in enumerate(zip(w["experts.w1"], w["experts.w2"])):
        gate, up = w1.t().chunk(2, dim=0)  # [F, H] each
        out[f"experts.{e}.{gate_name}.weight"] = gate
        out[f"experts.{e}.{up_name}.weight"] = up
        out[f"experts.{e}.{down_name}.weight"] = w2.t()  # [H, F]
    return out


# ---- per family -------------------------------------------------------------------------------


def plain_weights(block: Any) -> Weights:
    """Router ``gate`` and fused experts (Mixtral, Qwen3-MoE, OLMoE)."""
    return {"router.weight": block.gate.weight.detach(), **_fused_transposed(block.experts)}


def mixtral_disk(w: Weights) -> dict[str, Tensor]:
    return {"gate.weight": w["router.weight"], **_per_expert_keys(w, ("w1", "w3", "w2"))}


def qwen_disk(w: Weights) -> dict[str, Tensor]:
    return {"gate.weight": w["router.weight"],
            **_per_expert_keys(w, ("gate_proj", "up_proj", "down_proj"))}


def qwen2_weights(block: Any) -> Weights:
    w = {**plain_weights(block), **_mlp_weights(block.shared_expert, "shared_expert")}
    w["shared_expert.gate_weight"] = block.shared_expert_gate.weight.detach()
    return w


def qwen2_disk(w: Weights) -> dict[str, Tensor]:
    return {**qwen_disk(w), **_mlp_keys(w, "shared_expert", "shared_expert"),
            "shared_expert_gate.weight": w["shared_expert.gate_weight"]}


def deepseek_weights(block: Any) -> Weights:
    w = plain_weights(block)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        w["router.expert_bias"] = bias.detach()
    if getattr(block, "shared_experts", None) is not None:
        w.update(_mlp_weights(block.shared_experts, "shared_expert"))
    return w


def deepseek_disk(w: Weights) -> dict[str, Tensor]:
    out = qwen_disk(w)
    if "router.expert_bias" in w:
        out["gate.e_score_correction_bias"] = w["router.expert_bias"]
    if "shared_expert.w1" in w:
        out.update(_mlp_keys(w, "shared_expert", "shared_experts"))
    return out


def gpt_oss_weights(block: Any) -> Weights:
    e = block.experts
    return {"router.weight": block.router.weight.detach(),
            "router.bias": block.router.bias.detach(),
            "experts.w1": _deinterleave(e.gate_up_proj.detach()),
            "experts.b1": _deinterleave(e.gate_up_proj_bias.detach()),
            "experts.w2": e.down_proj.detach(), "experts.b2": e.down_proj_bias.detach()}


def gpt_oss_disk(w: Weights) -> dict[str, Tensor]:
    return {"router.weight": w["router.weight"], "router.bias": w["router.bias"],
            "experts.gate_up_proj": _interleave(w["experts.w1"]),
            "experts.gate_up_proj_bias": _interleave(w["experts.b1"]),
            "experts.down_proj": w["experts.w2"], "experts.down_proj_bias": w["experts.b2"]}


def llama4_weights(block: Any) -> Weights:
    return {"router.weight": block.router.weight.detach(),
            "experts.w1": block.experts.gate_up_proj.detach(),
            "experts.w2": block.experts.down_proj.detach(),
            **_mlp_weights(block.shared_expert, "shared_expert")}


def llama4_disk(w: Weights) -> dict[str, Tensor]:
    return {"router.weight": w["router.weight"], "experts.gate_up_proj": w["experts.w1"],
            "experts.down_proj": w["experts.w2"],
            **_mlp_keys(w, "shared_expert", "shared_expert")}
