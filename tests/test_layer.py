"""MoELayer against the loop-over-experts reference (float64): outputs, losses, every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE, set_aux_loss_scale
from moe_parallel.dispatch import LocalDispatcher

BASE = dict(hidden_size=16, ffn_hidden_size=12, num_experts=8, top_k=2,
            params_dtype=torch.float64, init_std=0.3)

CASES = {
    "softmax_pre_norm": dict(),
    "softmax_pre_nonorm": dict(norm_topk_prob=False),
    "softmax_post": dict(softmax_before_topk=False),
    "sigmoid_norm": dict(score_function="sigmoid"),
    "sigmoid_nonorm_scaled": dict(score_function="sigmoid", norm_topk_prob=False,
                                  routed_scaling_factor=2.5),
    "group_limited": dict(num_experts=16, top_k=4, num_groups=4, group_topk=2),
    "expert_bias": dict(expert_bias=True, score_function="sigmoid"),
    "noisy": dict(noisy_gating=True),
    "top1_switch": dict(top_k=1, norm_topk_prob=False, capacity_factor=1.25),
    "top1_gelu": dict(top_k=1, norm_topk_prob=False, activation="gelu"),
    # top-1 with the default norm_topk_prob=None: the weight is the router's top-1 score
    "top1_default": dict(top_k=1, aux_loss_coeff=0.1),
    "relu": dict(activation="relu"),
    "fine_grained_top6": dict(num_experts=16, top_k=6, ffn_hidden_size=6, num_shared_experts=2),
    "capacity_probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "capacity_position": dict(capacity_factor=1.0, drop_policy="position"),
    "capacity_tight_min": dict(capacity_factor=0.3, min_capacity=2, drop_policy="probs"),
    "pad_to_capacity": dict(capacity_factor=1.25, pad_to_capacity=True),
    "pad_position_top6": dict(num_experts=16, top_k=6, capacity_factor=0.8,
                              drop_policy="position", pad_to_capacity=True),
    "shared": dict(num_shared_experts=1),
    "shared_gated": dict(num_shared_experts=2, shared_expert_ffn_hidden_size=10,
                         shared_expert_gate=True),
    "losses": dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.05, z_loss_coeff=0.01),
    "expert_choice": dict(router_type="expert_choice", z_loss_coeff=0.01),
    "expert_choice_cf": dict(router_type="expert_choice", capacity_factor=0.5),
    # the Hugging Face families' semantics
    "deepseek_v3_groups": dict(num_experts=16, top_k=3, num_groups=4, group_topk=2,
                               group_score="sum_top2", score_function="sigmoid",
                               expert_bias=True, routed_scaling_factor=2.5,
                               router_dtype=torch.float32),
    "deepseek_v2_groups": dict(num_experts=16, top_k=3, num_groups=4, group_topk=2,
                               group_score="max", norm_topk_prob=False,
                               routed_scaling_factor=1.5),
    "gpt_oss": dict(router_bias=True, softmax_before_topk=False, expert_proj_bias=True,
                    activation="clamped_swiglu", swiglu_limit=0.5),
    "gpt_oss_block_sparse": dict(router_bias=True, softmax_before_topk=False,
                                 expert_proj_bias=True, activation="clamped_swiglu",
                                 swiglu_limit=0.5, expert_impl="block_sparse", block_size=4),
    "proj_bias_capacity_padded": dict(expert_proj_bias=True, capacity_factor=1.0,
                                      pad_to_capacity=True),
    "llama4": dict(score_function="sigmoid", top_k=1, scale_expert_input=True,
                   num_shared_experts=1, router_score_dtype=torch.float32),
    "scale_input_top2_capacity": dict(scale_expert_input=True, capacity_factor=1.0),
    "hf_score_dtype": dict(router_score_dtype=torch.float32),
    "jitter": dict(jitter_noise=0.2),
    "force_balance": dict(force_balance=True, expert_bias=True, score_function="sigmoid"),
    "force_balance_capacity": dict(force_balance=True, capacity_factor=0.75),
}


def _pair(cfg: MoEConfig, seed: int = 0) -> tuple[MoELayer, ReferenceMoE]:
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    with torch.no_grad():
        if cfg.expert_bias:
            layer.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.2)
        for bias in (getattr(layer.router, "bias", None), layer.experts.b1, layer.experts.b2):
            if bias is not None:  # initialised to zero: make them count
                bias.copy_(torch.randn_like(bias) * 0.3)
    return layer, ReferenceMoE.from_layer(layer)


def _run(module, x, seed, cot):
    """Forward with a fixed RNG state, backward of a random projection plus the losses."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    if isinstance(module, MoELayer):
        y, aux = module(x, return_aux=True)
        losses = aux.losses
    else:
        y, losses = module(x)
    total = (y * cot).sum() + sum(losses.values(), torch.zeros((), dtype=y.dtype))
    total.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), {k: v.detach() for k, v in losses.items()}, x.grad, grads


