"""Part ``train``: one ``moe_parallel.train`` step at the largest EP size, its tokens/s and model
FLOPs utilisation."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Optional

import torch

from benchmarks.cost_model import ACTIVATION_MATRICES

# bf16 dense peak TFLOP/s by GPU name (substring of torch.cuda.get_device_name)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def model_flops_per_token(hidden: int, ffn: int, layers: int, vocab: int, seq_len: int,
                          experts: int, top_k: int, activation: str = "swiglu") -> int:
    """Training FLOPs per token of ``moe_parallel.train``'s model, PaLM's count:
    ``6·N_active + 12·L·H·S`` with ``N_active = L·(4H² + E·H + k·m·H·F) + H·V`` (attention
    projections, router, the ``k`` routed experts' ``m`` matrices, m = 3 SwiGLU / 2 GELU, head;
    embeddings are lookups) and ``12·L·H·S`` the attention scores and values (non-causal)."""
    m = ACTIVATION_MATRICES[activation]
    n_active = layers * (4 * hidden * hidden + experts * hidden + top_k * m * hidden * ffn)
    n_active += hidden * vocab
    return 6 * n_active + 12 * layers * hidden * seq_len


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """bf16 dense peak TFLOP/s of a GPU by name (:data:`PEAK_TFLOPS`), None when unknown."""
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def run_train(cfg: dict, states: dict, device: torch.device, timer: Callable,
           device_name: Optional[str]) -> dict:
    """Part ``train`` (package docstring)."""
    from moe_parallel import train as tr

    ep = max(cfg["ep_sizes"], default=1)
    extra = shlex.split(cfg["train_args"])
    targs = tr._parser().parse_args([*extra, "--ep", str(ep)])
    if device.type == "cuda" and "--dtype" not in extra:
        targs.dtype = "bfloat16"
    ps = states[ep]
    model = tr.build_model(targs, ps).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=targs.lr, weight_decay=0.0)
    source = tr.MarkovSource(targs.vocab, targs.seed + 1)
    batch = tr.local_batch(source.batch(targs.batch_size * ps.dp, targs.seq_len), ps).to(device)
    t = timer({"train": lambda: tr.train_step(model, opt, batch, ps, targs.clip)}, iters=1,
              rounds=cfg["layer_rounds"], warmup=1)["train"]
    tokens = targs.batch_size * targs.seq_len
    flops = model_flops_per_token(targs.hidden, targs.ffn, targs.layers, targs.vocab,
                                  targs.seq_len, targs.experts, targs.top_k)
    peak = cfg["peak_tflops"] or peak_tflops_for(device_name if device.type == "cuda" else None)
    tok_s = tokens / t["seconds"]
    out = {"ep": ep, "train_args": [*extra, "--ep", str(ep)], "dtype": targs.dtype,
           "tokens_per_rank_per_step": tokens, "time": t, "tokens_per_s_per_rank": tok_s,
           "flops_per_token": flops, "achieved_tflops_per_rank": tok_s * flops / 1e12,
           "peak_tflops": peak, "mfu": tok_s * flops / (peak * 1e12) if peak else None}
    if peak is None:
        out["mfu_note"] = (f"no peak FLOP/s for {device_name or device.type}: pass "
                           f"--peak-tflops (table: {PEAK_TFLOPS}, bf16 dense)")
    return out
