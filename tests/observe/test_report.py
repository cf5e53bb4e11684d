"""python -m moe_parallel.report: the records it reads, the matrix it draws, the files it writes
and the inputs it refuses."""

from __future__ import annotations

import json
import math
import random

import pytest

from moe_parallel.observe.report import load_matrix, main, plot_run, read_records

PNG = b"\x89PNG\r\n\x1a\n"


def _records(steps: int = 6, layers: int = 2, experts: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for step in range(0, 2 * steps, 2):
        entries = []
        for layer in range(layers):
            counts = [rng.randint(1, 50) for _ in range(experts)]
            mean = sum(counts) / experts
            entries.append({"layer": layer, "tokens_per_expert": counts,
                            "drop_rate": rng.random() / 10, "imbalance": max(counts) / mean,
                            "loss_aux": rng.random() / 100})
        out.append({"step": step, "loss": 5.0 - step / 10, "layers": entries})
    return out


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_matrix_is_each_expert_s_load_over_the_mean():
    records = _records()
    records[2]["layers"][1]["tokens_per_expert"] = [0, 0, 0, 0]  # nothing processed
    steps, m = load_matrix(records, 1)
    assert steps == [r["step"] for r in records]
    assert len(m) == 4 and all(len(row) == len(steps) for row in m)
    for j, r in enumerate(records):
        counts = r["layers"][1]["tokens_per_expert"]
        for e, c in enumerate(counts):
            if j == 2:
                assert math.isnan(m[e][j])
            else:
                assert m[e][j] == pytest.approx(c * len(counts) / sum(counts), rel=1e-15)


def test_a_step_logged_twice_keeps_its_last_record(tmp_path):
    records = _records()
    again = json.loads(json.dumps(records[3]))
    again["loss"] = 123.0
    _write(tmp_path / "metrics.jsonl", records + [again])
    got = read_records(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in records]
    assert got[3]["loss"] == 123.0


def test_cli_writes_every_picture(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", _records(layers=3))
    written = main([str(tmp_path), "--out", str(tmp_path / "png")])
    names = sorted(p.name for p in written)
    assert names == ["balance.png", "load_layer0.png", "load_layer1.png", "load_layer2.png",
                     "loss.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert "6 logged steps (0..10), 3 MoE layers" in capsys.readouterr().out


def test_plot_run_without_loss_terms(tmp_path):
    records = _records(layers=1)
    for r in records:
        del r["layers"][0]["loss_aux"]
    assert len(plot_run(records, tmp_path)) == 3


@pytest.mark.parametrize("content,match", [
    ("", "no records"),
    ('{"step": 0, "layers": []}\nnot json\n', r"metrics\.jsonl:2: not JSON"),
    ('{"step": "0", "layers": []}\n', r"metrics\.jsonl:1: not a metrics record"),
])
def test_bad_files_are_refused_naming_the_line(tmp_path, content, match):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_records(tmp_path / "metrics.jsonl")


def test_a_directory_with_several_files_asks_which(tmp_path, capsys):
    _write(tmp_path / "a.jsonl", _records())
    _write(tmp_path / "b.jsonl", _records())
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "holds 2 *.jsonl files (a.jsonl, b.jsonl): name one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "neither a JSON Lines file nor a directory" in capsys.readouterr().err
