"""Hugging Face MoE models in and out (``moe_parallel.integrations.hf``), against transformers
itself, in float64: a converted model's logits and every gradient equal the HF model's, on one
process (both expert implementations) and on 4 gloo ranks (EP, EP×ETP, TP×EP); HF's own aux
loss comes out the same; export gives back what ``save_pretrained`` writes, bit for bit."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

from moe_parallel.integrations import hf  # noqa: E402
from tests.helpers.dist_harness import get_pool, parallel_state  # noqa: E402
from tests.helpers.hf_models import build, configs  # noqa: E402
from tests.helpers.payload import Payload  # noqa: E402

FAMILIES = sorted(configs())
TOL = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _block_grads(family: hf.Family, block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An HF block's parameter gradients in our layout (``family.weights`` applied to them)."""
    saved = {n: p.data for n, p in block.named_parameters()}
    try:
        for p in block.parameters():
            p.data = p.grad
        return {k: v.clone() for k, v in family.weights(block).items()}
    finally:
        for n, p in block.named_parameters():
            p.data = saved[n]


def _tokens(seed: int, batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _compare(name: str, overrides: dict) -> dict[str, float]:
    return _compare_model(build(name), overrides)


def _compare_model(ref, overrides: dict) -> dict[str, float]:
    """The relative errors of the converted ``ref``'s logits, dense and MoE gradients."""
    ours = hf.convert(copy.deepcopy(ref), **overrides)
    ref.train(), ours.train()
    ids = _tokens(1)
    out_ref, out = ref(ids).logits, ours(ids).logits
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out_ref * cot).sum().backward()
    (out * cot).sum().backward()
    errors = {"logits": _rel(out, out_ref)}
    family = hf.family_of(ref)
    ref_params = dict(ref.named_parameters())
    dense = [_rel(p.grad, ref_params[n].grad) for n, p in ours.named_parameters()
             if ".moe." not in n]
    moe = []
    for block_name, block in ref.named_modules():
        if type(block).__name__ == family.block_class:
            want = _block_grads(family, block)
            layer = ours.get_submodule(block_name).moe
            moe += [_rel(p.grad, want[k]) for k, p in layer.named_parameters()]
    errors["dense_grads"], errors["moe_grads"] = max(dense), max(moe)
    return errors


@pytest.mark.parametrize("expert_impl", ["grouped", "block_sparse"])
@pytest.mark.parametrize("name", FAMILIES)
def test_converted_model_equals_hf(name, expert_impl):
    overrides = dict(expert_impl=expert_impl, block_size=4) if expert_impl == "block_sparse" else {}
    errors = _compare(name, overrides)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
def test_hf_aux_loss_is_computed_from_the_converted_router_logits(name):
    """``output_router_logits=True``: HF's model-level aux loss (its convention: top_k times
    ours) is computed from the converted blocks' logits, and the loss equals HF's."""
    ref = build(name)
    ref.config.output_router_logits, ref.config.router_aux_loss_coef = True, 0.05
    ours = hf.convert(copy.deepcopy(ref))
    ids = _tokens(3)
    a, b = ref(ids, labels=ids), ours(ids, labels=ids)
    assert len(b.router_logits) == ref.config.num_hidden_layers
    assert float(a.aux_loss) > 0 and _rel(b.aux_loss, a.aux_loss) < TOL
    assert _rel(b.loss, a.loss) < TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip_is_bitwise(name, tmp_path):
    """HF -> ours -> HF: ``export`` equals the safetensors ``save_pretrained`` writes (keys,
    dtypes, values), and ``from_pretrained`` of the exported weights gives the model that
    ``from_pretrained`` of HF's own checkpoint gives (the same logits)."""
    import transformers
    from safetensors.torch import load_file, save_file

    ref = build(name)
    ref.save_pretrained(tmp_path / "hf")
    disk = {}
    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            disk.update(load_file(tmp_path / "hf" / f))
    exported = hf.export(hf.convert(copy.deepcopy(ref)))
    assert exported.keys() == disk.keys()
    bad = [k for k in disk if not (exported[k].dtype == disk[k].dtype
                                   and torch.equal(exported[k], disk[k]))]
    assert not bad, bad
    out = tmp_path / "exported"
    ref.config.save_pretrained(out)
    save_file(exported, out / "model.safetensors", metadata={"format": "pt"})
    cls = transformers.Llama4ForCausalLM if name == "llama4" else (
        transformers.AutoModelForCausalLM)
    kw = dict(dtype=torch.float64, experts_implementation="eager")
    back, hf_own = cls.from_pretrained(out, **kw), cls.from_pretrained(tmp_path / "hf", **kw)
    ids = _tokens(4)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf_own(ids).logits)


