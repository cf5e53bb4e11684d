"""Expert FFNs: all local experts as stacked weights, computed with grouped GEMMs.

Routed experts (``GroupedExperts``), for the rows of local expert ``e`` (consecutive in ``x``):
    h = x_e @ w1[e]                     w1: [E_local, H, F]   (SwiGLU: [E_local, H, 2F], gate | up)
    a = act(h)                          SwiGLU: silu(h[:, :F]) * h[:, F:]; GELU (erf); ReLU
    y_e = a @ w2[e]                     w2: [E_local, F, H]
Shared experts (``SharedExpert``): the same FFN applied densely to every token, optionally scaled
by a learned sigmoid gate ``sigmoid(x @ gate_weight^T)`` per token (Qwen2-MoE style).
With no biases, act(0) = 0 for every activation, so zero padding rows produce zero outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import MoEConfig


def activate(h: Tensor, activation: str) -> Tensor:
    """Apply the expert activation to the first GEMM's output ``h`` ([rows, F] or [rows, 2F])."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of ('swiglu', 'gelu', 'relu'), got {activation!r}")


def _fc1_width(config: MoEConfig, ffn_size: int) -> int:
    return 2 * ffn_size if config.gated else ffn_size


class GroupedExperts(nn.Module):
    """``num_local_experts`` expert FFNs of hidden size ``ffn_size`` as two stacked weights."""

    def __init__(
        self,
        config: MoEConfig,
        num_local_experts: int | None = None,
        ffn_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_local_experts = num_local_experts or config.num_experts
        self.ffn_size = ffn_size or config.ffn_hidden_size
        kw = dict(device=device, dtype=config.params_dtype)
        H, Fw = config.hidden_size, _fc1_width(config, self.ffn_size)
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, H, Fw, **kw))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, self.ffn_size, H, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.config.init_std)
        nn.init.normal_(self.w2, std=self.config.init_std)

    def forward(self, x: Tensor, group_sizes: Tensor) -> Tensor:
        """``x`` [N, H] grouped by local expert; ``group_sizes`` [E_local] CPU int64, sum N."""
        h = ops.grouped_gemm(x, self.w1, group_sizes)
        return ops.grouped_gemm(activate(h, self.config.activation), self.w2, group_sizes)


class SharedExpert(nn.Module):
    """The always-active shared experts, merged into one FFN of ``config.shared_ffn_size``."""

    def __init__(self, config: MoEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.shared_ffn_size == 0:
            raise ValueError("SharedExpert needs num_shared_experts >= 1")
        self.config = config
        kw = dict(device=device, dtype=config.params_dtype)
        H, Fs = config.hidden_size, config.shared_ffn_size
        self.w1 = nn.Parameter(torch.empty(H, _fc1_width(config, Fs), **kw))
        self.w2 = nn.Parameter(torch.empty(Fs, H, **kw))
        self.gate_weight = (
            nn.Parameter(torch.empty(1, H, **kw)) if config.shared_expert_gate else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=self.config.init_std)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [T, H] -> [T, H]."""
        y = activate(x @ self.w1, self.config.activation) @ self.w2
        if self.gate_weight is not None:
            y = torch.sigmoid(x @ self.gate_weight.t()) * y
        return y
