"""Upcycled Hugging Face models across ranks and in the main job: ``load_pretrained`` of an
upcycled model's ``save_pretrained`` directory at EP and EP×ETP layouts gives the dense logits
(float64, 1e-10) and ``export`` gathers what ``transformers`` loads back; ``moe_parallel.train
--upcycle-from`` starts from the dense model's loss and trains on 4 ranks as on one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from moe_parallel.integrations import hf  # noqa: E402
from tests.helpers.dist_harness import get_pool, parallel_state  # noqa: E402
from tests.helpers.hf_models import build_dense  # noqa: E402

EXACT = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(seed))


def _load_and_export(path: str, layout: dict, name: str) -> dict:
    """This rank's upcycled model at ``layout`` (``load_pretrained``): its logits against the
    dense model's on this rank's tokens, and the gathered ``export``."""
    import torch.distributed as dist

    ps = parallel_state(**layout)
    model = hf.load_pretrained(path, parallel_state=ps, dtype=torch.float64)
    ids = _tokens(40 + dist.get_rank())
    with torch.no_grad():
        err = _rel(model(ids).logits, build_dense(name)(ids).logits)
    exported = hf.export(model)  # a collective: every rank gathers
    return {"logits": err, "export": exported if dist.get_rank() == 0 else None,
            "held": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)}


@pytest.mark.distributed
@pytest.mark.parametrize("name, layout", [("llama", dict(ep=2)), ("llama", dict(ep=2, etp=2)),
                                          ("qwen2", dict(ep=2, etp=2))],
                         ids=["llama-ep2", "llama-ep2_etp2", "qwen2-ep2_etp2"])
def test_upcycled_checkpoint_loads_at_any_layout(name, layout, tmp_path):
    """Each rank holds 1/(ep·etp) of the experts, its logits equal the dense model's; the
    exported state equals what ``save_pretrained`` wrote, and ``from_pretrained`` of it gives
    the dense logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    moe = hf.upcycle(build_dense(name), 4, 2, 2, seed=4)
    moe.save_pretrained(tmp_path / "moe")
    full = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    shards = layout.get("ep", 1) * layout.get("etp", 1)
    got = get_pool(4).run(_load_and_export, str(tmp_path / "moe"), layout, name, timeout=180)
    for rank, answer in enumerate(got):
        assert answer["logits"] < EXACT, (rank, answer["logits"])
        assert answer["held"] == full // shards, rank
    disk = load_file(tmp_path / "moe" / "model.safetensors")
    exported = got[0]["export"]
    assert exported.keys() == disk.keys()
    assert all(torch.equal(exported[k], disk[k]) for k in disk)
    out = tmp_path / "exported"
    moe.config.save_pretrained(out)
    save_file(exported, out / "model.safetensors", metadata={"format": "pt"})
    back = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float64, experts_implementation="eager")
    assert type(back).__name__ == type(moe).__name__
    ids = _tokens(50)
    with torch.no_grad():
        assert _rel(back(ids).logits, build_dense(name)(ids).logits) < EXACT


# ---- the main job ------------------------------------------------------------------------------

TRAIN = ["--dtype", "float64", "--steps", "3", "--seq-len", "8", "--aux-loss-coeff", "0",
         "--z-loss-coeff", "0.01", "--lr", "0.01", "--log-every", "100", "--experts", "4",
         "--top-k", "2", "--granularity", "2"]


def _train(path: str, flags: list[str]) -> list[float]:
    from moe_parallel import train
    from tests.helpers.dist_harness import own_groups

    with own_groups():  # the job's groups, freed before the pool's next task
        return train.main(["--upcycle-from", path, *TRAIN, *flags])["history"]


def _dense_loss(path: str, batch_size: int) -> float:
    """The dense model's loss on the job's first global batch (the Markov source, seed 0 + 1,
    over the model's vocabulary)."""
    import transformers

    from moe_parallel import train
    from moe_parallel.train.step import lm_loss

    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    tokens = train.MarkovSource(dense.config.vocab_size, 1).batch(batch_size, 8)
    with torch.no_grad():
        return float(lm_loss(dense(tokens[:, :-1]).logits, tokens))


@pytest.mark.distributed
def test_main_job_upcycles_and_trains_as_one_process(tmp_path):
    """``--upcycle-from DIR --experts 4 --top-k 2 --granularity 2``: the loss at step 0 is the
    dense model's on the same batch (1e-10), and on 4 ranks (ep2, dp4; ep2 x etp2) every step's
    loss equals the one-process run's."""
    from moe_parallel import train

    build_dense("llama").save_pretrained(tmp_path)
    single = train.main(["--upcycle-from", str(tmp_path), *TRAIN, "--batch-size", "4"])
    history = single["history"]
    dense = _dense_loss(str(tmp_path), 4)
    assert abs(history[0] - dense) <= EXACT * dense, (history[0], dense)
    assert history[-1] != history[0]  # it trains
    assert type(single["model"].hf).__name__ == "MixtralForCausalLM"
    for layout in (["--ep", "2"], ["--ep", "2", "--etp", "2"]):
        runs = get_pool(4).run(_train, str(tmp_path), [*layout, "--batch-size", "1"],
                               timeout=180)
        for rank, got in enumerate(runs):
            assert len(got) == 3
            for a, b in zip(got, history):
                assert abs(a - b) <= 1e-10 * abs(b), (layout, rank, got, history)


def test_upcycle_flags_are_checked(tmp_path):
    from moe_parallel import train

    build_dense("llama").save_pretrained(tmp_path)
    bad = [(["--upcycle-from", str(tmp_path), "--hf-model", str(tmp_path)],
            "--upcycle-from and --hf-model"),
           (["--upcycle-from", str(tmp_path / "none")], "--upcycle-from .*: no such directory"),
           (["--upcycle-from", str(tmp_path), "--experts", "6", "--granularity", "4"],
            "--granularity 4 must divide --experts 6"),
           (["--upcycle-from", str(tmp_path), "--experts", "4", "--top-k", "1",
             "--granularity", "2"], "--granularity 2 must divide --top-k 1"),
           (["--granularity", "2"], "--granularity needs --upcycle-from"),
           (["--upcycle-from", str(tmp_path), "--compile"], "--compile supports the built-in")]
    for argv, match in bad:
        with pytest.raises(ValueError, match=match):
            train.check_flags(train._parser().parse_args(argv))
