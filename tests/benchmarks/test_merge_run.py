"""``python -m benchmarks merge`` end to end at tiny sizes: its JSON and table, finite losses of
the merged models before router training, router-only training that touches nothing but the
routers and lowers the loss on the mix."""

from __future__ import annotations

import json
import math

from benchmarks.__main__ import BENCHMARKS
from benchmarks.__main__ import main as bench_main

TINY = ["--vocab", "32", "--hidden", "16", "--ffn", "32", "--layers", "2", "--heads", "2",
        "--seq-len", "16", "--batch-size", "8", "--seed-steps", "5", "--branch-steps", "30",
        "--lr", "0.01", "--router-steps", "30", "--router-lr", "0.05", "--eval-batches", "4"]


def test_merge_run_tiny(tmp_path, capsys):
    assert BENCHMARKS["merge"][0] == "benchmarks.merge_run"
    out = tmp_path / "merge.json"
    assert bench_main(["merge", *TINY, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["command"] == " ".join(["python -m benchmarks merge", *TINY, "--out", str(out)])
    assert rec["machine"]["cpu_count"] >= 1
    rows = {r["model"]: r for r in rec["rows"]}
    names = ["model A (trained on A)", "model B (trained on B)", "average of A and B",
             "oracle: mean body + own expert"]
    for k in (1, 2):
        names += [f"merged top-{k}, before router training",
                  f"merged top-{k}, after router training"]
    assert list(rows) == names
    for r in rows.values():
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in ("loss_a", "loss_b"))
        assert r["loss_mean"] == (r["loss_a"] + r["loss_b"]) / 2
    # each branch learned its own source: better on it than on the other source
    assert rows["model A (trained on A)"]["loss_a"] < rows["model A (trained on A)"]["loss_b"]
    assert rows["model B (trained on B)"]["loss_b"] < rows["model B (trained on B)"]["loss_a"]
    hist = rec["train_history"]
    assert len(hist["seed"]) == 5 and len(hist["a"]) == len(hist["b"]) == 30
    for k in (1, 2):
        before = rows[f"merged top-{k}, before router training"]
        after = rows[f"merged top-{k}, after router training"]
        assert after["top_k"] == before["top_k"] == k
        # only the routers trained: 2 layers x [2 experts, H=16]
        assert after["trainable"] == 2 * 2 * 16
        assert len(after["router_history"]) == 30
        # router training lowers the loss on the mix (held out: half A, half B)
        with capsys.disabled():
            print(f"\ntop-{k}: held-out mixed loss {before['loss_mean']:.4f} before router "
                  f"training, {after['loss_mean']:.4f} after")
        assert after["loss_mean"] < before["loss_mean"], (k, before, after)
        for key in ("expert0_share_a", "expert0_share_b"):
            assert len(after[key]) == 2 and all(0.0 <= s <= 1.0 for s in after[key])
    text = out.with_suffix(".txt").read_text()
    assert text.startswith(f"# {rec['command']}\n")
    assert all(name in text for name in names)
    assert "wrote " + str(out) in capsys.readouterr().out
    with capsys.disabled():
        print(f"model A on A {rows[names[0]]['loss_a']:.4f}, on B {rows[names[0]]['loss_b']:.4f}")
