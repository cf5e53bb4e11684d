"""ParallelState/grid_groups rank arithmetic against the documented formulas, one 4-rank run
(whose groups the Megatron adapter also adopts)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_parallel.distributed.parallel_state import GROUP_NAMES, ParallelState, grid_groups
from moe_parallel.integrations.megatron import parallel_state_from_megatron
from tests.helpers.dist_harness import get_pool, own_groups
from tests.helpers.fake_mpu import GroupsAsMpu
from tests.helpers.grid_reference import (
    CONFIGS,
    dense_coords,
    expert_coords,
    groups_varying,
    reference,
)
from tests.helpers.proc_utils import free_port, spawn_bounded


# ---- grid_groups -----------------------------------------------------------------------------
def test_many_configs_are_enumerated():
    assert len(CONFIGS) > 600


def test_every_axis_partitions_the_world_with_the_right_sizes():
    for world, tp, cp, ep, etp, pp in CONFIGS:
        dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
        size = {"tp": tp, "cp": cp, "dp": dp, "dp_cp": dp * cp, "pp": pp, "ep": ep, "etp": etp,
                "edp": edp, "tp_ep": etp * ep, "stage": world // pp}
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
        assert got == reference(*cfg), cfg


def test_tp_and_etp_groups_are_consecutive_ranks():
    for world, tp, cp, ep, etp, pp in CONFIGS:
        groups = grid_groups(world, tp, cp, ep, etp, pp)
        assert sorted(groups["tp"]) == [list(range(k, k + tp)) for k in range(0, world, tp)]
        assert sorted(groups["etp"]) == [list(range(k, k + etp)) for k in range(0, world, etp)]
        # the pipeline axis is the slowest in both grids, so its groups are the same in both,
        # and so are the stages (all ranks of one pipeline rank)
        expert = expert_coords(world, ep, etp, pp)
        assert sorted(groups["pp"]) == groups_varying(expert, {3})
        assert sorted(groups["stage"]) == groups_varying(expert, {0, 1, 2})


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
        dense, expert = dense_coords(world, tp, cp, pp), expert_coords(world, ep, etp, pp)
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


# ---- one real multi-process run ------------------------------------------------------------
REAL_CONFIGS = ({"tp": 2, "ep": 2}, {"cp": 2, "pp": 2, "ep": 2}, {"ep": 2, "etp": 2})


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
        adopted = parallel_state_from_megatron(GroupsAsMpu(s.groups))
        assert adopted.ranks == s.ranks and (adopted.tp, adopted.ep) == (s.tp, s.ep)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_build_creates_groups_whose_all_reduce_matches_the_rank_lists():
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_state_worker, 4, (4, free_port(), start), timeout_s=120)


# ---- ranks asking for different layouts ------------------------------------------------------
POOL_TIMEOUT_S = 300  # the dist_harness pool's collective timeout


def _build_with_ep_by_rank() -> tuple[str, float]:
    """Ranks 0-1 ask ep=2, ranks 2-3 ep=4: the error and how long it took."""
    import time

    start = time.monotonic()
    with own_groups():
        try:
            ParallelState.build(ep=2 if dist.get_rank() < 2 else 4, ranks_per_node=4)
        except ValueError as exc:
            return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.distributed
def test_ranks_building_different_layouts_all_raise_naming_each_layout_at_once():
    for rank, (msg, seconds) in enumerate(get_pool(4).run(_build_with_ep_by_rank, timeout=60)):
        assert "ranks built ParallelState with different layouts" in msg, (rank, msg)
        assert "ranks [0, 1] world_size=4 tp=1 cp=1 ep=2 etp=1 pp=1 ranks_per_node=4" in msg
        assert "ranks [2, 3] world_size=4 tp=1 cp=1 ep=4 etp=1 pp=1 ranks_per_node=4" in msg
        assert "every rank must pass the same sizes" in msg
        assert seconds < POOL_TIMEOUT_S / 10, (rank, seconds)




# ---- the job's timeout reaches every group ----------------------------------------------------
STALL_TIMEOUT_S, STALL_S = 3, 15


def _stall_worker(rank: int, world: int, port: int, out_dir: str, start) -> None:
    import os
    import time
    from datetime import timedelta

    from moe_parallel import MoEConfig, MoELayer, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start.wait()  # imports done everywhere: the 3 s rendezvous does not race a slow import
    init_distributed(timeout=timedelta(seconds=STALL_TIMEOUT_S))
    ps = ParallelState.build(ep=world)  # the layer's all-to-all spans every rank
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=world, top_k=2),
                     parallel_state=ps)
    x = torch.randn(6, 8)
    layer(x)  # every rank present
    if rank == world - 1:
        time.sleep(STALL_S)  # stalls between two steps
    start = time.monotonic()
    try:
        layer(x)
        status = "ok"
    except Exception as exc:  # gloo raises RuntimeError on a timed-out collective
        status = type(exc).__name__
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(f"{status} {time.monotonic() - start:.2f}")
    os._exit(0)  # no destroy_process_group: the peers of a failed collective are gone


@pytest.mark.distributed
def test_a_stalled_rank_makes_the_others_raise_within_the_job_timeout(tmp_path):
    """init_distributed(timeout=3 s): the groups ParallelState.build creates carry it, so the
    ranks waiting in the layer's all-to-all for a rank stalled 15 s raise after ~3 s instead of
    waiting for it (dist.new_group alone would give them torch's 30-minute default)."""
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_stall_worker, 4, (4, free_port(), str(tmp_path), start), timeout_s=120)
    results = {int(p.name[4:]): p.read_text().split() for p in tmp_path.glob("rank*")}
    assert sorted(results) == [0, 1, 2, 3], results
    for rank in range(3):
        status, seconds = results[rank][0], float(results[rank][1])
        assert status != "ok", (rank, results)
        assert seconds < STALL_TIMEOUT_S + 6 < STALL_S, (rank, results)
