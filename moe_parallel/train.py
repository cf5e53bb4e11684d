"""The main job: train a small decoder-only MoE transformer language model on generated data.

Data: a random Markov source over ``vocab`` tokens: each token has a fixed table of 4 successors
drawn with probabilities (0.55, 0.25, 0.15, 0.05). Its conditional entropy (the lowest reachable
cross-entropy) is printed beside the loss. Every FFN is an ``MoELayer``; the layers' aux losses
are added to the language-model loss.

    python -m moe_parallel.train --steps 150 --experts 8 --top-k 2 --capacity-factor 1.25
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .config import MoEConfig
from .layer import MoELayer
from .metrics import RoutingStats

SUCCESSOR_PROBS = (0.55, 0.25, 0.15, 0.05)


class MarkovSource:
    """Markov token source: next ~ successors[prev] with SUCCESSOR_PROBS."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, len(SUCCESSOR_PROBS)), generator=g)
        self.probs = torch.tensor(SUCCESSOR_PROBS)
        self.generator = g

    @property
    def entropy(self) -> float:
        """Conditional entropy in nats (an upper bound when successors collide)."""
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, batch_size: int, seq_len: int) -> Tensor:
        """[batch_size, seq_len + 1] token ids."""
        g = self.generator
        out = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (batch_size,), generator=g)
        choice = torch.multinomial(
            self.probs.expand(batch_size * seq_len, -1), 1, generator=g
        ).view(batch_size, seq_len)
        for s in range(1, seq_len + 1):
            out[:, s] = self.successors[out[:, s - 1], choice[:, s - 1]]
        return out


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MoE FFN."""

    def __init__(self, config: MoEConfig, heads: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.heads = heads
        self.ln1 = nn.LayerNorm(H, dtype=config.params_dtype)
        self.qkv = nn.Linear(H, 3 * H, bias=False, dtype=config.params_dtype)
        self.proj = nn.Linear(H, H, bias=False, dtype=config.params_dtype)
        self.ln2 = nn.LayerNorm(H, dtype=config.params_dtype)
        self.moe = MoELayer(config)

    def forward(self, x: Tensor) -> Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, H // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, H))
        # MoELayer takes sequence-major [S, B, H].
        return x + self.moe(self.ln2(x).transpose(0, 1)).transpose(0, 1)


class MoETransformerLM(nn.Module):
    def __init__(self, config: MoEConfig, vocab: int, layers: int, heads: int, max_len: int):
        super().__init__()
        H = config.hidden_size
        self.embed = nn.Embedding(vocab, H, dtype=config.params_dtype)
        self.pos = nn.Embedding(max_len, H, dtype=config.params_dtype)
        self.blocks = nn.ModuleList(Block(config, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(H, dtype=config.params_dtype)
        self.head = nn.Linear(H, vocab, bias=False, dtype=config.params_dtype)

    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def forward(self, tokens: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def aux_loss(self) -> Tensor | float:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return sum(losses) if losses else 0.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="expert capacity factor; 0 for dropless")
    p.add_argument("--aux-loss-coeff", type=float, default=1e-2)
    p.add_argument("--z-loss-coeff", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return p.parse_args(argv)


def _load_line(stats: list[RoutingStats]) -> str:
    load = torch.stack([s.tokens_per_expert for s in stats]).sum(0)
    drop = sum(s.dropped for s in stats) / max(sum(s.num_routed for s in stats), 1)
    return f"load/expert {load.tolist()}  drop {100 * drop:.1f}%"


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.manual_seed(args.seed)
    config = MoEConfig(
        hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
        top_k=args.top_k, capacity_factor=args.capacity_factor or None,
        aux_loss_coeff=args.aux_loss_coeff, z_loss_coeff=args.z_loss_coeff,
        params_dtype=getattr(torch, args.dtype),
    )
    model = MoETransformerLM(config, args.vocab, args.layers, args.heads, args.seq_len)
    source = MarkovSource(args.vocab, args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    print(f"moe_parallel demo: {args.layers} layers, H={args.hidden}, E={args.experts}, "
          f"top-{args.top_k}, capacity_factor={config.capacity_factor}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
          f"loss floor (source entropy) ~{source.entropy:.3f}, uniform {math.log(args.vocab):.3f}")
    history: list[float] = []
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    for step in bar:
        batch = source.batch(args.batch_size, args.seq_len)
        t0 = time.perf_counter()
        logits = model(batch[:, :-1])
        lm_loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), batch[:, 1:].reshape(-1))
        loss = lm_loss + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        history.append(lm_loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            stats = [m.last_stats for m in model.moe_layers()]
            tqdm.write(f"step {step:4d}  loss {history[-1]:.4f}  tok/s {tok_s:,.0f}  "
                       f"{_load_line(stats)}")
    elapsed = time.perf_counter() - t_start
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f} (floor ~{source.entropy:.3f}) in {args.steps} steps, "
          f"{args.steps * tokens_per_step / elapsed:,.0f} tok/s overall")
    return {"first_loss": first, "last_loss": last, "history": history}


if __name__ == "__main__":
    main()
