"""ParallelState/grid_groups rank arithmetic, the Megatron adapter on fakes, one 4-rank run."""

import importlib.util
import itertools
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from proc_utils import free_port, spawn_bounded

from moe_parallel.distributed.parallel_state import GROUP_NAMES, ParallelState, grid_groups
from moe_parallel.integrations.megatron import MEGATRON_GROUPS, parallel_state_from_megatron

WORLDS = (1, 2, 3, 4, 6, 8, 16)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _configs():
    """Every valid (world, tp, cp, ep, etp, pp) for the worlds above."""
    for world in WORLDS:
        ds = _divisors(world)
        for tp, cp, ep, etp, pp in itertools.product(ds, repeat=5):
            if world % (tp * cp * pp) == 0 and world % (etp * ep * pp) == 0:
                yield world, tp, cp, ep, etp, pp


CONFIGS = list(_configs())


def _dense(world, tp, cp, pp, order="dp-pp"):
    """rank -> (tp, cp, dp, pp) coordinates from the documented encoding (or dp/pp swapped)."""
    dp = world // (tp * cp * pp)
    out = {}
    for t, c, d, p in itertools.product(range(tp), range(cp), range(dp), range(pp)):
        outer = d + dp * p if order == "dp-pp" else p + pp * d
        r = t + tp * (c + cp * outer)
        out[r] = (t, c, d, p)
    return out


def _expert(world, ep, etp, pp):
    """rank -> (etp, ep, edp, pp) coordinates: rank = etp + ETP*(ep + EP*(edp + EDP*pp))."""
    edp = world // (etp * ep * pp)
    return {t + etp * (e + ep * (d + edp * p)): (t, e, d, p)
            for t, e, d, p in itertools.product(range(etp), range(ep), range(edp), range(pp))}


def _reference_groups(coords, vary):
    """Ranks sharing every coordinate outside ``vary`` form one group."""
    buckets = defaultdict(list)
    for r, c in coords.items():
        buckets[tuple(x for i, x in enumerate(c) if i not in vary)].append(r)
    return sorted(sorted(g) for g in buckets.values())


def _reference(world, tp, cp, ep, etp, pp, order="dp-pp"):
    d, e = _dense(world, tp, cp, pp, order), _expert(world, ep, etp, pp)
    return {"tp": _reference_groups(d, {0}), "cp": _reference_groups(d, {1}),
            "dp": _reference_groups(d, {2}), "dp_cp": _reference_groups(d, {1, 2}),
            "pp": _reference_groups(d, {3}), "etp": _reference_groups(e, {0}),
            "ep": _reference_groups(e, {1}), "edp": _reference_groups(e, {2}),
            "tp_ep": _reference_groups(e, {0, 1})}


# ---- grid_groups -----------------------------------------------------------------------------
def test_many_configs_are_enumerated():
    assert len(CONFIGS) > 600


def test_every_axis_partitions_the_world_with_the_right_sizes():
    for world, tp, cp, ep, etp, pp in CONFIGS:
        dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
        size = {"tp": tp, "cp": cp, "dp": dp, "dp_cp": dp * cp, "pp": pp, "ep": ep, "etp": etp,
                "edp": edp, "tp_ep": etp * ep}
        groups = grid_groups(world, tp, cp, ep, etp, pp)
        assert set(groups) == set(GROUP_NAMES)
        for name, gs in groups.items():
            flat = [r for g in gs for r in g]
            assert sorted(flat) == list(range(world)), (name, world, tp, cp, ep, etp, pp)
            assert all(len(g) == size[name] for g in gs), (name, gs)
            assert len(gs) == world // size[name]


def test_groups_follow_the_dense_and_expert_rank_formulas():
    for cfg in CONFIGS:
        got = {k: sorted(v) for k, v in grid_groups(*cfg).items()}
        assert got == _reference(*cfg), cfg


def test_tp_and_etp_groups_are_consecutive_ranks():
    for world, tp, cp, ep, etp, pp in CONFIGS:
        groups = grid_groups(world, tp, cp, ep, etp, pp)
        assert sorted(groups["tp"]) == [list(range(k, k + tp)) for k in range(0, world, tp)]
        assert sorted(groups["etp"]) == [list(range(k, k + etp)) for k in range(0, world, etp)]
        # the pipeline axis is the slowest in both grids, so its groups are the same in both
        assert sorted(groups["pp"]) == _reference_groups(_expert(world, ep, etp, pp), {3})


