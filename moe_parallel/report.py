"""``python -m moe_parallel.report PATH [--out DIR]``: PNGs of a run's router metrics (the load
per expert over the steps, drop rate and imbalance, loss) from its ``--metrics-jsonl`` file;
``observe.report`` draws them."""

from __future__ import annotations

from .observe.report import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