def _close(a, b, what, tol=1e-10):
    err = (a - b).norm() / b.norm().clamp_min(1e-12)
    assert err < tol, f"{what}: relative error {err:.3e}"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", ["2d", "3d"])
def test_layer_matches_reference(name, shape):
    cfg = MoEConfig(**{**BASE, **CASES[name]})
    layer, ref = _pair(cfg)
    layer.train(), ref.train()
    gen = torch.Generator().manual_seed(1)
    dims = (40, cfg.hidden_size) if shape == "2d" else (10, 4, cfg.hidden_size)
    x = torch.randn(*dims, generator=gen, dtype=torch.float64)
    cot = torch.randn(*dims, generator=gen, dtype=torch.float64)

    y, losses, gx, grads = _run(layer, x, 7, cot)
    y_ref, losses_ref, gx_ref, grads_ref = _run(ref, x, 7, cot)

    assert y.shape == x.shape
    _close(y, y_ref, "output")
    assert losses.keys() == losses_ref.keys()
    for k in losses:
        _close(losses[k], losses_ref[k], f"loss {k}")
    _close(gx, gx_ref, "input grad")
    assert grads.keys() == grads_ref.keys(), (grads.keys(), grads_ref.keys())
    for n in grads:
        _close(grads[n], grads_ref[n], f"grad {n}")
    # every routed parameter received a gradient signal
    if cfg.top_k > 1 or not cfg.renormalize_topk or cfg.aux_loss_coeff:
        assert grads["router.weight"].norm() > 1e-6
    assert grads["experts.w1"].abs().sum() > 0


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_stats_count_drops(policy):
    cfg = MoEConfig(**{**BASE, "capacity_factor": 0.5, "drop_policy": policy})
    layer, _ = _pair(cfg)
    x = torch.randn(64, cfg.hidden_size, dtype=torch.float64)
    layer(x)
    s = layer.last_stats
    cap = math.ceil(64 * 2 / 8 * 0.5)
    assert s.num_routed == 64 * 2
    assert int(s.tokens_per_expert.max()) <= cap
    expected_kept = int(torch.clamp(s.routed_per_expert, max=cap).sum())
    assert s.num_processed == expected_kept
    assert s.dropped == 128 - expected_kept > 0
    assert s.drop_rate == pytest.approx(s.dropped / 128)
    assert s.max_load == int(s.tokens_per_expert.max())


def test_dropless_stats_and_pad_shapes():
    cfg = MoEConfig(**BASE)
    layer, _ = _pair(cfg)
    layer(torch.randn(33, cfg.hidden_size, dtype=torch.float64))
    s = layer.last_stats
    assert s.dropped == 0 and s.drop_rate == 0.0
    assert s.num_processed == 66
    assert torch.equal(s.tokens_per_expert, s.routed_per_expert)


def test_dispatcher_is_replaceable():
    """A dispatcher object with the dispatch/combine contract drops in."""

    class Counting(LocalDispatcher):
        calls = 0

        def dispatch(self, x, routing, pad_to=0):
            Counting.calls += 1
            return super().dispatch(x, routing, pad_to)

    cfg = MoEConfig(**BASE)
    torch.manual_seed(0)
    plain = MoELayer(cfg)
    swapped = MoELayer(cfg, dispatcher=Counting(cfg.num_experts))
    swapped.load_state_dict(plain.state_dict())
    x = torch.randn(20, cfg.hidden_size, dtype=torch.float64)
    assert torch.equal(plain(x), swapped(x))
    assert Counting.calls == 1


