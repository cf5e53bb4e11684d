"""moe_parallel.integrations.megatron: MoEMLP inside megatron-core 0.16's own modules.

Everything Megatron here is the real library: its ``TransformerConfig``, a ``TransformerLayer``
(pre-MLP LayerNorm, our ``MoEMLP`` as ``mlp``, bias-dropout-add) built from a layer spec, its
``DistributedDataParallel`` and ``finalize_model_grads``, its routing functions, aux-loss
tracker and dist-checkpointing. Two of those unconditionally touch CUDA even for CPU tensors:
Megatron's DDP allocates its gradient buffers on ``torch.cuda.current_device()`` and
dist-checkpointing calls ``torch.cuda.synchronize()``; on this CPU-only machine ``_on_cpu``
points those two torch calls at the CPU, nothing of Megatron is replaced. Attention needs CUDA
(a CUDA scratch buffer in ``DotProductAttention``), so the layer here has none.

The multi-rank cases compare 4 gloo ranks with the same layer on 1 process that runs each
data-parallel rank's batch as one micro-batch (gradient accumulation, loss and aux-loss scale
``1/dp``): the equivalence Megatron's data parallelism promises. float64 throughout.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.nn.functional as F  # noqa: E402

from tests.helpers.dist_harness import get_pool  # noqa: E402

S, B, H, FF, E = 8, 4, 12, 8, 8


# ---- helpers run in the workers ---------------------------------------------------------------


@contextlib.contextmanager
def _on_cpu():
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved


def _groups() -> set:
    import torch.distributed.distributed_c10d as c10d

    return set(c10d._world.pg_map)


def _destroy(groups: set) -> None:
    import torch.distributed as dist

    for pg in groups:
        dist.destroy_process_group(pg)


@contextlib.contextmanager
def _megatron(tp: int = 1, ep: int = 1, etp: int | None = None):
    """Megatron's parallel state for one test, in a worker of the shared pool. Its
    ``destroy_model_parallel`` forgets the process groups without destroying them; each keeps
    gloo threads alive until it is freed, and hundreds of them slow every later test in the
    worker, so the groups created here are destroyed on the way out and the garbage of earlier
    tests (modules holding groups in reference cycles) is collected on the way in."""
    import gc

    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
    )

    gc.collect()
    before = _groups()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                  expert_tensor_parallel_size=etp,
                                  create_gloo_process_groups=False)
    try:
        with _on_cpu():
            yield mpu
    finally:
        clear_aux_losses_tracker()
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        mpu.destroy_model_parallel()
        _destroy(_groups() - before)


def _config(tp: int = 1, ep: int = 1, etp: int | None = None, **moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=4 * H,
                moe_ffn_hidden_size=FF, num_moe_experts=E, add_bias_linear=False,
                gated_linear_unit=True, activation_func=F.silu, params_dtype=torch.float64,
                use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp, sequence_parallel=tp > 1,
                moe_token_dispatcher_type="alltoall")
    return TransformerConfig(**(base | moe))


def _layer(config, norm: bool = True, **overrides):
    """A Megatron TransformerLayer: pre-MLP LayerNorm → MoEMLP → bias-dropout-add (without the
    norm under sequence parallelism: Megatron's torch LayerNorm refuses it, its others need
    Apex or Transformer Engine)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from moe_parallel.integrations.megatron import get_moe_layer_spec

    full = get_moe_layer_spec(**overrides)
    spec = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=full.submodules.pre_mlp_layernorm if norm else IdentityOp,
        mlp=full.submodules.mlp,
        mlp_bda=get_bias_dropout_add))
    return build_module(spec, config=config, layer_number=1).double()


def _weights(seed: int, shared: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "ln_w": 1 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64),
        "ln_b": 0.1 * torch.randn(H, generator=g, dtype=torch.float64),
        "router": 0.5 * torch.randn(E, H, generator=g, dtype=torch.float64),
        "w1": 0.3 * torch.randn(E, H, 2 * FF, generator=g, dtype=torch.float64),
        "w2": 0.3 * torch.randn(E, FF, H, generator=g, dtype=torch.float64),
    }
    if shared:
        w["s1"] = 0.3 * torch.randn(H, 2 * shared, generator=g, dtype=torch.float64)
        w["s2"] = 0.3 * torch.randn(shared, H, generator=g, dtype=torch.float64)
        w["sg"] = 0.3 * torch.randn(1, H, generator=g, dtype=torch.float64)
    return w


