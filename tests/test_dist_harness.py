"""The shared worker pool's process groups share one gloo transport device, so that groups
left alive between tests cost no CPU while idle: one event-loop thread per worker however many
groups it holds, and the groups still compute what they should."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist_harness import get_pool, own_groups

pytestmark = pytest.mark.distributed


def _loop_threads() -> int:
    """This worker's gloo event-loop threads."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            count += f.read().strip() == "gloo_tcp_loop"
    return count


def _many_groups(n: int) -> tuple[int, float, float]:
    with own_groups():
        world = list(range(dist.get_world_size()))
        groups = [dist.new_group(world) for _ in range(n)]
        pair = dist.new_group([0, 1])  # a group not every rank belongs to
        total = torch.tensor([float(dist.get_rank() + 1)], dtype=torch.float64)
        for g in groups:
            dist.all_reduce(total, group=g)
        mine = torch.tensor([float(dist.get_rank() + 1)], dtype=torch.float64)
        if dist.get_rank() < 2:
            dist.all_reduce(mine, group=pair)
        return _loop_threads(), total.item(), mine.item()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_many_groups_share_one_event_loop_and_compute_right():
    got = get_pool(4).run(_many_groups, 12)
    # each all-reduce multiplies the sum by 4: (1 + 2 + 3 + 4) · 4^11 after 12 of them
    want_total = 10.0 * 4 ** 11
    assert got == [(1, want_total, 3.0), (1, want_total, 3.0), (1, want_total, 3.0),
                   (1, want_total, 4.0)]
