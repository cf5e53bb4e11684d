"""The FSDP2 recipe on 4 gloo ranks: ``fully_shard`` the dense submodules over the dense
data-parallel mesh (DP×CP), leave each MoELayer to ``sync_gradients`` (router and shared
experts over DP×CP, routed experts over EDP); training equals one process (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import get_pool, parallel_state
from torch import nn

from moe_parallel import MoEConfig, MoELayer, set_aux_loss_scale
from moe_parallel.distributed import sync_gradients
from moe_parallel.experts import shard_expert_weights

CFG = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2, aux_loss_coeff=0.1,
           num_shared_experts=1, params_dtype=torch.float64, init_std=0.3)
TOKENS = (6, 3, 5, 4)
STEPS, TOL = 2, 1e-10


class Net(nn.Module):
    def __init__(self, moe: MoELayer):
        super().__init__()
        self.inp = nn.Linear(4, 8, dtype=torch.float64)
        self.moe = moe
        self.out = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h)).squeeze(-1)


def _data(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(TOKENS[rank], 4, generator=g, dtype=torch.float64)
    return x, x.sum(-1)


def _loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), target)


def _train(layout: dict) -> dict:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(**layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = Net(MoELayer(MoEConfig(**CFG)))
    model = Net(MoELayer.shard_from(full.moe, ps))
    model.load_state_dict({k: v for k, v in full.state_dict().items()
                           if not k.startswith("moe.experts.")}, strict=False)
    mesh = DeviceMesh.from_group(ps.group("dp_cp"), "cpu")
    for dense in (model.inp, model.out):  # the recipe: dense submodules only
        fully_shard(dense, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(full.parameters(), lr=0.1)
    set_aux_loss_scale(full, 1.0 / world)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, *_data(step, rank)).backward()  # FSDP reduce-scatters inp/out (mean)
        sync_gradients(model.moe, ps)              # the MoE layer: DP×CP and EDP
        opt.step()
        ref_opt.zero_grad()
        sum(_loss(full, *_data(step, r)) for r in range(world)).div(world).backward()
        ref_opt.step()
    want = dict(full.named_parameters())
    w1, w2 = shard_expert_weights(want["moe.experts.w1"], want["moe.experts.w2"], ps.ep_rank,
                                  ps.ep, ps.etp_rank, ps.etp, True)
    want["moe.experts.w1"], want["moe.experts.w2"] = w1, w2
    errors = {}
    for name, p in model.named_parameters():
        got = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
        errors[name] = float((got.detach() - want[name]).norm() / want[name].norm())
    return errors


@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=4), dict(ep=2, etp=2)],
                         ids=["ep2_edp2", "ep4", "ep2_etp2"])
def test_fsdp2_dense_with_sync_gradients_for_moe_trains_as_one_process(layout):
    for rank, errors in enumerate(get_pool(4).run(_train, layout, timeout=120)):
        assert len(errors) == 9, errors  # inp, router, experts, shared w1/w2, out
        for name, err in errors.items():
            assert err < TOL, f"rank {rank} {name}: relative error {err:.3e}"


def _fsdp_over_everything() -> str:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    ps = parallel_state(ep=2)
    torch.manual_seed(0)
    model = Net(MoELayer(MoEConfig(**CFG), parallel_state=ps))
    fully_shard(model, mesh=DeviceMesh.from_group(ps.group("dp_cp"), "cpu"))
    try:
        model(_data(0, dist.get_rank())[0])
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_fsdp_over_expert_parameters_is_refused():
    for rank, msg in enumerate(get_pool(4).run(_fsdp_over_everything, timeout=60)):
        assert "FSDP unit (fully_shard) manages the expert parameters" in msg, (rank, msg)
        assert "sync_gradients(layer, ps)" in msg
