"""``python -m benchmarks finetune``: ST-MoE's fine-tuning recipe at small scale, on the demo
model (``moe_parallel.train.MoETransformerLM``), one process.

1. Pretrain on source A (the job's Markov source, ``MarkovSource(vocab, seed)``) for
   ``--pretrain-steps`` steps.
2. Fine-tune on source B: B keeps A's successor table for the tokens ``[0, vocab/2)`` and has
   its own for the rest, so what was pretrained helps on half of it. The fine-tuning set is
   ``--ft-samples`` fixed sequences of B (small, so the sparse model can overfit: what the
   recipe's expert dropout is for); the validation set ``--val-samples`` other sequences of B.
   Every run starts from the same pretrained weights and trains ``--ft-steps`` steps of AdamW
   at a constant ``--ft-lr`` on batches drawn from the fixed set in a seeded order:

   * freezing (``moe_parallel.train.freeze``): (i) ``all`` (nothing frozen), (ii) ``moe``
     (the MoE layers frozen: routers, experts), (iii) ``experts_only`` (everything but the
     routed experts frozen: ``dense,router``);
   * expert dropout (``MoEConfig.expert_dropout``: the experts' hidden units, training only)
     0 or ``--dropout``; the demo model has no dense dropout;
   * the auxiliary loss on (``--aux``) or off (0).

   The validation loss (eval mode: no dropout) is taken every ``--eval-every`` steps; each run
   is repeated for ``--seeds`` seeds (fine-tuning order and dropout seed).

Reported per run (mean and spread over seeds): the best and the final validation loss and the
final training loss; the curves (PNG); and whether ST-MoE's ordering holds here: (i) ≈ (ii) >
(iii), with "≈" meaning the best validation losses of (i) and (ii) differ by less than
``--tie`` (relative) and ">" that (iii)'s is higher than (ii)'s by more than that.

    python -m benchmarks finetune                      # table, JSON and PNG in results/
    python -m benchmarks finetune --ft-steps 20 --pretrain-steps 20 --seeds 1 --out /tmp/f.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path

import torch

from benchmarks.plotting import pyplot, save_figure
from benchmarks.record import print_head, save_result
from moe_parallel import MoEConfig
from moe_parallel.distributed import ParallelState
from moe_parallel.layer import set_expert_dropout_step
from moe_parallel.replay import set_token_keys
from moe_parallel.train import MarkovSource, MoETransformerLM, lm_loss, train_step
from moe_parallel.train.freeze import freeze

FREEZING = {"all": (), "moe": ("moe",), "experts_only": ("dense", "router")}
LABELS = {"all": "(i) all trained", "moe": "(ii) MoE frozen",
          "experts_only": "(iii) only experts trained"}


def sources(vocab: int, seed: int) -> tuple[MarkovSource, MarkovSource]:
    """Source A (pretraining) and source B: B's successors are A's for the tokens
    ``[0, vocab/2)`` and its own for the rest."""
    a, b = MarkovSource(vocab, seed), MarkovSource(vocab, seed + 1000)
    b.successors[: vocab // 2] = a.successors[: vocab // 2]
    return a, b


def build(args: argparse.Namespace, dropout: float, aux: float, seed: int) -> MoETransformerLM:
    config = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_experts=args.experts, top_k=args.top_k, aux_loss_coeff=aux,
                       expert_dropout=dropout, expert_dropout_seed=seed)
    return MoETransformerLM(config, args.vocab, args.layers, args.heads, args.seq_len)


def set_keys(model: torch.nn.Module, sample_ids: torch.Tensor, seq_len: int) -> None:
    """The tokens' keys for the expert dropout mask: (sample index, position)."""
    set_token_keys(model, sample_ids.view(1, -1), torch.arange(seq_len).view(-1, 1))


