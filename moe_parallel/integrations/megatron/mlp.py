"""``MoEMLP``: moe_parallel's MoE layer as the ``mlp`` submodule of a Megatron-Core layer.

Contract (Megatron-Core 0.16's ``MoELayer``, which it replaces in a ``TransformerLayer``)::

    MoEMLP(config: TransformerConfig, submodules=None, layer_number=None, pg_collection=None,
           **moe_overrides)
    forward(hidden_states [S, B, H], padding_mask [B, S] (True: padding) = None)
        -> (output [S, B, H], None)

* The ``MoEConfig`` comes from the ``TransformerConfig`` (``config.py``; ``moe_overrides``:
  ``MoEConfig`` fields Megatron has no name for, e.g. ``expert_impl``); the groups from
  ``pg_collection`` (its ``tp``, ``cp``, ``dp``, ``dp_cp``, ``pp``, ``ep``, ``expt_tp``,
  ``expt_dp``, ``tp_ep``, ``tp_cp``), any group it lacks from Megatron's global
  ``parallel_state``. With TP > 1 the input is sequence parallel (``sequence_parallel=True``):
  each TP rank brings its own ``S/tp`` tokens.
* Padding tokens are computed (their output is defined) but stay out of the losses and of the
  expert-bias counts.
* Losses: Megatron's, through ``MoEAuxLossAutoScaler`` and the aux-loss tracker (``losses.py``).
* Parameter attributes Megatron reads: routed experts ``allreduce=False`` (Megatron's DDP
  reduces them over the expert-data-parallel group), and with ETP > 1
  ``tensor_model_parallel=True``, ``partition_dim`` (2 for ``w1 [E_l, H, 2F/etp]``, 1 for
  ``w2 [E_l, F/etp, H]``), ``partition_stride=1``, so the gradient norm counts each shard once;
  the dense router and shared expert ``sequence_parallel`` (their TP gradients are summed by
  ``finalize_model_grads``).
* Expert bias: the router's ``expert_bias`` and ``local_tokens_per_expert`` buffers are what
  ``finalize_model_grads`` updates (``moe_router_enable_expert_bias``); both stay float32
  under ``Float16Module``.
* ``sharded_state_dict``: global expert tensors with EP/ETP offsets (``sharded.py``).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor

from ...layer import MoELayer
from .config import moe_config_from_megatron
from .groups import parallel_state_from_megatron
from .losses import attach_megatron_losses
from .sharded import moe_sharded_state_dict

try:  # megatron-core is an optional extra: importing this module needs it
    from megatron.core.transformer.module import MegatronModule
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("moe_parallel.integrations.megatron.mlp needs megatron-core "
                      "(pip install 'moe_parallel[megatron]')") from e

__all__ = ["MoEMLP", "get_moe_layer_spec"]

# Megatron getter -> ProcessGroupCollection attribute
_PG_NAMES = {
    "get_tensor_model_parallel_group": "tp",
    "get_context_parallel_group": "cp",
    "get_pipeline_model_parallel_group": "pp",
    "get_expert_model_parallel_group": "ep",
    "get_expert_tensor_parallel_group": "expt_tp",
    "get_expert_data_parallel_group": "expt_dp",
    "get_expert_tensor_and_model_parallel_group": "tp_ep",
    "get_tensor_and_context_parallel_group": "tp_cp",
}


class _Groups:
    """Megatron's ``parallel_state`` getters answered from a ``ProcessGroupCollection``, falling
    back to the global ``parallel_state`` for a group the collection does not hold."""

    def __init__(self, pg_collection: Any) -> None:
        from megatron.core import parallel_state as mpu

        self._pg, self._mpu = pg_collection, mpu

    def _get(self, attr: str, getter: str, **kw: Any) -> Any:
        group = getattr(self._pg, attr, None) if self._pg is not None else None
        return group if group is not None else getattr(self._mpu, getter)(**kw)

    def __getattr__(self, name: str) -> Any:
        if name in _PG_NAMES:
            return lambda **kw: self._get(_PG_NAMES[name], name, **kw)
        return getattr(self._mpu, name)

    def get_data_parallel_group(self, with_context_parallel: bool = False, **kw: Any) -> Any:
        attr = "dp_cp" if with_context_parallel else "dp"
        return self._get(attr, "get_data_parallel_group",
                         with_context_parallel=with_context_parallel, **kw)

    def get_tensor_and_data_parallel_group(self, with_context_parallel: bool = False,
                                           **kw: Any) -> Any:
        attr = "tp_dp_cp" if with_context_parallel else "tp_dp"  # the collection has no tp_dp
        return self._get(attr, "get_tensor_and_data_parallel_group",
                         with_context_parallel=with_context_parallel, **kw)


def _tag_for_megatron(layer: MoELayer) -> None:
    ps = layer.parallel_state
    for name, p in layer.experts.named_parameters():
        p.allreduce = False
        if ps.etp > 1:
            p.tensor_model_parallel = True
            p.partition_dim = {"w1": 2, "w2": 1}[name]
            p.partition_stride = 1


class MoEMLP(MegatronModule):
    """An expert-parallel ``MoELayer`` (``self.moe``) behind Megatron-Core's MoE-layer contract
    (module docstring). Build it through a layer spec (``get_moe_layer_spec``) or directly."""

    def __init__(self, config: Any, submodules: Any = None, layer_number: Optional[int] = None,
                 pg_collection: Any = None, **moe_overrides: Any) -> None:
        super().__init__(config=config)
        self.moe_config, self.losses = moe_config_from_megatron(config, **moe_overrides)
        groups = _Groups(pg_collection)
        ps = parallel_state_from_megatron(groups)
        for field, size in (("tensor_model_parallel_size", ps.tp),
                            ("expert_model_parallel_size", ps.ep),
                            ("context_parallel_size", ps.cp),
                            ("pipeline_model_parallel_size", ps.pp)):
            if getattr(config, field) != size:
                raise ValueError(f"TransformerConfig.{field}={getattr(config, field)} but the "
                                 f"process groups have size {size}")
        if ps.tp > 1 and not config.sequence_parallel:
            raise ValueError(
                f"MoEMLP with tensor_model_parallel_size={ps.tp} needs "
                "TransformerConfig.sequence_parallel=True: each TP rank must bring its own part "
                "of the sequence (the layer routes every token it is given)")
        self.parallel_state = ps
        self.tp_group = ps.group("tp")
        self.tp_cp_group = groups.get_tensor_and_context_parallel_group()
        device = (torch.device("cpu") if config.use_cpu_initialization
                  or not torch.cuda.is_available()
                  else torch.device("cuda", torch.cuda.current_device()))
        self.moe = MoELayer(self.moe_config, device=device, parallel_state=ps)
        _tag_for_megatron(self.moe)
        self.layer_number = layer_number

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron's ``TransformerLayer`` calls this with the global layer number (1-based),
        the slot of this layer's losses in the aux-loss tracker."""
        self.layer_number = layer_number

    def forward(self, hidden_states: Tensor, intermediate_tensors: Any = None,
                padding_mask: Optional[Tensor] = None) -> tuple[Tensor, None]:
        """``(MoE(hidden_states), None)``; ``hidden_states`` ``[S, B, H]``, ``padding_mask``
        ``[B, S]`` bool (True: padding) or None."""
        if intermediate_tensors is not None:
            raise NotImplementedError("MoEMLP has no partial (CUDA-graph) forward: "
                                      "intermediate_tensors must be None")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [S, B, H], got shape "
                             f"{tuple(hidden_states.shape)}")
        S, B = hidden_states.shape[:2]
        mask = None
        if padding_mask is not None:
            if tuple(padding_mask.shape) != (B, S):
                raise ValueError(f"padding_mask must be [B={B}, S={S}] (True: padding), got "
                                 f"{tuple(padding_mask.shape)}")
            mask = padding_mask.transpose(0, 1).bool()
        out, aux = self.moe(hidden_states, return_aux=True, padding_mask=mask)
        if self.training and torch.is_grad_enabled() and self.losses.enabled:
            cfg = self.moe_config
            out = attach_megatron_losses(
                out, aux.routing.logits, None if mask is None else mask.reshape(-1), S, B,
                self.losses, cfg.top_k, cfg.score_function, self.tp_cp_group, self.layer_number)
        return out, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict[str, Any]:
        """Megatron dist-checkpointing state: the routed experts as global tensors with EP/ETP
        offsets, the dense state replicated (``sharded.py``)."""
        return moe_sharded_state_dict(self.moe, prefix + "moe.", sharded_offsets,
                                      gated=self.moe_config.activation == "swiglu")


def get_moe_layer_spec(base: Any = None, **moe_overrides: Any) -> Any:
    """A ``TransformerLayer`` ``ModuleSpec`` whose ``mlp`` is ``MoEMLP``: a copy of ``base``
    (default: Megatron's ``get_gpt_layer_local_spec()``; any layer spec, e.g. the Transformer
    Engine one) with its ``mlp`` replaced. ``moe_overrides`` reach ``MoEMLP``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(base if base is not None else get_gpt_layer_local_spec())
    spec.submodules.mlp = ModuleSpec(module=MoEMLP, params=dict(moe_overrides))
    keys_map = getattr(spec.submodules, "sharded_state_dict_keys_map", None)
    if keys_map:  # the local spec files its pre-MLP norm under Megatron's dense fc1
        spec.submodules.sharded_state_dict_keys_map = {
            k: v for k, v in keys_map.items() if not v.startswith("mlp.")}
    return spec
