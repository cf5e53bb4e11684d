"""What the main job reports while it trains: the progress of the steps (a live tqdm bar on a
terminal, plain periodic lines in logs), every step's routing figures, and the periodic log line
with the load per expert and the drop rate summed over all ranks (from the router metrics
that ``observe`` collects on the logging steps)."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO

from torch import nn
from tqdm import tqdm

PLAIN_LINES = 16  # plain progress lines per run when --progress-every is 0


def is_terminal(stream: Optional[TextIO]) -> bool:
    """Whether ``stream`` is an interactive terminal (``False`` for files, pipes, ``None``)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def plain_every(total: int, every: int = 0) -> int:
    """Steps between plain progress lines: ``every``, else ``ceil(total / PLAIN_LINES)`` (a run
    of ``total`` steps prints at most ``PLAIN_LINES`` lines)."""
    return every if every > 0 else max(1, math.ceil(total / PLAIN_LINES))


class Progress:
    """The lead rank's step progress over steps ``start .. total``.

    ``live`` (default: stdout and stderr are both terminals): a tqdm bar on stderr with the last
    loss and tokens/s; otherwise one plain stdout line ``train D/T  loss L  tok/s R  elapsed
    Ns`` after every done step ``D`` with ``D % every == 0`` and after the last, and no
    carriage-return frames. ``enabled=False`` (the other ranks) prints nothing."""

    def __init__(self, start: int, total: int, enabled: bool, every: int = 0,
                 live: Optional[bool] = None) -> None:
        if live is None:
            live = is_terminal(sys.stdout) and is_terminal(sys.stderr)
        self.enabled, self.total = enabled, total
        self.every = plain_every(total, every)
        self.t0 = time.perf_counter()
        self.bar = tqdm(desc="train", dynamic_ncols=True, initial=start, total=total) if (
            enabled and live) else None

    def update(self, done: int, loss: float, tok_s: float) -> None:
        """Record that step ``done - 1`` finished with ``loss`` at ``tok_s`` tokens/s."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (done % self.every == 0 or done == self.total):
            print(f"train {done}/{self.total}  loss {loss:.3f}  tok/s {tok_s:,.0f}  "
                  f"elapsed {time.perf_counter() - self.t0:.1f}s", flush=True)

    def write(self, line: str) -> None:
        """Print ``line`` on stdout (above the live bar, if any)."""
        if self.bar is not None:
            tqdm.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        """End the live bar."""
        if self.bar is not None:
            self.bar.close()


def new_routing_log() -> dict[str, list]:
    """Per step, this rank's: mean experts per token and drop rate over the layers, and every
    layer's training capacity factor after the step (dynamic capacity moves it)."""
    return {"experts_per_token": [], "drop_rate": [], "capacity_factor": []}


def record_routing(log: dict[str, list], model: nn.Module) -> None:
    """Append this step's figures of ``model.moe_layers()`` to ``log`` (no communication)."""
    layers = model.moe_layers()
    local = [m.last_stats for m in layers]
    log["experts_per_token"].append(sum(st.mean_experts_per_token for st in local) / len(local))
    log["drop_rate"].append(
        sum(st.dropped for st in local) / max(sum(st.num_routed for st in local), 1))
    log["capacity_factor"].append([m.current_capacity_factor(True) for m in layers])


def line_figures(layers: list[dict]) -> tuple[list[int], float]:
    """Tokens per expert summed over the layers, and the drop rate ``Σ dropped / Σ routed``, of
    ``observe.collect_layer_metrics``'s per-layer figures (already summed over the ranks)."""
    load = [sum(col) for col in zip(*(m["tokens_per_expert"] for m in layers))]
    routed = sum(m["routed"] for m in layers)
    return load, sum(m["dropped"] for m in layers) / max(routed, 1)


def step_line(step: int, loss: float, tok_s: float, load: list[int], drop: float,
              experts_per_token: float, capacity_factor: Optional[float]) -> str:
    """The log line of ``step``: loss, tokens/s, load per expert with its max/mean imbalance,
    drop rate, experts per token and (dynamic capacity) the first layer's capacity factor."""
    imbalance = max(load) / (sum(load) / len(load)) if sum(load) else 0.0
    cap = f"  capacity factor {capacity_factor:.3f}" if capacity_factor is not None else ""
    return (f"step {step:4d}  loss {loss:.4f}  tok/s {tok_s:,.0f}  load/expert {load} "
            f"(max/mean {imbalance:.2f})  drop {100 * drop:.1f}%  experts/token "
            f"{experts_per_token:.2f}{cap}")
