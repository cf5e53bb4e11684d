"""Branch-Train-MiX on the main job's model, a toy run on one process: two dense models trained
on two different generated sources, merged into an MoE model, then only its routers trained on
a mix of both sources.

1. Branch: the main job's model with ``--experts 1 --top-k 1`` (dense: its one expert gets
   weight 1), built twice from the same ``--seed`` (the same initial weights), is trained for
   ``--branch-steps`` steps by the job's own functions (``build_model``, ``build_optimizer``,
   ``lr_lambda``, ``train_step``), model A on source A and model B on source B:
   ``MarkovSource(--vocab, seed)`` with the two ``--source-seeds`` (different successor tables).
2. Merge: ``merge_dense_models([A, B], top_k=k)`` for each ``--top-k`` (expert 0 = A's, expert
   1 = B's in every layer; the rest averaged; routers drawn from ``N(0, init_std²)``).
3. Mix: only the routers are trained (every other parameter ``requires_grad=False``), AdamW at
   ``--router-lr`` with the job's schedule over ``--router-steps`` steps and the job's
   ``train_step``, on batches of which half the sequences come from each source.

Reported: the next-token loss (nats) on held-out batches of source A and of source B (drawn
from a generator seeded apart from the training streams; ``--eval-batches`` batches each) of
model A, model B, their weight average (``average_models``), and each merged model before and
after router training; each source's entropy (the floor); and, for the merged models, the
fraction of each source's tokens whose first choice is expert 0 (A's), per layer.

    python -m benchmarks merge                                  # table + JSON + .txt
    python -m benchmarks merge --branch-steps 20 --router-steps 10 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.record import save_result
from moe_parallel.distributed import ParallelState
from moe_parallel.train import (
    MarkovSource,
    _parse,
    average_models,
    build_model,
    build_optimizer,
    lm_loss,
    lr_lambda,
    merge_dense_models,
    router_parameters,
    train_step,
)

PS = ParallelState.single()
NAME = "merge"


def job_args(a: argparse.Namespace, steps: int, lr: float) -> argparse.Namespace:
    """The main job's flags of the dense model (``--experts 1 --top-k 1``), checked by its
    parser."""
    argv = ["--experts", "1", "--top-k", "1", "--vocab", str(a.vocab), "--hidden",
            str(a.hidden), "--ffn", str(a.ffn), "--layers", str(a.layers), "--heads",
            str(a.heads), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
            "--steps", str(steps), "--lr", str(lr), "--seed", str(a.seed),
            "--aux-loss-coeff", str(a.aux_loss_coeff), "--z-loss-coeff", str(a.z_loss_coeff)]
    with contextlib.redirect_stderr(io.StringIO()):
        return _parse(argv)


def stream(vocab: int, table_seed: int, draw_seed: int) -> MarkovSource:
    """Source ``table_seed``'s successor table, its sequences drawn from ``draw_seed``."""
    src = MarkovSource(vocab, table_seed)
    src.generator.manual_seed(draw_seed)
    return src


def eval_batches(a: argparse.Namespace, table_seed: int) -> list[Tensor]:
    """``--eval-batches`` held-out batches of the source (a generator apart from training)."""
    src = stream(a.vocab, table_seed, 1_000_003 + table_seed)
    return [src.batch(a.batch_size, a.seq_len) for _ in range(a.eval_batches)]


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[Tensor]) -> float:
    """Mean next-token cross-entropy over ``batches`` (eval mode, training mode restored)."""
    was = model.training
    model.eval()
    try:
        return sum(float(lm_loss(model(b[:, :-1]), b)) for b in batches) / len(batches)
    finally:
        model.train(was)


