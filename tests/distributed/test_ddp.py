"""wrap_ddp on 4 gloo ranks: DDP over the dense parameters plus sync_gradients(dense=False)
trains exactly as one process does on all ranks' tokens (float64); a plain DDP that manages
expert parameters is refused on every rank at the first forward it runs, also when the model
ran a forward before it was wrapped."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moe_parallel.distributed import sync_gradients, wrap_ddp
from tests.helpers.dist_harness import get_pool, parallel_state
from tests.helpers.training_parity import (
    assert_parity,
    data,
    first_forward_error,
    nets,
    train_against_one_process,
)

pytestmark = pytest.mark.distributed


def _train(layout: dict) -> dict:
    ps = parallel_state(**layout)
    full, model = nets(ps)
    ddp = wrap_ddp(model, ps)
    return train_against_one_process(ps, full, model, ddp,
                                     lambda: sync_gradients(model, ps, dense=False), clip=10.0)


def _plain_ddp() -> str:
    return first_forward_error(parallel_state(ep=2), DistributedDataParallel)


def _warm_up_then_plain_ddp(net):
    with torch.no_grad():  # the layer runs (and passes its checks) before DDP exists
        net(data(0, dist.get_rank())[0])
    return DistributedDataParallel(net)


def _plain_ddp_after_warm_up() -> str:
    return first_forward_error(parallel_state(ep=2), _warm_up_then_plain_ddp)


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=4), dict(ep=2, etp=2)],
                         ids=["ep2_edp2", "ep4", "ep2_etp2"])
def test_wrap_ddp_trains_as_one_process(layout):
    # inp, router, experts w1/w2, out
    assert_parity(get_pool(4).run(_train, layout, timeout=120), num_params=7)


def test_plain_ddp_over_expert_parameters_is_refused():
    for rank, msg in enumerate(get_pool(4).run(_plain_ddp, timeout=60)):
        assert "DistributedDataParallel manages the expert parameters" in msg, (rank, msg)
        assert "wrap_ddp" in msg


def test_plain_ddp_built_after_a_warm_up_forward_is_refused_at_its_first_forward():
    # ep=2 on 4 ranks: ranks 0, 2 hold experts 0-3 and ranks 1, 3 experts 4-7; DDP's constructor
    # broadcast rank 0's over all four
    for rank, msg in enumerate(get_pool(4).run(_plain_ddp_after_warm_up, timeout=60)):
        assert "DistributedDataParallel manages the expert parameters" in msg, (rank, msg)
        assert "the experts of ranks [1, 3] were overwritten by rank 0's" in msg, (rank, msg)
        assert "wrap_ddp" in msg
