"""The FSDP2 recipe on 4 gloo ranks: ``fully_shard`` the dense submodules over the dense
data-parallel mesh (DP×CP), leave each MoELayer to ``sync_gradients`` (router and shared
experts over DP×CP, routed experts over EDP); training equals one process (float64). An FSDP
unit over the experts is refused at the first forward it runs, also after an unwrapped warm-up
forward, unless it is the experts' own unit over their EDP group (``shard_model``'s)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_parallel.distributed import sync_gradients
from tests.helpers.dist_harness import get_pool, parallel_state
from tests.helpers.training_parity import (
    assert_parity,
    data,
    first_forward_error,
    nets,
    train_against_one_process,
)

pytestmark = pytest.mark.distributed


def _mesh(ps):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ps.group("dp_cp"), "cpu")


def _train(layout: dict) -> dict:
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(**layout)
    full, model = nets(ps, num_shared_experts=1)
    for dense in (model.inp, model.out):  # the recipe: dense submodules only
        fully_shard(dense, mesh=_mesh(ps))
    # FSDP reduce-scatters inp/out (their mean over DP×CP) in the backward; the MoE layer:
    return train_against_one_process(ps, full, model, model,
                                     lambda: sync_gradients(model.moe, ps))


def _fsdp_over_everything() -> str:
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(ep=2)
    return first_forward_error(ps, lambda net: fully_shard(net, mesh=_mesh(ps)))


def _fsdp_after_warm_up() -> str:
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(ep=2)

    def warm_up_then_shard(net):
        with torch.no_grad():  # the layer runs (and passes its checks) before FSDP exists
            net(data(0, dist.get_rank())[0])
        return fully_shard(net, mesh=_mesh(ps))

    return first_forward_error(ps, warm_up_then_shard)


def _experts_unit_over(group_name: str) -> str:
    """The first forward's error when the routed experts are a unit of their own over the mesh
    of ``group_name`` (its parameters untagged, as a user's ``fully_shard`` leaves them)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(ep=2)

    def shard_experts(net):
        fully_shard(net.moe.experts, mesh=DeviceMesh.from_group(ps.group(group_name), "cpu"))
        return net

    return first_forward_error(ps, shard_experts)


def _shard_model() -> str:
    """The first forward's error under ``shard_model``: the experts' units over EDP, the
    layer's router and the net's dense layers in units over the dense mesh (the net's own unit
    runs the layer but manages no expert)."""
    from moe_parallel.distributed import shard_model

    ps = parallel_state(ep=2)
    return first_forward_error(ps, lambda net: shard_model(net, ps))


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=4), dict(ep=2, etp=2)],
                         ids=["ep2_edp2", "ep4", "ep2_etp2"])
def test_fsdp2_dense_with_sync_gradients_for_moe_trains_as_one_process(layout):
    # inp, router, experts, shared w1/w2, out
    assert_parity(get_pool(4).run(_train, layout, timeout=120), num_params=9)


@pytest.mark.parametrize("build", [_fsdp_over_everything, _fsdp_after_warm_up],
                         ids=["first_forward", "after_warm_up"])
def test_fsdp_over_expert_parameters_is_refused(build):
    for rank, msg in enumerate(get_pool(4).run(build, timeout=60)):
        assert "FSDP unit (fully_shard) manages the expert parameters" in msg, (rank, msg)
        assert "sync_gradients(layer, ps)" in msg


def test_experts_unit_over_the_dense_mesh_is_refused():
    # ep2 on 4 ranks: DP×CP = all 4 ranks, which hold two different expert shards
    for rank, msg in enumerate(get_pool(4).run(_experts_unit_over, "dp_cp", timeout=60)):
        assert "FSDP unit (fully_shard) manages the expert parameters" in msg, (rank, msg)
        assert "shard_model" in msg and f"group {[rank % 2, rank % 2 + 2]}" in msg, (rank, msg)


def test_experts_unit_over_their_edp_group_is_accepted():
    assert get_pool(4).run(_experts_unit_over, "edp", timeout=60) == ["no error"] * 4
    assert get_pool(4).run(_shard_model, timeout=60) == ["no error"] * 4
