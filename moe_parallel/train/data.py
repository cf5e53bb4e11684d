"""The main job's generated data: a Markov token source and each rank's data-parallel slice of
a batch (the default; ``token_file`` reads a file of token ids instead).

The source draws, for every token, its successor from a fixed table of ``len(SUCCESSOR_PROBS)``
successors with probabilities ``SUCCESSOR_PROBS``; its conditional entropy
``-sum(p log p)`` is the lowest cross-entropy a model can reach. Every rank draws the whole
global batch from the same generator and keeps its slice, so the generator's state (a uint8
tensor, the checkpoint's ``extra["data"]``) is the position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import ParallelState

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

    def next_batch(self, batch_size: int, seq_len: int, ps: ParallelState) -> Tensor:
        """This data-parallel rank's ``[batch_size, seq_len + 1]`` slice of the next global
        batch of ``batch_size · dp`` sequences."""
        return local_batch(self.batch(batch_size * ps.dp, seq_len), ps)

    def describe(self) -> str:
        """What the job's header says about the data."""
        return f"loss floor (source entropy) ~{self.entropy:.3f}"

    def loss_reference(self) -> str:
        """The figure the job's summary prints beside the loss."""
        return f"floor ~{self.entropy:.3f}"

    def state(self) -> Tensor:
        """The position, for a checkpoint's ``extra["data"]``: the generator's state."""
        return self.generator.get_state()

    def load_state(self, state: Any) -> None:
        """Continue from ``state()``; ``ValueError`` for a checkpoint of a ``--data`` run."""
        if not isinstance(state, Tensor):
            raise ValueError("the checkpoint was written by a run on --data (a token file); "
                             "resume it with the same --data, or start a new --save-dir")
        self.generator.set_state(state)


def local_batch(global_batch: Tensor, ps: ParallelState) -> Tensor:
    """This rank's data-parallel slice of the global batch (TP ranks of a shard share it)."""
    per_rank = global_batch.shape[0] // ps.dp
    return global_batch[ps.dp_rank * per_rank:][:per_rank]
