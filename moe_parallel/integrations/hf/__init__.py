"""Hugging Face transformers MoE models in and out: each MoE block becomes an ``MoELayer``.

``convert(model, parallel_state=None)`` replaces, in place, every MoE block of a transformers
(v5) model of a supported family with an ``HFMoEBlock``: the block's forward contract (input
``[B, S, H]``, the output HF returns, router logits recorded where HF's ``output_router_logits``
looks for them, so HF's own aux loss is computed from the same logits), around an ``MoELayer``
holding the block's weights; given a ``ParallelState``, only this rank's EP shard.
``load_pretrained(dir, parallel_state)`` builds a converted model from a ``save_pretrained``
directory, each rank reading only its own experts from the safetensors files.
``export(model)`` gives back the HF on-disk state dict (per-expert keys where HF saves them),
gathered from the shards, loadable by ``from_pretrained``.
``upcycle(model, num_experts, top_k, granularity)`` and ``merge_dense_models(models, ...)``
build such an MoE model (a plain transformers one, convertible) from dense models.

Families and their semantics (HF module -> ``MoEConfig``):

=============  ==========================================================================
mixtral        softmax top-k, renormalised; float32 scores; ``router_jitter_noise``
qwen2_moe      softmax top-k (``norm_topk_prob``); float32 scores; sigmoid-gated shared expert
qwen3_moe      softmax top-k (``norm_topk_prob``); float32 scores
olmoe          softmax top-k (``norm_topk_prob``); float32 scores
deepseek_v3    sigmoid, selection bias (``e_score_correction_bias``), groups scored by their top
               2 (``group_score="sum_top2"``), ``routed_scaling_factor``; float32 router;
               shared experts
deepseek_v2    softmax; ``greedy`` or ``group_limited_greedy`` (``group_score="max"``),
               ``routed_scaling_factor``; float32 router; shared experts
gpt_oss        top-k of the logits then softmax; learned router bias; expert biases; clamped
               SwiGLU (gate/up columns interleaved on HF's side); returns (out, router scores)
llama4         sigmoid top-k scaling the expert input; float32 scores; shared expert;
               returns (out [T, H], router logits)
=============  ==========================================================================

Modules (each imports only those listed before it; ``conversion`` and ``exporting`` are so
named that ``hf.convert`` and ``hf.export`` are the functions, never shadowed modules):

* ``weights``: the weight layouts, HF's tensors in our names (``experts.w1 [E, H, 2F]``,
  ``experts.w2 [E, F, H]``, ...) and ours as HF's on-disk keys, per family;
* ``families``: the registry ``FAMILIES`` (one ``Family`` record per model type: HF class
  names, config -> ``MoEConfig`` fields, weight and disk mappings), ``family_of``,
  ``UnsupportedModelError``;
* ``block``: ``HFMoEBlock`` and the router tap that HF's output recorder reads;
* ``conversion``: ``convert`` and its parts (``moe_config``, finding and replacing blocks);
* ``shards``: the safetensors ``Reader`` and the reading of one rank's shard of a block;
* ``load``: ``load_pretrained`` (meta model, dense weights, local experts);
* ``exporting``: ``export`` and ``gather_experts`` (over ``distributed.collectives``);
* ``upcycle``: ``upcycle`` (a dense Llama / Mistral / Qwen2 / Qwen3 model as a Mixtral /
  Qwen2-MoE / Qwen3-MoE model whose experts are copies, or 1/g shards, of the dense MLP, its
  logits equal to the dense model's under the conditions stated there) and the parts ``merge``
  shares (the MoE config derived from a dense config, the model skeleton, the block weights);
* ``merge``: ``merge_dense_models`` (expert i of every layer = dense model i's MLP, the other
  weights averaged or one model's: Branch-Train-MiX).

Adding a family: write its ``config(hf_config) -> dict`` in ``families.py`` (reject with
``_require`` what cannot be reproduced), its ``weights(block)`` and ``disk(weights)`` in
``weights.py`` (or reuse existing ones), and add one ``Family(model_type=..., ...)`` record to
``FAMILIES``; ``convert``, ``load_pretrained`` and ``export`` need no change.
"""

from __future__ import annotations

from .block import HFMoEBlock
from .conversion import convert
from .exporting import export
from .families import FAMILIES, Family, UnsupportedModelError, family_of
from .load import load_pretrained
from .merge import merge_dense_models
from .upcycle import MOE_FAMILY, upcycle

__all__ = ["FAMILIES", "Family", "HFMoEBlock", "MOE_FAMILY", "UnsupportedModelError", "convert",
           "export", "family_of", "load_pretrained", "merge_dense_models", "upcycle"]