@torch.no_grad()
def _set_weights(layer, w) -> None:
    from moe_parallel.experts import shard_expert_weights

    moe = layer.mlp.moe
    ps = moe.parallel_state
    if hasattr(layer.pre_mlp_layernorm, "weight"):
        layer.pre_mlp_layernorm.weight.copy_(w["ln_w"])
        layer.pre_mlp_layernorm.bias.copy_(w["ln_b"])
    moe.router.weight.copy_(w["router"])
    w1, w2 = shard_expert_weights(w["w1"], w["w2"], ps.ep_rank, ps.ep, ps.etp_rank, ps.etp, True)
    moe.experts.w1.copy_(w1)
    moe.experts.w2.copy_(w2)
    if "s1" in w:
        moe.shared_expert.w1.copy_(w["s1"])
        moe.shared_expert.w2.copy_(w["s2"])
        moe.shared_expert.gate_weight.copy_(w["sg"])


def _inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    gy = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    pad = torch.rand(B, S, generator=g) < 0.25  # True: padding
    pad[0, :] = False
    return x, gy, pad


def _run(layout: dict, moe: dict, overrides: dict, shared: int, dp_ref: int, steps: int,
         norm: bool):
    """Forward + backward under Megatron's DDP, finalize_model_grads; what each rank holds.

    On one process (``layout`` all ones) the ``dp_ref`` data-parallel batches run as
    micro-batches with the loss and the aux-loss scale divided by ``dp_ref``."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    with _megatron(**layout) as mpu:
        config = _config(**layout, **moe)
        layer = _layer(config, norm, **overrides)
        _set_weights(layer, _weights(3, shared))
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), layer)
        tp, t = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
        dp, d = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
        x, gy, pad = _inputs()
        if dp == 1:  # the reference: one micro-batch per data-parallel rank of the other run
            batches = [slice(i * B // dp_ref, (i + 1) * B // dp_ref) for i in range(dp_ref)]
            scale = 1.0 / dp_ref
        else:
            batches, scale = [slice(d * B // dp, (d + 1) * B // dp)], 1.0
        seq = slice(t * S // tp, (t + 1) * S // tp)
        outs, biases = [], []
        for _ in range(steps):
            ddp.zero_grad_buffer()
            outs = []
            for b in batches:
                MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, dtype=torch.float64))
                xi = x[seq, b].clone().requires_grad_()
                out, _ = ddp(xi, attention_mask=None, padding_mask=pad[b, seq])
                (out * gy[seq, b]).sum().mul(scale).backward()
                outs.append(out.detach())
            finalize_model_grads([ddp])
            bias = getattr(layer.mlp.moe.router, "expert_bias", None)
            biases.append(None if bias is None else bias.clone())
        reduce_aux_losses_tracker_across_ranks()
        tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        grads = {n.removeprefix("module."): p.main_grad.clone() for n, p in ddp.named_parameters()}
        attrs = {n.removeprefix("module."): (getattr(p, "allreduce", True),
                                             getattr(p, "tensor_model_parallel", False),
                                             getattr(p, "partition_dim", -1),
                                             getattr(p, "sequence_parallel", False))
                 for n, p in ddp.named_parameters()}
        ps = layer.mlp.moe.parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        from moe_parallel.integrations.megatron import MoEMLP

        pgs = ProcessGroupCollection.use_mpu_process_groups()
        assert MoEMLP(config, pg_collection=pgs).parallel_state.ranks == ps.ranks
        coords = dict(t=t, tp=tp, d=d, dp=dp, ep_rank=ps.ep_rank, ep=ps.ep,
                      etp_rank=ps.etp_rank, etp=ps.etp)
        return dict(out=torch.cat(outs, dim=1), grads=grads, bias=biases, tracker=tracker,
                    coords=coords, attrs=attrs)


CASES = {
    # tp2 ep2 with Megatron's default expert TP (= TP): ETP 2, sequence parallel, shared expert
    "tp2_ep2_etp2": (dict(tp=2, ep=2), dict(moe_aux_loss_coeff=0.03, moe_z_loss_coeff=0.002,
                                             moe_shared_expert_intermediate_size=6,
                                             moe_shared_expert_gate=True), {}, 6),
    # ep4 (dp4): sigmoid + expert bias + group-limited + scaling, capacity, seq aux loss
    "ep4_capacity": (dict(ep=4), dict(moe_router_score_function="sigmoid",
                                      moe_router_enable_expert_bias=True,
                                      moe_router_bias_update_rate=0.01,
                                      moe_router_num_groups=4, moe_router_group_topk=2,
                                      moe_router_topk_scaling_factor=2.5,
                                      moe_expert_capacity_factor=1.0,
                                      moe_router_load_balancing_type="seq_aux_loss",
                                      moe_aux_loss_coeff=0.05), {}, 0),
    # tp2 ep2 etp1 (edp2): all-gather dispatcher, pre-softmax top-2, block-sparse experts
    "tp2_ep2_etp1_allgather": (dict(tp=2, ep=2, etp=1),
                               dict(moe_router_pre_softmax=True, moe_aux_loss_coeff=0.02,
                                    moe_token_dispatcher_type="allgather"),
                               dict(expert_impl="block_sparse"), 0),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_transformer_layer_on_4_ranks_equals_one_process(case):
    layout, moe, overrides, shared = CASES[case]
    dp = 4 // (layout.get("tp", 1))
    steps = 2 if moe.get("moe_router_enable_expert_bias") else 1
    norm = layout.get("tp", 1) == 1
    ref = get_pool(1).run(_run, {}, moe, overrides, shared, dp, steps, norm, timeout=180)[0]
    got = get_pool(4).run(_run, layout, moe, overrides, shared, dp, steps, norm, timeout=180)
    from moe_parallel.experts import shard_expert_weights

    tol = dict(rtol=1e-12, atol=1e-12)
    for r in got:
        c = r["coords"]
        seq = slice(c["t"] * S // c["tp"], (c["t"] + 1) * S // c["tp"])
        bat = slice(c["d"] * B // c["dp"], (c["d"] + 1) * B // c["dp"])
        torch.testing.assert_close(r["out"], ref["out"][seq, bat], **tol)
        w1, w2 = shard_expert_weights(ref["grads"]["mlp.moe.experts.w1"],
                                      ref["grads"]["mlp.moe.experts.w2"], c["ep_rank"], c["ep"],
                                      c["etp_rank"], c["etp"], True)
        torch.testing.assert_close(r["grads"]["mlp.moe.experts.w1"], w1, **tol)
        torch.testing.assert_close(r["grads"]["mlp.moe.experts.w2"], w2, **tol)
        dense = [n for n in ref["grads"] if "experts." not in n]
        assert "mlp.moe.router.weight" in dense
        for n in dense:
            torch.testing.assert_close(r["grads"][n], ref["grads"][n], **tol, msg=n)
            assert float(ref["grads"][n].abs().sum()) > 0, n
        for a, b in zip(r["bias"], ref["bias"]):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b) and float(a.abs().sum()) > 0
        assert r["tracker"].keys() == ref["tracker"].keys() and r["tracker"]
        for k in ref["tracker"]:  # the reference sums dp micro-batches; Megatron averages dp
            torch.testing.assert_close(r["tracker"][k] * dp / steps,
                                       ref["tracker"][k] / steps, rtol=1e-6, atol=0, msg=k)
        etp = c["etp"]
        assert r["attrs"]["mlp.moe.experts.w1"] == (False, etp > 1, 2 if etp > 1 else -1, False)
        assert r["attrs"]["mlp.moe.experts.w2"] == (False, etp > 1, 1 if etp > 1 else -1, False)
        assert r["attrs"]["mlp.moe.router.weight"] == (True, False, -1, c["tp"] > 1)


# ---- padding ----------------------------------------------------------------------------------


def _padding(_layout):
    """Padding tokens change no loss, count or other token's output: the layer on a padded
    batch equals the layer on the same valid tokens moved to the front of each sequence with
    other (random) padding behind them, in dropless mode."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    res = {}
    with _megatron():
        config = _config(moe_aux_loss_coeff=[0.05, 0.02], moe_z_loss_coeff=0.01,
                         moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
        x, gy, pad = _inputs()
        order = torch.stack([torch.cat([torch.nonzero(~pad[b]).view(-1),
                                        torch.nonzero(pad[b]).view(-1)]) for b in range(B)], 1)
        for name in ("padded", "compact"):
            layer = _layer(config)
            _set_weights(layer, _weights(5))
            if name == "padded":
                xs, gs, ps_ = x, gy, pad
            else:
                xs, gs = x.gather(0, order[..., None].expand(S, B, H)), gy.gather(
                    0, order[..., None].expand(S, B, H))
                ps_ = pad.gather(1, order.t())
                xs = torch.where(ps_.t()[..., None], 3 * torch.randn_like(xs), xs)
            xi = xs.clone().requires_grad_()
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, dtype=torch.float64))
            clear_aux_losses_tracker()
            out, bias = layer(xi, attention_mask=None, padding_mask=ps_)
            assert bias is None
            valid = (~ps_.t()).to(out.dtype)[..., None]
            (out * gs * valid).sum().backward()
            if name == "padded":  # in the compact order, to compare token by token
                out = out.gather(0, order[..., None].expand(S, B, H))
            res[name] = dict(
                out=out.detach() * (~pad.gather(1, order.t()).t())[..., None],
                grad_router=layer.mlp.moe.router.weight.grad.clone(),
                counts=layer.mlp.moe.router.local_tokens_per_expert.clone(),
                tracker={k: v["values"].clone()
                         for k, v in get_moe_layer_wise_logging_tracker().items()})
    return res


