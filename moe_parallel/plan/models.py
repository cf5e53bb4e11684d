"""The models the planner knows: their shapes (``ModelSpec``), their parameters by piece, and the
presets of published MoE models.

A ``ModelSpec`` describes a decoder-only MoE transformer: token embedding (and learned positions
for the built-in model), ``len(layer_kinds)`` decoder layers, each attention then an FFN that is
an MoE layer (``"moe"``: router, routed experts, optional shared experts) or a dense FFN
(``"dense"``), a final norm and the vocabulary head; DeepSeek-V3 adds ``mtp_layers``
multi-token-prediction modules. Parameters per piece (``H`` hidden, ``V`` vocabulary, ``E``
routed experts of FFN width ``F``, ``m = 3`` matrices for gated FFNs (SwiGLU) else 2, ``fc1 =
2F`` gated else ``F``):

* attention, GQA: ``H·h·d`` (q) + ``2·H·g·d`` (k, v; ``g`` KV heads, ``d`` head width; v of
  width ``dv``) + ``h·dv·H`` (o), plus biases, per-head sinks and q/k norms where the model has
  them; MLA (DeepSeek): ``H·r_q + r_q`` (q down + norm) + ``r_q·h·d`` (q up) + ``H·(r_kv + d_rope)
  + r_kv`` (kv down + norm) + ``r_kv·h·(d - d_rope + dv)`` (kv up) + ``h·dv·H`` (o);
* norms: ``H`` (RMSNorm) or ``2H`` (LayerNorm) each, two per layer, one final;
* MoE layer: router ``E·H`` (+ ``E`` bias), routed experts ``E·(H·fc1 + F·H)`` (+ ``E·(fc1 +
  H)`` biases), shared experts ``H·fc1_s + F_s·H`` (+ ``H`` for their sigmoid gate);
* dense FFN: ``m·H·F_dense``; embedding ``V·H``; head ``V·H`` unless tied;
* one MTP module: a decoder layer plus ``eh_proj`` ``2H·H`` and three norms (its embedding and
  head are the main model's).

Each piece says how it is split over ranks (``Piece.split``): ``"tp"`` pieces are divided by TP
when the dense part is tensor-parallel (Megatron-Core: q/k/v/o, up-projections, dense FFN,
vocabulary-parallel embedding and head), ``"none"`` pieces are replicated over TP (norms, MLA
down-projections, output biases and, as ``MoELayer`` holds them, the router and the shared
experts), ``"experts"`` pieces are divided by ``ep·etp``. The router is kept in float32 whatever
the model's precision (``TopKRouter``); ``Piece.fp32`` marks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

__all__ = ["AttentionSpec", "ModelSpec", "PRESETS", "Piece", "active_params", "builtin_model",
           "layer_pieces", "model_pieces", "preset", "stage_layers", "stage_pieces",
           "total_params"]

LayerKind = Literal["moe", "dense"]


@dataclass(frozen=True)
class AttentionSpec:
    """One attention block's shape. GQA when ``kv_lora_rank == 0``, else MLA (DeepSeek-V2/V3):
    ``head_dim`` is then the query/key width per head including its ``rope_head_dim`` part.
    ``qk_norm``: ``"per_head"`` RMSNorm of width ``head_dim`` on q and on k (Qwen3),
    ``"full"`` over the whole q and k projections (OLMoE); ``sinks``: one learned logit per
    head (GPT-OSS)."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    sinks: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_head_dim: int = 0

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (low-rank KV)."""
        return self.kv_lora_rank > 0


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only MoE transformer's shape (module docstring). ``layer_kinds[i]`` is ``"moe"``
    or ``"dense"``; ``dense_tp``: the dense part is tensor-parallel with sequence parallelism
    (Megatron-Core, the presets) rather than replicated over TP with each TP rank routing its
    slice of the sequence (the built-in ``moe_parallel.train`` model); ``source``: where the
    shape comes from."""

    name: str
    hidden: int
    vocab: int
    attention: AttentionSpec
    layer_kinds: tuple[str, ...]
    experts: int
    top_k: int
    expert_ffn: int
    dense_ffn: int = 0
    shared_ffn: int = 0
    shared_gate: bool = False
    router_bias: bool = False
    expert_proj_bias: bool = False
    gated: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    tied_embeddings: bool = False
    position_embeddings: int = 0
    mtp_layers: int = 0
    dense_tp: bool = True
    source: str = ""
    published: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("hidden", "vocab", "experts", "top_k", "expert_ffn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name}: {name} must be a positive int, got {v!r}")
        if not self.layer_kinds or any(k not in ("moe", "dense") for k in self.layer_kinds):
            raise ValueError(f"{self.name}: layer_kinds must be a non-empty sequence of 'moe' "
                             f"or 'dense', got {self.layer_kinds!r}")
        if "dense" in self.layer_kinds and self.dense_ffn < 1:
            raise ValueError(f"{self.name}: dense layers need dense_ffn >= 1")
        if self.top_k > self.experts:
            raise ValueError(f"{self.name}: top_k {self.top_k} > experts {self.experts}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"{self.name}: norm must be 'rmsnorm' or 'layernorm', "
                             f"got {self.norm!r}")

    @property
    def layers(self) -> int:
        """Decoder layers of the main model (MTP modules not counted)."""
        return len(self.layer_kinds)

    @property
    def moe_layers(self) -> int:
        """MoE layers of the main model."""
        return self.layer_kinds.count("moe")

    @property
    def fc1(self) -> int:
        """Width of a routed expert's first projection: ``2F`` gated, else ``F``."""
        return (2 if self.gated else 1) * self.expert_ffn

    @property
    def norm_params(self) -> int:
        """Parameters of one norm of width ``hidden``: ``H`` (RMSNorm) or ``2H`` (LayerNorm)."""
        return self.hidden * (1 if self.norm == "rmsnorm" else 2)

    def to_dict(self) -> dict:
        """The spec as JSON-ready data."""
        d = asdict(self)
        d["layer_kinds"] = list(self.layer_kinds)
        return d


