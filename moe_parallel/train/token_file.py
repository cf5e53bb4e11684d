"""The main job's data from a flat file of token ids, memory-mapped (``--data PATH``).

Format: the raw little-endian token ids one after another, no header, ``--data-dtype`` uint16
(nanoGPT's ``train.bin``) or uint32; a Megatron indexed dataset's ``.bin`` file with its
``.idx`` saying uint16 (or int32, read as uint32) is the same stream, its document boundaries
ignored.

Samples: with ``N`` tokens and sequence length ``S`` the file holds ``W = (N - 1) // S`` windows,
window ``w`` being tokens ``[w·S, w·S + S + 1)`` (consecutive windows share one token: each
token but the first is a target once per epoch). Sample ``g`` (0, 1, 2, ... over the whole run)
is window ``perm_e[g mod W]`` of epoch ``e = g // W``, ``perm_e`` a permutation of the windows
drawn from ``(seed, e)``. Global batch ``t`` is samples ``[t·B·dp, (t+1)·B·dp)``; data-parallel
rank ``r`` reads from the memory map only its ``B`` of them, ``[t·B·dp + r·B, t·B·dp + (r+1)·B)``
(the rows ``local_batch`` would give it), and the tensor/expert-parallel ranks of one
data-parallel shard read the same ones. Every rank computes the same permutation, so no rank
talks to another about data. The order of the current epoch is held in memory (8 bytes per
window).

Position: the samples consumed so far, the same on every rank; it is the checkpoint's
``extra["data"]`` (``state`` / ``load_state``, JSON ints), so a resumed run reads the samples an
uninterrupted run would, at any data-parallel size.

Checks, each a ``ValueError`` naming the flag: a missing, non-regular or empty file, a size that
is not a multiple of the dtype's, fewer windows than one global batch (``token_count``,
``check_length``: from the file's size, before any process group exists); a token id ``>=`` the
vocabulary (``TokenFile``: one pass over the whole file in ``SCAN_CHUNK``-token pieces when it
opens, the same file and so the same verdict on every rank).

The figure printed beside the loss is the file's unigram entropy ``-sum_v p_v log p_v`` (nats):
the loss of a model that knows only each id's frequency. It is counted over the whole file up
to ``ENTROPY_EXACT`` tokens, beyond that over ``ENTROPY_BLOCKS`` evenly spaced blocks of
``ENTROPY_BLOCK`` tokens.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..distributed import ParallelState

DATA_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SCAN_CHUNK = 1 << 24
ENTROPY_EXACT = 1 << 24
ENTROPY_BLOCKS, ENTROPY_BLOCK = 64, 1 << 18
STATE_SOURCE = "token_file"


def _dtype(dtype: str) -> np.dtype:
    if dtype not in DATA_DTYPES:
        raise ValueError(f"--data-dtype must be one of {', '.join(DATA_DTYPES)}, got {dtype!r}")
    return DATA_DTYPES[dtype]


def token_count(path: str, dtype: str = "uint16") -> int:
    """Tokens in the flat file ``path`` of ``dtype`` ids, from its size; ``ValueError`` naming
    ``--data`` for a missing, non-regular or empty file or a size not a multiple of the dtype's."""
    itemsize = _dtype(dtype).itemsize
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: not a regular file (a flat file of token ids is "
                         "needed)")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"--data {path}: the file is empty")
    if size % itemsize:
        raise ValueError(f"--data {path}: {size} bytes is not a multiple of {itemsize} "
                         f"(--data-dtype {dtype}): a truncated file or another dtype")
    return size // itemsize