@torch.no_grad()
def evaluate(model: MoETransformerLM, data: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over ``data [N, S+1]`` in eval mode."""
    model.eval()
    losses = [float(lm_loss(model(x[:, :-1]), x)) * len(x) for x in data.split(batch)]
    model.train()
    return sum(losses) / len(data)


def pretrain(args: argparse.Namespace, source: MarkovSource) -> dict:
    """The pretrained state dict (aux on, no dropout) and its loss curve."""
    torch.manual_seed(args.seed)
    model = build(args, 0.0, args.aux, args.seed)
    ps = ParallelState.single()
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    curve = []
    for _ in range(args.pretrain_steps):
        loss, _ = train_step(model, opt, source.batch(args.batch, args.seq_len), ps, 1.0)
        curve.append(float(loss))
    return {"state": model.state_dict(), "curve": curve}


def finetune(args: argparse.Namespace, state: dict, train_set: torch.Tensor,
             val_set: torch.Tensor, frozen: str, dropout: float, aux: float, seed: int) -> dict:
    """One fine-tuning run from ``state``; its curves and final figures."""
    torch.manual_seed(seed)
    model = build(args, dropout, aux, seed)
    model.load_state_dict(state)
    counts = freeze(model, FREEZING[frozen]) if FREEZING[frozen] else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.ft_lr, weight_decay=0.0)
    ps = ParallelState.single()
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(train_set), generator=order), 0
    val = {0: evaluate(model, val_set, args.batch)}
    train_curve = []
    for step in range(args.ft_steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(train_set), generator=order), 0
        ids = perm[pos:pos + args.batch]
        pos += args.batch
        set_keys(model, ids, args.seq_len)
        set_expert_dropout_step(model, step)
        loss, _ = train_step(model, opt, train_set[ids], ps, 1.0)
        train_curve.append(float(loss))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.ft_steps:
            val[step + 1] = evaluate(model, val_set, args.batch)
    return {"frozen": frozen, "dropout": dropout, "aux": aux, "seed": seed,
            "frozen_params": counts, "trainable_params": sum(p.numel() for p in trainable),
            "val": val, "train": train_curve, "best_val": min(val.values()),
            "final_val": val[args.ft_steps],
            "final_train": statistics.fmean(train_curve[-args.eval_every:])}


def summarise(runs: list[dict]) -> dict[tuple, dict]:
    """Mean and spread over seeds of each (frozen, dropout, aux) setting."""
    out: dict[tuple, dict] = {}
    for key, group in itertools.groupby(
            sorted(runs, key=lambda r: (r["frozen"], r["dropout"], r["aux"])),
            key=lambda r: (r["frozen"], r["dropout"], r["aux"])):
        group = list(group)
        out[key] = {m: (statistics.fmean(r[m] for r in group),
                        statistics.pstdev([r[m] for r in group]))
                    for m in ("best_val", "final_val", "final_train")}
    return out


def ordering(summary: dict[tuple, dict], tie: float) -> dict:
    """ST-MoE's (i) ≈ (ii) > (iii) on the best validation loss, averaged over the dropout and
    aux settings, and per setting."""
    def mean_of(frozen: str, keys) -> float:
        return statistics.fmean(summary[(frozen, *k)]["best_val"][0] for k in keys)

    settings = sorted({k[1:] for k in summary})
    verdicts = {}
    for label, keys in [("overall", settings)] + [(f"dropout={d} aux={a}", [(d, a)])
                                                  for d, a in settings]:
        i, ii, iii = (mean_of(f, keys) for f in ("all", "moe", "experts_only"))
        close = abs(i - ii) <= tie * min(i, ii)
        worse = iii - ii > tie * ii
        verdicts[label] = {"i_all": i, "ii_moe_frozen": ii, "iii_experts_only": iii,
                           "i_close_to_ii": close, "iii_worse_than_ii": worse,
                           "holds": close and worse}
    return verdicts


def plot(runs: list[dict], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    settings = sorted({(r["dropout"], r["aux"]) for r in runs})
    cols = 2
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, (d, a) in zip(axes.flat, settings):
        for frozen in FREEZING:
            group = [r for r in runs if (r["frozen"], r["dropout"], r["aux"]) == (frozen, d, a)]
            steps = sorted(group[0]["val"])
            mean = [statistics.fmean(r["val"][s] for r in group) for s in steps]
            ax.plot(steps, mean, marker=".", label=LABELS[frozen])
        ax.set_title(f"expert dropout {d}, aux loss {a}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("validation loss (source B)")
        ax.legend()
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    save_figure(fig, path, 110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--vocab", type=int, default=128)
    add("--hidden", type=int, default=64)
    add("--ffn", type=int, default=64)
    add("--layers", type=int, default=2)
    add("--heads", type=int, default=4)
    add("--experts", type=int, default=8)
    add("--top-k", type=int, default=2)
    add("--seq-len", type=int, default=32)
    add("--batch", type=int, default=16)
    add("--pretrain-steps", type=int, default=300)
    add("--pretrain-lr", type=float, default=3e-3)
    add("--ft-samples", type=int, default=48)
    add("--val-samples", type=int, default=256)
    add("--ft-steps", type=int, default=150)
    add("--ft-lr", type=float, default=1e-3)
    add("--eval-every", type=int, default=10)
    add("--dropout", type=float, default=0.3, help="the expert dropout of the runs with it")
    add("--aux", type=float, default=0.01, help="the aux loss coefficient of the runs with it")
    add("--seeds", type=int, default=3)
    add("--seed", type=int, default=0)
    add("--tie", type=float, default=0.01, help="relative difference read as a tie")
    add("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.ft_steps < args.eval_every:
        p.error("--ft-steps must be >= --eval-every")
    src_a, src_b = sources(args.vocab, args.seed)
    pre = pretrain(args, src_a)
    data = src_b.batch(args.ft_samples + args.val_samples, args.seq_len)
    train_set, val_set = data[:args.ft_samples], data[args.ft_samples:]
    zero_shot = {"A": evaluate(_loaded(args, pre["state"]), src_a.batch(args.val_samples,
                                                                          args.seq_len),
                               args.batch),
                 "B": evaluate(_loaded(args, pre["state"]), val_set, args.batch)}
    runs = [finetune(args, pre["state"], train_set, val_set, frozen, dropout, aux,
                     args.seed + 1 + s)
            for frozen in FREEZING for dropout in (0.0, args.dropout) for aux in (args.aux, 0.0)
            for s in range(args.seeds)]
    summary = summarise(runs)
    verdicts = ordering(summary, args.tie)
    print(f"pretrained on A ({args.pretrain_steps} steps): loss on A {zero_shot['A']:.4f}, "
          f"on B {zero_shot['B']:.4f}; source entropy (floor) ~{src_b.entropy:.3f}")
    head = f"{'setting':<46}{'best val':>17}{'final val':>17}{'final train':>17}"
    print_head(head)
    for (frozen, d, a) in sorted(summary, key=lambda k: (list(FREEZING).index(k[0]), k[1:])):
        figs = summary[(frozen, d, a)]
        cells = "".join(f"{figs[m][0]:>10.4f} ±{figs[m][1]:.4f}"
                        for m in ("best_val", "final_val", "final_train"))
        print(f"{LABELS[frozen] + f', dropout {d}, aux {a}':<46}{cells}")
    for label, v in verdicts.items():
        print(f"ST-MoE ordering (i) ≈ (ii) > (iii), {label}: "
              f"{'holds' if v['holds'] else 'does not hold'} "
              f"(best val: i {v['i_all']:.4f}, ii {v['ii_moe_frozen']:.4f}, "
              f"iii {v['iii_experts_only']:.4f})")
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(args).items()},
               "pretrain_curve": pre["curve"], "zero_shot": zero_shot,
               "source_entropy": src_b.entropy,
               "runs": [{k: v for k, v in r.items()} for r in runs],
               "summary": {f"{f}|{d}|{a}": v for (f, d, a), v in summary.items()},
               "ordering": verdicts}
    record, path = save_result("finetune", argv, payload, args.out, "finetune_cpu")
    plot(runs, args, path.with_suffix(".png"))
    return record


def _loaded(args: argparse.Namespace, state: dict) -> MoETransformerLM:
    model = build(args, 0.0, args.aux, args.seed)
    model.load_state_dict(state)
    return model


if __name__ == "__main__":
    main()