@dataclass(frozen=True)
class Piece:
    """``count`` parameters of one component (``name``), split over ranks as ``split`` says
    (``"tp"``, ``"none"``, ``"experts"``: module docstring); ``fp32``: kept in float32."""

    name: str
    count: int
    split: Literal["tp", "none", "experts"]
    fp32: bool = False


def _attention_pieces(m: ModelSpec) -> list[Piece]:
    a, H = m.attention, m.hidden
    tp, rep = [], []
    if a.mla:
        if a.q_lora_rank:
            rep += [H * a.q_lora_rank, a.q_lora_rank]                 # q down + its norm
            tp.append(a.q_lora_rank * a.heads * a.head_dim)           # q up
        else:
            tp.append(H * a.heads * a.head_dim)
        rep += [H * (a.kv_lora_rank + a.rope_head_dim), a.kv_lora_rank]  # kv down + its norm
        tp.append(a.kv_lora_rank * a.heads * (a.head_dim - a.rope_head_dim + a.v_head_dim))
    else:
        q, k, v = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.v_head_dim
        tp.append(H * (q + k + v) + (q + k + v if a.qkv_bias else 0))
        if a.qk_norm == "per_head":
            rep.append(2 * a.head_dim)
        elif a.qk_norm == "full":
            tp.append(q + k)
    tp.append(a.heads * a.v_head_dim * H)                             # o
    if a.out_bias:
        rep.append(H)
    if a.sinks:
        tp.append(a.heads)
    return [Piece("attention", sum(tp), "tp"), Piece("attention", sum(rep), "none")]


