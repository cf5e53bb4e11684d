"""``moe_parallel.train --data PATH``: a flat file of token ids as the main job's data.

The token file is made here from Python's own standard-library sources, byte-level (uint16 ids
0..255), so the job's loss is that of real text: it falls from about log(256) below the text's
unigram entropy. Each data-parallel rank reads only its windows of a global batch, the ranks'
windows together are that batch, a resumed run equals an uninterrupted one bit for bit, and
every bad file or flag is refused naming the flag.
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import math
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe_parallel import train
from moe_parallel.distributed import ParallelState
from moe_parallel.train import TokenFile, token_count
from tests.helpers.dist_harness import get_pool, own_groups, parallel_state
from tests.helpers.training_parity import assert_same_run

MODULES = (json.decoder, textwrap, argparse)
TINY = ["--layers", "1", "--hidden", "32", "--ffn", "64", "--heads", "2", "--experts", "4",
        "--vocab", "256", "--log-every", "1000"]


def stdlib_bytes() -> bytes:
    """The source text of a few standard-library modules."""
    return b"".join(Path(inspect.getsourcefile(m)).read_bytes() for m in MODULES)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """A byte-level uint16 token file of ``stdlib_bytes()`` (nanoGPT's format)."""
    path = tmp_path_factory.mktemp("data") / "stdlib.bin"
    np.frombuffer(stdlib_bytes(), dtype=np.uint8).astype("<u2").tofile(path)
    return str(path)


def _write(path: Path, ids, dtype: str = "<u2") -> str:
    np.asarray(ids).astype(dtype).tofile(path)
    return str(path)


# ---- the file and its windows --------------------------------------------------------------


def test_file_is_memory_mapped_and_its_figures_are_those_of_the_bytes(text_file):
    raw = stdlib_bytes()
    tf = TokenFile(text_file, vocab=256, seq_len=32, seed=0)
    assert isinstance(tf.data, np.memmap) and tf.data.mode == "r"
    assert tf.tokens == token_count(text_file) == len(raw)
    assert tf.windows == (len(raw) - 1) // 32
    assert tf.max_id == max(raw)
    counts = Counter(raw)  # float64 unigram entropy, counted independently
    assert tf.entropy == pytest.approx(
        -sum(c / len(raw) * math.log(c / len(raw)) for c in counts.values()), rel=1e-12)
    assert 2.0 < tf.entropy < math.log(256)


def test_uint32_file_reads_the_same_ids(tmp_path):
    ids = np.random.default_rng(0).integers(1, 70_000, size=1000)
    tf = TokenFile(_write(tmp_path / "t.bin", ids, "<u4"), "uint32", vocab=70_000, seq_len=9,
                   seed=3)
    starts = tf.starts(0, 5)
    assert torch.equal(tf.read(starts),
                       torch.tensor(np.stack([ids[s:s + 10] for s in starts])))


def test_each_epoch_visits_every_window_once_in_a_seeded_order(text_file):
    tf = TokenFile(text_file, vocab=256, seq_len=64, seed=5)
    W = tf.windows
    two_epochs = tf.starts(0, 2 * W)
    for epoch in (two_epochs[:W], two_epochs[W:]):
        assert sorted(epoch.tolist()) == list(range(0, W * 64, 64))
    assert not np.array_equal(two_epochs[:W], two_epochs[W:])
    assert np.array_equal(tf.starts(W - 3, 7), two_epochs[W - 3:W + 4])  # across the boundary
    same = TokenFile(text_file, vocab=256, seq_len=64, seed=5)
    other = TokenFile(text_file, vocab=256, seq_len=64, seed=6)
    assert np.array_equal(same.starts(10, 50), two_epochs[10:60])
    assert not np.array_equal(other.starts(10, 50), two_epochs[10:60])


def test_rows_are_the_file_s_tokens_at_the_window_starts(text_file):
    raw = np.frombuffer(stdlib_bytes(), dtype=np.uint8).astype(np.int64)
    tf = TokenFile(text_file, vocab=256, seq_len=16, seed=0)
    rows = tf.next_batch(4, 16, ParallelState.single())
    starts = tf.starts(0, 4)
    assert rows.dtype == torch.long and rows.shape == (4, 17)
    assert torch.equal(rows, torch.from_numpy(np.stack([raw[s:s + 17] for s in starts])))
    assert tf.consumed == 4
    assert not torch.equal(tf.next_batch(4, 16, ParallelState.single()), rows)


# ---- training on real text -----------------------------------------------------------------


def test_job_learns_the_text_below_its_unigram_entropy(text_file, capsys):
    """120 steps of a tiny model: the loss starts near log(256) = 5.55 (uniform over bytes) and
    ends well below it and below the text's unigram entropy (~3.0), so the model uses context."""
    out = train.main(["--data", text_file, *TINY, "--steps", "120", "--seq-len", "32",
                      "--batch-size", "8", "--lr", "1e-2"])
    entropy = TokenFile(text_file, vocab=256, seq_len=32, seed=0).entropy
    printed = capsys.readouterr().out
    assert f"unigram entropy ~{entropy:.3f}" in printed
    assert abs(out["history"][0] - math.log(256)) < 0.5, out["history"][:3]
    assert out["last_loss"] < math.log(256) - 2.5, out["last_loss"]
    assert out["last_loss"] < entropy - 0.3, (out["last_loss"], entropy)
    assert f"loss {out['first_loss']:.3f} -> {out['last_loss']:.3f} (unigram entropy " in printed


# ---- data-parallel ranks ---------------------------------------------------------------------


class _Recording:
    """A memory map that records the token ranges read from it."""

    def __init__(self, data):
        self.data, self.reads = data, []

    def __getitem__(self, index):
        self.reads.append((index.start, index.stop))
        return self.data[index]


def _rank_reads(path: str, layout: dict, steps: int) -> tuple[int, list, list]:
    """This rank's token ranges read from the file and its rows, for ``steps`` batches of 3."""
    ps = parallel_state(**layout)
    tf = TokenFile(path, vocab=256, seq_len=16, seed=1)
    tf.data = _Recording(tf.data)
    rows = [tf.next_batch(3, 16, ps) for _ in range(steps)]
    return ps.dp_rank, tf.data.reads, rows


@pytest.mark.distributed
def test_each_data_parallel_rank_reads_only_its_windows_of_the_global_batch(text_file):
    """2 ranks, dp=2: the ranks' reads are disjoint, together the global batch of 6 windows,
    rank r's rows those ``local_batch`` gives it; with tp=2 (dp=1) both ranks read the same."""
    steps, pool = 3, get_pool(2)
    one = TokenFile(text_file, vocab=256, seq_len=16, seed=1)
    for layout, dp in ((dict(), 2), (dict(tp=2), 1)):
        ranks = pool.run(_rank_reads, text_file, layout, steps)
        for t in range(steps):
            starts = one.starts(t * 3 * dp, 3 * dp)
            whole = one.read(starts)
            for r, reads, rows in ranks:
                mine = starts[r * 3:(r + 1) * 3].tolist()
                assert reads[t * 3:(t + 1) * 3] == [(s, s + 17) for s in mine]
                slot = SimpleNamespace(dp=dp, dp_rank=r)  # what local_batch reads of a layout
                assert torch.equal(rows[t], train.local_batch(whole, slot))
        if dp == 2:
            a, b = ({tuple(x) for x in reads} for _, reads, _ in ranks)
            assert not a & b and len(a | b) == steps * 6
        else:
            assert ranks[0][1] == ranks[1][1]


# ---- resume ----------------------------------------------------------------------------------

RESUME = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
          "--experts", "4", "--top-k", "2", "--vocab", "256", "--seq-len", "8",
          "--batch-size", "2", "--steps", "5", "--lr", "0.01", "--log-every", "100"]


