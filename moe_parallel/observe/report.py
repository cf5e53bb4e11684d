"""Pictures of a run's router metrics: ``python -m moe_parallel.report RUN_DIR | FILE.jsonl``.

Reads the JSON Lines the main job writes with ``--metrics-jsonl`` (schema: ``observe.sinks``;
``RUN_DIR``: a directory holding exactly one ``*.jsonl`` file, or ``metrics.jsonl`` among
several) and draws, with matplotlib (the ``observe`` extra), into ``--out`` (default: the
file's directory):

* ``load_layer{i}.png`` per MoE layer: a heatmap of the relative load ``c_e / mean_e c`` of
  expert ``e`` (row) at each logged step (column), ``c = tokens_per_expert`` (after capacity);
  1.0 is a balanced expert, the colour scale is centred there (``load_matrix``);
* ``balance.png``: per layer, the drop rate and the imbalance ``max / mean`` over the steps;
* ``loss.png``: the training loss over the steps, and each layer's loss terms (``loss_<term>``,
  summed over the layers) where the run logged them.

A step logged twice (a resumed run appends to the file) keeps its last record. Records are
plain JSON: nothing here runs code from the file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

__all__ = ["load_matrix", "main", "plot_run", "read_records"]


def _find_jsonl(path: Path) -> Path:
    """The JSON Lines file ``path`` names (module docstring); ``ValueError`` naming ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"PATH {str(path)!r} is neither a JSON Lines file nor a directory")
    files = sorted(path.glob("*.jsonl"))
    named = [f for f in files if f.name == "metrics.jsonl"]
    if len(files) == 1 or named:
        return named[0] if named else files[0]
    raise ValueError(f"PATH {str(path)!r} holds {len(files)} *.jsonl files"
                     + (f" ({', '.join(f.name for f in files)}): name one, or call one "
                        "metrics.jsonl" if files else ": pass the --metrics-jsonl file"))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of the run at ``path``, one per logged step in step order (the last record
    of a step logged twice). ``ValueError`` naming the file and line for a line that is not a
    JSON object with ``step`` and ``layers``, or a file without records."""
    file = _find_jsonl(Path(path))
    by_step: dict[int, dict[str, Any]] = {}
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
            if (not isinstance(record, dict) or not isinstance(record.get("step"), int)
                    or not isinstance(record.get("layers"), list)):
                raise ValueError(f"{file}:{n}: not a metrics record (an object with an integer "
                                 "'step' and a list 'layers')")
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{file}: no records")
    return [by_step[s] for s in sorted(by_step)]


def load_matrix(records: list[dict[str, Any]], layer: int) -> tuple[list[int], list[list[float]]]:
    """``(steps, m)``: ``m[e][j] = c_e / mean(c)`` of layer ``layer`` at the ``j``-th step that
    logged it, ``c = tokens_per_expert``; NaN for a step where the layer processed nothing."""
    steps, columns = [], []
    for r in records:
        entry = next((m for m in r["layers"] if m.get("layer") == layer), None)
        if entry is None:
            continue
        counts = [float(c) for c in entry["tokens_per_expert"]]
        mean = sum(counts) / len(counts) if counts else 0.0
        steps.append(r["step"])
        columns.append([c / mean if mean > 0 else math.nan for c in counts])
    experts = max((len(c) for c in columns), default=0)
    return steps, [[col[e] if e < len(col) else math.nan for col in columns]
                   for e in range(experts)]


def _layers(records: list[dict[str, Any]]) -> list[int]:
    return sorted({m["layer"] for r in records for m in r["layers"] if "layer" in m})


def _series(records: list[dict[str, Any]], layer: int, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        for m in r["layers"]:
            if m.get("layer") == layer and m.get(key) is not None:
                xs.append(r["step"])
                ys.append(float(m[key]))
    return xs, ys


def plot_run(records: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Write the module docstring's PNGs of ``records`` into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    layers = _layers(records)
    for layer in layers:
        steps, m = load_matrix(records, layer)
        finite = [v for row in m for v in row if not math.isnan(v)]
        top = max([2.0, *finite])
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(steps) + 3), 0.25 * len(m) + 2))
        image = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                          norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=top))
        ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
        ax.set_xticks(ticks, [str(steps[j]) for j in ticks])
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: load per expert / mean load (1 = balanced)")
        fig.colorbar(image, ax=ax, label="tokens / mean")
        fig.tight_layout()
        written.append(out / f"load_layer{layer}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, (drop_ax, imb_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for layer in layers:
        drop_ax.plot(*_series(records, layer, "drop_rate"), label=f"layer {layer}")
        imb_ax.plot(*_series(records, layer, "imbalance"), label=f"layer {layer}")
    drop_ax.set_ylabel("drop rate")
    imb_ax.set_ylabel("imbalance (max / mean)")
    imb_ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    imb_ax.set_xlabel("step")
    drop_ax.legend(fontsize="small", ncol=4)
    fig.tight_layout()
    written.append(out / "balance.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    terms = sorted({k for r in records for m in r["layers"] for k in m
                    if k.startswith("loss_") and m[k] is not None})
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in records if r.get("loss") is not None],
            [r["loss"] for r in records if r.get("loss") is not None], label="loss", color="k")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if terms:
        aux = ax.twinx()
        for term in terms:
            sums: dict[int, float] = {}
            for r in records:
                for m in r["layers"]:
                    if m.get(term) is not None:
                        sums[r["step"]] = sums.get(r["step"], 0.0) + float(m[term])
            aux.plot(list(sums), list(sums.values()), ls="--", label=f"{term} (all layers)")
        aux.set_ylabel("loss terms")
        aux.legend(fontsize="small", loc="center right")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    """``python -m moe_parallel.report PATH [--out DIR]`` (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m moe_parallel.report",
                                description=__doc__.split("\n")[0])
    p.add_argument("path", metavar="PATH",
                   help="the --metrics-jsonl file of a run, or the directory holding it")
    p.add_argument("--out", default=None, help="where the PNGs go (default: the file's directory)")
    args = p.parse_args(argv)
    try:
        file = _find_jsonl(Path(args.path))
        records = read_records(file)
    except (ValueError, OSError) as e:
        p.error(str(e))
    written = plot_run(records, args.out or file.parent)
    steps = [r["step"] for r in records]
    print(f"{len(records)} logged steps ({steps[0]}..{steps[-1]}), "
          f"{len(_layers(records))} MoE layers from {file}")
    for path in written:
        print(f"wrote {path}")
    return written
