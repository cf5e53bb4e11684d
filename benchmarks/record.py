"""Where a benchmark result goes: one JSON with date, command and machine in results/, and the
heads of the tables it prints."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from benchmarks.machine import machine_info

RESULTS = Path(__file__).parent / "results"


def save_result(name: str, argv: list[str] | None, payload: dict, out: Path | None,
                stem: str) -> tuple[dict, Path]:
    """Write ``{"date", "command", "machine", **payload}`` to ``out`` (default
    ``results/<stem>_<date>.json``), print its path; return the record and the path.
    ``command`` is ``python -m benchmarks <name>`` with ``argv`` (the CLI's when None)."""
    args = sys.argv[1:] if argv is None else argv
    record = {"date": str(date.today()),
              "command": " ".join(["python -m benchmarks", name, *args]),
              "machine": machine_info(), **payload}
    path = out or RESULTS / f"{stem}_{date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return record, path


def print_head(head: str) -> None:
    """Print a table's column heads and a rule of the same width under them."""
    print(head + "\n" + "-" * len(head))