def test_unsupported_models_and_fields_are_named():
    import transformers

    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=12, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(hf.UnsupportedModelError, match="model_type='llama' is not supported"):
        hf.convert(dense)
    cfg = configs()["mixtral"]
    cfg.hidden_act = "gelu"
    with pytest.raises(hf.UnsupportedModelError, match="mixtral: hidden_act='gelu'"):
        hf.convert(transformers.AutoModelForCausalLM.from_config(cfg))


# ---- across ranks ------------------------------------------------------------------------------


def _rms_norm_in_model_dtype(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                          + self.variance_epsilon))


def _full_precision_norms(model: torch.nn.Module) -> None:
    """HF's RMSNorm computes in float32 even in float64 models. With TP each TP rank
    back-propagates a different partial gradient through the norms below the last MoE layer
    (the sum over TP ranks is the full one), so their float32 rounding no longer cancels
    (~1e-7, measured); for the exact comparison both models compute the norms in float64."""
    import types

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rms_norm_in_model_dtype, m)


def _across_ranks(name: str, layout: dict, overrides: dict) -> dict[str, float]:
    """Each data shard's ranks run the converted model (their EP/ETP shards; with TP each TP
    rank routes its 1/tp of the sequence) on the shard's tokens; the logits equal HF's on
    those tokens, and the summed gradients (dense ones over the world, each expert shard's over
    its EDP replicas) equal HF's for the sum of every shard's loss."""
    import torch.distributed as dist

    from moe_parallel.experts import shard_expert_bias, shard_expert_weights

    ps = parallel_state(**layout)
    ref = build(name)
    ours = hf.convert(copy.deepcopy(ref), parallel_state=ps, **overrides)
    if ps.tp > 1:
        _full_precision_norms(ref), _full_precision_norms(ours)
    ref.train(), ours.train()
    errors = {}
    for d in range(ps.dp):  # HF: every data shard's loss, summed (TP ranks share a shard)
        ids = _tokens(10 + d, batch=2, seq=6)
        logits = ref(ids).logits
        cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(20 + d),
                          dtype=logits.dtype)
        (logits * cot).sum().backward()
        if d == ps.dp_rank:
            mine = ours(ids).logits
            errors["logits"] = _rel(mine, logits.detach())
            ((mine * cot).sum() / ps.tp).backward()  # each TP rank's share, as moe_parallel.train
    family = hf.family_of(ref)
    ref_params = dict(ref.named_parameters())
    dense = []
    for n, p in ours.named_parameters():
        if ".moe.experts." in n:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        key = n.replace(".moe.", ".", 1)
        want = ref_params[key].grad if key in ref_params else None
        if want is None:  # our router / shared expert: compared with the block's below
            continue
        dense.append(_rel(grad, want))
    moe = []
    for block_name, block in ref.named_modules():
        if type(block).__name__ != family.block_class:
            continue
        want = _block_grads(family, block)
        layer = ours.get_submodule(block_name).moe
        w1, w2 = shard_expert_weights(want["experts.w1"], want["experts.w2"], ps.ep_rank, ps.ep,
                                      ps.etp_rank, ps.etp, layer.config.gated)
        want["experts.w1"], want["experts.w2"] = w1, w2
        for k in ("experts.b1", "experts.b2"):
            if k in want:
                want[k] = shard_expert_bias(want[k], ps.ep_rank, ps.ep)
        for k, p in layer.named_parameters():
            grad = p.grad.clone()
            if not k.startswith("experts."):  # router, shared expert: replicated
                dist.all_reduce(grad)
            elif ps.edp > 1:  # expert replicas: each EDP rank saw its own EP group's tokens
                dist.all_reduce(grad, group=ps.group("edp"))
            moe.append(_rel(grad, want[k]))
    errors["dense_grads"] = max(dense) if dense else 0.0
    errors["moe_grads"] = max(moe)
    return errors


