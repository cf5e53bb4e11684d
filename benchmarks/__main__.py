"""``python -m benchmarks <name> [args]``: one entry point for the benchmark suite.

Every benchmark prints a table and writes JSON (with the machine it ran on) to
``benchmarks/results/``; ``python -m benchmarks <name> --help`` lists its options.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "ops": ("benchmarks.ops_bench", "custom ops vs their twins and a copy / dense GEMM"),
    "layer": ("benchmarks.layer_bench", "one layer vs dense FFN, reference, HF Mixtral loop"),
    "dropless": ("benchmarks.dropless_bench", "block-sparse vs grouped vs capacity modes"),
    "memory": ("benchmarks.memory", "exact bytes: layer activations, EP peak, per-rank "
               "bytes by shard/recompute"),
    "dispatch": ("benchmarks.dispatch_bench", "dispatch+combine vs raw all-to-all; DeepSpeed"),
    "scaling": ("benchmarks.scaling_bench", "weak/strong scaling and the GPU cost model"),
    "cluster": ("benchmarks.cluster.main", "all-to-all, dispatch and layer over EP sizes; "
                "fitted cost model (any launcher)"),
    "routing": ("benchmarks.routing_bench", "top-2 vs top-p and the drop policies, demo model"),
    "merge": ("benchmarks.merge_run", "Branch-Train-MiX toy run: two dense demo models merged, "
              "routers trained on the mix"),
    "finetune": ("benchmarks.finetune", "ST-MoE fine-tuning recipe: freezing x expert dropout "
                 "x aux loss, demo model"),
    "grouped_gemm": ("benchmarks.grouped_gemm_bench", "grouped GEMM backends (CUDA)"),
    "cuda_graph": ("benchmarks.cuda_graph_bench", "static layer: eager vs CUDA-graph replay "
                   "(CUDA)"),
    "cuda_ops": ("benchmarks.cuda_ops_bench", "CUDA kernel bandwidth vs copy (CUDA)"),
}


def usage() -> str:
    lines = ["usage: python -m benchmarks <name> [args]", "", "benchmarks:"]
    lines += [f"  {name:<13} {what}" for name, (_, what) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}\n",
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
