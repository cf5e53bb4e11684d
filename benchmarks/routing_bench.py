"""Dynamic routing on the demo model: top-2 against top-p at the same mean experts per token,
and the capacity drop policies (with and without dynamic capacity), one process each run.

Every run is ``python -m moe_parallel.train`` (the demo MoE language model on its Markov
source, same seed, ``--steps`` steps, the train flags of ``--train-args``) called in this
process, one after another. Reported per run: the lm loss after the run (mean of the last 5
steps), tokens/s over the run, the mean over steps of the experts each token selected (before
capacity), the mean drop rate, and for dynamic capacity the factor's path.

  * ``top2``: top-2, dropless.
  * ``top_p``: top-p over at most ``--max-k`` experts, dropless, with ``p`` chosen by
    bisection (``--calibration-runs`` full runs) so the mean experts per token over the run is
    within ``--k-tolerance`` of 2 (``--top-p`` skips the search), and the dynamic loss weight
    ``--dynamic-loss-coeff``.
  * ``cap_<policy>``: top-2 at capacity factor ``--capacity-factor`` for every drop policy
    (probs, position, k_major, batch_priority), and ``dynamic_<policy>``: the same with
    ``--dynamic-capacity`` (target ``--target-drop-rate``), for batch_priority.

    python -m benchmarks routing                    # table + JSON in benchmarks/results/
    python -m benchmarks routing --steps 40 --top-p 0.3 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.record import print_head, save_result
from moe_parallel.routing import DROP_POLICIES


def run(train_args: list[str]) -> dict:
    """One demo training run; its figures (the train job's printout is swallowed)."""
    from moe_parallel import train

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = train.main(train_args)
    return {"args": train_args, "last_loss": out["last_loss"], "first_loss": out["first_loss"],
            "tokens_per_s": out["tokens_per_s"],
            "mean_experts_per_token": statistics.fmean(out["experts_per_token"]),
            "final_experts_per_token": out["experts_per_token"][-1],
            "mean_drop_rate": statistics.fmean(out["drop_rate"]),
            "capacity_factor": [f[0] for f in out["capacity_factor"]]}


def calibrate(base: list[str], max_k: int, runs: int, tol: float, extra: list[str]
              ) -> tuple[float, list[dict]]:
    """Bisection on p in (0, 1) for a mean of 2 experts per token (it grows with p)."""
    lo, hi, tried = 0.0, 1.0, []
    best = None
    for _ in range(runs):
        p = (lo + hi) / 2
        r = run([*base, "--top-k", str(max_k), "--top-p", f"{p:.6g}", *extra])
        r["top_p"] = p
        tried.append(r)
        if best is None or abs(r["mean_experts_per_token"] - 2) < abs(
                best["mean_experts_per_token"] - 2):
            best = r
        if abs(r["mean_experts_per_token"] - 2) <= tol:
            break
        lo, hi = (p, hi) if r["mean_experts_per_token"] < 2 else (lo, p)
    return best["top_p"], tried


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks routing", description=__doc__)
    add = p.add_argument
    add("--steps", type=int, default=150)
    add("--train-args", default="", help="more flags for every run (quoted)")
    add("--max-k", type=int, default=4, help="top-p: at most this many experts")
    add("--top-p", type=float, default=None, help="skip the calibration")
    add("--calibration-runs", type=int, default=5)
    add("--k-tolerance", type=float, default=0.1)
    add("--dynamic-loss-coeff", type=float, default=0.0)
    add("--capacity-factor", type=float, default=1.0)
    add("--target-drop-rate", type=float, default=0.01)
    add("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.steps < 5:
        p.error("--steps must be >= 5 (the loss is the mean of the last 5 steps)")
    torch.set_num_threads(torch.get_num_threads())
    base = ["--steps", str(args.steps), "--log-every", str(10 ** 9), *args.train_args.split()]
    extra = ["--dynamic-loss-coeff", str(args.dynamic_loss_coeff)]
    runs: dict[str, dict] = {"top2": run([*base, "--top-k", "2"])}
    tried = []
    top_p = args.top_p
    if top_p is None:
        top_p, tried = calibrate(base, args.max_k, args.calibration_runs, args.k_tolerance,
                                 extra)
    runs["top_p"] = run([*base, "--top-k", str(args.max_k), "--top-p", f"{top_p:.6g}", *extra])
    runs["top_p"]["top_p"] = top_p
    cap = ["--top-k", "2", "--capacity-factor", str(args.capacity_factor)]
    for policy in DROP_POLICIES:
        runs[f"cap_{policy}"] = run([*base, *cap, "--drop-policy", policy])
    runs["dynamic_batch_priority"] = run(
        [*base, *cap, "--drop-policy", "batch_priority", "--dynamic-capacity",
         "--target-drop-rate", str(args.target_drop_rate)])

    print(f"demo model, {args.steps} steps per run, one process; loss = mean of the last 5 "
          f"steps; experts/token = mean over steps (before capacity)")
    head = (f"{'run':<24} {'loss':>7} {'tok/s':>8} {'experts/tok':>11} {'final':>6} "
            f"{'drop %':>7} {'cap. factor':>18}")
    print_head(head)
    for name, r in runs.items():
        f = r["capacity_factor"]
        factor = "-" if f[0] is None else (f"{f[0]:.3f}" if len(set(f)) == 1
                                            else f"{f[0]:.3f}->{f[-1]:.3f}")
        label = name if name != "top_p" else f"top_p (p={top_p:.4g}, k<={args.max_k})"
        print(f"{label:<24} {r['last_loss']:7.4f} {r['tokens_per_s']:8.0f} "
              f"{r['mean_experts_per_token']:11.3f} {r['final_experts_per_token']:6.2f} "
              f"{100 * r['mean_drop_rate']:7.2f} {factor:>18}")
    if tried:
        print("top-p calibration: " + ", ".join(
            f"p={t['top_p']:.4g} -> {t['mean_experts_per_token']:.3f}" for t in tried))
    record, _ = save_result("routing", argv, {"config": vars(args) | {"out": str(args.out)},
                                               "runs": runs, "calibration": tried},
                            args.out, "routing_cpu")
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