def test_bf16_layer_close_to_float64_reference():
    cfg = MoEConfig(**{**BASE, "params_dtype": torch.bfloat16, "num_shared_experts": 1})
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    ref = ReferenceMoE(cfg.replace(params_dtype=torch.float64))
    own = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in layer.named_parameters():
            own[n].copy_(p.double())
    x = torch.randn(48, cfg.hidden_size, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref, _ = ref(x.double())
    err = (y.double() - y_ref).norm() / y_ref.norm()
    assert err < 2e-2, err


def test_eval_mode_noisy_is_deterministic():
    cfg = MoEConfig(**{**BASE, "noisy_gating": True})
    layer, ref = _pair(cfg)
    layer.eval(), ref.eval()
    x = torch.randn(24, cfg.hidden_size, dtype=torch.float64)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert torch.equal(a, b)
    _close(a, ref(x)[0], "eval output")


def test_all_tokens_to_one_expert_dropless_and_capacity():
    """A router biased onto expert 3: dropless keeps all, capacity keeps exactly C."""
    for cf in (None, 1.0):
        cfg = MoEConfig(**{**BASE, "top_k": 1, "capacity_factor": cf})
        layer, ref = _pair(cfg)
        with torch.no_grad():
            for m in (layer, ref):
                m.router.weight.zero_()
                m.router.weight[3] = 5.0
        x = torch.rand(32, cfg.hidden_size, dtype=torch.float64) + 0.5  # positive: expert 3 wins
        y = layer(x)
        _close(y, ref(x)[0], f"output cf={cf}")
        counts = layer.last_stats.tokens_per_expert
        assert int(counts[3]) == (32 if cf is None else 4)
        assert int(counts.sum()) == int(counts[3])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(5, 7, dtype=torch.float64), "hidden_size"),
        (torch.randn(5, dtype=torch.float64), "hidden_size"),
        (torch.randn(5, 16, dtype=torch.float32), "dtype"),
    ],
)
def test_bad_input(bad, match):
    layer, _ = _pair(MoEConfig(**BASE))
    with pytest.raises(ValueError, match=match):
        layer(bad)


def test_nan_input_raises_by_default_and_propagates_when_unchecked():
    x = torch.randn(8, 16, dtype=torch.float64)
    x[3, 2] = float("nan")
    layer, _ = _pair(MoEConfig(**BASE))
    with pytest.raises(FloatingPointError):
        layer(x)
    unchecked, _ = _pair(MoEConfig(**BASE, check_finite=False))
    y = unchecked(x)
    assert torch.isnan(y[3]).any()
    assert torch.isfinite(y[[0, 1, 2, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_top1_defaults_give_the_router_a_task_gradient(score_function):
    """Switch-style top-1: with the defaults the combine weight is the top-1 score
    (``softmax(logits)[top-1]`` / ``sigmoid``), not 1, so the main loss alone (no aux loss)
    trains the router."""
    cfg = MoEConfig(**{**BASE, "top_k": 1, "score_function": score_function})
    assert cfg.norm_topk_prob is None and not cfg.renormalize_topk
    layer, ref = _pair(cfg, seed=3)
    x = torch.randn(32, cfg.hidden_size, dtype=torch.float64)
    y, aux = layer(x, return_aux=True)
    assert aux.total_loss is None  # no aux loss: the router learns from the main loss alone
    y.square().sum().backward()
    assert layer.router.weight.grad.norm() > 1e-6
    with torch.no_grad():
        logits = x @ layer.router.weight.t()
        scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
        top1, e = scores.max(-1)
        assert (top1 < 1 - 1e-3).all()
        want = torch.stack([top1[t] * ref._expert(int(e[t]), x[t:t + 1])[0] for t in range(32)])
    _close(y, want, "top-1 output = score · expert(x)")


@pytest.mark.parametrize("kw, field", [
    (dict(norm_topk_prob=True), "norm_topk_prob"),
    (dict(softmax_before_topk=False), "softmax_before_topk"),
    (dict(score_function="sigmoid", norm_topk_prob=True), "norm_topk_prob"),
])
def test_top1_combinations_that_freeze_the_router_are_refused(kw, field):
    with pytest.raises(ValueError, match=f"{field}.*top_k=1.*no gradient"):
        MoEConfig(**{**BASE, "top_k": 1, **kw})


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=1, etp=2), dict(ep=2, etp=2)])
def test_parallel_state_without_groups_is_refused_at_construction(layout):
    from moe_parallel.distributed import ParallelState

    ps = ParallelState.build(**layout, world_size=4, rank=1, create_groups=False)
    with pytest.raises(ValueError, match=r"no process group.*create_groups=False"):
        MoELayer(MoEConfig(**BASE), parallel_state=ps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_tokens_in_every_mode(name):
    """A rank without tokens (T = 0) runs the whole layer, forward and backward, in every mode."""
    layer, _ = _pair(MoEConfig(**{**BASE, **CASES[name]}))
    x = torch.randn(0, BASE["hidden_size"], dtype=torch.float64, requires_grad=True)
    y, aux = layer(x, return_aux=True)
    assert y.shape == (0, BASE["hidden_size"])
    assert aux.stats.num_routed == 0 and aux.stats.dropped == 0
    (y.sum() + (aux.total_loss if aux.total_loss is not None else 0.0)).backward()
    assert x.grad.shape == x.shape
    assert float(layer.router.weight.grad.abs().sum()) == 0.0


def test_eval_capacity_factor_sets_the_eval_capacity():
    cfg = MoEConfig(**{**BASE, "capacity_factor": 0.5, "eval_capacity_factor": 2.0})
    layer, ref = _pair(cfg)
    T = 64
    x = torch.randn(T, cfg.hidden_size, dtype=torch.float64)
    assert layer.capacity(T) == math.ceil(T * 2 / 8 * 0.5)
    _, train_aux = layer(x, return_aux=True)
    layer.eval()
    ref.eval()
    assert layer.capacity(T) == math.ceil(T * 2 / 8 * 2.0)
    y, aux = layer(x, return_aux=True)
    assert aux.stats.drop_rate < train_aux.stats.drop_rate
    y_ref, _ = ref(x)
    _close(y, y_ref, "eval output")


@pytest.mark.parametrize("kw, match", [
    (dict(eval_capacity_factor=2.0), "eval_capacity_factor needs capacity_factor"),
    (dict(capacity_factor=1.0, eval_capacity_factor=0.0), "eval_capacity_factor must be"),
    (dict(capacity_factor=1.0, eval_capacity_factor=float("nan")), "eval_capacity_factor must"),
])
def test_eval_capacity_factor_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **kw})


