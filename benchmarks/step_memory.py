"""A rank's exact bytes by category after one training step of the built-in model.

``measure(ps, dims, seq_len, batch, shard, recompute)`` builds ``moe_parallel.train``'s
``MoETransformerLM`` (float32, dropless) for the caller's ``ParallelState`` and a sharding /
recompute mode, then counts on this rank:

* ``params``: bytes of its parameters (a DTensor by its local shard);
* ``grads``: bytes of their gradients after one training step (``train.train_step``: backward,
  ``sync_gradients``, clipping, AdamW step);
* ``optimizer``: bytes of every tensor in the AdamW state after that step (moments and the
  per-parameter ``step`` counters, a sharded tensor by its local shard);
* ``activations``: bytes one forward of the language-model loss saves for its backward
  (``benchmarks.memory.saved_tensor_bytes``), the storages of the parameters apart;
* ``expert_params``, ``expert_grads``, ``expert_optimizer``: the same three for the routed
  experts alone (``distributed.is_expert_param``), and ``expert_optimizer_scalars``: the bytes
  of the 0-dimensional tensors in their state (AdamW's ``step`` counters, one per parameter
  tensor, never sharded);
* ``rows``: the rows each MoE layer's experts received in the measured forward, ``tokens``: the
  MoE tokens of this rank (``batch · seq_len / tp``), ``largest_param``: bytes of its largest
  parameter.

Modes (``SHARD_MODES``): ``"none"`` (replicated weights, AdamW); ``"optimizer"`` (AdamW state
sharded by ``distributed.ShardedOptimizer``: the experts' over EDP, the rest over DP×CP);
``"experts"`` (``distributed.shard_model``, FSDP2: the routed experts over EDP, every block and
the rest over DP×CP; weights, gradients and AdamW state alike). ``recompute`` is
``MoEConfig.recompute``. The batch is the global ``batch · dp`` sequences of ``seq_len + 1``
tokens of a ``MarkovSource`` (seed 7), each data-parallel rank taking its ``batch``.

With ``"experts"`` the FSDP units keep their gathered weights from forward to backward
(``reshard_after_forward=False``) and a first forward gathers them before the measured one:
the weights that forward saves for its backward are then the module's parameters, counted
apart from the activations as on every other mode.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moe_parallel.config.choices import SHARD_MODES

DIMS = ("vocab", "hidden", "ffn", "experts", "top_k", "layers", "heads")


def _local(t: torch.Tensor) -> torch.Tensor:
    """``t``'s data on this rank (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s data on this rank."""
    local = _local(t)
    return local.numel() * local.element_size()


def _check(dims: Mapping[str, int], shard: str) -> None:
    missing = [k for k in DIMS if k not in dims]
    if missing:
        raise ValueError(f"dims lacks {missing}: it needs every one of {list(DIMS)}")
    if shard not in SHARD_MODES:
        raise ValueError(f"shard must be one of {list(SHARD_MODES)}, got {shard!r}")


