"""reuse_freed_memory(): after it, a step's large tensors reuse freed heap pages instead of
fresh mmap'd ones (no page faults on their first write); it is a no-op when turned off by
MOE_PARALLEL_HEAP_REUSE=0. Each case runs in a fresh interpreter: the setting is per process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")

SCRIPT = r"""
import json, resource, torch
from moe_parallel.cpu_memory import reuse_freed_memory, reusing_freed_memory
enabled = reuse_freed_memory()
def faults():
    # three steps' worth of 64 MiB tensors, each written in full, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        x = torch.empty(16 << 20)
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):
    faults()  # reach the steady state
print(json.dumps({"enabled": enabled, "reported": reusing_freed_memory(), "faults": faults()}))
"""
PAGES_64MIB = (64 << 20) // 4096


def run(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MOE_PARALLEL_HEAP_REUSE", None)
    if env_value is not None:
        env["MOE_PARALLEL_HEAP_REUSE"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    on, off = run(None), run("0")
    assert on["enabled"] and on["reported"]
    assert not off["enabled"] and not off["reported"]
    # Off: every 64 MiB tensor is a fresh mapping, a fault per 4 KiB page.
    assert off["faults"] >= 3 * PAGES_64MIB * 0.9, off
    # On: the pages of the previous tensors are reused.
    assert on["faults"] < PAGES_64MIB * 0.1, on