def _resume_bitwise(path: str, root: str) -> str:
    """5 steps with a checkpoint after step 3, then resumed from it: the same losses and
    parameters, bit for bit, and the same data position."""
    flags = ["--data", path, *RESUME, "--ep", "2", f"--save-dir={root}"]
    with own_groups():
        first = train.main(flags + ["--save-every=3"])
    with own_groups():
        resumed = train.main(flags + ["--resume=3"])
    assert_same_run(first, resumed)
    return "ok"


@pytest.mark.distributed
def test_resumed_run_equals_uninterrupted_run_bitwise(text_file, tmp_path):
    assert get_pool(2).run(_resume_bitwise, text_file, str(tmp_path), timeout=180) == ["ok"] * 2


def test_data_position_round_trips_and_refuses_another_file_or_geometry(text_file, tmp_path):
    tf = TokenFile(text_file, vocab=256, seq_len=16, seed=0)
    for _ in range(3):
        tf.next_batch(2, 16, ParallelState.single())
    state = tf.state()
    assert state == {"source": "token_file", "consumed_samples": 6, "seq_len": 16, "seed": 0,
                     "tokens": tf.tokens}
    again = TokenFile(text_file, vocab=256, seq_len=16, seed=0)
    again.load_state(json.loads(json.dumps(state)))
    assert torch.equal(again.next_batch(2, 16, ParallelState.single()),
                       tf.next_batch(2, 16, ParallelState.single()))
    for kwargs, named in ((dict(seq_len=8, seed=0), "--seq-len 16"),
                          (dict(seq_len=16, seed=1), "--seed 0")):
        with pytest.raises(ValueError, match=named):
            TokenFile(text_file, vocab=256, **kwargs).load_state(state)
    shorter = _write(tmp_path / "short.bin", np.arange(200) % 256)
    with pytest.raises(ValueError, match=r"--data \(its token count\)"):
        TokenFile(shorter, vocab=256, seq_len=16, seed=0).load_state(state)
    markov = train.MarkovSource(256, 1)
    with pytest.raises(ValueError, match="Markov source"):
        tf.load_state(markov.state())
    with pytest.raises(ValueError, match="--data"):
        markov.load_state(state)