ACROSS = ([(name, dict(ep=4), {}) for name in FAMILIES] + [
    ("mixtral", dict(ep=2, etp=2), dict(expert_impl="block_sparse", block_size=4)),
    ("qwen2_moe", dict(tp=2, ep=2), {}),
    ("olmoe", dict(tp=2, ep=2), dict(token_dispatcher_type="allgather")),
    # DeepSeek's router computes in float32 (as HF's): its weight gradient sums the tokens in
    # float32, so a layout that splits a shard's tokens over TP ranks is equal only to float32
    # rounding; EP x ETP keeps each rank's tokens together
    ("deepseek_v3", dict(ep=2, etp=2), dict(token_dispatcher_type="allgather")),
])


@pytest.mark.distributed
@pytest.mark.parametrize("name, layout, overrides", ACROSS,
                         ids=[f"{n}-{'_'.join(f'{k}{v}' for k, v in lay.items())}"
                              for n, lay, _ in ACROSS])
def test_converted_model_across_ranks_equals_hf(name, layout, overrides):
    for rank, errors in enumerate(get_pool(4).run(_across_ranks, name, layout, overrides,
                                                  timeout=180)):
        assert max(errors.values()) < TOL, (rank, errors)


def _gpt_oss_with_etp() -> str:
    try:
        hf.convert(build("gpt_oss"), parallel_state=parallel_state(ep=2, etp=2))
    except ValueError as e:
        return str(e)
    return "converted"


@pytest.mark.distributed
def test_expert_biases_with_expert_tensor_parallelism_are_refused():
    for answer in get_pool(4).run(_gpt_oss_with_etp, timeout=120):
        assert "expert_proj_bias=True is not supported with expert tensor parallelism" in answer


# ---- loading a checkpoint directory shard by shard ----------------------------------------------


def _expert_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".experts." in n)


def _load_sharded(name: str, layout: dict, path: str) -> dict:
    """``load_pretrained`` at ``layout``: what this rank read of the experts and holds, and its
    logits against HF's on its tokens."""
    import torch.distributed as dist

    ps = parallel_state(**layout)
    model = hf.load_pretrained(path, parallel_state=ps, dtype=torch.float64)
    ids = _tokens(30 + dist.get_rank(), batch=2, seq=5)
    with torch.no_grad():
        err = _rel(model(ids).logits, build(name)(ids).logits)
    reader = model.moe_checkpoint_reader
    return {"logits": err, "read": reader.expert_bytes, "largest": reader.largest_read,
            "held": _expert_bytes(model)}


@pytest.mark.distributed
@pytest.mark.parametrize("name, layout", [("mixtral", dict(ep=2, etp=2)),
                                          ("llama4", dict(ep=2, etp=2)),
                                          ("gpt_oss", dict(ep=4)),
                                          ("deepseek_v3", dict(ep=4))],
                         ids=["mixtral-ep2_etp2", "llama4-ep2_etp2", "gpt_oss-ep4",
                              "deepseek_v3-ep4"])
def test_load_pretrained_reads_only_this_ranks_experts(name, layout, tmp_path):
    """From a ``save_pretrained`` directory each rank reads and holds exactly its own 1/(ep·etp)
    of the routed experts (never the full tensors), and its logits equal HF's."""
    ref = build(name)
    ref.save_pretrained(tmp_path)
    full = _expert_bytes(ref)
    one_tensor = max(p.numel() * p.element_size() for n, p in ref.named_parameters())
    shards = layout.get("ep", 1) * layout.get("etp", 1)
    for rank, got in enumerate(get_pool(4).run(_load_sharded, name, layout, str(tmp_path),
                                               timeout=180)):
        assert got["logits"] < TOL, (rank, got)
        assert got["read"] == got["held"] == full // shards, (rank, got, full)
        assert got["largest"] <= one_tensor, (rank, got)


