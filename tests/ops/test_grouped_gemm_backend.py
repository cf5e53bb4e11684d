"""Grouped GEMM backend selection on any device: the names the compiled op, its twin and the
config accept; CUDA-only backends rejected on CPU with an error naming the backend; "loop" and
"auto" give the same result; the backward runs with the forward's backend (the backends
themselves are tested on CUDA in test_cuda_grouped_gemm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_parallel import MoEConfig, MoELayer, ops

EXT = ops.has_extension()
needs_ext = pytest.mark.skipif(not EXT, reason="moe_parallel._C not loaded")
CUDA_ONLY = ("streams", "cublas", "torch", "cutlass")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 0, 5, 2]
    a = torch.randn(sum(sizes), 6, generator=g) + 0.1
    b = torch.randn(len(sizes), 6, 4, generator=g) + 0.1
    return a, b, sizes


def test_backend_list():
    assert ops.GROUPED_GEMM_BACKENDS == ("auto", "loop", "streams", "cublas", "torch", "cutlass")


@pytest.mark.parametrize("impl", ["op", "twin"])
def test_unknown_backend_lists_the_allowed_ones(impl):
    if impl == "op" and not EXT:
        pytest.skip("moe_parallel._C not loaded")
    a, b, sizes = inputs()
    fn = ops.grouped_gemm if impl == "op" else ops.grouped_gemm_torch
    with pytest.raises(ValueError, match="backend must be one of") as info:
        fn(a, b, sizes, False, "cuBLAS")
    assert tuple(re.findall(r"'(\w+)'", str(info.value))[:-1]) == ops.GROUPED_GEMM_BACKENDS
    assert "'cuBLAS'" in str(info.value)


@pytest.mark.parametrize("backend", CUDA_ONLY)
def test_cuda_only_backends_rejected_on_cpu(backend):
    a, b, sizes = inputs()
    gs = torch.tensor(sizes)
    match = rf"backend='{backend}' runs on CUDA tensors only.*'auto' or 'loop'"
    calls = [
        lambda: ops.grouped_gemm_torch(a, b, gs, False, backend),
        lambda: ops.grouped_gemm_wgrad_torch(a, torch.ones(10, 4), gs, False, backend),
    ]
    if EXT:
        calls += [
            lambda: ops.grouped_gemm(a, b, gs, backend=backend),
            lambda: torch.ops.moe_parallel.grouped_gemm_wgrad(a, a, gs, False, backend),
        ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("trans_b", [False, True])
def test_loop_and_auto_agree_on_cpu(trans_b):
    a, b, sizes = inputs(1)
    if trans_b:
        b = b.transpose(1, 2).contiguous()
    grads = []
    for backend in ("auto", "loop"):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = ops.grouped_gemm(aa, bb, sizes, trans_b, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append((out.detach(), aa.grad, bb.grad))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    ref = a[:3] @ (b[0].T if trans_b else b[0])
    torch.testing.assert_close(grads[0][0][:3], ref)


@needs_ext
def test_backward_uses_the_forward_backend():
    """The autograd formula calls grouped_gemm (dgrad) and grouped_gemm_wgrad with the backend
    the forward was called with."""
    a, b, sizes = inputs(2)
    a.requires_grad_()
    b.requires_grad_()
    out = ops.grouped_gemm(a, b, sizes, backend="loop")
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(func).startswith("moe_parallel.grouped_gemm"):
                seen.append((str(func), args[4] if len(args) > 4 else kwargs.get("backend")))
            return func(*args, **kwargs)

    with Record():
        out.sum().backward()
    assert sorted(seen) == [
        ("moe_parallel.grouped_gemm.default", "loop"),
        ("moe_parallel.grouped_gemm_wgrad.default", "loop"),
    ]


@needs_ext
def test_opcheck_with_backend():
    a, b, sizes = inputs(3)
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    gs = torch.tensor(sizes)
    torch.library.opcheck(torch.ops.moe_parallel.grouped_gemm.default, (a, b, gs, False, "loop"))
    go = torch.randn(a.shape[0], 4, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.moe_parallel.grouped_gemm_wgrad.default, (a.detach(), go, gs, True, "loop")
    )


@needs_ext
def test_fake_kernel_checks_backend():
    meta = torch.device("meta")
    a, b = torch.empty(5, 4, device=meta), torch.empty(3, 4, 6, device=meta)
    gs = torch.tensor([2, 0, 3])
    assert torch.ops.moe_parallel.grouped_gemm(a, b, gs, False, "loop").shape == (5, 6)
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.moe_parallel.grouped_gemm(a, b, gs, False, "nope")
    with pytest.raises(ValueError, match="backend='cublas' runs on CUDA tensors only"):
        torch.ops.moe_parallel.grouped_gemm(a, b, gs, False, "cublas")


def test_config_validates_backend():
    with pytest.raises(ValueError, match="grouped_gemm_backend must be one of"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, grouped_gemm_backend="fast")
    assert MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2).grouped_gemm_backend == "auto"


def test_layer_on_cpu_with_each_backend():
    """MoELayer on CPU: "loop" gives the bits of "auto"; a CUDA-only backend raises on the first
    forward, naming it."""
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    outs = []
    for backend in ("auto", "loop"):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(**base, grouped_gemm_backend=backend))
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**base, grouped_gemm_backend="cublas"))
    with pytest.raises(ValueError, match="backend='cublas' runs on CUDA tensors only"):
        layer(x)


@needs_ext
def test_cuda_build_has_every_backend():
    """A CUDA build of the extension (CI's: torch with CUDA, nvcc) links the cuBLAS grouped GEMM
    and contains the CUTLASS grouped kernels, so a broken backend source fails here even without
    a GPU."""
    from moe_parallel import _C

    data = Path(_C.__file__).read_bytes()
    if b"swiglu_kernel" not in data:  # CPU-only build (MOE_PARALLEL_NO_CUDA=1 or no nvcc)
        pytest.skip("the extension was built without CUDA")
    assert b"cublasGemmGroupedBatchedEx" in data
    assert b"GemmGrouped" in data, "the CUTLASS grouped GEMM was not built (headers missing?)"
