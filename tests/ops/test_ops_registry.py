"""What all the moe_parallel ops share: the public functions reach the compiled ops,
torch.library.opcheck of the registered ops (schema, autograd registration, fake kernels,
aot_dispatch_dynamic), the fake kernels' shapes on meta tensors, loading the extension and the
fallback to the twins without it, and bitwise determinism of a chain of ops forward and backward.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

import moe_parallel
from moe_parallel import ops
from moe_parallel.ops import extension
from tests.helpers.op_helpers import (
    H,
    bitwise_equal,
    gemm_inputs,
    gen,
    make_routing,
    needs_ext,
    randn,
    ref_permute,
    unpermute_inputs,
)

# ---------------------------------------------------------------- compiled-op glue


def _dispatched_ops(fn):
    """Names of the ops that reach the dispatcher's Python mode while running ``fn``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@needs_ext
def test_public_functions_call_compiled_ops():
    expert_idx, keep, E = make_routing(6, 2, seed=1, drop=0.2)
    x = randn(6, H, seed=1, requires_grad=True)
    a, b, sizes = gemm_inputs(torch.float32, "ragged_with_empty", False)

    def run():
        y, row_map, _ = ops.permute(x, expert_idx, E, keep)
        ops.unpermute(ops.sort_chunks(y, [y.shape[0]], [0]), row_map).sum().backward()
        y2, row_map2, _ = ops.permute(x.detach(), expert_idx, E, keep)
        probs = torch.rand(row_map2.shape, dtype=torch.float32, requires_grad=True)
        ops.unpermute(y2.requires_grad_(), row_map2, probs).sum().backward()  # unpermute_backward
        ops.grouped_gemm(a.requires_grad_(), b.requires_grad_(), sizes).sum().backward()
        _, br, bc, rp, _, _ = ops.block_topology(torch.tensor([3, 0, 2]), 2, 2)
        xb = randn(6, 3, seed=2, requires_grad=True)
        w1, w2 = randn(3, 3, 4, seed=3, requires_grad=True), randn(3, 4, 3, seed=4)
        blocks = ops.bsr_sdd(xb, w1, br, bc, 2)
        ops.bsr_dsd(blocks, w2.requires_grad_(), rp, bc, 6).sum().backward()  # uses bsr_wgrad
        ops.swiglu(randn(3, 4, seed=5, requires_grad=True)).sum().backward()
        ops.clamped_swiglu(randn(3, 4, seed=6, requires_grad=True), 1.702, 7.0).sum().backward()
        ops.expert_dropout(randn(5, 4, seed=7, requires_grad=True), torch.arange(5) * 977,
                           [2, 3], 0, 0, 0.3).sum().backward()

    seen = set(_dispatched_ops(run))
    for name in ops.OP_NAMES:
        assert f"moe_parallel.{name}.default" in seen, (name, sorted(seen))


def _opcheck_samples():
    """(op name, args, kwargs) covering every op, with and without optional arguments."""
    f64 = torch.float64
    samples = []
    for pad_to, drop in [(0, 0.0), (0, 0.3), (8, 0.3)]:
        expert_idx, keep, E = make_routing(7, 2, seed=31 + pad_to, drop=drop)
        x = randn(7, 4, dtype=f64, seed=14, requires_grad=True)
        samples.append(("permute", (x, expert_idx, E, keep, pad_to), {}))
    for probs_kind in ["none", "float32"]:
        y, row_map, probs = unpermute_inputs(torch.float32, 2, probs_kind, "slack", seed=5)
        y.requires_grad_()
        if probs is not None:
            probs.requires_grad_()
        kw = dict(y=y, row_map=row_map, probs=probs, num_tokens=row_map.shape[0])
        samples.append(("unpermute", (), kw))
        grad_out = randn(row_map.shape[0], H, seed=15)
        args = (
            grad_out,
            y.detach(),
            row_map,
            None if probs is None else probs.detach(),
            y.shape[0],
        )
        samples.append(("unpermute_backward", args, {}))
    for sizes, order in [([2, 0, 3, 1], [3, 1, 0, 2]), ([0, 0], [1, 0])]:
        x = randn(sum(sizes), 3, dtype=f64, seed=16, requires_grad=True)
        samples.append(("sort_chunks", (x, torch.tensor(sizes), torch.tensor(order)), {}))
    for case, trans_b in [
        ("ragged_with_empty", False),
        ("ragged_with_empty", True),
        ("m_zero", True),
    ]:
        a, b, sizes = gemm_inputs(f64, case, trans_b, seed=3)
        gs = torch.tensor(sizes)
        samples.append(("grouped_gemm", (a.requires_grad_(), b.requires_grad_(), gs, trans_b), {}))
        grad_out = randn(a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=f64, seed=17)
        samples.append(("grouped_gemm_wgrad", (a.detach(), grad_out, gs, trans_b), {}))
    return samples


OPCHECK_SAMPLES = _opcheck_samples()


@needs_ext
@pytest.mark.parametrize(
    "name,args,kwargs",
    OPCHECK_SAMPLES,
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(OPCHECK_SAMPLES)],
)
def test_opcheck(name, args, kwargs):
    # All default sub-tests apply: schema, autograd registration, fake tensor (permute's
    # data-dependent row count goes through ctx.new_dynamic_size()) and aot_dispatch_dynamic.
    op = getattr(torch.ops.moe_parallel, name).default
    torch.library.opcheck(op, args, kwargs)