@pytest.mark.distributed
def test_padding_tokens_stay_out_of_losses_and_counts():
    r = get_pool(1).run(_padding, {}, timeout=120)[0]
    a, b = r["padded"], r["compact"]
    assert set(a["tracker"]) == {"load_balancing_loss", "seq_load_balancing_loss", "z_loss"}
    for k in a["tracker"]:
        torch.testing.assert_close(a["tracker"][k], b["tracker"][k], rtol=1e-6, atol=0, msg=k)
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-12, atol=1e-12)
    assert float(a["out"].abs().sum()) > 0
    torch.testing.assert_close(a["grad_router"], b["grad_router"], rtol=1e-10, atol=1e-12)
    valid = int((~_inputs()[2]).sum())
    assert torch.equal(a["counts"], b["counts"]) and int(a["counts"].sum()) == 2 * valid


# ---- TransformerConfig translation ------------------------------------------------------------

ROUTING = [
    dict(),  # softmax, top-k of the logits then softmax over them (Megatron's default)
    dict(moe_router_pre_softmax=True),
    dict(moe_router_pre_softmax=True, moe_router_topk=1),
    dict(moe_router_score_function="sigmoid", moe_router_topk=3),
    dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
         moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=4,
         moe_router_topk_scaling_factor=2.5),
    dict(moe_router_num_groups=2, moe_router_group_topk=1, moe_router_pre_softmax=True),
]