def window_count(tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens, overlapping by one, in ``tokens`` tokens."""
    return max(tokens - 1, 0) // seq_len


def check_length(path: str, tokens: int, seq_len: int, batch_size: int, dp: int) -> None:
    """``ValueError`` naming ``--data``, ``--seq-len`` and ``--batch-size`` unless the file's
    ``tokens`` hold at least one global batch (``batch_size · dp`` windows)."""
    need = batch_size * dp
    if window_count(tokens, seq_len) < need:
        raise ValueError(
            f"--data {path}: {tokens} tokens hold {window_count(tokens, seq_len)} sequences of "
            f"--seq-len {seq_len} + 1 tokens, fewer than one global batch of --batch-size "
            f"{batch_size} x {dp} data-parallel rank(s) = {need}; a file of at least "
            f"{need * seq_len + 1} tokens is needed")


class TokenFile:
    """A flat token file as the job's data source: this data-parallel rank's windows of each
    global batch (``next_batch``), the position (``state``), the unigram entropy."""

    def __init__(self, path: str, dtype: str = "uint16", *, vocab: int, seq_len: int,
                 seed: int) -> None:
        self.path, self.dtype, self.vocab, self.seq_len, self.seed = (
            path, dtype, vocab, seq_len, seed)
        self.tokens = token_count(path, dtype)
        self.windows = window_count(self.tokens, seq_len)
        if self.windows < 1:
            raise ValueError(f"--data {path}: {self.tokens} token(s), fewer than one sequence of "
                             f"--seq-len {seq_len} + 1 tokens")
        self.data = np.memmap(path, dtype=_dtype(dtype), mode="r")
        self.max_id = self._check_ids()
        self.entropy = self._unigram_entropy()
        self.consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    def _check_ids(self) -> int:
        """The largest id in the file (one pass); ``ValueError`` when it is ``>= vocab``."""
        largest, first_bad = 0, None
        for lo in range(0, self.tokens, SCAN_CHUNK):
            chunk = self.data[lo:lo + SCAN_CHUNK]
            top = int(chunk.max())
            if top >= self.vocab and first_bad is None:
                first_bad = lo + int(np.argmax(chunk >= self.vocab))
            largest = max(largest, top)
        if first_bad is not None:
            raise ValueError(
                f"--data {self.path}: token id {int(self.data[first_bad])} at position "
                f"{first_bad} is outside the vocabulary of {self.vocab} (--vocab, or the "
                f"--hf-model's vocab_size); the largest id is {largest}, so the vocabulary must "
                f"be at least {largest + 1} (256 for a byte-level file), or --data-dtype "
                f"{self.dtype} is not the file's")
        return largest

    def _unigram_entropy(self) -> float:
        """``-sum p log p`` of the id frequencies (nats), over the file or a fixed sample."""
        if self.tokens <= ENTROPY_EXACT:
            blocks = [self.data]
        else:
            step = (self.tokens - ENTROPY_BLOCK) // (ENTROPY_BLOCKS - 1)
            blocks = [self.data[i * step:i * step + ENTROPY_BLOCK] for i in range(ENTROPY_BLOCKS)]
        counts = sum(np.bincount(b, minlength=self.vocab) for b in blocks)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch``: a permutation of ``range(windows)`` from
        ``(seed, epoch)`` (the last two epochs kept)."""
        if epoch not in self._perms:
            seq = np.random.SeedSequence([self.seed % (1 << 64), epoch])
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = np.random.Generator(np.random.PCG64(seq)).permutation(
                self.windows)
        return self._perms[epoch]

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of samples ``first .. first + count - 1`` (int64 ``[count]``)."""
        g = np.arange(first, first + count, dtype=np.int64)
        window = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.windows):
            at = g // self.windows == epoch
            window[at] = self._permutation(int(epoch))[g[at] % self.windows]
        return window * self.seq_len

    def read(self, starts: np.ndarray) -> Tensor:
        """The windows at token offsets ``starts`` from the memory map: int64 ``[n, S + 1]``."""
        rows = [self.data[s:s + self.seq_len + 1] for s in starts.tolist()]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def rank_starts(self, batch_size: int, ps: ParallelState) -> np.ndarray:
        """Token offsets of this data-parallel rank's windows in the next global batch."""
        return self.starts(self.consumed + ps.dp_rank * batch_size, batch_size)

    def next_batch(self, batch_size: int, seq_len: int, ps: ParallelState) -> Tensor:
        """This data-parallel rank's ``[batch_size, seq_len + 1]`` rows of the next global batch
        of ``batch_size · dp`` samples, read from the file; the position advances by the whole
        global batch on every rank."""
        if seq_len != self.seq_len:
            raise ValueError(f"this TokenFile cuts sequences of {self.seq_len} tokens, asked for "
                             f"{seq_len}")
        rows = self.read(self.rank_starts(batch_size, ps))
        self.consumed += batch_size * ps.dp
        return rows

    def describe(self) -> str:
        """What the job's header says about the data."""
        return (f"data {self.path}: {self.tokens:,} {self.dtype} tokens, largest id "
                f"{self.max_id}, unigram entropy ~{self.entropy:.3f}")

    def loss_reference(self) -> str:
        """The figure the job's summary prints beside the loss."""
        return f"unigram entropy ~{self.entropy:.3f}"

    def state(self) -> dict[str, Any]:
        """The position, for a checkpoint's ``extra["data"]`` (JSON ints and a str)."""
        return {"source": STATE_SOURCE, "consumed_samples": self.consumed,
                "seq_len": self.seq_len, "seed": self.seed, "tokens": self.tokens}

    def load_state(self, state: Any) -> None:
        """Continue from ``state`` (``state()`` of a run on the same file, ``--seq-len`` and
        ``--seed``); ``ValueError`` naming what differs, or that the checkpoint was written by a
        run on the generated Markov source."""
        if not isinstance(state, dict) or state.get("source") != STATE_SOURCE:
            raise ValueError("--data: the checkpoint was written by a run on the generated "
                             "Markov source; resume it without --data, or start a new --save-dir")
        for key, flag_name, mine in (("tokens", "--data (its token count)", self.tokens),
                                     ("seq_len", "--seq-len", self.seq_len),
                                     ("seed", "--seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"--resume: the checkpoint's data position is for {flag_name} "
                                 f"{state[key]}, this run has {mine}; its samples would not "
                                 "continue the same sequence")
        self.consumed = int(state["consumed_samples"])
