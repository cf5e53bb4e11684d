"""The expert dropout op (``ops.expert_dropout``): a mask that is a pure function of (row hash,
global expert, global hidden unit).

* The twin's hash equals the specification written with Python integers (csrc/dropout_hash.h),
  element by element; the compiled op equals the twin bitwise (float32/64, bfloat16, float16;
  ragged groups with empty ones; offsets) and does not depend on the thread count.
* The drop rate is within 5 binomial standard deviations of p; neighbouring units, rows and
  experts are uncorrelated; the kept values are exactly ``a · s`` (s = 1/(1-p) in the math type).
* The mask depends only on (hash, expert, unit): permuting rows permutes the result, padding
  rows or splitting the groups over calls (EP) or the columns over calls (ETP) changes nothing.
* Backward is the op on the gradient (bitwise); opcheck; bad input raises ValueError naming it.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops
from moe_parallel.ops import dropout as dropout_ops

EXT = ops.has_extension()
needs_ext = pytest.mark.skipif(not EXT, reason="moe_parallel._C has no expert_dropout; "
                                               "twin tested only")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
M32 = 0xFFFFFFFF


def spec_bits(u: int, e: int, j: int) -> int:
    """bits(u, e, j) of csrc/dropout_hash.h with Python integers (an independent transcription
    of the specification)."""
    def mix(x):
        x &= M32
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & M32
        x ^= x >> 15
        x = (x * 0x735A2D97) & M32
        return x ^ (x >> 15)

    key = mix((u & M32) ^ mix(e * 0x9E3779B9 + 0x7F4A7C15))
    return mix(key + j * 0x85EBCA77)


def inputs(sizes, F, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    a = (torch.randn(N, F, generator=g, dtype=torch.float64) * 2).to(dtype)
    row_hash = torch.randint(0, 2**32, (N,), generator=g, dtype=torch.int64)
    return a, row_hash, torch.tensor(sizes, dtype=torch.int64)


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(
        x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------- the hash and the twin


def test_twin_mask_equals_the_integer_specification():
    sizes, F, first, offset, p = [3, 0, 4, 2], 7, 5, 11, 0.4
    _, row_hash, gs = inputs(sizes, F, seed=1)
    row_hash[0], row_hash[1] = 0, 2**32 - 1  # the ends of the range
    row_hash[2] = -3  # negative: taken mod 2^32 (two's complement)
    keep = dropout_ops.expert_dropout_keep_torch(row_hash, gs, first, offset, F, p)
    experts = [first + g for g, n in enumerate(sizes) for _ in range(n)]
    thr = int(p * 2**32)
    want = torch.tensor([[spec_bits(int(row_hash[r]), experts[r], offset + j) >= thr
                          for j in range(F)] for r in range(len(experts))])
    assert torch.equal(keep, want)
    assert 0 < int(keep.sum()) < keep.numel()


def test_mul32_and_mix32_have_no_int64_overflow():
    x = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 1, 0x9E3779B9], dtype=torch.int64)
    for c in (0x21F0AAAD, 0x735A2D97, 0x9E3779B9, 0x85EBCA77, M32):
        assert dropout_ops._mul32(x, c).tolist() == [(int(v) * c) & M32 for v in x]
    assert dropout_ops.mix32_torch(x).tolist() == [dropout_ops.mix32(int(v)) for v in x]


def test_token_hash_and_stream_key_follow_the_docstring():
    mix = dropout_ops.mix32
    seed, step, layer = 2**40 + 7, 2**33 + 5, 3
    k = mix((layer & M32) ^ 0x6A09E667)
    k = mix(k + (step & M32))
    k = mix(k ^ (step >> 32))
    k = mix(k + (seed & M32))
    k = mix(k ^ (seed >> 32))
    assert dropout_ops.stream_key(seed, step, layer) == k
    s = torch.tensor([0, 5, 2**31 - 1, 2**35 + 9])
    q = torch.tensor([0, 3, 2**32 - 1, 2**33])
    got = ops.token_hash(torch.tensor(k), s, q)
    want = []
    for si, qi in zip(s.tolist(), q.tolist()):
        h = mix(k ^ (si & M32))
        h = mix(h + ((si >> 32) & M32))
        h = mix(h ^ (qi & M32))
        want.append(mix(h + ((qi >> 32) & M32)))
    assert got.tolist() == want
    assert ops.token_hash(k, s, q).tolist() == want  # a host-int key: the same


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_keeps_exactly_a_times_the_scale(dtype):
    a, row_hash, gs = inputs([5, 0, 9], 6, dtype, seed=2)
    p = 0.3
    out = ops.expert_dropout_torch(a, row_hash, gs, 2, 4, p)
    keep = dropout_ops.expert_dropout_keep_torch(row_hash, gs, 2, 4, 6, p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1 / (1 - p), dtype=acc)
    assert bitwise_equal(out[keep], (a[keep].to(acc) * scale).to(dtype))
    assert torch.all(out[~keep] == 0) and bool((~keep).any()) and bool(keep.any())


# ---------------------------------------------------------------- compiled op == twin


SIZES = [[4, 0, 7, 1, 0, 5], [0, 0, 3], [1], [40, 0, 23], []]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(map(str, s)) or "none")
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.95])
def test_op_equals_twin_bitwise(dtype, sizes, p):
    F = 13
    a, row_hash, gs = inputs(sizes, F, dtype, seed=len(sizes))
    got = torch.ops.moe_parallel.expert_dropout(a, row_hash, gs, 3, 24, p)
    want = ops.expert_dropout_torch(a, row_hash, gs, 3, 24, p)
    assert bitwise_equal(got, want)
    assert bitwise_equal(ops.expert_dropout(a, row_hash, gs, 3, 24, p), want)


@needs_ext
def test_op_result_does_not_depend_on_threads():
    a, row_hash, gs = inputs([300, 0, 500, 224], 64, torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.expert_dropout(a, row_hash, gs, 0, 0, 0.25)
        torch.set_num_threads(max(2, before))
        many = ops.expert_dropout(a, row_hash, gs, 0, 0, 0.25)
    finally:
        torch.set_num_threads(before)
    assert bitwise_equal(one, many)


@needs_ext
def test_op_on_non_contiguous_input():
    a, row_hash, gs = inputs([3, 6], 10, seed=4)
    wide = torch.randn(9, 20, dtype=torch.float64)[:, ::2]
    assert not wide.is_contiguous()
    assert bitwise_equal(ops.expert_dropout(wide, row_hash, gs, 1, 0, 0.5),
                         ops.expert_dropout_torch(wide.contiguous(), row_hash, gs, 1, 0, 0.5))


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_drop_rate_within_binomial_bounds(p):
    sizes, F = [150, 0, 250], 128
    a = torch.ones(sum(sizes), F, dtype=torch.float64)
    _, row_hash, gs = inputs(sizes, 1, seed=5)
    out = ops.expert_dropout(a, row_hash, gs, 7, 0, p)
    dropped = (out == 0).double()
    n = dropped.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.mean()) - p) < 5 * sigma
    assert torch.all((out == 0) | (out == 1 / (1 - p)))
    # every row and every unit sees drops at about the rate (no degenerate row or column)
    assert float(dropped.mean(1).min()) > 0 and float(dropped.mean(0).min()) > 0


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_masks_of_neighbours_are_uncorrelated():
    """Adjacent units, adjacent row hashes (consecutive positions) and adjacent experts."""
    N, F, p = 400, 64, 0.5
    row_hash = ops.token_hash(ops.stream_key(0, 0, 0), torch.zeros(N, dtype=torch.int64),
                              torch.arange(N))
    keep = dropout_ops.expert_dropout_keep_torch(row_hash, [N], 0, 0, F, p)
    other = dropout_ops.expert_dropout_keep_torch(row_hash, [N], 1, 0, F, p)
    bound = 5 / (N * F) ** 0.5
    assert abs(_corr(keep[:, 1:], keep[:, :-1])) < bound
    assert abs(_corr(keep[1:], keep[:-1])) < bound
    assert abs(_corr(keep, other)) < bound


# ---------------------------------------------------------------- invariances


def test_permuting_rows_within_groups_permutes_the_result():
    sizes, F = [6, 0, 9, 4], 11
    a, row_hash, gs = inputs(sizes, F, seed=6)
    starts = [0, 6, 6, 15, 19]
    perm = torch.cat([torch.randperm(starts[g + 1] - starts[g],
                                     generator=torch.Generator().manual_seed(g)) + starts[g]
                      for g in range(4)])
    assert not torch.equal(perm, torch.arange(19))
    out = ops.expert_dropout(a, row_hash, gs, 2, 5, 0.4)
    permuted = ops.expert_dropout(a[perm], row_hash[perm], gs, 2, 5, 0.4)
    assert bitwise_equal(permuted, out[perm])


def test_padding_and_splitting_over_ranks_change_nothing():
    """EP: each expert's rows computed alone (first_expert = its id) or with padding rows in
    between; ETP: each column slice with unit_offset = its first unit."""
    sizes, F, p = [5, 3, 0, 6], 12, 0.35
    a, row_hash, gs = inputs(sizes, F, seed=7)
    full = ops.expert_dropout(a, row_hash, gs, 4, 0, p)
    rows = list(zip(a.split(sizes), row_hash.split(sizes)))
    for g, (ag, hg) in enumerate(rows):  # one expert per call, as on its EP rank
        assert bitwise_equal(ops.expert_dropout(ag, hg, [sizes[g]], 4 + g, 0, p),
                             full.split(sizes)[g])
    for q in range(3):  # ETP: columns [4q, 4q + 4)
        part = ops.expert_dropout(a[:, 4 * q:4 * q + 4].contiguous(), row_hash, gs, 4, 4 * q, p)
        assert bitwise_equal(part, full[:, 4 * q:4 * q + 4])
    # two zero padding rows after each expert's rows, hashes 0
    pad = torch.zeros(2, F, dtype=a.dtype)
    padded = torch.cat([torch.cat([ag, pad]) for ag, _ in rows])
    hashes = torch.cat([torch.cat([hg, torch.zeros(2, dtype=torch.int64)]) for _, hg in rows])
    out = ops.expert_dropout(padded, hashes, [n + 2 for n in sizes], 4, 0, p)
    real = torch.cat([torch.arange(n) + sum(sizes[:g]) + 2 * g for g, n in enumerate(sizes)])
    assert bitwise_equal(out[real], full)


def test_mask_changes_with_hash_expert_and_unit_offset():
    a, row_hash, gs = inputs([30], 32, seed=8)
    base = ops.expert_dropout(a, row_hash, gs, 0, 0, 0.5) == 0
    for args in ((row_hash + 1, 0, 0), (row_hash, 1, 0), (row_hash, 0, 32)):
        other = ops.expert_dropout(a, args[0], gs, args[1], args[2], 0.5) == 0
        assert 0.35 < float((base != other).double().mean()) < 0.65


# ---------------------------------------------------------------- autograd, opcheck, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_is_the_op_on_the_gradient(dtype):
    a, row_hash, gs = inputs([4, 0, 9], 8, dtype, seed=9)
    a.requires_grad_()
    g = torch.randn(13, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    ops.expert_dropout(a, row_hash, gs, 1, 3, 0.3).backward(g)
    assert bitwise_equal(a.grad, ops.expert_dropout(g, row_hash, gs, 1, 3, 0.3))
    assert bool((a.grad == 0).any()) and bool((a.grad != 0).any())


def test_twin_gradcheck():
    a, row_hash, gs = inputs([3, 0, 4], 5, seed=10)
    torch.autograd.gradcheck(
        lambda x: ops.expert_dropout(x, row_hash, gs, 0, 0, 0.4), (a.requires_grad_(),))


@needs_ext
@pytest.mark.parametrize("sizes,dtype", [([4, 0, 3], torch.float64), ([0, 0], torch.float32),
                                         ([2, 5], torch.bfloat16)])
def test_opcheck(sizes, dtype):
    a, row_hash, gs = inputs(sizes, 6, dtype, seed=11)
    torch.library.opcheck(torch.ops.moe_parallel.expert_dropout.default,
                          (a.requires_grad_(), row_hash, gs, 2, 6, 0.25))


@needs_ext
def test_compiled_function_equals_eager():
    a, row_hash, gs = inputs([5, 0, 6], 9, seed=12)
    fn = torch.compile(lambda x, h: ops.expert_dropout(x, h, gs, 1, 0, 0.5).sin(),
                       backend="aot_eager", fullgraph=True)
    x = a.clone().requires_grad_()
    y = fn(x, row_hash)
    y.sum().backward()
    x2 = a.clone().requires_grad_()
    y2 = ops.expert_dropout(x2, row_hash, gs, 1, 0, 0.5).sin()
    y2.sum().backward()
    assert bitwise_equal(y, y2) and bitwise_equal(x.grad, x2.grad)


BAD = [
    (dict(p=1.0), r"p must be a number in \[0, 1\), got 1"),
    (dict(p=-0.1), r"p must be a number in \[0, 1\)"),
    (dict(first_expert=-1), r"first_expert must be >= 0"),
    (dict(unit_offset=2**32 - 2), r"unit_offset must be >= 0 with unit_offset \+ F <= 2\^32"),
    (dict(row_hash=torch.zeros(7, dtype=torch.int64)), r"row_hash must have a.size\(0\) = 6"),
    (dict(row_hash=torch.zeros(6, dtype=torch.int32)), r"row_hash must (be|have dtype) int64"),
    (dict(group_sizes=torch.tensor([2, 3])), r"group_sizes must sum to a.size\(0\)"),
    (dict(group_sizes=torch.tensor([7, -1])), r"group_sizes entries must be >= 0"),
    (dict(a=torch.zeros(6, 4, dtype=torch.int64)), r"a must (be|have dtype) float32"),
]


@pytest.mark.parametrize("impl", ["op", "twin"])
@pytest.mark.parametrize("change,match", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_naming_the_argument(impl, change, match):
    if impl == "op" and not EXT:
        pytest.skip("moe_parallel._C has no expert_dropout")
    args = dict(a=torch.randn(6, 4, dtype=torch.float64), row_hash=torch.arange(6),
                group_sizes=torch.tensor([2, 4]), first_expert=0, unit_offset=0, p=0.5)
    args.update(change)
    fn = ops.expert_dropout if impl == "op" else ops.expert_dropout_torch
    with pytest.raises(ValueError, match=match):
        fn(**args)