@pytest.mark.parametrize("moe", ROUTING)
def test_translated_router_routes_as_megatron(moe):
    """Our router built from the translated config gives the probs and expert map of
    Megatron's own ``topk_routing_with_score_function`` on the same logits (and, with a
    capacity, the kept map of its ``apply_router_token_dropping``)."""
    from megatron.core.transformer.moe.moe_utils import (
        apply_router_token_dropping,
        topk_routing_with_score_function,
    )

    from moe_parallel.integrations.megatron import moe_config_from_megatron
    from moe_parallel.routing import apply_capacity, build_router, expert_capacity

    cfg, losses = moe_config_from_megatron(_config(**moe))
    assert not losses.enabled and cfg.aux_loss_coeff == cfg.z_loss_coeff == 0
    torch.manual_seed(0)
    router = build_router(cfg)
    bias = None
    if cfg.expert_bias:
        bias = torch.linspace(-0.2, 0.3, E)
        router.expert_bias.copy_(bias)
    x = torch.randn(64, H, dtype=torch.float64)
    routing, _ = router(x)
    logits = x @ router.weight.t()
    probs, rmap = topk_routing_with_score_function(
        logits, cfg.top_k, use_pre_softmax=bool(moe.get("moe_router_pre_softmax")),
        num_groups=cfg.num_groups, group_topk=cfg.group_topk,
        scaling_factor=moe.get("moe_router_topk_scaling_factor"),
        score_function=cfg.score_function, expert_bias=bias)
    ours = torch.zeros(64, E, dtype=torch.float64).scatter(1, routing.expert_idx, routing.probs)
    assert torch.equal(ours != 0, rmap)
    # Megatron evaluates softmax / sigmoid in float32 even for float64 logits
    torch.testing.assert_close(ours, probs, rtol=3e-7, atol=1e-9)

    cap = expert_capacity(64, E, cfg.top_k, 0.7)
    keep = apply_capacity(routing.expert_idx, routing.probs, E, cap, "probs", None)
    kept = torch.zeros(64, E, dtype=torch.bool).scatter(1, routing.expert_idx, keep)
    _, mmap = apply_router_token_dropping(probs, rmap, cfg.top_k, 0.7, "probs")
    assert torch.equal(kept, mmap) and not bool(kept.all())


