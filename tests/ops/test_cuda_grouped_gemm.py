"""Every CUDA backend of grouped_gemm / grouped_gemm_wgrad (loop, streams, cublas, torch, cutlass)
against float64 references and the per-group loop: ragged groups with empty ones, one group,
no rows, 64 groups, a large bf16 case; forward, the wgrad op and both gradients through
autograd, with trans_b. Freed allocator blocks are filled with 0x7F bytes first, so rows a
backend forgets to write show up. Unsupported dtypes and shapes raise, naming the backend, before
any kernel runs."""

from __future__ import annotations

import os

import pytest
import torch

from moe_parallel import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not ops.has_extension(), reason=f"moe_parallel._C not loaded ({ops.extension_error()!r})"
    ),
]

DEV = "cuda"
BACKENDS = ("loop", "streams", "cublas", "torch", "cutlass")
DTYPES = {
    "loop": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "streams": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cublas": (torch.float32, torch.bfloat16, torch.float16),
    "torch": (torch.bfloat16,),
    "cutlass": (torch.bfloat16,),
}
# Relative-norm error bounds against float64 of the same (rounded) inputs.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = {
    "ragged_with_empty": [37, 0, 64, 5, 0, 130],
    "single": [96],
    "no_rows": [0, 0, 0],
    "groups64": None,  # 64 random sizes in [0, 40], about a fifth of them empty
}
K, N = 64, 48  # multiples of 8, as the bf16 grouped kernels need
# Set by benchmarks/device_session.sh for its compute-sanitizer run, where the profiler records
# no kernels: the kernel-name checks are left to the plain run there.
UNDER_SANITIZER = os.environ.get("MOE_PARALLEL_UNDER_SANITIZER") == "1"


