"""wrap_ddp on 4 gloo ranks: DDP over the dense parameters plus sync_gradients(dense=False)
trains exactly as one process does on all ranks' tokens (float64); a plain DDP that manages
expert parameters is refused at the first forward on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import get_pool, parallel_state
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moe_parallel import MoEConfig, MoELayer, set_aux_loss_scale
from moe_parallel.distributed import clip_grad_norm, sync_gradients, wrap_ddp
from moe_parallel.experts import shard_expert_weights

CFG = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2, aux_loss_coeff=0.1,
           params_dtype=torch.float64, init_std=0.3)
TOKENS = (6, 3, 5, 4)  # per rank
STEPS, TOL = 2, 1e-10


class Net(nn.Module):
    def __init__(self, moe: MoELayer):
        super().__init__()
        self.inp = nn.Linear(4, 8, dtype=torch.float64)
        self.moe = moe
        self.out = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h)).squeeze(-1)  # the aux loss rides on the moe output


def _data(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(TOKENS[rank], 4, generator=g, dtype=torch.float64)
    return x, x.sum(-1)


def _loss(model, x, target):
    return F.mse_loss(model(x), target)


def _train(layout: dict) -> dict:
    ps = parallel_state(**layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = Net(MoELayer(MoEConfig(**CFG)))
    model = Net(MoELayer.shard_from(full.moe, ps))
    model.load_state_dict({k: v for k, v in full.state_dict().items()
                           if not k.startswith("moe.experts.")}, strict=False)
    ddp = wrap_ddp(model, ps)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(full.parameters(), lr=0.1)
    set_aux_loss_scale(full, 1.0 / world)  # one process runs the world's forwards: mean of them
    for step in range(STEPS):
        opt.zero_grad()
        _loss(ddp, *_data(step, rank)).backward()
        sync_gradients(model, ps, dense=False)
        clip_grad_norm(model, ps, 10.0)
        opt.step()
        # one process: the mean of the ranks' losses (each rank's loss is its own mean)
        ref_opt.zero_grad()
        sum(_loss(full, *_data(step, r)) for r in range(world)).div(world).backward()
        torch.nn.utils.clip_grad_norm_(full.parameters(), 10.0)
        ref_opt.step()
    want = dict(full.named_parameters())
    w1, w2 = shard_expert_weights(want["moe.experts.w1"], want["moe.experts.w2"], ps.ep_rank,
                                  ps.ep, ps.etp_rank, ps.etp, True)
    want["moe.experts.w1"], want["moe.experts.w2"] = w1, w2
    return {n: float((p - want[n]).norm() / want[n].norm()) for n, p in model.named_parameters()}


def _plain_ddp() -> str:
    ps = parallel_state(ep=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(Net(MoELayer(MoEConfig(**CFG), parallel_state=ps)))
    try:
        model(_data(0, dist.get_rank())[0])
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=4), dict(ep=2, etp=2)],
                         ids=["ep2_edp2", "ep4", "ep2_etp2"])
def test_wrap_ddp_trains_as_one_process(layout):
    for rank, errors in enumerate(get_pool(4).run(_train, layout, timeout=120)):
        assert len(errors) == 7, errors  # inp, router, experts w1/w2, out
        for name, err in errors.items():
            assert err < TOL, f"rank {rank} {name}: relative error {err:.3e}"


def test_plain_ddp_over_expert_parameters_is_refused():
    for rank, msg in enumerate(get_pool(4).run(_plain_ddp, timeout=60)):
        assert "DistributedDataParallel manages the expert parameters" in msg, (rank, msg)
        assert "wrap_ddp" in msg
