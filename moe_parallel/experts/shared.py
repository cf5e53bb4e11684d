"""Shared experts (DeepSeekMoE, Qwen2-MoE): one dense FFN of ``config.shared_ffn_size`` applied to
every token, optionally scaled per token by a learned sigmoid gate:

    shared(x) = act(x @ w1) @ w2                         w1 [H, Fs] (gated: [H, 2Fs]), w2 [Fs, H]
    shared(x) = sigmoid(x @ gate_weight^T) · act(x @ w1) @ w2    with ``shared_expert_gate``
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from .activation import activate, fc1_width


class SharedExpert(nn.Module):
    """The always-active shared experts, merged into one FFN of ``config.shared_ffn_size``."""

    def __init__(self, config: MoEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.shared_ffn_size == 0:
            raise ValueError("SharedExpert needs num_shared_experts >= 1")
        self.config = config
        kw = dict(device=device, dtype=config.params_dtype)
        H, Fs = config.hidden_size, config.shared_ffn_size
        self.w1 = nn.Parameter(torch.empty(H, fc1_width(config, Fs), **kw))
        self.w2 = nn.Parameter(torch.empty(Fs, H, **kw))
        self.gate_weight = (
            nn.Parameter(torch.empty(1, H, **kw)) if config.shared_expert_gate else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every weight ~ N(0, ``config.init_std``²)."""
        for p in self.parameters():
            nn.init.normal_(p, std=self.config.init_std)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [T, H] -> [T, H]."""
        y = activate(x @ self.w1, self.config) @ self.w2
        if self.gate_weight is not None:
            y = torch.sigmoid(x @ self.gate_weight.t()) * y
        return y
