"""Block-sparse (dropless, MegaBlocks-style) expert ops: block_topology, bsr_sdd, bsr_dsd.

Forward against a dense block-diagonal-masked float64 product, backward through gradcheck
(float64) and torch.library.opcheck, bfloat16 against float64, the padding contract of the
SDD -> activation -> DSD chain, compiled ops against their twins, and bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops

EXT = ops.has_extension()
needs_ext = pytest.mark.skipif(not EXT, reason="moe_parallel._C not loaded; twins tested only")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


TOPOLOGY_IMPLS = [pytest.param(ops.block_topology_torch, id="twin")]
if EXT:
    TOPOLOGY_IMPLS.append(
        pytest.param(lambda c, b, n: torch.ops.moe_parallel.block_topology(c, b, n), id="ext")
    )
# (x, w -> blocks) and (blocks, w -> y) implementations: compiled ops (through the public
# functions when the extension is loaded) and the twins.
SDD_IMPLS = [pytest.param(ops.bsr_sdd_torch, id="twin"), pytest.param(ops.bsr_sdd, id="public")]
DSD_IMPLS = [pytest.param(ops.bsr_dsd_torch, id="twin"), pytest.param(ops.bsr_dsd, id="public")]


# ---- topology ----


@pytest.mark.parametrize("topo", TOPOLOGY_IMPLS)
def test_topology_small_case_written_out(topo):
    # E = 3, B = 2, n_col_blocks = 2: counts 3 (pads to 4), 0 (empty), 1 (pads to 2).
    po, br, bc, rp, cp, ti = topo(torch.tensor([3, 0, 1]), 2, 2)
    assert po.tolist() == [0, 4, 4, 6]
    # Row blocks: 0, 1 (expert 0), 2 (expert 2); expert 0 -> cols 0, 1; expert 2 -> cols 4, 5.
    assert br.tolist() == [0, 0, 1, 1, 2, 2]
    assert bc.tolist() == [0, 1, 0, 1, 4, 5]
    assert rp.tolist() == [0, 2, 4, 6]
    assert cp.tolist() == [0, 2, 4, 4, 4, 5, 6]
    assert ti.tolist() == [0, 2, 1, 3, 4, 5]
    for t in (po, br, bc, rp, cp, ti):
        assert t.dtype == torch.int64 and t.device.type == "cpu"


@pytest.mark.parametrize("topo", TOPOLOGY_IMPLS)
@pytest.mark.parametrize(
    "counts,block_size,ncb",
    [
        ([4, 8, 12], 4, 3),  # exact multiples of B
        ([1, 1, 1, 1], 4, 2),  # counts of 1
        ([0, 0, 5, 0], 2, 1),  # empty experts
        ([0, 0], 3, 2),  # all empty: nnz = 0
        ([7, 0, 1, 16, 3], 4, 2),
    ],
)
def test_topology_invariants(topo, counts, block_size, ncb):
    c = torch.tensor(counts, dtype=torch.int64)
    po, br, bc, rp, cp, ti = topo(c, block_size, ncb)
    padded = [-(-n // block_size) * block_size for n in counts]
    assert po.tolist() == [0] + torch.tensor(padded).cumsum(0).tolist()
    num_r = sum(padded) // block_size
    expert_of_row = [e for e, p in enumerate(padded) for _ in range(p // block_size)]
    want = [(r, expert_of_row[r] * ncb + j) for r in range(num_r) for j in range(ncb)]
    assert list(zip(br.tolist(), bc.tolist())) == want
    assert rp.tolist() == [r * ncb for r in range(num_r + 1)]
    assert cp.shape == (len(counts) * ncb + 1,)
    # CSC lists every block once, column by column, rows ascending within a column.
    assert sorted(ti.tolist()) == list(range(len(want)))
    for col in range(len(counts) * ncb):
        idx = ti[cp[col] : cp[col + 1]]
        assert (bc[idx] == col).all()
        assert br[idx].tolist() == sorted(br[idx].tolist())
    assert int(cp[-1]) == len(want)
    ref = ops.block_topology_torch(c, block_size, ncb)
    for a, b in zip((po, br, bc, rp, cp, ti), ref):
        assert torch.equal(a, b)


# ---- dense reference ----


def make_case(counts, block_size, K, N, K2, dtype=torch.float64, seed=0, pad_value=0.0):
    """Random expert-padded x [M_pad, K] (padding rows = pad_value * noise), w1 [E, K, N],
    w2 [E, N, K2] and the topology for N / B column blocks."""
    E = len(counts)
    topo = ops.block_topology_torch(torch.tensor(counts), block_size, N // block_size)
    po = topo[0]
    m_pad = int(po[-1])
    x = randn(m_pad, K, seed=seed)
    real = real_row_mask(counts, po)
    x[~real] *= pad_value
    w1 = randn(E, K, N, seed=seed + 1) / K**0.5
    w2 = randn(E, N, K2, seed=seed + 2) / N**0.5
    return x.to(dtype), w1.to(dtype), w2.to(dtype), topo


def real_row_mask(counts, padded_offsets):
    m = torch.zeros(int(padded_offsets[-1]), dtype=torch.bool)
    for e, c in enumerate(counts):
        m[int(padded_offsets[e]) : int(padded_offsets[e]) + c] = True
    return m


def dense_masked(x, w, padded_offsets):
    """Dense [M_pad, E*N] = x @ [w_0 | w_1 | ...] masked to the block diagonal (float64)."""
    E, _, N = w.shape
    full = x.double() @ w.double().permute(1, 0, 2).reshape(x.shape[1], E * N)
    mask = torch.zeros_like(full, dtype=torch.bool)
    for e in range(E):
        mask[int(padded_offsets[e]) : int(padded_offsets[e + 1]), e * N : (e + 1) * N] = True
    return full * mask


def dense_to_blocks(dense, block_row, block_col, B):
    return (
        torch.stack(
            [
                dense[r * B : (r + 1) * B, c * B : (c + 1) * B]
                for r, c in zip(block_row.tolist(), block_col.tolist())
            ]
        )
        if block_row.numel()
        else dense.new_zeros(0, B, B)
    )


COUNTS = [5, 0, 8, 1]  # ragged, an empty expert, an exact multiple of B = 4, a count of 1
B = 4


@pytest.mark.parametrize("sdd", SDD_IMPLS)
@pytest.mark.parametrize("dsd", DSD_IMPLS)
def test_forward_matches_dense_masked(sdd, dsd):
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case(COUNTS, B, K=6, N=8, K2=5, pad_value=1.0)
    dense = dense_masked(x, w1, po)
    blocks = sdd(x, w1, br, bc, B)
    assert rel_err(blocks, dense_to_blocks(dense, br, bc, B)) < 1e-12
    # DSD: y = dense_blockdiag(blocks) @ stacked w2 [E*N, K2].
    y = dsd(blocks, w2, rp, bc, x.shape[0])
    y_ref = dense @ w2.reshape(-1, w2.shape[2])
    assert rel_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case([37, 0, 64, 3], 16, K=32, N=64, K2=32)
    ref_blocks = ops.bsr_sdd_torch(x, w1, br, bc, 16)
    ref_y = ops.bsr_dsd_torch(ref_blocks, w2, rp, bc, x.shape[0])
    blocks = ops.bsr_sdd(x.to(dtype), w1.to(dtype), br, bc, 16)
    y = ops.bsr_dsd(blocks, w2.to(dtype), rp, bc, x.shape[0])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert blocks.dtype == dtype and y.dtype == dtype
    assert rel_err(blocks, ref_blocks) < tol
    assert rel_err(y, ref_y) < tol
    # Gradients of a random loss, low precision vs float64.
    xs = [t.detach().clone().requires_grad_() for t in (x.to(dtype), w1.to(dtype), w2.to(dtype))]
    xd = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    g = randn(x.shape[0], 32, seed=9)
    for (a, b1, b2), gg in ((xs, g.to(dtype)), (xd, g)):
        yy = ops.bsr_dsd(torch.relu(ops.bsr_sdd(a, b1, br, bc, 16)), b2, rp, bc, x.shape[0])
        (yy * gg).sum().backward()
    for lo, hi in zip(xs, xd):
        assert rel_err(lo.grad, hi.grad) < (3e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_extension_matches_twins_forward_backward(dtype):
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case([9, 0, 4, 1, 12], 4, K=6, N=8, K2=5, seed=3)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    outs = []
    for sdd, dsd in ((ops.bsr_sdd, ops.bsr_dsd), (ops.bsr_sdd_torch, ops.bsr_dsd_torch)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w1, w2)]
        blocks = sdd(leaves[0], leaves[1], br, bc, 4)
        y = dsd(torch.nn.functional.gelu(blocks), leaves[2], rp, bc, x.shape[0])
        (y * randn(*y.shape, seed=11).to(dtype)).sum().backward()
        outs.append([blocks, y] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert rel_err(a, b) < tol
    # wgrad op directly, both orientations.
    blocks = randn(br.shape[0], 4, 4, seed=5).to(dtype)
    for trans in (False, True):
        a = torch.ops.moe_parallel.bsr_wgrad(x.to(dtype), blocks, br, cp, ti, 5, trans)
        b = ops.bsr_wgrad_torch(x.to(dtype), blocks, br, cp, ti, 5, trans)
        assert a.shape == ((5, 8, 6) if trans else (5, 6, 8))
        assert rel_err(a, b) < tol


def test_empty_expert_weight_grads_are_zero_and_deterministic():
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case(COUNTS, B, K=6, N=8, K2=5, seed=4)
    grads = []
    for _ in range(2):
        a, b1, b2 = (t.clone().requires_grad_() for t in (x, w1, w2))
        ops.bsr_dsd(
            torch.tanh(ops.bsr_sdd(a, b1, br, bc, B)), b2, rp, bc, x.shape[0]
        ).square().sum().backward()
        grads.append((a.grad, b1.grad, b2.grad))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    assert (grads[0][1][1] == 0).all() and (grads[0][2][1] == 0).all()  # expert 1 is empty
    assert grads[0][1][0].abs().sum() > 0 and grads[0][2][2].abs().sum() > 0


def test_gradcheck_float64():
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case([3, 0, 2], 2, K=3, N=4, K2=3, seed=6)
    x, w1, w2 = (t.requires_grad_() for t in (x, w1, w2))
    m = x.shape[0]
    torch.autograd.gradcheck(lambda a, b: ops.bsr_sdd(a, b, br, bc, 2), (x, w1))
    blocks = randn(br.shape[0], 2, 2, seed=7).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ops.bsr_dsd(a, b, rp, bc, m), (blocks, w2))
    chain = lambda a, b1, b2: ops.bsr_dsd(torch.sin(ops.bsr_sdd(a, b1, br, bc, 2)), b2, rp, bc, m)  # noqa: E731
    torch.autograd.gradcheck(chain, (x, w1, w2))


@needs_ext
def test_opcheck():
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case([3, 0, 2], 2, K=3, N=4, K2=3, seed=8)
    m = x.shape[0]
    blocks = randn(br.shape[0], 2, 2, seed=7)
    for dtype in (torch.float64, torch.float32):
        xx, ww1, ww2, bb = (t.to(dtype).requires_grad_() for t in (x, w1, w2, blocks))
        torch.library.opcheck(torch.ops.moe_parallel.bsr_sdd.default, (xx, ww1, br, bc, 2))
        torch.library.opcheck(torch.ops.moe_parallel.bsr_dsd.default, (bb, ww2, rp, bc, m))
        for trans in (False, True):
            torch.library.opcheck(
                torch.ops.moe_parallel.bsr_wgrad.default,
                (xx.detach(), bb.detach(), br, cp, ti, 3, trans),
            )
    torch.library.opcheck(
        torch.ops.moe_parallel.block_topology.default,
        (torch.tensor([3, 0, 2]), 2, 2),
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_padding_rows_do_not_leak_into_real_rows():
    """Contract: padding rows of x may hold anything; the real rows of the SDD -> act -> DSD
    output and of grad_x depend on the real rows only. Padding rows of the output (non-zero when
    act(0) != 0 or x's padding is non-zero) are the caller's to zero; so are the weight
    gradients' padding contributions: zero the padding rows of x (or of grad_y) for those."""
    counts = [5, 0, 3, 1]
    x0, w1, w2, (po, br, bc, rp, cp, ti) = make_case(counts, B, K=6, N=8, K2=5, seed=10)
    real = real_row_mask(counts, po)
    noise = randn(*x0.shape, seed=12) * 100
    results = []
    for x in (x0, torch.where(real[:, None], x0, noise)):
        a, b1, b2 = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = ops.bsr_dsd(
            torch.nn.functional.silu(ops.bsr_sdd(a, b1, br, bc, B)), b2, rp, bc, x.shape[0]
        )
        y = y * real[:, None]  # the caller zeroes the padding rows of the output
        (y * randn(*y.shape, seed=13)).sum().backward()
        results.append((y, a.grad[real], b1.grad, b2.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda t: ops.block_topology(torch.tensor([1, -1]), 2, 1), "tokens_per_expert"),
        (lambda t: ops.block_topology(torch.tensor([1, 2]), 0, 1), "block_size"),
        (lambda t: ops.block_topology(torch.tensor([1.0, 2.0]), 2, 1), "tokens_per_expert"),
        (lambda t: ops.block_topology(torch.tensor([1, 2]), 2, 0), "n_col_blocks"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"], t["bc"], 0), "block_size"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"], t["bc"], 3), "block_size"),
        (lambda t: ops.bsr_sdd(t["x"][:6], t["w1"], t["br"], t["bc"], 4), "x"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"].float(), t["br"], t["bc"], 4), "w"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"][:, :5], t["br"], t["bc"], 4), "w"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"][..., :6], t["br"], t["bc"], 4), "w.size\\(2\\)"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"] + 100, t["bc"], 4), "block_row"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"], t["bc"] + 100, 4), "block_col"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"], t["bc"][:-1], 4), "block_col"),
        (lambda t: ops.bsr_sdd(t["x"], t["w1"], t["br"].int(), t["bc"], 4), "block_row"),
        (lambda t: ops.bsr_dsd(t["blocks"], t["w2"], t["rp"], t["bc"], 7), "num_rows"),
        (lambda t: ops.bsr_dsd(t["blocks"], t["w2"], t["rp"], t["bc"], 4), "row_ptr"),
        (
            lambda t: ops.bsr_dsd(t["blocks"], t["w2"][:, :6], t["rp"], t["bc"], t["m"]),
            "w.size\\(1\\)",
        ),
        (lambda t: ops.bsr_dsd(t["blocks"][:, :, :3], t["w2"], t["rp"], t["bc"], t["m"]), "blocks"),
        (lambda t: ops.bsr_dsd(t["blocks"], t["w2"], t["rp"] * 2, t["bc"], t["m"]), "row_ptr"),
        (lambda t: ops.bsr_dsd(t["blocks"], t["w2"], t["rp"], t["bc"] - 100, t["m"]), "block_col"),
        (lambda t: ops.bsr_dsd(t["blocks"], t["w2"].float(), t["rp"], t["bc"], t["m"]), "w"),
    ],
)
@pytest.mark.parametrize("twin", [False, True], ids=["public", "twin"])
def test_bad_inputs_name_the_argument(call, match, twin, monkeypatch):
    if twin:  # the public functions fall back to the twins
        monkeypatch.setattr(ops, "has_extension", lambda: False)
    x, w1, w2, (po, br, bc, rp, cp, ti) = make_case(COUNTS, B, K=6, N=8, K2=5)
    t = dict(x=x, w1=w1, w2=w2, br=br, bc=bc, rp=rp, m=x.shape[0])
    t["blocks"] = randn(br.shape[0], B, B)
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(t)
