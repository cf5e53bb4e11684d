"""Record the planner's validation: ``python -m tests.plan.record_validation [--out PREFIX]``
runs every layout and mode of ``validation.py`` on 4 and 8 gloo ranks and writes a table
(``PREFIX.txt``) and every rank's figures (``PREFIX.json``); default prefix
``benchmarks/results/plan_validation_<date>``. Per layout and mode the table gives, for each
category, the predicted bytes of rank 0 and the range of predicted/measured over the ranks."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table(rows: list[dict]) -> str:
    cats = ("params", "grads", "optimizer", "activations")
    head = ["ranks", "layout", "shard", "recompute"] + [f"{c} pred / meas" for c in cats]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["world"], json.dumps(r["layout"], sort_keys=True), r["shard"], r["recompute"])
        groups.setdefault(key, []).append(r)
    lines = [head]
    for (world, layout, shard, recompute), rs in groups.items():
        cells = [str(world), "·".join(f"{k}{v}" for k, v in json.loads(layout).items()),
                 shard, recompute]
        for c in cats:
            ratios = [r[c]["ratio"] for r in rs]
            cell = f"{rs[0][c]['predicted'] / 1024:.1f} KiB {min(ratios):.3f}-{max(ratios):.3f}"
            if c == "optimizer" and shard == "optimizer":
                total = (sum(r[c]["predicted"] for r in rs) / sum(r[c]["measured"] for r in rs))
                cell += f" (all ranks {total:.3f})"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main() -> None:
    from tests.helpers.dist_harness import get_pool
    from tests.plan.validation import BATCH, CASES, MODES, SEQ_LEN, compare, measure

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        f"plan_validation_{datetime.date.today().isoformat()}"))
    args = p.parse_args()
    rows = []
    for world in (4, 8):
        pool = get_pool(world)
        for shard, recompute in MODES:
            for w, layout in CASES:
                if w == world:
                    rows += compare(world, layout, shard, recompute,
                                    pool.run(measure, layout, shard, recompute, timeout=300))
    command = "python -m tests.plan.record_validation " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"# {command}",
        f"# {datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}; built-in model float32 (tests/plan/validation.py "
        f"MODEL, seq {SEQ_LEN} x batch {BATCH}); pred / meas: predicted over measured bytes per "
        f"rank, the range over the ranks; activations: bytes saved for backward",
        "# shard=optimizer: ZeroRedundancyOptimizer keeps each tensor's state whole on one rank, "
        "so a rank's share departs from the even split the planner predicts by up to one "
        "tensor's; over all ranks they agree",
        "", _table(rows), ""])
    Path(args.out + ".txt").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(
        {"command": command, "date": datetime.date.today().isoformat(), "rows": rows},
        indent=1))
    print(text)
    print(f"wrote {args.out}.txt and {args.out}.json")


if __name__ == "__main__":
    main()