@lru_cache(maxsize=256)
def layer_pieces(m: ModelSpec, kind: str) -> tuple[Piece, ...]:
    """The pieces of one decoder layer of ``kind`` (``"moe"`` or ``"dense"``)."""
    H = m.hidden
    pieces = _attention_pieces(m) + [Piece("norms", 2 * m.norm_params, "none")]
    mats = 3 if m.gated else 2
    if kind == "dense":
        return tuple(pieces + [Piece("dense_ffn", mats * H * m.dense_ffn, "tp")])
    pieces.append(Piece("router", m.experts * H + (m.experts if m.router_bias else 0), "none",
                        fp32=True))
    if m.shared_ffn:
        pieces.append(Piece("shared_experts", mats * H * m.shared_ffn
                            + (H if m.shared_gate else 0), "none"))
    per_expert = H * m.fc1 + m.expert_ffn * H + ((m.fc1 + H) if m.expert_proj_bias else 0)
    return tuple(pieces + [Piece("experts", m.experts * per_expert, "experts")])


def _embedding_pieces(m: ModelSpec) -> list[Piece]:
    out = [Piece("embedding", m.vocab * m.hidden, "tp")]
    if m.position_embeddings:
        out.append(Piece("embedding", m.position_embeddings * m.hidden, "none"))
    return out


def _head_pieces(m: ModelSpec, pp: int = 1) -> list[Piece]:
    """Final norm and head; a tied head is the embedding itself when one stage holds both, and
    a copy on the last stage otherwise (as Megatron-Core keeps it)."""
    out = [Piece("norms", m.norm_params, "none")]
    if not m.tied_embeddings or pp > 1:
        out.append(Piece("head", m.vocab * m.hidden, "tp"))
    return out


def _mtp_pieces(m: ModelSpec) -> list[Piece]:
    """One MTP module: its decoder layer, ``eh_proj`` and three norms (enorm, hnorm, the shared
    head's norm); its embedding and head are the main model's."""
    return ([Piece("mtp", p.count, p.split, p.fp32) for p in layer_pieces(m, "moe")]
            + [Piece("mtp", 2 * m.hidden * m.hidden, "tp"),
               Piece("mtp", 3 * m.norm_params, "none")])


def model_pieces(m: ModelSpec, include_mtp: bool = True) -> list[Piece]:
    """Every piece of the whole model (one process, no parallelism)."""
    out = _embedding_pieces(m)
    for kind in m.layer_kinds:
        out += layer_pieces(m, kind)
    out += _head_pieces(m)
    if include_mtp:
        for _ in range(m.mtp_layers):
            out += _mtp_pieces(m)
    return out


def total_params(m: ModelSpec, include_mtp: bool = True) -> int:
    """Parameters of the whole model (``include_mtp``: with its MTP modules)."""
    return sum(p.count for p in model_pieces(m, include_mtp))


def active_params(m: ModelSpec, include_embedding: bool = True) -> int:
    """Parameters one token passes through in the main model: every dense piece, ``top_k / E``
    of each MoE layer's routed experts (the embedding row counted as the whole table when
    ``include_embedding``, as DeepSeek reports it)."""
    total = 0
    for p in model_pieces(m, include_mtp=False):
        if p.split == "experts":
            total += p.count * m.top_k // m.experts
        elif p.name != "embedding" or include_embedding:
            total += p.count
    return total