# ---- refusals --------------------------------------------------------------------------------


def _refusal(capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as exc:
        train._parse(list(flags))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_files_are_refused_naming_the_flag(capsys, tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    (tmp_path / "six.bin").write_bytes(b"abcdef")
    cases = [
        ([str(tmp_path / "missing.bin")], "no such file"),
        ([str(tmp_path)], "not a regular file"),
        ([str(tmp_path / "empty.bin")], "the file is empty"),
        ([str(tmp_path / "odd.bin")], "3 bytes is not a multiple of 2 (--data-dtype uint16)"),
        ([str(tmp_path / "six.bin"), "--data-dtype", "uint32"],
         "6 bytes is not a multiple of 4 (--data-dtype uint32)"),
    ]
    for (path, *more), message in cases:
        err = _refusal(capsys, "--data", path, *more)
        assert f"--data {path}: {message}" in err, err
    assert "invalid choice: 'int8'" in _refusal(capsys, "--data-dtype", "int8")


def test_a_file_shorter_than_one_global_batch_is_refused(capsys, tmp_path):
    path = _write(tmp_path / "t.bin", np.arange(1, 65))  # 64 tokens: 7 windows of 9+1
    err = _refusal(capsys, "--data", path, "--seq-len", "9", "--batch-size", "8")
    assert ("64 tokens hold 7 sequences of --seq-len 9 + 1 tokens, fewer than one global batch "
            "of --batch-size 8 x 1 data-parallel rank(s) = 8; a file of at least 73 tokens"
            in err), err
    args = train._parse(["--data", path, "--seq-len", "9", "--batch-size", "4"])
    with pytest.raises(ValueError, match=r"--batch-size 4 x 2 data-parallel rank\(s\) = 8"):
        train.check_world(args, 2)  # dp = 2
    args = train._parse(["--data", path, "--seq-len", "8", "--batch-size", "4", "--tp", "2"])
    train.check_world(args, 2)  # dp = 1: 7 windows of 8+1 hold one batch of 4


def test_ids_outside_the_vocabulary_are_refused(capsys, text_file):
    with pytest.raises(ValueError) as exc:
        TokenFile(text_file, vocab=100, seq_len=8, seed=0)
    raw = stdlib_bytes()
    first = next(i for i, b in enumerate(raw) if b >= 100)
    assert (f"token id {raw[first]} at position {first} is outside the vocabulary of 100 "
            f"(--vocab, or the --hf-model's vocab_size); the largest id is {max(raw)}, so the "
            f"vocabulary must be at least {max(raw) + 1}") in str(exc.value)
    with pytest.raises(SystemExit) as stop:  # the job: argparse's usage error, exit status 2
        train.main(["--data", text_file, "--steps", "1", "--vocab", "64"])
    assert stop.value.code == 2
    assert "is outside the vocabulary of 64 (--vocab" in capsys.readouterr().err


def test_hf_model_vocabulary_bounds_the_ids(capsys, tmp_path, text_file):
    """``--hf-model``: its ``vocab_size`` (32), not ``--vocab``, is what the ids must fit."""
    pytest.importorskip("transformers")
    from tests.helpers.hf_models import build

    build("mixtral").save_pretrained(tmp_path / "hf")
    small = _write(tmp_path / "small.bin", np.random.default_rng(0).integers(0, 32, 400))
    flags = ["--hf-model", str(tmp_path / "hf"), "--dtype", "float64", "--steps", "2",
             "--seq-len", "8", "--batch-size", "2", "--log-every", "100"]
    out = train.main(["--data", small, "--vocab", "256", *flags])
    assert len(out["history"]) == 2 and all(math.isfinite(x) for x in out["history"])
    with pytest.raises(SystemExit):
        train.main(["--data", text_file, "--vocab", "256", *flags])
    assert "is outside the vocabulary of 32 (--vocab, or the --hf-model's vocab_size)" in (
        capsys.readouterr().err)


def test_markov_source_is_still_the_default(capsys):
    args = train._parse([])
    assert args.data is None and args.data_dtype == "uint16"
    out = train.main(["--steps", "1", "--layers", "1", "--hidden", "16", "--ffn", "16",
                      "--heads", "2", "--experts", "4", "--seq-len", "8", "--batch-size", "2"])
    assert len(out["history"]) == 1
    assert "(floor ~" in capsys.readouterr().out

