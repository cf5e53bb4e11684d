"""Predicted against measured bytes per rank of the built-in model on small layouts.

On every rank (a ``dist_harness`` pool worker) ``measure`` builds the built-in model
(``moe_parallel.train``'s ``MoETransformerLM``, float32, dropless) for a layout and a
sharding / recompute mode, then counts exactly (``benchmarks.step_memory``): the bytes of the
rank's parameters, of its gradients after one training step (``train.train_step``: backward,
``sync_gradients``, AdamW step) and of the AdamW state after that step (sharded tensors counted
by their local shard), and the activations one forward of the language-model loss saves for its
backward (``benchmarks.memory.saved_tensor_bytes``) together with the rows each MoE layer's
experts received. ``predict`` evaluates the planner for the same rank: ``moe_parallel.plan``
with the rank's measured routing imbalance (its received rows over the balanced ``etp·T·k``,
averaged over the layers: the activation model is linear in them).

``MODES`` lists the (sharding, recompute) modes measured.
"""

from __future__ import annotations

MODEL = dict(vocab=64, hidden=32, ffn=48, experts=8, top_k=2, layers=2, heads=4)
SEQ_LEN, BATCH = 32, 2

# (world size, layout): every layout of the built-in model on 4 and 8 ranks the tests use
CASES: list[tuple[int, dict]] = [
    (4, dict(ep=4)), (4, dict(ep=2)), (4, dict(ep=2, etp=2)), (4, dict(tp=2, ep=2)),
    (4, dict(etp=4)),
    (8, dict(ep=8)), (8, dict(ep=4)), (8, dict(ep=2, etp=2)), (8, dict(tp=2, ep=4)),
    (8, dict(ep=4, etp=2)),
]
MODES: list[tuple[str, str]] = [
    ("none", "none"), ("none", "activation"), ("none", "experts"),
    ("optimizer", "none"), ("experts", "none"),
]


def measure(layout: dict, shard: str = "none", recompute: str = "none") -> dict:
    """This rank's exact counts (module docstring; ``benchmarks.step_memory.measure`` of
    ``MODEL`` at ``SEQ_LEN`` × ``BATCH``): ``{"params", "largest_param" (bytes of its largest
    parameter), "grads", "optimizer", "activations", "rows": [rows per MoE layer], "tokens":
    MoE tokens of this rank}`` and the experts' share of each (``expert_*``)."""
    from benchmarks.step_memory import measure as step_memory
    from tests.helpers.dist_harness import parallel_state

    return step_memory(parallel_state(**layout), MODEL, SEQ_LEN, BATCH, shard, recompute)


def predict(world: int, layout: dict, shard: str, recompute: str, measured: dict) -> dict:
    """The planner's bytes for the rank ``measured`` came from (module docstring)."""
    from moe_parallel.plan import Layout, MemoryOptions, builtin_model, layout_memory

    lay = Layout(world, **layout, shard=shard, recompute=recompute)
    assignments = measured["tokens"] * MODEL["top_k"]
    rho = sum(measured["rows"]) / len(measured["rows"]) / (lay.etp * assignments)
    model = builtin_model(seq_len=SEQ_LEN, **MODEL)
    return layout_memory(model, lay, MemoryOptions(seq_len=SEQ_LEN, micro_batch=BATCH,
                                                   precision="fp32", imbalance=rho))


def compare(world: int, layout: dict, shard: str, recompute: str,
            per_rank: list[dict]) -> list[dict]:
    """One row per rank: measured, predicted and their ratio for each category."""
    rows = []
    for rank, got in enumerate(per_rank):
        pred = predict(world, layout, shard, recompute, got)
        row = {"world": world, "layout": layout, "shard": shard, "recompute": recompute,
               "rank": rank, "largest_param": got["largest_param"],
               "imbalance": sum(got["rows"]) / len(got["rows"])
               / (layout.get("etp", 1) * got["tokens"] * MODEL["top_k"])}
        for key in ("params", "grads", "optimizer", "activations"):
            row[key] = {"measured": got[key], "predicted": pred[key],
                        "ratio": pred[key] / got[key]}
        rows.append(row)
    return rows