@lru_cache(maxsize=256)
def stage_layers(m: ModelSpec, pp: int) -> tuple[dict, ...]:
    """What pipeline stage ``s`` of ``pp`` holds: ``{"kinds": layer kinds, "embedding": bool,
    "head": bool, "mtp": int}``; stage ``s`` gets layers ``[s·L//pp, (s+1)·L//pp)``, the first
    the embedding, the last the head and the MTP modules."""
    L = m.layers
    if isinstance(pp, bool) or not isinstance(pp, int) or not 1 <= pp <= L:
        raise ValueError(f"pp must be an int in [1, layers={L}], got {pp!r}")
    return tuple({"kinds": m.layer_kinds[s * L // pp:(s + 1) * L // pp], "embedding": s == 0,
                  "head": s == pp - 1, "mtp": m.mtp_layers if s == pp - 1 else 0}
                 for s in range(pp))


@lru_cache(maxsize=1024)
def stage_pieces(m: ModelSpec, pp: int, s: int) -> tuple[Piece, ...]:
    """The pieces of pipeline stage ``s`` of ``pp`` (``stage_layers``)."""
    stage = stage_layers(m, pp)[s]
    out = _embedding_pieces(m) if stage["embedding"] else []
    if stage["mtp"] and not stage["embedding"]:  # MTP embeds tokens on the last stage
        out += [p for p in _embedding_pieces(m) if p.split == "tp"]
    for kind in stage["kinds"]:
        out += layer_pieces(m, kind)
    if stage["head"]:
        out += _head_pieces(m, pp)
    for _ in range(stage["mtp"]):
        out += _mtp_pieces(m)
    return tuple(out)


# ---- presets ----------------------------------------------------------------------------------
# Each preset is the published config.json of the model. The expected totals in the tests are
# the parameter counts of the Hugging Face transformers implementation (5.25) of the same config
# built on the meta device; ``published`` holds what the model's authors state.


def _mixtral(name: str, H: int, F: int, layers: int, heads: int, vocab: int, source: str,
             published: dict) -> ModelSpec:
    return ModelSpec(name=name, hidden=H, vocab=vocab, layer_kinds=("moe",) * layers,
                     attention=AttentionSpec(heads=heads, kv_heads=8, head_dim=H // heads,
                                             v_head_dim=H // heads),
                     experts=8, top_k=2, expert_ffn=F, source=source, published=published)


def _mixtral_8x7b() -> ModelSpec:
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json (hidden 4096,
    # intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 32000, 8 experts, top-2);
    # "46.7B total parameters", "12.9B per token": https://mistral.ai/news/mixtral-of-experts
    return _mixtral("mixtral-8x7b", 4096, 14336, 32, 32, 32000,
                    "mistralai/Mixtral-8x7B-v0.1 config.json",
                    {"total": 46.7e9, "active": 12.9e9})


def _mixtral_8x22b() -> ModelSpec:
    # https://huggingface.co/mistralai/Mixtral-8x22B-Instruct-v0.1/blob/main/config.json
    # (hidden 6144, intermediate 16384, 56 layers, 48 heads, 8 KV heads, vocab 32768);
    # "141B parameters, 39B active": https://mistral.ai/news/mixtral-8x22b
    return _mixtral("mixtral-8x22b", 6144, 16384, 56, 48, 32768,
                    "mistralai/Mixtral-8x22B-Instruct-v0.1 config.json",
                    {"total": 141e9, "active": 39e9})


def _deepseek_v3() -> ModelSpec:
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json and
    # github.com/deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json: hidden 7168, 61
    # layers (first 3 dense, intermediate 18432), 256 routed experts of 2048 + 1 shared, top-8,
    # 128 heads, MLA q_lora 1536, kv_lora 512, qk nope 128 + rope 64, v 128, vocab 129280,
    # untied, 1 MTP module. README_WEIGHTS.md: main model 671B (36.7B activated, embedding and
    # head included), MTP module 11.5B unique parameters besides the shared embedding and head.
    return ModelSpec(
        name="deepseek-v3", hidden=7168, vocab=129280,
        attention=AttentionSpec(heads=128, kv_heads=128, head_dim=192, v_head_dim=128,
                                q_lora_rank=1536, kv_lora_rank=512, rope_head_dim=64),
        layer_kinds=("dense",) * 3 + ("moe",) * 58, experts=256, top_k=8, expert_ffn=2048,
        dense_ffn=18432, shared_ffn=2048, mtp_layers=1,
        source="deepseek-ai/DeepSeek-V3 config.json",
        published={"total": 671e9, "active": 36.7e9, "mtp_layer": 11.5e9})


def _qwen3(name: str, H: int, layers: int, heads: int, F: int, source: str,
           published: dict) -> ModelSpec:
    return ModelSpec(name=name, hidden=H, vocab=151936,
                     attention=AttentionSpec(heads=heads, kv_heads=4, head_dim=128,
                                             v_head_dim=128, qk_norm="per_head"),
                     layer_kinds=("moe",) * layers, experts=128, top_k=8, expert_ffn=F,
                     source=source, published=published)


def _qwen3_30b() -> ModelSpec:
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json: hidden 2048, 48 layers,
    # 32 heads, 4 KV heads, head_dim 128, 128 experts of 768, top-8, vocab 151936, untied,
    # q/k norms; model card: "30.5B in total and 3.3B activated"
    return _qwen3("qwen3-30b-a3b", 2048, 48, 32, 768, "Qwen/Qwen3-30B-A3B config.json",
                  {"total": 30.5e9, "active": 3.3e9})


def _qwen3_235b() -> ModelSpec:
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json: hidden 4096, 94
    # layers, 64 heads, 4 KV heads, head_dim 128, 128 experts of 1536, top-8, vocab 151936;
    # model card: "235B in total and 22B activated"
    return _qwen3("qwen3-235b-a22b", 4096, 94, 64, 1536, "Qwen/Qwen3-235B-A22B config.json",
                  {"total": 235e9, "active": 22e9})


def _gpt_oss_120b() -> ModelSpec:
    # https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json: hidden 2880, 36 layers,
    # 64 heads of 64, 8 KV heads, attention biases and sinks, 128 experts of 2880 with biases,
    # router bias, top-4, vocab 201088, untied; model card (arXiv 2508.10925): 116.83B total,
    # 5.13B active per token (embedding excluded)
    return ModelSpec(
        name="gpt-oss-120b", hidden=2880, vocab=201088,
        attention=AttentionSpec(heads=64, kv_heads=8, head_dim=64, v_head_dim=64,
                                qkv_bias=True, out_bias=True, sinks=True),
        layer_kinds=("moe",) * 36, experts=128, top_k=4, expert_ffn=2880, router_bias=True,
        expert_proj_bias=True, source="openai/gpt-oss-120b config.json",
        published={"total": 116.83e9, "active": 5.13e9})


PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "mixtral-8x7b": _mixtral_8x7b,
    "mixtral-8x22b": _mixtral_8x22b,
    "deepseek-v3": _deepseek_v3,
    "qwen3-30b-a3b": _qwen3_30b,
    "qwen3-235b-a22b": _qwen3_235b,
    "gpt-oss-120b": _gpt_oss_120b,
}


def preset(name: str) -> ModelSpec:
    """The preset ``name`` (a key of ``PRESETS``); ``ValueError`` naming ``--model`` and the
    known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"--model: unknown model {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


def builtin_model(vocab: int, hidden: int, ffn: int, experts: int, top_k: int, layers: int,
                  heads: int, seq_len: int) -> ModelSpec:
    """The shape of ``moe_parallel.train``'s built-in model (``MoETransformerLM``): LayerNorm,
    learned positions (``seq_len`` of them), one fused bias-free ``qkv`` and ``proj``, an
    ``MoELayer`` (SwiGLU) in every block, untied head; its dense part is replicated over TP."""
    return ModelSpec(
        name="builtin", hidden=hidden, vocab=vocab,
        attention=AttentionSpec(heads=heads, kv_heads=heads, head_dim=hidden // heads,
                                v_head_dim=hidden // heads),
        layer_kinds=("moe",) * layers, experts=experts, top_k=top_k, expert_ffn=ffn,
        norm="layernorm", position_embeddings=seq_len,
        dense_tp=False, source="moe_parallel.train.model.MoETransformerLM")
