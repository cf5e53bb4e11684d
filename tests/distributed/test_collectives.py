"""moe_parallel.distributed.collectives on 4 gloo ranks: all_to_all (plain and chunked) /
all_gather / reduce_scatter, forward and backward, uneven splits with zero-size blocks,
sub-groups, the one-rank identity.

Every rank draws every rank's inputs from known seeds, so each can compute the exact expected
output and gradient on its own. Backward is checked against that explicit adjoint and with the
dot-product test ``Σ_r <A(x)_r, g_r> = Σ_r <x_r, (A^T g)_r>``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel.distributed import collectives as comm
from tests.helpers.dist_harness import DistFailure, get_pool, parallel_state

pytestmark = pytest.mark.distributed

WORLD = 4
H = 3

# S[i][j]: rows rank i sends to rank j. Rank 1 sends nothing, rank 3 receives nothing from 0/2.
SPLITS = {
    "uneven_zeros": [[2, 0, 3, 0], [0, 0, 0, 0], [1, 4, 0, 0], [2, 1, 1, 5]],
    "even": [[2, 2, 2, 2]] * 4,
    "all_empty": [[0] * 4] * 4,
}
GATHER_SIZES = {"uneven_zeros": [3, 0, 5, 2], "even": [2, 2, 2, 2], "all_empty": [0, 0, 0, 0]}


@pytest.fixture(scope="module")
def pool():
    return get_pool(WORLD)


def _data(seed: int, rows: int, tag: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * tag + seed)
    return torch.randn(rows, H, generator=g, dtype=torch.float64)


def _members(group) -> list[int]:
    return list(range(WORLD)) if group is dist.group.WORLD else dist.get_process_group_ranks(group)


def _groups() -> dict:
    ps = parallel_state(ep=2)  # ep groups {0,1},{2,3}; edp groups {0,2},{1,3}
    return {"world": dist.group.WORLD, "ep": ps.group("ep"), "edp": ps.group("edp")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300)) if b.numel() else 0.0


def _dot_sum(pairs) -> float:
    """Σ over ranks of Σ_i <a_i, b_i>, all-reduced over the world."""
    local = sum(((a * b).sum() for a, b in pairs), torch.zeros((), dtype=torch.float64))
    t = local.detach().clone().reshape(1)
    dist.all_reduce(t)
    return float(t)


def _check_all_to_all() -> dict[str, float]:
    errs = {}
    for gname, group in _groups().items():
        members = _members(group)
        w, r = len(members), members.index(dist.get_rank())
        for sname, S in SPLITS.items():
            S = [row[:w] for row in S[:w]]
            xs = [_data(i, sum(S[i]), 1) for i in range(w)]
            gs = [_data(j, sum(S[i][j] for i in range(w)), 2) for j in range(w)]
            x = xs[r].clone().requires_grad_(True)
            y = comm.all_to_all(x, [S[i][r] for i in range(w)], S[r], group)
            expect = torch.cat([xs[i].split(S[i])[r] for i in range(w)])
            y.backward(gs[r])
            # rank r's block j went to rank j, where it is block r of rank j's output
            grad_expect = torch.cat(
                [gs[j].split([S[i][j] for i in range(w)])[r] for j in range(w)]
            )
            key = f"{gname}/{sname}"
            errs[f"{key}/fwd"] = 0.0 if torch.equal(y, expect) else float("inf")
            errs[f"{key}/bwd"] = 0.0 if torch.equal(x.grad, grad_expect) else float("inf")
            lhs = _dot_sum([(y, gs[r])])
            rhs = _dot_sum([(x, x.grad)])
            errs[f"{key}/adjoint"] = abs(lhs - rhs) / max(abs(lhs), 1e-300) if lhs else abs(rhs)
    return errs


def _check_all_to_all_chunked() -> dict[str, float]:
    """Three chunks with different split matrices (one all empty): chunk c of the output is
    what chunk c of every rank's input sent here, in rank order."""
    errs = {}
    for gname, group in _groups().items():
        members = _members(group)
        w, r = len(members), members.index(dist.get_rank())
        mats = [[row[:w] for row in SPLITS[n][:w]] for n in ("uneven_zeros", "all_empty", "even")]
        xs = [[_data(i, sum(S[i]), 10 + c) for i in range(w)] for c, S in enumerate(mats)]
        gs = [[_data(j, sum(S[i][j] for i in range(w)), 20 + c) for j in range(w)]
              for c, S in enumerate(mats)]
        x = torch.cat([xs[c][r] for c in range(3)]).requires_grad_(True)
        y = comm.all_to_all_chunked(x, [[S[i][r] for i in range(w)] for S in mats],
                                    [S[r] for S in mats], group)
        expect = torch.cat([xs[c][i].split(S[i])[r] for c, S in enumerate(mats)
                            for i in range(w)])
        y.backward(torch.cat([gs[c][r] for c in range(3)]))
        grad_expect = torch.cat([gs[c][j].split([S[i][j] for i in range(w)])[r]
                                 for c, S in enumerate(mats) for j in range(w)])
        errs[f"{gname}/fwd"] = 0.0 if torch.equal(y, expect) else float("inf")
        errs[f"{gname}/bwd"] = 0.0 if torch.equal(x.grad, grad_expect) else float("inf")
    return errs


