"""moe_parallel.integrations.megatron: adopting Megatron-Core's process groups, on a fake mpu
for many layouts and with the real megatron-core 0.16 on 4 gloo ranks."""

import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_parallel.distributed.parallel_state import GROUP_NAMES, ParallelState
from moe_parallel.integrations.megatron import MEGATRON_GROUPS, parallel_state_from_megatron
from tests.helpers.fake_mpu import FakeMpu, ranks_of
from tests.helpers.grid_reference import CONFIGS, reference
from tests.helpers.proc_utils import free_port, spawn_bounded


def test_from_megatron_reads_sizes_ranks_and_keeps_the_group_objects():
    for world, tp, cp, ep, etp, pp in CONFIGS[::23]:
        groups = reference(world, tp, cp, ep, etp, pp)
        for rank in range(world):
            mpu = FakeMpu(groups, rank)
            s = parallel_state_from_megatron(mpu, group_ranks=ranks_of)
            want = ParallelState.build(tp, cp, ep, etp, pp, world_size=world, rank=rank,
                                       create_groups=False)
            assert (s.world_size, s.rank, s.tp, s.cp, s.ep, s.etp, s.pp, s.dp, s.edp) == (
                world, rank, tp, cp, ep, etp, pp, want.dp, want.edp)
            assert s.ranks == want.ranks
            assert all(s.group(n) is mpu._g[n] for n in GROUP_NAMES)


def test_from_megatron_rejects_another_rank_order():
    groups = reference(8, 2, 1, 2, 1, 2, order="pp-dp")  # Megatron order="tp-cp-ep-pp-dp"
    with pytest.raises(ValueError, match="order='tp-cp-ep-dp-pp'"):
        parallel_state_from_megatron(FakeMpu(groups, 1), group_ranks=ranks_of)


def test_from_megatron_errors():
    groups = reference(4, 2, 1, 2, 1, 1)
    with pytest.raises(RuntimeError, match="not initialised"):
        parallel_state_from_megatron(FakeMpu(groups, 0, initialised=False), group_ranks=ranks_of)

    class Old(FakeMpu):
        get_expert_tensor_parallel_group = None

    with pytest.raises(AttributeError, match="get_expert_tensor_parallel_group"):
        parallel_state_from_megatron(Old(groups, 0), group_ranks=ranks_of)

    class Missing(FakeMpu):
        def get_context_parallel_group(self, check_initialized=True):
            return None

    with pytest.raises(ValueError, match="'cp' group"):
        parallel_state_from_megatron(Missing(groups, 0), group_ranks=ranks_of)
    assert {f for f, _ in MEGATRON_GROUPS.values()} <= set(dir(FakeMpu))


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


@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed (optional; not a project dependency)")
def test_from_megatron_with_real_megatron_core():
    start = mp.get_context("spawn").Barrier(4)
    spawn_bounded(_megatron_worker, 4, (4, free_port(), start), timeout_s=180)