@needs_ext
def test_fake_kernels_on_meta():
    """The registered fake kernels give the contract's output shapes on meta tensors."""
    meta = torch.device("meta")
    gs = torch.tensor([2, 0, 3])
    a = torch.empty(5, 4, device=meta)
    out = torch.ops.moe_parallel.grouped_gemm(a, torch.empty(3, 4, 6, device=meta), gs, False)
    assert out.shape == (5, 6) and out.device == meta
    out = torch.ops.moe_parallel.grouped_gemm(a, torch.empty(3, 6, 4, device=meta), gs, True)
    assert out.shape == (5, 6)
    wg = torch.ops.moe_parallel.grouped_gemm_wgrad(a, torch.empty(5, 6, device=meta), gs, True)
    assert wg.shape == (3, 6, 4)
    x = torch.empty(5, 4, device=meta)
    assert torch.ops.moe_parallel.sort_chunks(x, gs, torch.tensor([2, 1, 0])).shape == (5, 4)
    ei = torch.empty(5, 2, dtype=torch.int64, device=meta)
    permuted, row_map, tpe = torch.ops.moe_parallel.permute(x, ei, 3, None, 4)
    assert permuted.shape == (12, 4) and row_map.shape == (5, 2) and tpe.shape == (3,)
    y = torch.empty(12, 4, device=meta, dtype=torch.bfloat16)
    out = torch.ops.moe_parallel.unpermute(y=y, row_map=row_map, probs=None, num_tokens=5)
    assert out.shape == (5, 4) and out.dtype == torch.bfloat16
    probs = torch.empty(5, 2, device=meta)
    go = torch.empty(5, 4, device=meta, dtype=torch.bfloat16)
    gy, gp = torch.ops.moe_parallel.unpermute_backward(go, y, row_map, probs, 12)
    assert gy.shape == (12, 4) and gy.dtype == torch.bfloat16 and gp.shape == (5, 2)
    assert gp.dtype == torch.float32


# ---------------------------------------------------------------- extension loading


def _exec_fresh(name: str, path: str):
    """Execute the module file ``path`` afresh as module ``name`` (not put in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_extension_copy(monkeypatch, require: bool):
    """Execute ops/extension.py afresh with ``moe_parallel._C`` made unimportable."""
    monkeypatch.setitem(sys.modules, "moe_parallel._C", None)
    monkeypatch.delattr(moe_parallel, "_C", raising=False)
    if require:
        monkeypatch.setenv("MOE_PARALLEL_REQUIRE_EXTENSION", "1")
    else:
        monkeypatch.delenv("MOE_PARALLEL_REQUIRE_EXTENSION", raising=False)
    return _exec_fresh("moe_parallel.ops.extension", extension.__file__)


@pytest.mark.distributed
def test_missing_extension_falls_back_to_twins(monkeypatch):
    fallback_ext = _load_extension_copy(monkeypatch, require=False)
    assert not fallback_ext.has_extension()
    assert isinstance(fallback_ext.extension_error(), ImportError)
    # A fresh ops/permute.py bound to that extension module: its ``from .extension import ...``
    # finds the copy in sys.modules. (``ops.permute`` is the function, hence import_module.)
    monkeypatch.setitem(sys.modules, "moe_parallel.ops.extension", fallback_ext)
    permute_file = importlib.import_module("moe_parallel.ops.permute").__file__
    fallback = _exec_fresh("moe_parallel.ops._permute_without_ext", permute_file)
    expert_idx, keep, E = make_routing(5, 2, seed=2)
    x = randn(5, H, dtype=torch.float64, seed=2)
    out, row_map, tpe = fallback.permute(x, expert_idx, E, keep)
    r_out, r_row_map, r_tpe = ref_permute(x, expert_idx, E, keep, 0)
    assert torch.equal(out, r_out) and torch.equal(row_map, r_row_map)


@pytest.mark.distributed
def test_required_extension_raises_with_cause(monkeypatch):
    with pytest.raises(ImportError, match="MOE_PARALLEL_REQUIRE_EXTENSION.*_C") as info:
        _load_extension_copy(monkeypatch, require=True)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    """Two runs of every op, forward and backward, are bitwise equal."""
    expert_idx, keep, E = make_routing(40, 6, seed=41, drop=0.2)
    probs = torch.rand(40, 6, generator=gen(42))
    a_sizes = [7, 0, 13, 20]

    def run():
        x = randn(40, 16, dtype=dtype, seed=43, requires_grad=True)
        p = probs.clone().requires_grad_()
        b = randn(4, 16, 16, dtype=dtype, seed=44, requires_grad=True)
        y, row_map, tpe = ops.permute(x, expert_idx, E, keep)
        sizes = tpe.tolist()
        order = list(range(len(sizes)))[::-1]
        y = ops.sort_chunks(y, sizes, order)
        y = ops.sort_chunks(y, [sizes[i] for i in order], torch.argsort(torch.tensor(order)))
        out = ops.unpermute(y, row_map, p)
        h = ops.grouped_gemm(out, b, a_sizes, False)
        h = ops.grouped_gemm(h, b, a_sizes, True)
        h.pow(2).sum().backward()
        return [out, h, row_map, tpe, x.grad, p.grad, b.grad]

    first, second = run(), run()
    for u, v in zip(first, second):
        assert bitwise_equal(u, v)