def test_eval_and_no_grad_forwards_leave_training_state_alone():
    """Counts for the expert-bias update and the losses a training loop reads back stay those
    of the training forward after eval-mode or no_grad forwards."""
    cfg = MoEConfig(**{**BASE, "score_function": "sigmoid", "expert_bias": True,
                       "aux_loss_coeff": 0.1})
    layer, _ = _pair(cfg)
    x = torch.randn(32, cfg.hidden_size, dtype=torch.float64)
    layer(x).sum().backward()  # the routed counts are added by the training step's backward
    counts = layer.router.local_tokens_per_expert.clone()
    assert counts.sum() == 32 * cfg.top_k
    kept, aux = layer.last_losses, layer.aux_loss.detach().clone()
    bias = layer.router.expert_bias.clone()
    with torch.no_grad():
        layer(torch.randn(16, cfg.hidden_size, dtype=torch.float64))
    layer.eval()
    _, eval_aux = layer(torch.randn(8, cfg.hidden_size, dtype=torch.float64), return_aux=True)
    assert eval_aux.losses  # the eval forward still reports its own losses
    assert torch.equal(layer.router.local_tokens_per_expert, counts)
    assert layer.last_losses is kept and torch.equal(layer.aux_loss, aux)
    assert torch.equal(layer.router.expert_bias, bias)


LOSSES_AND_BIAS = dict(score_function="sigmoid", expert_bias=True, aux_loss_coeff=0.1,
                       seq_aux_loss_coeff=0.05, z_loss_coeff=0.01)


@pytest.mark.parametrize("wrap", ["none", "checkpoint_reentrant", "checkpoint"])
def test_router_gets_the_loss_gradients_and_counts_once_whatever_wraps_the_layer(wrap):
    """The losses are on the output's graph: the task loss alone (no aux term added by the
    caller) gives the router the gradient of task + losses, equal to the reference that adds
    them, also under activation recomputation; the routed counts are added once per backward."""
    from torch.utils.checkpoint import checkpoint

    cfg = MoEConfig(**{**BASE, **LOSSES_AND_BIAS})
    layer, ref = _pair(cfg, seed=5)
    x = torch.randn(4, 6, cfg.hidden_size, dtype=torch.float64)
    cot = torch.randn_like(x)
    xl = x.clone().requires_grad_(True)
    if wrap == "none":
        y = layer(xl)
    else:
        y = checkpoint(layer, xl, use_reentrant=wrap == "checkpoint_reentrant")
    (y * cot).sum().backward()
    xr = x.clone().requires_grad_(True)
    y_ref, losses_ref = ref(xr)
    ((y_ref * cot).sum() + sum(losses_ref.values())).backward()
    _close(y.detach(), y_ref.detach(), "output")
    _close(xl.grad, xr.grad, "input grad")
    grads_ref = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        _close(p.grad, grads_ref[name].grad, f"grad {name}")
    assert layer.router.local_tokens_per_expert.sum() == x.shape[0] * x.shape[1] * cfg.top_k