def test_config_translation_fields():
    from moe_parallel.integrations.megatron import moe_config_from_megatron

    cfg, losses = moe_config_from_megatron(_config(
        moe_aux_loss_coeff=[0.01, 0.002], moe_router_load_balancing_type=["aux_loss",
                                                                          "seq_aux_loss"],
        moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=1.25, moe_token_drop_policy="position",
        moe_pad_expert_input_to_capacity=True, moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True, moe_router_dtype="fp64", init_method_std=0.011,
        moe_token_dispatcher_type="allgather"), expert_impl="block_sparse")
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.top_k) == (H, FF, E, 2)
    assert (cfg.activation, cfg.capacity_factor, cfg.drop_policy, cfg.pad_to_capacity) == (
        "swiglu", 1.25, "position", True)
    assert (cfg.num_shared_experts, cfg.shared_expert_ffn_hidden_size,
            cfg.shared_expert_gate) == (1, 24, True)
    assert (cfg.router_dtype, cfg.params_dtype, cfg.init_std, cfg.token_dispatcher_type,
            cfg.expert_impl) == (torch.float64, torch.float64, 0.011, "allgather",
                                 "block_sparse")
    assert (losses.aux_coeff, losses.seq_aux_coeff, losses.z_coeff) == (0.01, 0.002, 1e-3)
    gelu, _ = moe_config_from_megatron(_config(gated_linear_unit=False, activation_func=F.gelu))
    assert gelu.activation == "gelu"
    assert not cfg.force_balance
    forced, _ = moe_config_from_megatron(_config(moe_router_force_load_balancing=True))
    assert forced.force_balance


@pytest.mark.parametrize("field,value,match", [
    ("moe_input_jitter_eps", 0.01, "moe_input_jitter_eps"),
    ("moe_router_load_balancing_type", "sinkhorn", "moe_router_load_balancing_type"),
    ("moe_router_load_balancing_type", "global_aux_loss", "moe_router_load_balancing_type"),
    ("moe_latent_size", 4, "moe_latent_size"),
    ("add_bias_linear", True, "add_bias_linear"),
    ("activation_func", F.relu, "activation_func"),
    ("moe_token_dispatcher_type", "flex", "moe_token_dispatcher_type"),
    ("moe_router_dtype", "fp16", "moe_router_dtype"),
])
def test_config_translation_names_what_it_cannot_honour(field, value, match):
    from moe_parallel.integrations.megatron import moe_config_from_megatron

    with pytest.raises(ValueError, match=match):
        moe_config_from_megatron(_config(**{field: value}))


# ---- Megatron dist-checkpointing --------------------------------------------------------------


def _ckpt(layout: dict, directory: str, save: bool, seed: int):
    """Save (the seed's weights) or load a layer's sharded_state_dict with Megatron's
    dist_checkpointing; after a load, what this rank holds against the seed's global weights."""
    from megatron.core import dist_checkpointing

    from moe_parallel.experts import shard_expert_weights

    with _megatron(**layout):
        layer = _layer(_config(**layout), norm=False)
        w = _weights(seed)
        ps = layer.mlp.moe.parallel_state
        if save:
            _set_weights(layer, w)
            dist_checkpointing.save(layer.sharded_state_dict(), directory)
            return None
        _set_weights(layer, _weights(seed + 1))  # other values, overwritten by the load
        loaded = dist_checkpointing.load(layer.sharded_state_dict(), directory)
        layer.load_state_dict(loaded)
        w1, w2 = shard_expert_weights(w["w1"], w["w2"], ps.ep_rank, ps.ep, ps.etp_rank, ps.etp,
                                      True)
        moe = layer.mlp.moe
        return (torch.equal(moe.experts.w1, w1) and torch.equal(moe.experts.w2, w2)
                and torch.equal(moe.router.weight, w["router"]), (ps.ep, ps.etp))


def _threads(_layout) -> int:
    """This worker's OS threads (gloo's are native: not in ``threading``)."""
    import os

    return len(os.listdir("/proc/self/task"))


