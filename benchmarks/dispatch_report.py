"""The dispatch benchmark's tables: dispatch overhead against raw all-to-all, where the time goes
(profiled op families), and the layer against DeepSpeed's."""

from __future__ import annotations

import statistics

from benchmarks.record import print_head

TARGET_RATIO = 1.3  # the project's target for dispatch+combine time / raw all-to-all time


def print_dispatch(rows: list[dict], cfg: str) -> None:
    print(f"\nDispatch overhead: {cfg}; ours = dispatch+combine, raw = all_to_all_single "
          f"(counts + rows there and back); ms per call, slowest rank")
    head = (f"{'world':>5} {'mode':<9} {'rows/rank':>9} {'MB fwd':>8} {'ours fwd':>9} "
            f"{'raw fwd':>8} {'ratio':>6} {'ours f+b':>9} {'raw f+b':>8} {'ratio':>6}")
    print_head(head)
    for r in rows:
        t = r["times"]
        flag = lambda v: "*" if v > TARGET_RATIO else " "  # noqa: E731
        print(f"{r['world']:>5} {r['mode']:<9} {statistics.mean(r['rows_sent_per_rank']):9.0f} "
              f"{r['bytes_fwd_off_rank'] / 2**20:8.1f} {t['ours_fwd']['seconds'] * 1e3:9.2f} "
              f"{t['raw_fwd']['seconds'] * 1e3:8.2f} {r['ratio_fwd']:5.2f}{flag(r['ratio_fwd'])} "
              f"{t['ours_fwd_bwd']['seconds'] * 1e3:9.2f} "
              f"{t['raw_fwd_bwd']['seconds'] * 1e3:8.2f} "
              f"{r['ratio_fwd_bwd']:5.2f}{flag(r['ratio_fwd_bwd'])}")
    print(f"MB fwd: row bytes leaving their rank, all ranks, there and back (f+b moves twice "
          f"that); * ratio above the {TARGET_RATIO} target")


FAMILIES = ("all_to_all", "all_gather", "sort_chunks", "permute/unpermute", "other",
             "untracked")


def print_profiles(rows: list[dict]) -> None:
    rows = [r for r in rows if r.get("profile_ours_fwd_bwd_rank0")]
    if not rows:
        return
    print("\nWhere ours forward+backward spends its time (torch.profiler, rank 0, ms per call, "
          "self time by op family; raw = the bare all_to_all_single calls, all untracked)")
    head = (f"{'world':>5} {'mode':<9} {'raw':>7} {'ours':>7} "
            + " ".join(f"{f[:11]:>11}" for f in FAMILIES))
    print_head(head)
    for r in rows:
        prof, raw = r["profile_ours_fwd_bwd_rank0"], r["profile_raw_fwd_bwd_rank0"]
        fam = dict(prof["by_family_self_ms"])  # gemm / other collectives (none here) -> other
        fam["other"] = sum(v for k, v in fam.items() if k not in FAMILIES[:-2] + ("untracked",))
        print(f"{r['world']:>5} {r['mode']:<9} {raw['wall_ms_per_call']:7.1f} "
              f"{prof['wall_ms_per_call']:7.1f} "
              + " ".join(f"{fam.get(f, 0.0):11.1f}" for f in FAMILIES))
    for r in rows:
        prof = r["profile_ours_fwd_bwd_rank0"]
        print(f"\nTop ops, ours forward+backward, world {r['world']} {r['mode']}, rank 0 "
              f"(ms per call)")
        print(f"  {'op':<56} {'calls':>6} {'self ms':>8} {'total ms':>9}")
        for op in prof["top_ops"]:
            print(f"  {op['op'][:56]:<56} {op['calls']:6.1f} {op['self_ms']:8.2f} "
                  f"{op['total_ms']:9.2f}")


def print_layer(res: dict, cfg: str) -> None:
    print(f"\nMoE layer forward+backward, {cfg}")
    head = f"{'variant':<22} {'ms/step':>9} {'vs deepspeed':>12} {'rows/rank':>10} {'dropped':>8}"
    print_head(head)
    ds = res["times"].get("deepspeed", {}).get("seconds")
    for name, t in res["times"].items():
        rows = res["rows_per_rank"][name]
        drops = [r["drop_rate"] for r in rows if r["drop_rate"] is not None]
        vs_ds = f"{t['seconds'] / ds:.3f}" if ds else "-"
        print(f"{name:<22} {t['seconds'] * 1e3:9.1f} {vs_ds:>12} "
              f"{statistics.mean(r['rows_computed'] for r in rows):10.0f} "
              f"{(f'{statistics.mean(drops):.2%}' if drops else '-'):>8}")
    ds = res.get("deepspeed") or {}
    if ds.get("available") and not res.get("deepspeed_note"):
        env = " ".join(f"{k}={v}" for k, v in ds["env"].items())
        print(f"DeepSpeed {ds['version']} ({ds['accelerator']} accelerator): {env}, "
              f"deepspeed.init_distributed(dist_backend='gloo'), MoE.set_deepspeed_parallelism()")
    if res.get("deepspeed_note"):
        print(res["deepspeed_note"])
    for name, prof in (res.get("profiles_rank0") or {}).items():
        fams = ", ".join(f"{k} {v:.1f}" for k, v in sorted(prof["by_family_self_ms"].items()))
        print(f"\nProfile {name}, rank 0: {prof['wall_ms_per_call']:.1f} ms/step; "
              f"self ms by family: {fams}")
        for op in prof["top_ops"]:
            print(f"  {op['op'][:56]:<56} {op['calls']:6.1f} {op['self_ms']:8.2f} "
                  f"{op['total_ms']:9.2f}")