def test_load_pretrained_refuses_a_directory_without_safetensors(tmp_path, monkeypatch):
    """A pickled checkpoint (``pytorch_model.bin``) is never unpickled: without a safetensors
    file ``load_pretrained`` raises ``FileNotFoundError``."""
    ref = build("mixtral")
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load_pretrained unpickled a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors checkpoint"):
        hf.load_pretrained(tmp_path)


def test_load_pretrained_never_runs_a_bin_payload(tmp_path):
    """A ``pytorch_model.bin`` whose pickle would run code is refused unopened: the payload's
    marker file never appears."""
    build("mixtral").config.save_pretrained(tmp_path)
    torch.save({"hook": Payload(tmp_path / "marker")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors checkpoint"):
        hf.load_pretrained(tmp_path)
    assert not (tmp_path / "marker").exists()


# ---- the main job on a converted model ---------------------------------------------------------

TRAIN = ["--dtype", "float64", "--steps", "3", "--seq-len", "8", "--aux-loss-coeff", "0",
         "--z-loss-coeff", "0.01", "--lr", "0.01", "--log-every", "100"]


def _train_hf(path: str, flags: list[str]) -> list[float]:
    from moe_parallel import train

    return train.main(["--hf-model", path, *TRAIN, *flags])["history"]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--ep", "2"], ["--tp", "2", "--ep", "2"]],
                         ids=["ep2_dp4", "tp2_ep2"])
def test_main_job_trains_a_converted_model_as_one_process(layout, tmp_path):
    """``moe_parallel.train --hf-model DIR`` on 4 ranks gives the one-process loss curve
    (float64; Qwen2-MoE: a float64 router, so no float32 reduction depends on how the tokens
    are split)."""
    from moe_parallel import train

    build("qwen2_moe").save_pretrained(tmp_path)
    dp = 4 // (2 if "--tp" in layout else 1)
    single = train.main(["--hf-model", str(tmp_path), *TRAIN, "--batch-size", str(2 * dp)])
    runs = get_pool(4).run(_train_hf, str(tmp_path), [*layout, "--batch-size", "2"], timeout=180)
    for rank, history in enumerate(runs):
        assert len(history) == 3
        for a, b in zip(history, single["history"]):
            assert abs(a - b) <= 1e-10 * abs(b), (rank, history, single["history"])


def _export_sharded(name: str, layout: dict) -> dict[str, torch.Tensor]:
    ps = parallel_state(**layout)
    return hf.export(hf.convert(build(name), parallel_state=ps))


@pytest.mark.distributed
@pytest.mark.parametrize("name, layout", [("mixtral", dict(ep=2, etp=2)),
                                          ("gpt_oss", dict(ep=4)),
                                          ("llama4", dict(ep=2, etp=2))],
                         ids=["mixtral-ep2_etp2", "gpt_oss-ep4", "llama4-ep2_etp2"])
def test_export_gathers_the_shards(name, layout):
    """Converted at EP/ETP, ``export`` on every rank gathers the full HF state dict, equal bit
    for bit to the unconverted model's (the same keys ``save_pretrained`` writes)."""
    want = hf.export(hf.convert(build(name)))
    for rank, got in enumerate(get_pool(4).run(_export_sharded, name, layout, timeout=180)):
        assert got.keys() == want.keys(), rank
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, (rank, bad)


def test_mixtral_jitter_noise_draws_as_hf():
    """``router_jitter_noise`` in training: the converted layer scales its input by the same
    U(1 - ε, 1 + ε) draws as HF's block (same RNG state, same [tokens, H] order)."""
    ref = build("mixtral")
    ref.config.router_jitter_noise = 0.3
    for block in ref.modules():
        if type(block).__name__ == "MixtralSparseMoeBlock":
            block.jitter_noise = 0.3
    ours = hf.convert(copy.deepcopy(ref))
    assert all(m.moe.config.jitter_noise == 0.3 for m in ours.modules()
               if isinstance(m, hf.HFMoEBlock))
    ref.train(), ours.train()
    ids = _tokens(5)
    torch.manual_seed(9)
    a = ref(ids).logits
    torch.manual_seed(9)
    b = ours(ids).logits
    torch.manual_seed(10)
    other = ours(ids).logits
    assert _rel(b, a) < TOL and _rel(other, a) > 1e-6  # the noise is there, and drawn alike


# ---- DeepSeek-V3 with 4, 6 and 8 experts per token: the weights bit for bit ---------------------


def _deepseek_v3_top(k: int, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny DeepSeek-V3 with 16 routed experts in 4 groups (the 3 best allowed) and
    ``num_experts_per_tok = k``, in ``dtype``; weights drawn as ``hf_models.build`` draws them
    (the selection bias float32, as HF keeps it; its router computes in float32 in any
    model)."""
    import transformers

    from tests.helpers.hf_models import COMMON, DS

    cfg = transformers.DeepseekV3Config(**COMMON, **DS, intermediate_size=16,
                                        moe_intermediate_size=8, n_routed_experts=16,
                                        num_experts_per_tok=k, n_group=4, topk_group=3,
                                        n_shared_experts=1, routed_scaling_factor=2.5)
    cfg._experts_implementation = "eager"
    torch.manual_seed(k)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn_like(p) * 0.5)
    for module in model.modules():
        if getattr(module, "e_score_correction_bias", None) is not None:
            module.e_score_correction_bias = torch.randn(
                module.e_score_correction_bias.shape, dtype=torch.float32) * 0.1
    return model


def _by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


# a float32 block (grouped GEMMs against HF's loop over experts) agrees to float32 rounding
BLOCK_TOL = {torch.float64: TOL, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("k", [4, 6, 8])
def test_deepseek_v3_top_k_weights_are_hf_bit_for_bit(k, dtype):
    """Every MoE block of the converted model on random hidden states: the selected experts
    and their float32 combine weights equal HF's bit for bit (HF adds the selected scores in
    ``topk(sorted=False)`` order; a best-first sum differs in some rows, counted and required,
    so the check can fail), and the block output equals HF's to ``BLOCK_TOL``."""
    ref = _deepseek_v3_top(k, dtype)
    ours = hf.convert(copy.deepcopy(ref))
    ref.eval(), ours.eval()
    H = ref.config.hidden_size
    reordered, rows, worst = 0, 0, 0.0
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            h = torch.randn(4, 16, H, dtype=dtype, generator=torch.Generator().manual_seed(i))
            logits, w_hf, idx_hf = layer.mlp.gate(h)
            mine = ours.model.layers[i].mlp
            routing = mine.moe(h.reshape(-1, H), return_aux=True)[1].routing
            a_idx, a_w = _by_expert(routing.expert_idx, routing.probs)
            b_idx, b_w = _by_expert(idx_hf, w_hf)
            assert torch.equal(a_idx, b_idx), i
            assert a_w.dtype == b_w.dtype == torch.float32 and torch.equal(a_w, b_w), i
            picked = logits.sigmoid().gather(1, routing.expert_idx)  # best first
            best_first = picked / (picked.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
            reordered += int((best_first != routing.probs).any(dim=-1).sum())
            rows += routing.probs.shape[0]
            worst = max(worst, _rel(mine(h), layer.mlp(h)))
    print(f"k={k} {dtype}: routing bitwise equal; a best-first sum would change "
          f"{reordered}/{rows} rows; block output rel. error {worst:.2e}")
    assert reordered > 0
    assert worst < BLOCK_TOL[dtype]


@pytest.mark.parametrize("k", [4, 6, 8])
def test_deepseek_v3_top_k_model_equals_hf(k):
    """The whole converted model (float64; the routers in float32 as HF's): logits and every
    gradient equal HF's to ``TOL``."""
    errors = _compare_model(_deepseek_v3_top(k, torch.float64), {})
    print(f"k={k}: {errors}")
    assert max(errors.values()) < TOL, errors