def build(ps, dims: Mapping[str, int], seq_len: int, shard: str = "none",
          recompute: str = "none", lr: float = 1e-3):
    """``(model, optimizer)`` of the built-in model of ``dims`` (``DIMS``) for this rank of
    ``ps``, sharded as ``shard`` says (module docstring); a collective over ``ps``'s groups."""
    from moe_parallel import MoEConfig
    from moe_parallel.layer import set_aux_loss_scale
    from moe_parallel.train import MoETransformerLM

    _check(dims, shard)
    extra = {} if recompute == "none" else {"recompute": recompute}
    cfg = MoEConfig(hidden_size=dims["hidden"], ffn_hidden_size=dims["ffn"],
                    num_experts=dims["experts"], top_k=dims["top_k"], capacity_factor=None,
                    params_dtype=torch.float32, **extra)
    torch.manual_seed(0)
    model = MoETransformerLM(cfg, dims["vocab"], dims["layers"], dims["heads"],
                             seq_len).parallelize(ps)
    set_aux_loss_scale(model, 1.0 / ps.tp)
    if shard == "experts":
        from moe_parallel.distributed import shard_model
        model = shard_model(model, ps, dense_modules=list(model.blocks),
                            reshard_after_forward=False)
    if shard == "optimizer" and ps.world_size > 1:
        from moe_parallel.distributed import ShardedOptimizer
        opt = ShardedOptimizer(model, ps, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return model, opt


def measure(ps, dims: Mapping[str, int], seq_len: int, batch: int, shard: str = "none",
            recompute: str = "none") -> dict:
    """This rank's exact bytes by category after one training step (module docstring); a
    collective: every rank of ``ps`` calls it with the same arguments."""
    from benchmarks.memory import saved_tensor_bytes
    from moe_parallel.distributed import is_expert_param
    from moe_parallel.train import MarkovSource, lm_loss, local_batch, train_step

    model, opt = build(ps, dims, seq_len, shard, recompute)
    tokens = local_batch(MarkovSource(dims["vocab"], seed=7).batch(batch * ps.dp, seq_len), ps)
    forward = lambda: lm_loss(model(tokens[:, :-1]), tokens)  # noqa: E731
    if shard == "experts":
        forward()  # gathers the FSDP units' weights, kept for the measured forward
    saved = saved_tensor_bytes(forward, [_local(p) for p in model.parameters()])
    rows = [layer.last_stats.expert_rows for layer in model.moe_layers()]
    train_step(model, opt, tokens, ps, clip=1.0)

    params = list(model.parameters())
    experts = [p for p in params if is_expert_param(p)]

    def state(ps_):
        return [v for p in ps_ for v in opt.state.get(p, {}).values()
                if isinstance(v, torch.Tensor)]

    every_state = [v for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor)]
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(t) for t in every_state),
        "activations": saved["activations"],
        "expert_params": sum(_local_bytes(p) for p in experts),
        "expert_grads": sum(_local_bytes(p.grad) for p in experts if p.grad is not None),
        "expert_optimizer": sum(_local_bytes(t) for t in state(experts)),
        "expert_optimizer_scalars": sum(_local_bytes(t) for t in state(experts)
                                        if _local(t).dim() == 0),
        "largest_param": max(_local_bytes(p) for p in params),
        "rows": rows,
        "tokens": batch * seq_len // ps.tp,
    }


def sweep_job(job: dict) -> dict:
    """One gloo rank of the benchmark's sweep (``harness.run_gloo_job``): for each layout of
    ``job["layouts"]`` (``ParallelState.build`` keyword arguments) its ``ParallelState``, then
    ``measure`` in each ``(shard, recompute)`` of ``job["modes"]`` with ``job["dims"]``,
    ``job["seq_len"]`` and ``job["batch"]``. ``{"rows": one dict per measurement with its
    ``layout``, ``shard``, ``recompute`` and ``edp``, "full_model": full_model_bytes}``."""
    import warnings

    from moe_parallel.distributed.parallel_state import ParallelState

    # the built-in model adds the MoE output out of place, as FSDP2's warning asks
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rows = []
    for layout in job["layouts"]:
        ps = ParallelState.build(**layout)
        for shard, recompute in job["modes"]:
            got = measure(ps, job["dims"], job["seq_len"], job["batch"], shard, recompute)
            rows.append(dict(got, layout=layout, shard=shard, recompute=recompute, edp=ps.edp))
    return {"rows": rows, "full_model": full_model_bytes(job["dims"], job["seq_len"])}


def full_model_bytes(dims: Mapping[str, int], seq_len: int) -> dict[str, int]:
    """``{"params", "expert_params"}``: bytes of the whole built-in model of ``dims`` (one
    process, nothing sharded) and of its routed experts, the sums every layout divides."""
    from moe_parallel.distributed import ParallelState, is_expert_param

    model, _ = build(ParallelState.single(), dims, seq_len)
    params = list(model.parameters())
    return {"params": sum(_local_bytes(p) for p in params),
            "expert_params": sum(_local_bytes(p) for p in params if is_expert_param(p))}