def test_aux_loss_scale_scales_only_the_loss_gradient():
    """grad(scale) = grad_task + scale · grad_losses: the scale for gradient accumulation."""
    cfg = MoEConfig(**{**BASE, **LOSSES_AND_BIAS})
    x = torch.randn(24, cfg.hidden_size, dtype=torch.float64)
    grads = {}
    for scale in (0.0, 0.25, 1.0):
        layer, _ = _pair(cfg, seed=6)
        assert set_aux_loss_scale(layer, scale) == 1
        layer(x).sum().backward()
        grads[scale] = layer.router.weight.grad.clone()
    _close(grads[0.25], 0.75 * grads[0.0] + 0.25 * grads[1.0], "scaled router grad")
    assert (grads[1.0] - grads[0.0]).norm() > 1e-3 * grads[0.0].norm()  # the losses matter


def test_expert_projection_biases_refuse_expert_tensor_parallelism():
    from moe_parallel.experts import GroupedExperts

    cfg = MoEConfig(**{**BASE, "expert_proj_bias": True})
    with pytest.raises(ValueError, match="expert_proj_bias=True is not supported with expert "
                                         "tensor parallelism"):
        GroupedExperts(cfg, 8, cfg.ffn_hidden_size // 2)


@pytest.mark.parametrize("kw", [dict(), dict(score_function="sigmoid", expert_bias=True)])
def test_padding_tokens_change_no_loss_count_or_other_output(kw):
    """A padded [S, B, H] batch equals the same valid tokens packed at the front of each
    sequence behind other (random) padding: outputs of the valid tokens, every loss (aux,
    per-sequence aux, z), the router gradient and the expert-bias counts."""
    cfg = MoEConfig(**BASE, **kw, aux_loss_coeff=0.05, seq_aux_loss_coeff=0.03,
                    z_loss_coeff=0.01)
    S_, B_ = 10, 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(S_, B_, 16, generator=g, dtype=torch.float64)
    cot = torch.randn(S_, B_, 16, generator=g, dtype=torch.float64)
    pad = torch.rand(S_, B_, generator=g) < 0.3
    pad[:, 0] = False
    order = torch.stack([torch.cat([torch.nonzero(~pad[:, b]).view(-1),
                                    torch.nonzero(pad[:, b]).view(-1)]) for b in range(B_)], 1)
    idx = order[..., None].expand(S_, B_, 16)
    packed_pad = pad.gather(0, order)
    packed_x = torch.where(packed_pad[..., None], 5 * torch.randn_like(x), x.gather(0, idx))
    got = {}
    for name, xs, cs, ps_ in (("padded", x, cot, pad),
                              ("packed", packed_x, cot.gather(0, idx), packed_pad)):
        torch.manual_seed(0)
        layer = MoELayer(cfg)
        y, aux = layer(xs.clone().requires_grad_(), return_aux=True, padding_mask=ps_)
        (y * cs * (~ps_)[..., None]).sum().backward()
        if name == "padded":
            y = y.gather(0, idx)
        got[name] = (y.detach() * (~packed_pad)[..., None], aux.losses,
                     layer.router.weight.grad, layer.router.local_tokens_per_expert.clone())
    (ya, la, ga, ca), (yb, lb, gb, cb) = got["padded"], got["packed"]
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    assert set(la) == {"aux", "seq_aux", "z"}
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-12, atol=0, msg=k)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert torch.equal(ca, cb) and int(ca.sum()) == 2 * int((~pad).sum())
    # the loss over the valid tokens only, as a [T, H] batch, is the same aux and z loss
    torch.manual_seed(0)
    flat = MoELayer(cfg)
    _, flat_aux = flat(x[~pad].clone().requires_grad_(), return_aux=True)
    for k in ("aux", "z"):
        torch.testing.assert_close(la[k], flat_aux.losses[k], rtol=1e-12, atol=0, msg=k)


def test_padding_mask_is_checked():
    layer = MoELayer(MoEConfig(**BASE))
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor of shape"):
        layer(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, padding_mask=torch.zeros(4, 2))
    ec = MoELayer(MoEConfig(**BASE | dict(top_k=2), router_type="expert_choice"))
    with pytest.raises(ValueError, match="expert_choice"):
        ec(x, padding_mask=torch.zeros(4, 2, dtype=torch.bool))
