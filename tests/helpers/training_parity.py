"""Training on every rank against one process on all ranks' tokens (float64): the pieces the
data-parallel wrapper tests (DDP, FSDP2) share. Runs inside a dist_harness worker."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_parallel import MoEConfig, MoELayer, set_aux_loss_scale
from moe_parallel.distributed import clip_grad_norm
from moe_parallel.experts import shard_expert_weights

CFG = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2, aux_loss_coeff=0.1,
           params_dtype=torch.float64, init_std=0.3)
TOKENS = (6, 3, 5, 4)  # per rank
STEPS, TOL = 2, 1e-10


class Net(nn.Module):
    """Dense in, an MoE layer (residual), dense out."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.inp = nn.Linear(4, 8, dtype=torch.float64)
        self.moe = moe
        self.out = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h)).squeeze(-1)  # the aux loss rides on the moe output


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(TOKENS[rank], 4, generator=g, dtype=torch.float64)
    return x, x.sum(-1)


def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), target)


def nets(ps, **changes) -> tuple[Net, Net]:
    """The full single-process net and this rank's net (its expert shard, the dense weights)."""
    torch.manual_seed(0)
    full = Net(MoELayer(MoEConfig(**{**CFG, **changes})))
    model = Net(MoELayer.shard_from(full.moe, ps))
    model.load_state_dict({k: v for k, v in full.state_dict().items()
                           if not k.startswith("moe.experts.")}, strict=False)
    return full, model


def train_against_one_process(ps, full: Net, model: Net, forward: nn.Module,
                              after_backward: Callable[[], None],
                              clip: float | None = None) -> dict[str, float]:
    """``STEPS`` SGD steps of ``model`` (through ``forward``, e.g. its DDP wrapper; then
    ``after_backward()``) and of ``full`` on every rank's tokens; the relative error of each of
    ``model``'s parameters against ``full``'s (expert shards against their slice)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(full.parameters(), lr=0.1)
    set_aux_loss_scale(full, 1.0 / world)  # one process runs the world's forwards: their mean
    for step in range(STEPS):
        opt.zero_grad()
        loss(forward, *data(step, rank)).backward()
        after_backward()
        if clip is not None:
            clip_grad_norm(model, ps, clip)
        opt.step()
        # one process: the mean of the ranks' losses (each rank's loss is its own mean)
        ref_opt.zero_grad()
        sum(loss(full, *data(step, r)) for r in range(world)).div(world).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(full.parameters(), clip)
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


def first_forward_error(ps, wrap: Callable[[Net], nn.Module]) -> str:
    """The ValueError message of the first forward of ``wrap(net)`` (a net whose MoE layer is
    expert-parallel over ``ps``), or "no error"."""
    torch.manual_seed(0)
    model = wrap(Net(MoELayer(MoEConfig(**CFG), parallel_state=ps)))
    try:
        model(data(0, dist.get_rank())[0])
    except ValueError as exc:
        return str(exc)
    return "no error"


def assert_parity(per_rank: list[dict[str, float]], num_params: int) -> None:
    """Every rank's every parameter within ``TOL`` of the one-process run."""
    for rank, errors in enumerate(per_rank):
        assert len(errors) == num_params, errors
        for name, err in errors.items():
            assert err < TOL, f"rank {rank} {name}: relative error {err:.3e}"


def assert_same_run(first: dict, second: dict) -> None:
    """Two ``train.main`` results (e.g. a run and its resumption) with the same loss history and
    bitwise-equal parameters."""
    assert second["history"] == first["history"], (second["history"], first["history"])
    a, b = first["model"].state_dict(), second["model"].state_dict()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad
