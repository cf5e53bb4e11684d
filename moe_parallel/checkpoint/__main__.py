"""``python -m moe_parallel.checkpoint consolidate DIR OUT`` / ``shard FILE DIR`` /
``upgrade --trust-pickles DIR``.

OUT ending in ``.safetensors`` writes the model's tensors as safetensors; any other OUT writes
every tensor (model, optimizer state, extra) as safetensors at OUT and the rest (manifest,
extra, hyperparameters) as JSON at ``OUT.json`` (``convert.py``). Nothing is pickled.
"""

from __future__ import annotations

import argparse

from .agreement import CheckpointError
from .convert import consolidate, shard, upgrade


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moe_parallel.checkpoint",
                                description="convert moe_parallel checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="checkpoint directory -> one single-process file")
    c.add_argument("directory")
    c.add_argument("out", help="*.safetensors: the model's tensors; any other name: every tensor "
                   "as safetensors at OUT plus OUT.json (manifest, extra, hyperparameters)")
    s = sub.add_parser("shard", help="consolidated file -> checkpoint directory (any layout); "
                       "a torch.save file is read with weights_only=True")
    s.add_argument("file")
    s.add_argument("directory")
    u = sub.add_parser("upgrade", help="rewrite a checkpoint whose extra, RNG states or "
                       "hyperparameters are pickled (format 1) without pickles (format 2)")
    u.add_argument("--trust-pickles", action="store_true",
                   help="required: unpickling runs any code the checkpoint holds")
    u.add_argument("directory")
    args = p.parse_args(argv)
    try:
        _run(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "upgrade":
        upgrade(args.directory, trust_pickles=args.trust_pickles)
        print(f"upgraded checkpoint {args.directory}")
        return
    if args.command == "consolidate":
        out = consolidate(args.directory, args.out)
        n = sum(t.numel() for t in out["model"].values())
        print(f"wrote {args.out}: {len(out['model'])} model tensors, {n:,} values")
    else:
        shard(args.file, args.directory)
        print(f"wrote checkpoint {args.directory}")


if __name__ == "__main__":
    main()
