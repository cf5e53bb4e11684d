"""The ``megablocks`` contender of the layer benchmark: MegaBlocks' dropless ``dMoE``
(megablocks 0.10.0, ``mlp_impl="grouped"``) configured as ``MoELayer`` and holding its weights.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEGABLOCKS_INSTALL = (
    "the 'megablocks' contender needs megablocks==0.10.0, grouped_gemm==0.3.0 and "
    "stanford-stk==0.7.1 (not on this interpreter's path): run `make megablocks-carry` on a "
    "machine with PyPI (sdists into build/megablocks), then `bash benchmarks/megablocks_install.sh`"
    " and run with PYTHONPATH=build/megablocks/site")


def megablocks_arguments(case: dict) -> dict:
    """Keyword arguments of ``megablocks.layers.arguments.Arguments`` (0.10.0) for the layer
    ``MoELayer`` runs on ``case``: dropless top-k MoE with SwiGLU experts, no biases.

    * ``hidden_size``/``ffn_hidden_size``/``moe_num_experts``/``moe_top_k`` = H/F/E/k: its
      ``ffn_hidden_size`` is the intermediate size of one expert, as ours (``SparseGLU`` holds
      ``w1``, ``v1``, ``w2`` as ``[E·F, H]``, viewed ``[E, F, H]`` per expert);
    * ``mlp_type="glu"`` + ``activation_fn=F.silu``: its ``GroupedGLU`` computes
      ``(act(x w1ᵀ) * (x v1ᵀ)) w2``, SwiGLU with ``w1`` the gate and ``v1`` the up projection
      (its default activation is tanh-GELU, hence the explicit ``F.silu``);
    * ``mlp_impl="grouped"``: grouped_gemm's ``gmm`` (bfloat16 only; its default build runs one
      cuBLAS GEMM per expert, ``GROUPED_GEMM_CUTLASS=1`` a CUTLASS grouped kernel); ``"sparse"``
      (stk block-sparse Triton kernels) refuses triton >= 3.2. ``memory_optimized_mlp=False``:
      the plain autograd path (its GLU variant recomputes the activation in backward);
    * router: ``softmax`` over experts then top-k, renormalised with
      ``moe_normalize_expert_weights=1`` (L1, = our ``norm_topk_prob``); its router weight and
      logits are in the parameter dtype (bfloat16) where ours are float32, so near-tied
      choices may differ; no jitter, ``moe_loss_weight=0`` (no load-balancing loss, as our
      ``aux_loss_coeff=0``; with a weight it would also append to a global list every training
      step), ``moe_zloss_weight=0``;
    * ``bias=False`` (our experts have none; with a bias dMoE returns ``(y, bias)``);
    * ``bf16=True, fp16=False`` (``fp16`` defaults to True there): bfloat16 parameters, the
      only dtype grouped_gemm takes; ``moe_expert_model_parallelism=False``: one process, all
      experts local; ``device`` explicit (its default asks ``torch.cuda.current_device()``);
    * ``init_method``: normal(0, 0.02), as ``MoEConfig.init_std``; the weights are overwritten
      with our layer's anyway (:func:`megablocks_state`).
    """
    if case["dtype"] != "bfloat16":
        raise ValueError(f"the 'megablocks' contender runs bfloat16 only (grouped_gemm), got "
                         f"--dtype {case['dtype']}")
    if case["ffn"] * case["experts"] < 128:  # dMoE takes log2(F·E // 128) in its constructor
        raise ValueError("MegaBlocks' dMoE needs ffn·experts >= 128")
    return dict(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                moe_num_experts=case["experts"], moe_top_k=case["top_k"],
                mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu,
                memory_optimized_mlp=False, moe_normalize_expert_weights=1,
                moe_loss_weight=0.0, moe_zloss_weight=0.0, moe_jitter_eps=None,
                bias=False, return_bias=False, bf16=True, fp16=False,
                moe_expert_model_parallelism=False, device=torch.device(case["device"]),
                init_method=partial(nn.init.normal_, mean=0.0, std=0.02))


def megablocks_state(layer: nn.Module) -> dict[str, Tensor]:
    """``layer``'s weights under the parameter names and layouts of MegaBlocks' ``dMoE``:
    ``router.layer.weight`` ``[E, H]``; ``experts.mlp.w1`` (gate) and ``experts.mlp.v1`` (up),
    ``[E·F, H]``, from our ``w1`` ``[E, H, 2F]`` (gate columns first); ``experts.mlp.w2``
    ``[E·F, H]`` from our ``w2`` ``[E, F, H]``."""
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    e, h, f2 = w1.shape
    f = f2 // 2
    return {"router.layer.weight": layer.router.weight.detach(),
            "experts.mlp.w1": w1[:, :, :f].transpose(1, 2).reshape(e * f, h),
            "experts.mlp.v1": w1[:, :, f:].transpose(1, 2).reshape(e * f, h),
            "experts.mlp.w2": w2.reshape(e * f, h)}


def megablocks_dmoe(case: dict, layer: nn.Module) -> nn.Module:
    """MegaBlocks' ``dMoE`` for ``case`` holding ``layer``'s weights; a ``RuntimeError`` naming
    what to install when megablocks does not import."""
    try:
        with warnings.catch_warnings():  # its import-time FutureWarnings (torch.jit.script)
            warnings.simplefilter("ignore")
            import grouped_gemm  # noqa: F401  (megablocks only warns when it is missing)
            from megablocks.layers.arguments import Arguments
            from megablocks.layers.dmoe import dMoE
    except ImportError as e:
        raise RuntimeError(f"{MEGABLOCKS_INSTALL}: {e}") from e
    if case["device"] != "cuda":
        raise ValueError("the 'megablocks' contender runs on CUDA only (--device cuda)")
    module = dMoE(Arguments(**megablocks_arguments(case)))
    params = dict(module.named_parameters())
    state = megablocks_state(layer)
    if set(params) != set(state):
        raise RuntimeError(f"megablocks dMoE parameters {sorted(params)}, expected "
                           f"{sorted(state)}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return module
