"""``python -m moe_parallel.checkpoint consolidate DIR OUT`` / ``shard FILE DIR``.

OUT ending in ``.safetensors`` writes the model's tensors as safetensors, anything else a
``torch.save`` file with the model, optimizer state and extra (``convert.py``).
"""

from __future__ import annotations

import argparse

from .convert import consolidate, shard


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moe_parallel.checkpoint",
                                description="convert moe_parallel checkpoints")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="checkpoint directory -> one single-process file")
    c.add_argument("directory")
    c.add_argument("out", help="*.safetensors (model tensors) or a torch.save file (all state)")
    s = sub.add_parser("shard", help="consolidated file -> checkpoint directory (any layout)")
    s.add_argument("file")
    s.add_argument("directory")
    args = p.parse_args(argv)
    if args.command == "consolidate":
        out = consolidate(args.directory, args.out)
        n = sum(t.numel() for t in out["model"].values())
        print(f"wrote {args.out}: {len(out['model'])} model tensors, {n:,} values")
    else:
        shard(args.file, args.directory)
        print(f"wrote checkpoint {args.directory}")


if __name__ == "__main__":
    main()
