"""Side-by-side timing: every contender runs once per round, so the machine's noise hits all
of them alike; the figure kept is the median over rounds."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping


def median_seconds(
    fns: Mapping[Hashable, Callable[[], object]],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    progress: bool = False,
) -> dict:
    """Median seconds per call of every fn: one warm-up call each (then ``sync()``), then
    ``repeats`` rounds calling each fn once in turn, ``sync()`` after each call. ``progress``
    prints ``timing round r/n`` to stderr after every round."""
    for fn in fns.values():
        fn()
    sync()
    times: dict = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
        if progress:
            print(f"timing round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in times.items()}
