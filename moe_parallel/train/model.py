"""The main job's models: the built-in decoder-only MoE transformer and a converted Hugging Face
causal LM behind the same interface (``forward(tokens [B, S]) -> logits``, ``moe_layers()``),
and the ``MoEConfig`` every layer gets from the command-line flags (``CONFIG_FLAGS``)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from ..distributed import ParallelState, shard_model
from ..distributed import collectives as comm
from ..layer import MoELayer, set_aux_loss_scale

# MoEConfig field -> the dest of the flag that sets it (``build_config``)
CONFIG_FLAGS: dict[str, str] = {
    "hidden_size": "hidden", "ffn_hidden_size": "ffn", "num_experts": "experts",
    "params_dtype": "dtype", "token_dispatcher_type": "dispatcher",
    **{name: name for name in (
        "top_k", "capacity_factor", "aux_loss_coeff", "z_loss_coeff", "score_function",
        "expert_bias", "bias_update_rate", "expert_impl", "block_size", "grouped_gemm_backend",
        "max_rows_factor", "row_overflow", "overlap_chunks", "top_p", "dynamic_loss_coeff",
        "drop_policy", "dynamic_capacity", "target_drop_rate", "capacity_factor_min",
        "capacity_factor_max", "capacity_update_rate", "recompute", "expert_dropout")},
}

# the fields that apply to a converted model's layers too (``_runtime_fields``)
_RUNTIME_FIELDS = ("capacity_factor", "aux_loss_coeff", "z_loss_coeff", "expert_bias",
                   "bias_update_rate", "token_dispatcher_type", "expert_impl", "block_size",
                   "grouped_gemm_backend", "max_rows_factor", "row_overflow", "overlap_chunks",
                   "drop_policy", "dynamic_capacity", "target_drop_rate", "capacity_factor_min",
                   "capacity_factor_max", "capacity_update_rate", "recompute")


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
        self.tp_group = None

    def _moe(self, x: Tensor) -> Tensor:
        """MoE on ``x [S, B, H]``; with TP, on this TP rank's slice of S, gathered back."""
        tp = comm.group_size(self.tp_group)
        if tp == 1:
            return self.moe(x)
        chunk = x.shape[0] // tp
        start = comm.group_rank(self.tp_group) * chunk
        with self.moe.token_keys_narrowed(x.shape[:-1], 0, start, chunk):  # the slice's keys
            y = self.moe(x[start:][:chunk])
        return comm.all_gather(y, self.tp_group, sizes=[chunk] * tp)

    def forward(self, x: Tensor) -> Tensor:
        """``x + attn(ln1(x))``, then ``+ moe(ln2(·))``; ``[B, S, H]`` in and out."""
        B, S, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, H // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, H))
        # MoELayer takes sequence-major [S, B, H].
        return x + self._moe(self.ln2(x).transpose(0, 1)).transpose(0, 1)