def test_small_example_by_hand():
    g = {k: sorted(v) for k, v in grid_groups(8, tp=2, ep=2, pp=2).items()}  # dp = edp = 2
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["etp"] == [[0], [1], [2], [3], [4], [5], [6], [7]]
    assert g["tp_ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("world, kw, pattern", [
    (6, {"tp": 4}, r"world_size 6 .*tp\*cp\*pp = 4\*1\*1 = 4"),
    (8, {"tp": 2, "cp": 2, "pp": 4}, r"world_size 8 .*2\*2\*4 = 16"),
    (6, {"ep": 4}, r"world_size 6 .*etp\*ep\*pp = 1\*4\*1 = 4"),
    (12, {"ep": 4, "etp": 2}, r"world_size 12 .*etp\*ep\*pp = 2\*4\*1 = 8"),
    (4, {"tp": 0}, "tp must be a positive int"),
    (4, {"ep": 2.0}, "ep must be a positive int"),
    (0, {}, "world_size must be a positive int"),
])
def test_divisibility_errors_name_the_sizes(world, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        grid_groups(world, **kw)
    if world < 1:
        return
    with pytest.raises(ValueError, match=pattern):
        ParallelState.build(**kw, world_size=world, rank=0, create_groups=False)


# ---- ParallelState coordinates -------------------------------------------------------------------
def test_coordinates_are_consistent_with_groups():
    for world, tp, cp, ep, etp, pp in CONFIGS[::7]:
        groups = grid_groups(world, tp, cp, ep, etp, pp)
        dense, expert = _dense(world, tp, cp, pp), _expert(world, ep, etp, pp)
        for rank in range(world):
            s = ParallelState.build(tp, cp, ep, etp, pp, world_size=world, rank=rank,
                                    create_groups=False)
            for name in GROUP_NAMES:
                assert s.ranks[name] == next(g for g in groups[name] if rank in g)
                assert s.group(name) is None
            assert (s.tp_rank, s.cp_rank, s.dp_rank, s.pp_rank) == dense[rank]
            assert (s.etp_rank, s.ep_rank, s.edp_rank, s.pp_rank) == expert[rank]
            for name, coord in (("tp", s.tp_rank), ("cp", s.cp_rank), ("dp", s.dp_rank),
                                ("pp", s.pp_rank), ("ep", s.ep_rank), ("etp", s.etp_rank),
                                ("edp", s.edp_rank)):
                assert s.group_rank(name) == coord, (name, world, tp, cp, ep, etp, pp, rank)
            assert s.group_rank("tp_ep") == s.etp_rank + etp * s.ep_rank
            assert s.group_rank("dp_cp") == s.cp_rank + cp * s.dp_rank


def test_build_validation_and_single():
    with pytest.raises(ValueError, match="rank 4 is outside world_size 4"):
        ParallelState.build(world_size=4, rank=4, create_groups=False)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_distributed"):
            ParallelState.build(tp=2)
    s = ParallelState.single()
    assert (s.world_size, s.tp_rank, s.ep_rank, s.group("ep")) == (1, 0, 0, None)
    s = ParallelState.build(ep=4, etp=2, world_size=16, rank=5, create_groups=False)
    s.check_experts(num_experts=8, ffn_hidden_size=64)
    with pytest.raises(ValueError, match="num_experts 6 is not divisible by ep 4"):
        s.check_experts(num_experts=6, ffn_hidden_size=64)
    with pytest.raises(ValueError, match="ffn_hidden_size 63 is not divisible by etp 2"):
        s.check_experts(num_experts=8, ffn_hidden_size=63)


# ---- Megatron adapter on a fake mpu --------------------------------------------------------------
class FakeGroup:
    def __init__(self, ranks):
        self.ranks = list(ranks)


class FakeMpu:
    """The getters of megatron.core.parallel_state, over fixed rank lists of one rank."""

    def __init__(self, groups, rank, initialised=True):
        self._g = {n: FakeGroup(next(g for g in gs if rank in g)) for n, gs in groups.items()}
        self._initialised = initialised

    def model_parallel_is_initialized(self):
        return self._initialised

    def get_tensor_model_parallel_group(self, check_initialized=True):
        return self._g["tp"]

    def get_context_parallel_group(self, check_initialized=True):
        return self._g["cp"]

    def get_data_parallel_group(self, with_context_parallel=False, partial_data_parallel=False):
        return self._g["dp_cp" if with_context_parallel else "dp"]

    def get_pipeline_model_parallel_group(self, check_initialized=True):
        return self._g["pp"]

    def get_expert_model_parallel_group(self, check_initialized=True):
        return self._g["ep"]

    def get_expert_tensor_parallel_group(self, check_initialized=True):
        return self._g["etp"]

    def get_expert_data_parallel_group(self, check_initialized=True,
                                       partial_expert_data_parallel=False):
        return self._g["edp"]

    def get_expert_tensor_and_model_parallel_group(self, check_initialized=True):
        return self._g["tp_ep"]


def _ranks_of(group):
    return group.ranks


def test_from_megatron_reads_sizes_ranks_and_keeps_the_group_objects():
    for world, tp, cp, ep, etp, pp in CONFIGS[::23]:
        groups = _reference(world, tp, cp, ep, etp, pp)
        for rank in range(world):
            mpu = FakeMpu(groups, rank)
            s = parallel_state_from_megatron(mpu, group_ranks=_ranks_of)
            want = ParallelState.build(tp, cp, ep, etp, pp, world_size=world, rank=rank,
                                       create_groups=False)
            assert (s.world_size, s.rank, s.tp, s.cp, s.ep, s.etp, s.pp, s.dp, s.edp) == (
                world, rank, tp, cp, ep, etp, pp, want.dp, want.edp)
            assert s.ranks == want.ranks
            assert all(s.group(n) is mpu._g[n] for n in GROUP_NAMES)


def test_from_megatron_rejects_another_rank_order():
    groups = _reference(8, 2, 1, 2, 1, 2, order="pp-dp")  # Megatron order="tp-cp-ep-pp-dp"
    with pytest.raises(ValueError, match="order='tp-cp-ep-dp-pp'"):
        parallel_state_from_megatron(FakeMpu(groups, 1), group_ranks=_ranks_of)


def test_from_megatron_errors():
    groups = _reference(4, 2, 1, 2, 1, 1)
    with pytest.raises(RuntimeError, match="not initialised"):
        parallel_state_from_megatron(FakeMpu(groups, 0, initialised=False), group_ranks=_ranks_of)

    class Old(FakeMpu):
        get_expert_tensor_parallel_group = None

    with pytest.raises(AttributeError, match="get_expert_tensor_parallel_group"):
        parallel_state_from_megatron(Old(groups, 0), group_ranks=_ranks_of)

    class Missing(FakeMpu):
        def get_context_parallel_group(self, check_initialized=True):
            return None

    with pytest.raises(ValueError, match="'cp' group"):
        parallel_state_from_megatron(Missing(groups, 0), group_ranks=_ranks_of)
    assert {f for f, _ in MEGATRON_GROUPS.values()} <= set(dir(FakeMpu))


# ---- one real multi-process run ------------------------------------------------------------
REAL_CONFIGS = ({"tp": 2, "ep": 2}, {"cp": 2, "pp": 2, "ep": 2}, {"ep": 2, "etp": 2})


class _GroupsAsMpu(FakeMpu):
    """A fake mpu whose getters return real torch ProcessGroups."""

    def __init__(self, groups):
        self._g, self._initialised = dict(groups), True


def _state_worker(rank: int, world: int, port: int, start) -> None:
    start.wait(60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    for cfg in REAL_CONFIGS:
        s = ParallelState.build(**cfg)
        assert (s.rank, s.world_size) == (rank, world)
        for name in GROUP_NAMES:
            members = s.ranks[name]
            t = torch.tensor([float(rank), float(2 ** rank)])  # the bit mask names the members
            dist.all_reduce(t, group=s.group(name))
            assert t.tolist() == [sum(members), sum(2 ** m for m in members)], (cfg, name)
            assert dist.get_process_group_ranks(s.group(name)) == members
        adopted = parallel_state_from_megatron(_GroupsAsMpu(s.groups))
        assert adopted.ranks == s.ranks and (adopted.tp, adopted.ep) == (s.tp, s.ep)
    dist.destroy_process_group()


def test_build_creates_groups_whose_all_reduce_matches_the_rank_lists():
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_state_worker, 4, (4, free_port(), start), timeout_s=120)


def _megatron_worker(rank: int, world: int, port: int, start) -> None:
    from megatron.core import parallel_state as mpu

    start.wait(60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    for cfg in ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2},
                {"context_parallel_size": 2, "pipeline_model_parallel_size": 2,
                 "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}):
        mpu.initialize_model_parallel(**cfg)
        s = parallel_state_from_megatron()
        want = ParallelState.build(s.tp, s.cp, s.ep, s.etp, s.pp, world_size=world, rank=rank,
                                   create_groups=False)
        assert s.ranks == want.ranks and s.group("ep") is mpu.get_expert_model_parallel_group()
        t = torch.ones(1)
        dist.all_reduce(t, group=s.group("tp_ep"))
        assert t.item() == len(s.ranks["tp_ep"])
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(pipeline_model_parallel_size=2, order="tp-cp-ep-pp-dp")
    with pytest.raises(ValueError, match="order='tp-cp-ep-dp-pp'"):
        parallel_state_from_megatron()
    dist.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed (optional; not a project dependency)")
def test_from_megatron_with_real_megatron_core():
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_megatron_worker, 4, (4, free_port(), start), timeout_s=180)