def _ckpt_job(rank: int, world: int, port: int, start, directory: str, saved: dict,
              loads: list) -> None:
    import torch.distributed as dist

    start.wait(60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    _ckpt(saved, directory, True, 11)
    for layout in loads:
        ok, sizes = _ckpt(layout, directory, False, 11)
        assert ok, (rank, layout)
        assert sizes == (layout.get("ep", 1), layout.get("etp", layout.get("tp", 1)))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("saved,loads", [
    (dict(ep=4), [dict(ep=2), dict(tp=2, ep=2)]),       # ep4 -> ep2 (EDP 2), -> ep2 etp2
    (dict(tp=2, ep=2), [dict(ep=4), dict(tp=2, ep=2, etp=1)]),  # etp2 (gate|up chunks) -> ...
])
def test_dist_checkpoint_saves_every_expert_once_and_reshards(tmp_path, saved, loads):
    """Megatron's dist-checkpointing forks writer processes, which the test pool's daemonic
    workers may not: these ranks are spawned for the test."""
    import torch.multiprocessing as mp

    from tests.helpers.proc_utils import free_port, spawn_bounded

    directory = tmp_path / "ckpt"
    directory.mkdir()
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_ckpt_job, 4, (4, free_port(), start, str(directory), saved, loads),
                  timeout_s=240)


# ---- expert bias under Megatron's finalize_model_grads and Float16Module ---------------------


def _bias_under_megatron(_layout):
    """Two MoE layers, one with the expert bias and one without (a hybrid model), under
    Megatron's Float16Module (bf16) and DDP: finalize_model_grads updates the one bias in
    float32 by ``rate · sign(mean(c) − c)`` over the routed non-padding counts, and skips the
    other layer."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    from moe_parallel.integrations.megatron import MoEMLP

    with _megatron():
        kw = dict(params_dtype=torch.bfloat16, bf16=True, moe_router_score_function="sigmoid",
                  moe_router_bias_update_rate=0.125)
        on = _config(moe_router_enable_expert_bias=True, **kw)
        off = _config(**kw)
        model = torch.nn.ModuleList([MoEMLP(on, layer_number=1), MoEMLP(off, layer_number=2)])
        model.config = on
        wrapped = Float16Module(on, model)
        router = model[0].moe.router
        assert not hasattr(model[1].moe.router, "expert_bias")
        assert router.expert_bias.dtype == torch.float32
        assert model[0].moe.experts.w1.dtype == torch.bfloat16
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-1, 1, E) * 1e-3 + 0.5)  # not exact in bf16
        start = router.expert_bias.clone()
        ddp = DistributedDataParallel(on, DistributedDataParallelConfig(), wrapped)
        x = torch.randn(S, B, H, dtype=torch.bfloat16)
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 3:] = True
        y = x
        for layer in model:
            y, _ = layer(y, padding_mask=pad)
        y.float().square().sum().backward()
        counts = router.local_tokens_per_expert.clone()
        finalize_model_grads([ddp])
        return dict(start=start, end=router.expert_bias.clone(), counts=counts,
                    after=router.local_tokens_per_expert.clone(),
                    valid=int((~pad).sum()))


@pytest.mark.distributed
def test_finalize_model_grads_updates_the_expert_bias_in_float32():
    r = get_pool(1).run(_bias_under_megatron, {}, timeout=120)[0]
    c = r["counts"]
    assert int(c.sum()) == 2 * r["valid"]  # top-2 of the non-padding tokens
    want = r["start"] + 0.125 * torch.sign(c.mean() - c)
    assert r["end"].dtype == torch.float32 and torch.equal(r["end"], want)
    assert not torch.equal(r["end"], r["start"]) and float(r["after"].abs().sum()) == 0


def test_top_p_refuses_megatron_balancing_losses():
    from moe_parallel.integrations.megatron import moe_config_from_megatron

    cfg = _config(moe_router_topk=2, moe_router_pre_softmax=True, moe_aux_loss_coeff=0.01)
    with pytest.raises(ValueError, match="top_p .* Megatron's load-balancing"):
        moe_config_from_megatron(cfg, top_p=0.5)
    cfg.moe_aux_loss_coeff = 0.0
    moe, losses = moe_config_from_megatron(cfg, top_p=0.5)
    assert moe.top_p == 0.5 and not losses.enabled