def _check_gather_scatter() -> dict[str, float]:
    errs = {}
    for gname, group in _groups().items():
        members = _members(group)
        w, r = len(members), members.index(dist.get_rank())
        for sname, sizes in GATHER_SIZES.items():
            sizes = sizes[:w]
            key = f"{gname}/{sname}"
            xs = [_data(i, sizes[i], 3) for i in range(w)]
            gs = [_data(j, sum(sizes), 4) for j in range(w)]
            for given in (True, False):
                x = xs[r].clone().requires_grad_(True)
                y = comm.all_gather(x, group, sizes if given else None)
                y.backward(gs[r])
                k = f"{key}/gather/sizes_given={given}"
                errs[f"{k}/fwd"] = 0.0 if torch.equal(y, torch.cat(xs)) else float("inf")
                grad_expect = sum(g.split(sizes)[r] for g in gs)
                errs[f"{k}/bwd"] = _rel(x.grad, grad_expect)
            # reduce_scatter: every rank holds sum(sizes) rows; rank r gets Σ_i block r
            zs = [_data(i, sum(sizes), 5) for i in range(w)]
            hs = [_data(j, sizes[j], 6) for j in range(w)]
            z = zs[r].clone().requires_grad_(True)
            out = comm.reduce_scatter(z, sizes, group)
            errs[f"{key}/rs/fwd"] = _rel(out, sum(zi.split(sizes)[r] for zi in zs))
            out.backward(hs[r])
            errs[f"{key}/rs/bwd"] = 0.0 if torch.equal(z.grad, torch.cat(hs)) else float("inf")
            lhs, rhs = _dot_sum([(out, hs[r])]), _dot_sum([(z, z.grad)])
            errs[f"{key}/rs/adjoint"] = abs(lhs - rhs) / max(abs(lhs), 1e-300) if lhs else 0.0
    return errs


def _check_identity_and_ints() -> dict[str, float]:
    errs = {}
    ps = parallel_state(ep=2)
    x = _data(dist.get_rank(), 4, 7).requires_grad_(True)
    # group None and a one-rank group: identity, no communication
    one = parallel_state(ep=4).group("edp")  # edp = 1 with ep = 4
    for name, g in (("none", None), ("one_rank", one)):
        ok = comm.all_to_all(x, [4], [4], g) is x and comm.all_gather(x, g) is x
        ok = ok and comm.reduce_scatter(x, [4], g) is x
        errs[f"identity/{name}"] = 0.0 if ok else float("inf")
    # int64 counts over a sub-group (what the dispatcher exchanges)
    r = ps.group_rank("ep")
    counts = torch.arange(4, dtype=torch.int64) + 10 * r
    got = comm.all_to_all(counts, [2, 2], [2, 2], ps.group("ep"))
    expect = torch.tensor([2 * r, 2 * r + 1, 10 + 2 * r, 10 + 2 * r + 1])
    errs["int64_counts"] = 0.0 if torch.equal(got, expect) else float("inf")
    sizes = comm.all_gather_sizes(dist.get_rank() + 1, dist.group.WORLD)
    errs["gather_sizes"] = 0.0 if sizes == [1, 2, 3, 4] else float("inf")
    return errs


def _check_bad_splits() -> dict[str, str]:
    out = {}
    x = torch.zeros(3, H)
    for name, call in {
        "a2a_sum": lambda: comm.all_to_all(x, [1] * 4, [1, 1, 0, 0], dist.group.WORLD),
        "a2a_len": lambda: comm.all_to_all(x, [3], [3], dist.group.WORLD),
        "a2a_neg": lambda: comm.all_to_all(x, [1] * 4, [4, -1, 0, 0], dist.group.WORLD),
        "chunked_sum": lambda: comm.all_to_all_chunked(x, [[1] * 4], [[1, 1, 0, 0]],
                                                       dist.group.WORLD),
        "chunked_chunks": lambda: comm.all_to_all_chunked(x, [[1] * 4], [[3, 0, 0, 0], [0] * 4],
                                                          dist.group.WORLD),
        "rs_sum": lambda: comm.reduce_scatter(x, [1, 1, 1, 1], dist.group.WORLD),
        "gather_own": lambda: comm.all_gather(x, dist.group.WORLD, [1, 1, 1, 1]),
    }.items():
        try:
            call()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


@pytest.mark.parametrize("check", [_check_all_to_all, _check_all_to_all_chunked,
                                   _check_gather_scatter, _check_identity_and_ints])
def test_collectives(pool, check):
    results = pool.run(check)
    for rank, errs in enumerate(results):
        assert errs, "no checks ran"
        for name, err in errs.items():
            assert err < 1e-12, f"rank {rank} {name}: error {err:.3e}"


def test_bad_splits_raise_before_communicating(pool):
    for rank, msgs in enumerate(pool.run(_check_bad_splits)):
        for name, msg in msgs.items():
            assert msg != "no error", f"rank {rank} {name} did not raise"
            assert "split" in msg or "sizes" in msg, msg


def _raise_on_rank_2() -> int:
    if dist.get_rank() == 2:
        raise ValueError("boom on rank 2")
    return dist.get_rank()


def _rank() -> int:
    return dist.get_rank()


def test_harness_reports_a_rank_failure_and_stays_usable(pool):
    """A rank's exception becomes a test failure carrying its traceback; every rank answered,
    so the pool is kept (hangs and dead ranks kill it instead, see dist_harness)."""
    with pytest.raises(DistFailure, match="boom on rank 2"):
        pool.run(_raise_on_rank_2)
    assert not pool.broken
    assert pool.run(_rank) == list(range(WORLD))
