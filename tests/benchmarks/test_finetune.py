"""``python -m benchmarks finetune`` at a tiny size: the structure of its record and what must
hold whatever the figures (every run starts from the pretrained model, evaluation is without
dropout, freezing leaves only the chosen parameters trainable)."""

from __future__ import annotations

import json
import math

from benchmarks import finetune


def test_finetune_runs_every_setting_from_the_same_start(tmp_path):
    out = tmp_path / "ft.json"
    record = finetune.main(["--vocab", "32", "--hidden", "16", "--ffn", "16", "--layers", "1",
                            "--heads", "2", "--experts", "4", "--seq-len", "8", "--batch", "4",
                            "--pretrain-steps", "3", "--ft-samples", "8", "--val-samples", "8",
                            "--ft-steps", "4", "--eval-every", "2", "--seeds", "1",
                            "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks finetune")
    runs = record["runs"]
    assert len(runs) == 3 * 2 * 2
    assert {(r["frozen"], r["dropout"], r["aux"]) for r in runs} == {
        (f, d, a) for f in finetune.FREEZING for d in (0.0, 0.3) for a in (0.01, 0.0)}
    start = record["zero_shot"]["B"]
    for r in runs:
        assert r["val"][0] == start, r  # the same pretrained weights, evaluated without dropout
        assert all(math.isfinite(v) for v in r["val"].values()) and sorted(r["val"]) == [0, 2, 4]
        assert r["best_val"] == min(r["val"].values())
    trainable = {r["frozen"]: r["trainable_params"] for r in runs}
    assert trainable["all"] > trainable["moe"] > 0 and trainable["all"] > trainable[
        "experts_only"] > 0
    # frozen runs train fewer parameters but still learn: the training loss moves
    moved = [r for r in runs if r["val"][4] != start]
    assert len(moved) == len(runs)
    assert set(record["ordering"]) >= {"overall"}
