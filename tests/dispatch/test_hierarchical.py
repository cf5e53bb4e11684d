"""The hierarchical all-to-all (``token_dispatcher_type="alltoall_hierarchical"``) against the
flat one, on simulated nodes (``ParallelState.build(ranks_per_node=R)`` over gloo ranks).

Layouts: 2 nodes × 2 ranks (ep4), 2 × 4 (ep8), 4 × 2 (ep8), two EP groups of 2 nodes × 2
(ep4, edp2), and ETP 2 (ep4 etp2 over 2 nodes of 4 ranks: 2 EP ranks per node). On each rank the
same full layer (one seed) is sharded twice, once per dispatcher, and both run forward and
backward on the rank's own tokens (uneven counts, some ranks empty), in float64. Only rows move
differently, so output, input gradient, every parameter gradient and the routing statistics must
be bitwise equal (``torch.equal``), dropless and with capacity (unpadded and padded; top-p
routing with V-MoE's batch-priority dropping too). Also: the
node layout arithmetic, and the named errors.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moe_parallel import MoEConfig, MoELayer
from moe_parallel.dispatch import HierarchicalAllToAllDispatcher
from moe_parallel.distributed.parallel_state import ParallelState, ep_node_layout, node_groups
from tests.helpers.dist_harness import get_pool, own_groups
from tests.helpers.layer_runs import forward_backward

TOKENS = [6, 0, 11, 3, 5, 9, 0, 2]
BASE = dict(hidden_size=8, ffn_hidden_size=8, num_experts=16, params_dtype=torch.float64,
            init_std=0.3)
LAYOUTS = {  # name -> (world, ParallelState sizes, ranks_per_node)
    "2x2_ep4": (4, dict(ep=4), 2),
    "2x4_ep8": (8, dict(ep=8), 4),
    "4x2_ep8": (8, dict(ep=8), 2),
    "2x2_ep4_edp2": (8, dict(ep=4), 2),
    "2x4_ep4_etp2": (8, dict(ep=4, etp=2), 4),
}
CASES = {
    "dropless_top2": dict(top_k=2),
    "dropless_top6_shared": dict(top_k=6, ffn_hidden_size=4, num_shared_experts=1),
    "capacity": dict(top_k=2, capacity_factor=1.0),
    "pad_to_capacity": dict(top_k=2, capacity_factor=1.0, pad_to_capacity=True),
    "top_p_batch_priority": dict(top_k=4, top_p=0.6, capacity_factor=0.6,
                                 drop_policy="batch_priority"),
}
def run_layout(layout: str) -> dict:
    with own_groups():
        return _run_layout(layout)


def _run_layout(layout: str) -> dict:
    world, sizes, rpn = LAYOUTS[layout]
    ps = ParallelState.build(**sizes, ranks_per_node=rpn)
    rank = dist.get_rank()
    out = {}
    for name, case in CASES.items():
        cfg = MoEConfig(**{**BASE, **case})
        layers = {}
        for kind in ("alltoall", "alltoall_hierarchical"):
            torch.manual_seed(0)
            full = MoELayer(replace(cfg, token_dispatcher_type=kind))
            layers[kind] = MoELayer.shard_from(full, ps)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(TOKENS[rank], 8, dtype=torch.float64, generator=g)
        gy = torch.randn(TOKENS[rank], 8, dtype=torch.float64, generator=g)
        flat, hier = (forward_backward(layers[k], x, gy)
                      for k in ("alltoall", "alltoall_hierarchical"))
        disp = layers["alltoall_hierarchical"].dispatcher
        same = [torch.equal(a, b) for a, b in zip(flat[:2], hier[:2])]
        same.append(flat[2].keys() == hier[2].keys()
                    and all(torch.equal(flat[2][n], hier[2][n]) for n in flat[2]))
        same += [torch.equal(flat[3], hier[3]), flat[4] == hier[4]]
        out[name] = {"same": same, "two_stage": disp.two_stage,
                     "stages": (disp.ep_per_node, disp.nodes),
                     "grad_norm": float(sum(v.norm() for v in hier[2].values()))}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hierarchical_equals_flat_bitwise(layout):
    world, sizes, rpn = LAYOUTS[layout]
    results = get_pool(world).run(run_layout, layout)
    g = rpn // sizes.get("etp", 1)
    for rank, res in enumerate(results):
        for name, r in res.items():
            assert r["two_stage"] and r["stages"] == (g, sizes["ep"] // g), (rank, name, r)
            assert r["same"] == [True] * 5, (layout, rank, name, r["same"])
            assert r["grad_norm"] > 0, (rank, name)  # gradients reached the parameters


def test_node_layout_arithmetic():
    # EP groups [0..3], [4..7] on nodes of 2 ranks: 2 EP ranks per node
    assert ep_node_layout([[0, 1, 2, 3], [4, 5, 6, 7]], 2) == 2
    assert ep_node_layout([[0, 2, 4, 6], [1, 3, 5, 7]], 4) == 2  # ETP 2 strides the EP group
    assert ep_node_layout([[0, 1, 2, 3]], 4) == 4                 # one node
    assert ep_node_layout([[0, 1, 2, 3]], 1) == 1                 # one rank per node
    assert ep_node_layout([[0, 1, 2], [3, 4, 5]], 2) is None      # nodes [0,0,1], [1,2,2]
    assert node_groups([[0, 1, 2, 3], [4, 5, 6, 7]], 2) == {
        "ep_node": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "ep_rail": [[0, 2], [1, 3], [4, 6], [5, 7]]}


def test_parallel_state_places_nodes(monkeypatch):
    ps = ParallelState.build(ep=4, world_size=8, rank=5, create_groups=False, ranks_per_node=2)
    assert (ps.ranks_per_node, ps.ep_per_node) == (2, 2)
    assert ps.ranks["ep_node"] == [4, 5] and ps.ranks["ep_rail"] == [5, 7]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ps = ParallelState.build(ep=8, world_size=8, rank=6, create_groups=False)
    assert (ps.ranks_per_node, ps.ep_per_node) == (4, 4)
    assert ps.ranks["ep_node"] == [4, 5, 6, 7] and ps.ranks["ep_rail"] == [2, 6]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ParallelState.build(ep=8, world_size=8, rank=0,
                               create_groups=False).ep_per_node == 8  # default: one node
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="ranks_per_node"):
            ParallelState.build(ep=2, world_size=8, rank=0, create_groups=False,
                                ranks_per_node=bad)


def test_errors_name_the_knob():
    ps = ParallelState.build(ep=3, world_size=6, rank=0, create_groups=False, ranks_per_node=2)
    assert ps.ep_per_node is None
    with pytest.raises(ValueError, match="alltoall_hierarchical.*ranks_per_node=2"):
        HierarchicalAllToAllDispatcher(6, ps)
    ps = ParallelState.build(ep=4, world_size=4, rank=0, create_groups=False, ranks_per_node=2)
    with pytest.raises(ValueError, match="ep_node/ep_rail"):
        HierarchicalAllToAllDispatcher(8, ps)
    with pytest.raises(ValueError, match="token_dispatcher_type.*alltoall_hierarchical"):
        MoEConfig(**BASE, token_dispatcher_type="hierarchical")


def run_round_robin_hosts() -> list[str]:
    import socket
    import warnings
    from unittest import mock

    rank = dist.get_rank()
    with mock.patch.object(socket, "gethostname", return_value=f"host{rank % 2}"), \
            warnings.catch_warnings(record=True) as caught, own_groups():
        warnings.simplefilter("always")
        ParallelState.build(ep=4, ranks_per_node=2)  # ranks 0, 2 on host0; 1, 3 on host1
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.distributed
def test_nodes_that_span_hosts_are_reported():
    for messages in get_pool(4).run(run_round_robin_hosts):
        assert len(messages) == 1 and "node(s) [0, 1]" in messages[0], messages
        assert "--map-by slot" in messages[0]
