"""MoELayer on CUDA against the float64 reference on CPU, in every dispatch mode (grouped GEMMs,
the default, on each grouped GEMM backend, and block-sparse experts)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.layer_bench import sync_sites
from moe_parallel import MoEConfig, MoELayer, ReferenceMoE
from moe_parallel.dispatch.in_flight import side_stream

pytestmark = pytest.mark.cuda

BASE = dict(hidden_size=64, ffn_hidden_size=48, num_experts=8, top_k=2, init_std=0.1)
MODES = {
    "dropless": dict(),
    "capacity_probs": dict(capacity_factor=1.0),
    "capacity_position": dict(capacity_factor=1.0, drop_policy="position"),
    "pad_to_capacity": dict(capacity_factor=1.25, pad_to_capacity=True),
    "fine_grained_shared": dict(num_experts=32, top_k=6, ffn_hidden_size=16,
                                num_shared_experts=1, shared_expert_gate=True),
    "sigmoid_groups": dict(num_experts=16, top_k=4, score_function="sigmoid",
                           num_groups=4, group_topk=2, expert_bias=True),
    "expert_choice": dict(router_type="expert_choice"),
    "gelu_top1": dict(top_k=1, norm_topk_prob=False, activation="gelu", capacity_factor=1.25),
    "dropless_block_sparse": dict(expert_impl="block_sparse"),
    "dropless_block128": dict(ffn_hidden_size=256, expert_impl="block_sparse", block_size=128),
    "overlap_chunks_shared": dict(num_shared_experts=1, shared_expert_overlap=True,
                                  overlap_chunks=3),
    "grouped_streams": dict(grouped_gemm_backend="streams"),
    "grouped_cublas": dict(grouped_gemm_backend="cublas"),
    "grouped_torch": dict(grouped_gemm_backend="torch"),
    "grouped_cutlass_capacity": dict(grouped_gemm_backend="cutlass", capacity_factor=1.0),
}
BF16_ONLY = {"grouped_torch", "grouped_cutlass_capacity"}  # backends without float32


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_cuda_layer_matches_reference(mode, dtype, tol):
    if mode in BF16_ONLY and dtype != torch.bfloat16:
        pytest.skip(f"{MODES[mode]['grouped_gemm_backend']} runs bfloat16 only")
    if mode == "grouped_torch" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm's fast path needs sm_90")
    cfg = MoEConfig(**{**BASE, **MODES[mode], "params_dtype": dtype})
    torch.manual_seed(0)
    layer = MoELayer(cfg, device="cuda")
    ref = ReferenceMoE(cfg.replace(params_dtype=torch.float64))
    own = dict(ref.named_parameters()) | dict(ref.named_buffers())
    with torch.no_grad():
        for n, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if n in own:
                own[n].copy_(t.double().cpu())
    x = torch.randn(256, cfg.hidden_size).to(dtype).double()  # exactly representable
    cot = torch.randn_like(x)

    xc = x.to("cuda", dtype).requires_grad_(True)
    y = layer(xc)
    assert y.is_cuda and y.dtype == dtype
    (y.double() * cot.cuda()).sum().backward()

    xr = x.clone().requires_grad_(True)
    y_ref, _ = ref(xr)
    (y_ref * cot).sum().backward()

    def rel(a, b):
        return float((a.double().cpu() - b).norm() / b.norm())

    if dtype == torch.float32:
        # bf16 routing can pick different experts on near-ties; compare outputs in fp32 only
        assert rel(y.detach(), y_ref.detach()) < tol
        assert rel(xc.grad, xr.grad) < tol
        refp = dict(ref.named_parameters())
        for n, p in layer.named_parameters():
            assert rel(p.grad, refp[n].grad) < tol, n
    else:
        assert rel(y.detach(), y_ref.detach()) < tol


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_dropless_step_reads_the_device_once(backend, check_finite):
    """A dropless forward+backward reads the device from the host once: ops.expert_counts
    (ids checked and group sizes together), plus the finiteness check of the logits when
    check_finite is on. Routing statistics arrive by a non-blocking copy, and the permute and
    unpermute ops with their backwards skip the range checks the ids already passed."""
    if backend == "torch" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm's fast path needs sm_90")
    cfg = MoEConfig(**{**BASE, "params_dtype": torch.bfloat16, "grouped_gemm_backend": backend,
                       "check_finite": check_finite})
    layer = MoELayer(cfg, device="cuda")
    x = torch.randn(256, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    grad = torch.randn_like(x)
    layer(x).backward(grad)  # warm-up: lazy initialisations are not per-step reads
    torch.cuda.synchronize()
    sites = sync_sites(lambda: layer(x).backward(grad))
    assert len(sites) == 1 + check_finite, "\n".join(sites)
    assert "expert_counts" in "".join(sites)
    stats = layer.last_stats
    assert int(stats.tokens_per_expert.sum()) == 256 * cfg.top_k
    assert stats.unrouted_tokens == 0


def test_shared_expert_overlap_runs_on_the_side_stream():
    """With shared_expert_overlap the shared experts run on the device's side stream (the
    current stream waits for it before the sum) and the layer's output and every gradient are
    the plain layer's (float64; a missing stream wait would read unfinished memory, far above
    the 1e-12 bound)."""
    cfg = MoEConfig(**{**BASE, "num_shared_experts": 2, "shared_expert_gate": True,
                       "params_dtype": torch.float64})
    torch.manual_seed(0)
    plain = MoELayer(cfg, device="cuda")
    overlapped = MoELayer(cfg.replace(shared_expert_overlap=True), device="cuda")
    overlapped.load_state_dict(plain.state_dict())
    streams = []
    overlapped.shared_expert.register_forward_pre_hook(
        lambda module, args: streams.append(torch.cuda.current_stream()))
    x = torch.randn(512, cfg.hidden_size, device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    results = []
    for layer in (plain, overlapped):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad)
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    torch.cuda.synchronize()
    side = side_stream(x.device)
    assert streams == [side] and side != torch.cuda.default_stream(x.device)
    for a, b in zip(*results):
        assert ((a - b).norm() / a.norm()).item() < 1e-12
