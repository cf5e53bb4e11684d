"""``HFMoEBlock``: an HF MoE block's forward contract around an ``MoELayer``.

``forward(hidden_states [B, S, H])`` returns what the family's HF block returns (``[B, S, H]``;
Llama-4: ``([T, H], router_logits)``; GPT-OSS: ``([B, S, H], router_scores [T, k])``). The
router logits pass through a tap of HF's router class (``router_tap``), so HF's
``OutputRecorder`` (``output_router_logits``) records ours and HF computes its own aux loss
from them; ``install_recorder_hook`` hooks a tap created after HF installed its hooks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...distributed import collectives
from ...layer import MoELayer
from .families import Family

__all__ = ["HFMoEBlock", "install_recorder_hook", "router_tap"]


def router_tap(family: Family, router_cls: type) -> nn.Module:
    """A module of HF's router class whose forward hands back the logits at the position HF's
    router returns them, so HF's ``OutputRecorder`` (``output_router_logits``) records ours."""
    def forward(self, logits: Tensor) -> tuple:
        out = [None] * (family.router_index + 1)
        out[family.router_index] = logits
        return tuple(out)

    tap_cls = type(f"{router_cls.__name__}Logits", (router_cls,),
                   {"__init__": lambda self: nn.Module.__init__(self), "forward": forward})
    return tap_cls()


class HFMoEBlock(nn.Module):
    """An HF MoE block's forward contract around an ``MoELayer`` (``self.moe``).

    ``forward(hidden_states [B, S, H]) -> [B, S, H]`` (Llama-4: ``([T, H], router_logits)``,
    GPT-OSS: ``([B, S, H], router_scores [T, k])``). ``hf_dtypes`` keeps the dtype of every
    tensor HF stored (HF keeps some routers in float32 in any model), for ``export``.
    """

    def __init__(self, moe: MoELayer, family: Family, tap: Optional[nn.Module],
                 hf_dtypes: dict[str, torch.dtype]) -> None:
        super().__init__()
        self.moe = moe
        self.family = family
        self.router_logits = tap
        self.hf_dtypes = hf_dtypes
        ps = moe.parallel_state
        self.tp_group = ps.group("tp") if ps is not None and ps.tp > 1 else None

    def _routed(self, hidden_states: Tensor) -> tuple[Tensor, Any]:
        """The layer on the block's tokens; with TP > 1 (sequence parallel, as the built-in
        model) on this TP rank's 1/tp of the sequence, the outputs gathered back."""
        B, S, H = hidden_states.shape
        if self.tp_group is None:
            return self.moe(hidden_states.reshape(-1, H), return_aux=True)
        tp, rank = collectives.group_size(self.tp_group), collectives.group_rank(self.tp_group)
        if S % tp:
            raise ValueError(f"sequence length {S} is not divisible by tp={tp}")
        chunk = S // tp
        mine = hidden_states[:, rank * chunk:(rank + 1) * chunk].transpose(0, 1)
        y, aux = self.moe(mine.reshape(-1, H), return_aux=True)  # [chunk·B, H], sequence-major
        y = collectives.all_gather(y, self.tp_group, sizes=[chunk * B] * tp)
        return y.view(S, B, H).transpose(0, 1).reshape(B * S, H), aux

    def forward(self, hidden_states: Tensor, *args: Any,
                **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        shape = hidden_states.shape
        y, aux = self._routed(hidden_states.reshape(-1, shape[-2], shape[-1]))
        logits = aux.routing.logits
        if self.router_logits is not None:
            self.router_logits(logits)
        if self.family.flat_output:
            return y, logits
        y = y.reshape(shape)
        if self.family.returns == "router_scores":
            return y, aux.routing.probs
        return y


def install_recorder_hook(model: nn.Module, tap: nn.Module, family: Family) -> None:
    """When HF already installed its output-recording hooks, hook the new tap too."""
    try:
        from transformers.utils import output_capturing as oc
    except ImportError:  # pragma: no cover - older transformers record no router logits
        return
    for m in model.modules():
        if getattr(m, "_output_capturing_hooks_installed", False):
            oc.install_output_capuring_hook(tap, "router_logits", family.router_index, False)
            return