def sizes_of(case: str) -> list[int]:
    if CASES[case] is not None:
        return CASES[case]
    g = torch.Generator().manual_seed(5)
    s = torch.randint(0, 41, (64,), generator=g)
    s[torch.rand(64, generator=g) < 0.2] = 0
    return s.tolist()


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """CPU N(0,1) values shifted away from 0 (|v| >= 0.05), rounded to dtype."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (t + 0.05 * torch.where(t >= 0, 1.0, -1.0)).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert tuple(out.shape) == tuple(ref.shape), (tuple(out.shape), tuple(ref.shape))
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm()) if ref.norm() > 0 else float(out.norm())


def cuda_kernels(fn):
    """fn() under the CUDA profiler (synchronized before it stops): (its result, the names of
    the CUDA kernels and copies it ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, [e.name for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA]


def poison_allocator() -> None:
    for size in (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24):
        blocks = [torch.full((size,), 0x7F, dtype=torch.uint8, device=DEV) for _ in range(3)]
        del blocks


def references(a, b, sizes, trans_b, grad):
    """float64 (out, grad_a, grad_b) of out_g = a_g @ b[g] (b[g]^T with trans_b), per group."""
    bd = b.double().transpose(1, 2) if trans_b else b.double()  # [G, K, N]
    a_g, g_g = torch.split(a.double(), sizes), torch.split(grad.double(), sizes)
    out = torch.cat([x @ w for x, w in zip(a_g, bd)])
    grad_a = torch.cat([g @ w.t() for g, w in zip(g_g, bd)])
    grad_b = torch.stack([x.t() @ g for x, g in zip(a_g, g_g)])
    return out, grad_a, grad_b.transpose(1, 2) if trans_b else grad_b


def needs_sm90(backend: str) -> None:
    if backend == "torch" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm's fast path needs sm_90")


PARAMS = [
    (be, dt, case)
    for be in BACKENDS
    for dt in DTYPES[be]
    for case in CASES
]


@pytest.mark.parametrize("backend,dtype,case", PARAMS, ids=[f"{b}-{d}-{c}" for b, d, c in PARAMS])
@pytest.mark.parametrize("trans_b", [False, True])
def test_backend_matches_float64(backend, dtype, case, trans_b):
    needs_sm90(backend)
    sizes = sizes_of(case)
    G, Mrows = len(sizes), sum(sizes)
    a = randn(Mrows, K, dtype=dtype, seed=1)
    b = randn(*((G, N, K) if trans_b else (G, K, N)), dtype=dtype, seed=2)
    grad = randn(Mrows, N, dtype=dtype, seed=3)
    gs = torch.tensor(sizes, dtype=torch.int64)
    r_out, r_ga, r_gb = references(a, b, sizes, trans_b, grad)
    bound = TOL[dtype]

    poison_allocator()
    a_d = a.to(DEV).requires_grad_(True)
    b_d = b.to(DEV).requires_grad_(True)
    out = ops.grouped_gemm(a_d, b_d, gs, trans_b, backend=backend)
    assert out.is_cuda and out.dtype == dtype and out.shape == (Mrows, N)
    out.backward(grad.to(DEV))
    if Mrows == 0:
        assert out.numel() == 0
        assert bool((b_d.grad == 0).all())
        return
    assert rel_err(out, r_out) < bound
    assert rel_err(a_d.grad, r_ga) < bound
    assert rel_err(b_d.grad, r_gb) < bound

    wg = torch.ops.moe_parallel.grouped_gemm_wgrad(
        a.to(DEV), grad.to(DEV), gs, trans_b, backend
    )
    assert wg.shape == b.shape and wg.dtype == dtype
    assert rel_err(wg, r_gb) < bound
    for g, s in enumerate(sizes):
        if s == 0:
            assert bool((wg[g] == 0).all()), f"group {g} is empty but its gradient is not zero"

    loop = ops.grouped_gemm(a.to(DEV), b.to(DEV), gs, trans_b, backend="loop")
    assert rel_err(out, loop) < bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_large_bf16(backend):
    """Mixtral-like shape at small scale: 8 skewed groups, 8192 rows, H=1024, 2F=2048."""
    needs_sm90(backend)
    sizes = [2900, 1700, 1200, 900, 700, 500, 292, 0]
    a = (torch.randn(sum(sizes), 1024, device=DEV) * 0.5).to(torch.bfloat16)
    b = (torch.randn(8, 1024, 2048, device=DEV) * 1024**-0.5).to(torch.bfloat16)
    gs = torch.tensor(sizes)
    out = ops.grouped_gemm(a, b, gs, backend=backend)
    rows = list(torch.split(a.double(), sizes))
    ref = torch.cat([r @ w for r, w in zip(rows, b.double())])
    assert rel_err(out, ref) < 1e-2
    go = torch.randn_like(out)
    wg = torch.ops.moe_parallel.grouped_gemm_wgrad(a, go, gs, False, backend)
    ref_wg = torch.stack([r.t() @ g for r, g in zip(rows, torch.split(go.double(), sizes))])
    assert rel_err(wg, ref_wg) < 1e-2


# Shape class -> (group sizes, K, N, the Hopper kernel schedule its mean problem selects for the
# forward and the wgrad): "wide" mean problems (m and n > 128) take the cooperative 128x256 tile,
# "thin" ones the pingpong 64x128 tile (csrc/cuda/grouped_gemm_sm90.cu).
HOPPER = {
    "wide": ([700, 0, 1300, 261], 512, 384, "Cooperative"),
    "thin": ([40, 0, 90, 17, 5], 256, 96, "Pingpong"),
}


SCHEDULE_OF_TILE = {"cooperative": "Cooperative", "pingpong": "Pingpong",
                    "pingpong_thin": "Pingpong"}


def needs_hopper() -> None:
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper kernels run on sm_90 only")


@pytest.mark.parametrize("tile", ["", *SCHEDULE_OF_TILE])
@pytest.mark.parametrize("shape", sorted(HOPPER))
@pytest.mark.parametrize("trans_b", [False, True])
def test_cutlass_runs_hopper_kernels_on_sm90(shape, trans_b, tile, monkeypatch):
    """On sm_90 backend 'cutlass' launches one CUTLASS 3.x ptr-array kernel per product, with the
    tile schedule of its shape class (or the one MOE_PARALLEL_SM90_TILE forces), and matches
    float64."""
    needs_hopper()
    monkeypatch.setenv("MOE_PARALLEL_SM90_TILE", tile)
    sizes, k, n, schedule = HOPPER[shape]
    schedule = SCHEDULE_OF_TILE.get(tile, schedule)
    G, rows = len(sizes), sum(sizes)
    a = randn(rows, k, dtype=torch.bfloat16, seed=11)
    b = randn(*((G, n, k) if trans_b else (G, k, n)), dtype=torch.bfloat16, seed=12)
    grad = randn(rows, n, dtype=torch.bfloat16, seed=13)
    gs = torch.tensor(sizes)
    r_out, _, r_gb = references(a, b, sizes, trans_b, grad)
    poison_allocator()
    (out, wg), kernels = cuda_kernels(lambda: (
        ops.grouped_gemm(a.to(DEV), b.to(DEV), gs, trans_b, backend="cutlass"),
        torch.ops.moe_parallel.grouped_gemm_wgrad(a.to(DEV), grad.to(DEV), gs, trans_b, "cutlass"),
    ))
    if not UNDER_SANITIZER:
        hopper = [name for name in kernels if "Sm90Array" in name]
        assert len(hopper) == 2, f"expected two CUTLASS 3.x Hopper kernels, ran: {kernels}"
        assert all(f"KernelPtrArrayTmaWarpSpecialized{schedule}" in name for name in hopper), \
            hopper
    assert rel_err(out, r_out) < TOL[torch.bfloat16]
    assert rel_err(wg, r_gb) < TOL[torch.bfloat16]
    assert bool((wg[sizes.index(0)] == 0).all()), "the empty group's gradient is not zero"


def test_cutlass_rejects_unknown_sm90_tile(monkeypatch):
    needs_hopper()
    monkeypatch.setenv("MOE_PARALLEL_SM90_TILE", "128x256")
    a = randn(10, K, dtype=torch.bfloat16, seed=14).to(DEV)
    b = randn(2, K, N, dtype=torch.bfloat16, seed=15).to(DEV)
    assert_raises_before_kernels(
        r"MOE_PARALLEL_SM90_TILE must be unset, 'cooperative', 'pingpong' or 'pingpong_thin'",
        lambda: ops.grouped_gemm(a, b, [4, 6], backend="cutlass"),
    )


def runs_hopper_kernels(a: torch.Tensor, b: torch.Tensor, sizes: torch.Tensor) -> bool:
    """Whether backend 'cutlass' runs the CUTLASS 3.x Hopper kernel on this device and build."""
    _, kernels = cuda_kernels(lambda: ops.grouped_gemm(a, b, sizes, backend="cutlass"))
    return any("Sm90Array" in name for name in kernels)


@pytest.mark.parametrize("groups", [8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_picks_one_launch_for_many_bf16_groups(groups, dtype):
    """"auto" is one grouped launch for bfloat16 on sm_90+ with >= 16 groups, else the loop: the
    forward is torch._grouped_mm, the wgrad CUTLASS where its Hopper kernels run, else
    torch._grouped_mm. Its forward and wgrad are bitwise those of the backend each resolves to,
    and its forward launches what that backend launches."""
    if UNDER_SANITIZER:
        pytest.skip("the choice is read from profiled kernel names")
    sizes = torch.randint(1, 200, (groups,), generator=torch.Generator().manual_seed(groups))
    a = randn(int(sizes.sum()), 256, dtype=dtype, seed=11).to(DEV)
    b = randn(groups, 256, 512, dtype=dtype, seed=12).to(DEV)
    go = randn(int(sizes.sum()), 512, dtype=dtype, seed=13).to(DEV)
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    one_launch = dtype == torch.bfloat16 and sm90 and groups >= 16
    expect = "torch" if one_launch else "loop"
    expect_wgrad = "cutlass" if one_launch and runs_hopper_kernels(a, b, sizes) else expect

    auto_out = ops.grouped_gemm(a, b, sizes, backend="auto")
    auto_wgrad = torch.ops.moe_parallel.grouped_gemm_wgrad(a, go, sizes, False, "auto")
    assert torch.equal(auto_out, ops.grouped_gemm(a, b, sizes, backend=expect))
    assert torch.equal(
        auto_wgrad, torch.ops.moe_parallel.grouped_gemm_wgrad(a, go, sizes, False, expect_wgrad)
    )
    # The forward's kernels tell the two apart: one grouped launch (and its set-up), or one
    # GEMM per group.
    _, names = cuda_kernels(lambda: ops.grouped_gemm(a, b, sizes, backend="auto"))
    kernels = [name for name in names if "emcpy" not in name]
    assert (len(kernels) <= 3) if one_launch else (len(kernels) >= groups), kernels


def test_cublas_float32_without_tf32_is_float32_exact():
    """TF32 only when torch allows it: with it off, the cuBLAS backend meets the fp32 bound."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        sizes = [300, 0, 211]
        a = randn(511, 256, dtype=torch.float32, seed=4)
        b = randn(3, 256, 128, dtype=torch.float32, seed=5)
        out = ops.grouped_gemm(a.to(DEV), b.to(DEV), sizes, backend="cublas")
        ref, _, _ = references(a, b, sizes, False, torch.zeros(511, 128))
        assert rel_err(out, ref) < 1e-6
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def assert_raises_before_kernels(match: str, fn) -> None:
    def call() -> None:
        with pytest.raises(ValueError, match=match):
            fn()

    _, kernels = cuda_kernels(call)
    gemm = [k for k in kernels if "gemm" in k.lower() or "cutlass" in k.lower()]
    assert not gemm, f"GEMM kernels ran before the error: {gemm}"


BAD = {
    "torch_float32": ("torch", torch.float32, K, r"backend='torch'.*bfloat16"),
    "cutlass_float16": ("cutlass", torch.float16, K, r"backend='cutlass'.*bfloat16"),
    "cublas_float64": ("cublas", torch.float64, K, r"backend='cublas'.*float32"),
    "cutlass_k_not_multiple_of_8": ("cutlass", torch.bfloat16, 20, r"backend='cutlass'.*\bK\b"),
    "unknown": ("cuBLAS", torch.float32, K, r"backend must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_backend_bad_input(case):
    backend, dtype, k, match = BAD[case]
    a = randn(10, k, dtype=dtype, seed=6).to(DEV)
    b = randn(2, k, N, dtype=dtype, seed=7).to(DEV)
    go = randn(10, N, dtype=dtype, seed=8).to(DEV)
    assert_raises_before_kernels(match, lambda: ops.grouped_gemm(a, b, [4, 6], backend=backend))
    wgrad = torch.ops.moe_parallel.grouped_gemm_wgrad
    assert_raises_before_kernels(
        match, lambda: wgrad(a, go, torch.tensor([4, 6]), False, backend)
    )
