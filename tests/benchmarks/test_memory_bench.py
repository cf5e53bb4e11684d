"""benchmarks.memory: the breakdown of saved storages, the peak across threads, and the CLI."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from benchmarks.memory import (
    main,
    peak_live_bytes,
    saved_tensor_breakdown,
    saved_tensor_bytes,
)
from moe_parallel import MoEConfig, MoELayer


def test_breakdown_lists_each_storage_once_and_sums_to_the_totals():
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2,
                    params_dtype=torch.float64)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    parts = saved_tensor_breakdown(lambda: layer(x), layer.parameters())
    totals = saved_tensor_bytes(lambda: layer(x), layer.parameters())
    assert sum(p.nbytes for p in parts if not p.param) == totals["activations"]
    assert sum(p.nbytes for p in parts if p.param) == totals["params"]
    rows = [p for p in parts if p.shape == (18, 16)]  # the expert input rows, T·k = 18
    assert len(rows) == 1 and rows[0].nbytes == 18 * 16 * 8 and "grouped" in rows[0].site


def test_peak_counts_a_free_made_on_another_thread():
    """8000 B allocated, handed to a thread that frees it, then 8000 B again: the peak is
    8000 (a running sum of this thread's events alone would say 16000)."""
    holder = []

    def step():
        holder.append(torch.empty(1000, dtype=torch.float64))
        t = threading.Thread(target=holder.clear)
        t.start()
        t.join()
        b = torch.empty(1000, dtype=torch.float64)
        del b

    assert peak_live_bytes(step) == 8000


@pytest.mark.distributed
def test_memory_cli_tiny(tmp_path):
    out = tmp_path / "memory.json"
    main(["--configs", "--ep", "2", "--ep-tokens", "24", "8", "--ep-hidden", "16",
          "--ep-ffn", "32", "--ep-experts", "4", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m benchmarks memory")
    ep = record["ep"]
    assert {m["mode"] for m in ep} == {"none", "activation", "experts"}
    assert {m["rank"] for m in ep} == {0, 1}
    for m in ep:
        assert 0 < m["peak"] <= m["peak_bound"], m
    assert sum(m["rows_sent"] for m in ep if m["mode"] == "none") == (24 + 8) * 2