class MoETransformerLM(nn.Module):
    """Decoder-only language model: token + position embeddings, ``layers`` pre-norm blocks
    (causal self-attention, then an ``MoELayer`` as the FFN), final norm, vocabulary head."""

    def __init__(self, config: MoEConfig, vocab: int, layers: int, heads: int, max_len: int):
        super().__init__()
        H = config.hidden_size
        self.embed = nn.Embedding(vocab, H, dtype=config.params_dtype)
        self.pos = nn.Embedding(max_len, H, dtype=config.params_dtype)
        self.blocks = nn.ModuleList(Block(config, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(H, dtype=config.params_dtype)
        self.head = nn.Linear(H, vocab, bias=False, dtype=config.params_dtype)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layer of every block, in order."""
        return [b.moe for b in self.blocks]

    def parallelize(self, ps: ParallelState) -> MoETransformerLM:
        """Shard every MoE layer's experts over EP/ETP (from the full weights this model holds)
        and tag the replicated parameters for gradient sync over TP as well (see the package
        doc)."""
        if ps.world_size == 1:
            return self
        if ps.cp > 1 or ps.pp > 1:
            raise ValueError(f"the demo model supports tp, ep, etp and dp; got {ps}")
        for block in self.blocks:
            block.moe = MoELayer.shard_from(block.moe, ps)
            block.tp_group = ps.group("tp")
        _mark_sequence_parallel(self, ps)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, S, vocab]`` for ``tokens`` ``[B, S]``."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class HFCausalLM(nn.Module):
    """A converted transformers causal LM (``integrations.hf.load_pretrained``) with the built-in
    model's interface: ``forward(tokens [B, S]) -> logits``, ``moe_layers()``."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def moe_layers(self) -> list[MoELayer]:
        """Every converted block's ``MoELayer``, in order."""
        return [m for m in self.hf.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, S, vocab]``."""
        return self.hf(tokens, use_cache=False).logits


def _mark_sequence_parallel(model: nn.Module, ps: ParallelState) -> None:
    """Tag the replicated (``sync_group`` "dp") parameters ``sequence_parallel`` when tp > 1:
    their gradients are summed over TP as well (``distributed.sync_gradients``)."""
    for p in model.parameters():
        if getattr(p, "sync_group", "dp") == "dp":
            p.sequence_parallel = ps.tp > 1


def build_config(args: argparse.Namespace) -> MoEConfig:
    """The ``MoEConfig`` of every layer from the command-line flags (``CONFIG_FLAGS``;
    ``--capacity-factor 0`` is dropless, ``None``)."""
    fields = {field: getattr(args, dest) for field, dest in CONFIG_FLAGS.items()}
    fields["capacity_factor"] = args.capacity_factor or None
    fields["params_dtype"] = getattr(torch, args.dtype)
    fields["expert_dropout_seed"] = args.seed % 2**64  # the expert dropout's seed: --seed
    return MoEConfig(**fields)


def _runtime_fields(config: MoEConfig) -> dict:
    """The flags that apply to a converted model's layers too (the model fields come from its
    config); ``--expert-bias`` only where the family has none (DeepSeek-V3 keeps its own)."""
    fields = {f: getattr(config, f) for f in _RUNTIME_FIELDS}
    if not fields["expert_bias"]:
        del fields["expert_bias"]
    return fields


def upcycled_model(args: argparse.Namespace, ps: ParallelState) -> nn.Module:
    """``--upcycle-from``: the dense model of that save_pretrained directory (``from_pretrained``
    in ``--dtype``) upcycled (``integrations.hf.upcycle`` with ``--experts``, ``--top-k``,
    ``--granularity``, seeded by ``--seed``: the same model on every rank), then converted for
    ``ps`` (``hf.convert``: each rank keeps its EP/ETP shard of the experts; while it is built,
    every rank holds the whole upcycled model once)."""
    import transformers

    from ..integrations import hf

    dense = transformers.AutoModelForCausalLM.from_pretrained(
        args.upcycle_from, dtype=getattr(torch, args.dtype))
    moe = hf.upcycle(dense, args.experts, args.top_k, args.granularity, seed=args.seed)
    del dense
    return hf.convert(moe, parallel_state=ps, **_runtime_fields(build_config(args)))


def build_model(args: argparse.Namespace, ps: ParallelState) -> nn.Module:
    """The full model from ``args.seed`` (identical on every rank), then sharded for ``ps``; with
    ``--hf-model`` the converted transformers model, each rank reading its own experts; with
    ``--upcycle-from`` the upcycled and converted one (``upcycled_model``)."""
    torch.manual_seed(args.seed)
    if args.hf_model or args.upcycle_from:
        from ..integrations import hf

        model = HFCausalLM(upcycled_model(args, ps) if args.upcycle_from else hf.load_pretrained(
            args.hf_model, parallel_state=ps, dtype=getattr(torch, args.dtype),
            **_runtime_fields(build_config(args))))
        _mark_sequence_parallel(model, ps)  # the dense part is replicated over TP
    else:
        model = MoETransformerLM(build_config(args), args.vocab, args.layers, args.heads,
                                 args.seq_len).parallelize(ps)
    set_aux_loss_scale(model, 1.0 / ps.tp)  # each TP rank's share, as its lm loss / tp
    return model


def compile_blocks(model: nn.Module, backend: str) -> int:
    """``torch.compile`` each block of the built-in model in place (``nn.Module.compile``: the
    module tree, its state dict and checkpoints are unchanged) with ``backend``; returns the
    number compiled. A block's dense part and its MoE layer's routing and experts trace into
    its graphs; the expert-parallel and tensor-parallel exchanges between them are graph
    breaks."""
    if not isinstance(model, MoETransformerLM):
        raise ValueError(f"compile_blocks compiles MoETransformerLM blocks, got "
                         f"{type(model).__name__}")
    for block in model.blocks:
        block.compile(backend=backend)
    return len(model.blocks)


def shard_for_memory(model: nn.Module, shard: str, ps: ParallelState) -> nn.Module:
    """``--shard experts``: ``model`` sharded with FSDP2 (``distributed.shard_model``: routed
    experts over EDP, every block and the rest over DP), each block of the built-in model a unit
    of its own; ``model`` unchanged for the other modes (``optimizer`` shards in the optimizer:
    ``step.build_optimizer``). Call once the model is on its device."""
    if shard != "experts":
        return model
    blocks = list(model.blocks) if isinstance(model, MoETransformerLM) else []
    return shard_model(model, ps, dense_modules=blocks)