@torch.no_grad()
def first_choice_share(model: nn.Module, batches: list[Tensor]) -> list[float]:
    """Per MoE layer: the fraction of the tokens of ``batches`` whose first-choice expert is
    expert 0."""
    hits = [0] * len(model.blocks)
    total = [0] * len(model.blocks)
    hooks = []
    for i, block in enumerate(model.blocks):
        def hook(_module, _inputs, output, i=i):
            idx = output[0].expert_idx[:, 0]
            hits[i] += int((idx == 0).sum())
            total[i] += idx.numel()
        hooks.append(block.moe.router.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for b in batches:
            model(b[:, :-1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [h / max(t, 1) for h, t in zip(hits, total)]


def train_dense(model: nn.Module, a: argparse.Namespace, steps: int,
                next_batch: Callable[[], Tensor]) -> list[float]:
    """``steps`` steps of the job (``build_optimizer``, ``lr_lambda``, ``train_step``) on
    ``next_batch()``; returns each step's lm loss."""
    args = job_args(a, steps, a.lr)
    opt = build_optimizer(model, args, PS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    history = []
    for _ in range(steps):
        loss, _ = train_step(model, opt, next_batch(), PS, args.clip)
        sched.step()
        history.append(float(loss))
    return history


def train_branches(a: argparse.Namespace) -> tuple[list[nn.Module], dict[str, list[float]]]:
    """The seed model (``build_model`` of ``--seed``, then ``--seed-steps`` steps on the mix)
    and its two copies trained ``--branch-steps`` steps on source A and on source B."""
    seed_model = build_model(job_args(a, 1, a.lr), PS)
    mix = [stream(a.vocab, s, 4_000_003 + s) for s in a.source_seeds]
    histories = {"seed": train_dense(seed_model, a, a.seed_steps, lambda: mixed_batch(mix, a))
                 if a.seed_steps else []}
    branches = []
    for name, table_seed in zip("ab", a.source_seeds):
        model = copy.deepcopy(seed_model)
        src = stream(a.vocab, table_seed, 2_000_003 + table_seed)
        histories[name] = train_dense(model, a, a.branch_steps,
                                      lambda src=src: src.batch(a.batch_size, a.seq_len))
        branches.append(model)
    return branches, histories


def mixed_batch(sources: list[MarkovSource], a: argparse.Namespace) -> Tensor:
    """``--batch-size`` sequences: the first half from source A, the rest from source B."""
    half = a.batch_size // 2
    return torch.cat([sources[0].batch(half, a.seq_len),
                      sources[1].batch(a.batch_size - half, a.seq_len)])


def train_routers(model: nn.Module, a: argparse.Namespace) -> list[float]:
    """Only the routers of ``model`` trained (``requires_grad=False`` elsewhere) on the mix of
    both sources; returns each step's lm loss."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = router_parameters(model)
    for p in params:
        p.requires_grad_(True)
    args = job_args(a, a.router_steps, a.router_lr)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    sources = [stream(a.vocab, s, 3_000_003 + s) for s in a.source_seeds]
    history = []
    for _ in range(a.router_steps):
        loss, _ = train_step(model, opt, mixed_batch(sources, a), PS, args.clip)
        sched.step()
        history.append(float(loss))
    return history


def row(name: str, models: nn.Module | list[nn.Module], evals: list[list[Tensor]],
        **extra) -> dict:
    """The losses of ``models`` on source A's and B's held-out batches (a list: the first
    model on A, the second on B)."""
    pair = models if isinstance(models, list) else [models, models]
    la, lb = (eval_loss(m, e) for m, e in zip(pair, evals))
    return {"model": name, "loss_a": la, "loss_b": lb, "loss_mean": (la + lb) / 2, **extra}


def with_expert_of(body: nn.Module, source: nn.Module) -> nn.Module:
    """A copy of the dense model ``body`` holding ``source``'s expert weights."""
    out = copy.deepcopy(body)
    with torch.no_grad():
        for mine, theirs in zip(out.blocks, source.blocks):
            for p, q in zip(mine.moe.experts.parameters(), theirs.moe.experts.parameters()):
                p.copy_(q)
    return out


def mean_last(history: list[float], n: int = 5) -> float:
    tail = history[-n:]
    return sum(tail) / len(tail)


def table(record: dict) -> str:
    """The printed result: the command, the setup, the loss table and the routing shares."""
    c = record["config"]
    lines = [f"# {record['command']}",
             f"# {record['date']}, {record['machine'].get('cpu', '?')}, "
             f"{record['machine'].get('cpu_count', '?')} cores, torch "
             f"{record['machine'].get('torch', '?')}",
             f"dense model: {c['layers']} layers, H={c['hidden']}, F={c['ffn']}, vocab "
             f"{c['vocab']}, seq {c['seq_len']}, batch {c['batch_size']}; seed model "
             f"{c['seed_steps']} steps on the mix, branches "
             f"{c['branch_steps']} steps (lr {c['lr']}), routers {c['router_steps']} steps "
             f"(lr {c['router_lr']}) on a half/half mix; aux {c['aux_loss_coeff']}, z "
             f"{c['z_loss_coeff']}",
             f"source entropy (loss floor, nats): A {record['entropy']['a']:.3f}, B "
             f"{record['entropy']['b']:.3f}; uniform {math.log(c['vocab']):.3f}; eval: "
             f"{c['eval_batches']} held-out batches per source",
             ""]
    head = (f"{'model':<38} {'loss on A':>9} {'loss on B':>9} {'mean':>7} "
            f"{'E0 share A/B (per layer)':>30}")
    lines += [head, "-" * len(head)]
    for r in record["rows"]:
        share = ""
        if "expert0_share_a" in r:
            share = " ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(r["expert0_share_a"],
                                                               r["expert0_share_b"]))
        lines.append(f"{r['model']:<38} {r['loss_a']:9.4f} {r['loss_b']:9.4f} "
                     f"{r['loss_mean']:7.4f} {share:>30}")
    lines += ["", "E0 share: fraction of the source's tokens whose first-choice expert is "
              "expert 0 (model A's), per layer", f"wall time {record['seconds']:.1f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--vocab", type=int, default=96)
    add("--hidden", type=int, default=64)
    add("--ffn", type=int, default=128)
    add("--layers", type=int, default=2)
    add("--heads", type=int, default=4)
    add("--seq-len", type=int, default=32)
    add("--batch-size", type=int, default=16)
    add("--seed-steps", type=int, default=200,
        help="steps of the common seed model on the mix before branching (0: branch from "
             "the random initial weights)")
    add("--branch-steps", type=int, default=300, help="training steps of each dense model")
    add("--lr", type=float, default=3e-3, help="the dense models' peak learning rate")
    add("--router-steps", type=int, default=300, help="router-only training steps")
    add("--router-lr", type=float, default=3e-2, help="the routers' peak learning rate")
    add("--top-k", type=int, nargs="+", default=[1, 2], help="merged models' top-k")
    add("--aux-loss-coeff", type=float, default=1e-2)
    add("--z-loss-coeff", type=float, default=0.0)
    add("--eval-batches", type=int, default=8)
    add("--seed", type=int, default=0, help="model seed (both dense models start from it)")
    add("--source-seeds", type=int, nargs=2, default=[1, 2], metavar=("A", "B"))
    add("--threads", type=int, default=1,
        help="torch threads (1: the tiny model runs fastest on one, and a shared machine's "
             "other load does not stall it)")
    add("--out", type=Path, default=None,
        help="JSON path (default results/merge_cpu_<date>.json); the table goes beside it "
             "as .txt")
    a = p.parse_args(argv)
    if a.source_seeds[0] == a.source_seeds[1]:
        p.error("--source-seeds must differ (two different sources)")
    for name, least in (("seed_steps", 0), ("branch_steps", 1), ("router_steps", 1),
                        ("eval_batches", 1)):
        if getattr(a, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}")
    if a.batch_size < 2:
        p.error("--batch-size must be >= 2 (half of each mixed batch per source)")
    if any(k not in (1, 2) for k in a.top_k):
        p.error("--top-k takes 1 and/or 2 (two experts)")
    if a.threads < 1:
        p.error("--threads must be >= 1")
    job_args(a, 1, a.lr)  # the job's checks of the model flags, before any training
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    evals = [eval_batches(a, s) for s in a.source_seeds]
    (model_a, model_b), histories = train_branches(a)
    hist_a, hist_b = histories["a"], histories["b"]
    average = average_models([model_a, model_b])
    rows = [row("model A (trained on A)", model_a, evals, train_loss=mean_last(hist_a)),
            row("model B (trained on B)", model_b, evals, train_loss=mean_last(hist_b)),
            row("average of A and B", average, evals),
            row("oracle: mean body + own expert", [with_expert_of(average, model_a),
                                                   with_expert_of(average, model_b)], evals)]
    for k in a.top_k:
        merged = merge_dense_models([model_a, model_b], top_k=k, seed=a.seed)
        shares = [first_choice_share(merged, e) for e in evals]
        rows.append(row(f"merged top-{k}, before router training", merged, evals,
                        top_k=k, stage="before", expert0_share_a=shares[0],
                        expert0_share_b=shares[1]))
        trained = copy.deepcopy(merged)
        history = train_routers(trained, a)
        shares = [first_choice_share(trained, e) for e in evals]
        rows.append(row(f"merged top-{k}, after router training", trained, evals,
                        top_k=k, stage="after", expert0_share_a=shares[0],
                        expert0_share_b=shares[1], router_history=history,
                        mix_loss_first=mean_last(history[:5]), mix_loss_last=mean_last(history),
                        trainable=sum(p.numel() for p in trained.parameters()
                                      if p.requires_grad)))
    entropy = {k: MarkovSource(a.vocab, s).entropy for k, s in zip("ab", a.source_seeds)}
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "entropy": entropy, "rows": rows,
               "train_history": histories,
               "seconds": time.perf_counter() - t0}
    record, path = save_result(NAME, argv, payload, a.out, "merge_cpu")
    text = table(record)
    print(text)
    path.with_suffix(".txt").write_text(text + "\n")
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
