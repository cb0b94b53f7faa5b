"""Model shapes from a HF config.json, and the parameter count tensor by tensor.

Every weight the checkpoint holds is listed as a `Tensor` with its shape, how often it repeats
(per dense layer, per MoE layer, once per model, in the MTP module) and how tensor parallelism
shards it. Memory, FLOPs and the parameter totals are all derived from that one list, so the
planner never uses a "params x bytes" shortcut that would miss 16-bit embeddings or scales.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from r1deploy.errors import UsageError
from r1deploy.presets import canonical_name, preset_names, resolve_config_path

# Where a tensor lives. "layer" tensors repeat in every decoder layer, "dense"/"moe" only in that kind.
Scope = Literal["model", "layer", "dense", "moe", "mtp"]
# How TP splits it: "tp" = 1/tp per GPU, "kv" = 1/min(tp, n_kv) (GQA K/V are replicated when TP > n_kv),
# "attn" = like "tp" unless attention runs data-parallel, "none" = replicated (norms, routers).
Shard = Literal["tp", "kv", "attn", "none"]
# Precision class: "linear" = quantizable matmul weight [out, in]; "embed" = 16-bit embedding/lm_head;
# "vector" = 16-bit norm weight or bias; "router" = 16-bit router matrix; "fp32" = fp32 vector.
Kind = Literal["linear", "embed", "vector", "router", "fp32"]
# Which bucket it belongs to, for the breakdown and for "touched per token" (routed experts).
Part = Literal["embedding", "lm_head", "attention", "dense_mlp", "shared_experts", "routed_experts",
               "router", "norm", "mtp"]


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # [out, in] for linear layers
    scope: Scope
    part: Part
    kind: Kind
    shard: Shard
    copies: int = 1  # per scope occurrence, e.g. 256 routed experts per MoE layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_dense_layers: int
    num_moe_layers: int
    num_mtp_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int
    checkpoint_weights: str  # "fp8" | "bf16" | "fp16" | "awq" | "gptq"
    checkpoint_group_size: int
    mla: bool
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    tensors: tuple[Tensor, ...]

    @property
    def moe(self) -> bool:
        return self.n_routed_experts > 0

    def scope_count(self, scope: Scope) -> int:
        return {"model": 1, "layer": self.num_layers, "dense": self.num_dense_layers,
                "moe": self.num_moe_layers, "mtp": self.num_mtp_layers}[scope]

    def params(self, *, parts: tuple[Part, ...] | None = None, include_mtp: bool = False) -> int:
        return sum(t.numel * t.copies * self.scope_count(t.scope) for t in self.tensors
                   if (include_mtp or t.scope != "mtp") and (parts is None or t.part in parts))

    @property
    def total_params(self) -> int:
        """Main model, all experts resident, MTP excluded (DeepSeek's "671B")."""
        return self.params()

    @property
    def mtp_params(self) -> int:
        """The multi-token-prediction module as stored in the checkpoint (own embedding and head copies)."""
        return self.params(include_mtp=True) - self.params()

    @property
    def checkpoint_params(self) -> int:
        """What the HF model card counts: main model + MTP (R1: 671B + ~14B = 685B)."""
        return self.params(include_mtp=True)

    @property
    def routed_expert_params(self) -> int:
        return self.params(parts=("routed_experts",))

    @property
    def active_params(self) -> int:
        """Parameters a token uses: all but the routed experts, plus top-k of them (embedding included,
        as DeepSeek counts its "37B")."""
        if not self.moe:
            return self.total_params
        return self.total_params - self.routed_expert_params * (1 - self.num_experts_per_tok / self.n_routed_experts)

    @property
    def embedding_params(self) -> int:
        return self.params(parts=("embedding",))

    @property
    def lm_head_params(self) -> int:
        return self.params(parts=("lm_head",))

    def kv_elems_per_token(self) -> int:
        """Values cached per token over all layers: MLA stores one latent + one rope key per layer;
        GQA/MHA store K and V for every KV head."""
        if self.mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def load_config(model: str) -> tuple[str, dict[str, Any]]:
    path = resolve_config_path(model)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path} as a config.json: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a config.json (expected a JSON object)")
    name = canonical_name(model) if canonical_name(model) in preset_names() else str(path)
    return name, config


def _require(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise UsageError(f"{source} is missing {', '.join(missing)} (needed to size the model)")


_COMMON = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_MLA = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
_MOE = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def _checkpoint_format(config: dict[str, Any]) -> tuple[str, int]:
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method == "fp8":
        return "fp8", 0
    if method in ("awq", "gptq"):
        return method, int(quant.get("group_size", 128))
    return ("fp16" if config.get("torch_dtype") == "float16" else "bf16"), 0


def spec_from_config(name: str, config: dict[str, Any]) -> ModelSpec:
    source = f"config {name}"
    _require(config, _COMMON, source)
    mla = config.get("kv_lora_rank") is not None
    moe = bool(config.get("n_routed_experts"))
    if mla:
        _require(config, _MLA, source)
    if moe:
        _require(config, _MOE, source)
    d, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    vocab = config["vocab_size"]
    first_dense = config.get("first_k_dense_replace", 0) if moe else layers
    freq = config.get("moe_layer_freq", 1) or 1
    moe_layers = sum(1 for i in range(layers) if moe and i >= first_dense and i % freq == 0)
    mtp_layers = config.get("num_nextn_predict_layers", 0) or 0
    weights, group = _checkpoint_format(config)

    t: list[Tensor] = [
        Tensor("embed_tokens", (vocab, d), "model", "embedding", "embed", "tp"),
        Tensor("norm", (d,), "model", "norm", "vector", "none"),
    ]
    if not config.get("tie_word_embeddings", False):
        t.append(Tensor("lm_head", (vocab, d), "model", "lm_head", "embed", "tp"))
    t += [Tensor("input_layernorm", (d,), "layer", "norm", "vector", "none"),
          Tensor("post_attention_layernorm", (d,), "layer", "norm", "vector", "none")]
    attn = _mla_attention(config, d, heads) if mla else _gqa_attention(config, d, heads, kv_heads, head_dim)
    t += [Tensor(n, s, "layer", "attention", k, sh) for n, s, k, sh in attn]
    t += _mlp("mlp", d, config["intermediate_size"], "dense", "dense_mlp")
    if moe:
        e, inter = config["n_routed_experts"], config["moe_intermediate_size"]
        shared = (config.get("n_shared_experts") or 0) * inter
        t += [Tensor("mlp.gate", (e, d), "moe", "router", "router", "none")]
        if config.get("topk_method") == "noaux_tc":
            t += [Tensor("mlp.gate.e_score_correction_bias", (e,), "moe", "router", "fp32", "none")]
        t += _mlp("mlp.experts", d, inter, "moe", "routed_experts", copies=e)
        if shared:
            t += _mlp("mlp.shared_experts", d, shared, "moe", "shared_experts")
    if mtp_layers:
        t += _mtp_tensors(t, d, vocab)

    return ModelSpec(
        name=name, model_type=str(config.get("model_type", "unknown")), hidden_size=d, num_layers=layers,
        num_dense_layers=layers - moe_layers, num_moe_layers=moe_layers, num_mtp_layers=mtp_layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        checkpoint_weights=weights, checkpoint_group_size=group, mla=mla,
        kv_lora_rank=config.get("kv_lora_rank") or 0, qk_rope_head_dim=config.get("qk_rope_head_dim") or 0,
        qk_nope_head_dim=config.get("qk_nope_head_dim") or 0, v_head_dim=config.get("v_head_dim") or head_dim,
        n_routed_experts=config.get("n_routed_experts") or 0 if moe else 0,
        num_experts_per_tok=config.get("num_experts_per_tok") or 0 if moe else 0,
        moe_intermediate_size=config.get("moe_intermediate_size") or 0 if moe else 0,
        tensors=tuple(t),
    )


def _mla_attention(config: dict[str, Any], d: int, heads: int) -> list[tuple[str, tuple[int, ...], Kind, Shard]]:
    nope, rope, v, kv_rank = (config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                   "kv_lora_rank"))
    q_rank = config.get("q_lora_rank")
    if q_rank:
        # q_a and its norm act on the full hidden state: replicated under TP (vLLM ReplicatedLinear).
        q = [("q_a_proj", (q_rank, d), "linear", "none"), ("q_a_layernorm", (q_rank,), "vector", "none"),
             ("q_b_proj", (heads * (nope + rope), q_rank), "linear", "attn")]
    else:
        q = [("q_proj", (heads * (nope + rope), d), "linear", "attn")]
    return [*q,
            ("kv_a_proj_with_mqa", (kv_rank + rope, d), "linear", "none"),
            ("kv_a_layernorm", (kv_rank,), "vector", "none"),
            ("kv_b_proj", (heads * (nope + v), kv_rank), "linear", "attn"),
            ("o_proj", (d, heads * v), "linear", "attn")]


def _gqa_attention(config: dict[str, Any], d: int, heads: int, kv: int,
                   hd: int) -> list[tuple[str, tuple[int, ...], Kind, Shard]]:
    # Qwen2 has q/k/v bias (no key for it in its config); Llama says so with attention_bias.
    bias = config.get("attention_bias", config.get("model_type") == "qwen2")
    out = [("q_proj", (heads * hd, d), "linear", "attn"), ("k_proj", (kv * hd, d), "linear", "kv"),
           ("v_proj", (kv * hd, d), "linear", "kv"), ("o_proj", (d, heads * hd), "linear", "attn")]
    if bias:
        out += [("q_proj.bias", (heads * hd,), "vector", "attn"), ("k_proj.bias", (kv * hd,), "vector", "kv"),
                ("v_proj.bias", (kv * hd,), "vector", "kv")]
    return out


def _mlp(prefix: str, d: int, inter: int, scope: Scope, part: Part, copies: int = 1) -> list[Tensor]:
    return [Tensor(f"{prefix}.{n}", s, scope, part, "linear", "tp", copies)
            for n, s in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter)))]


def _mtp_tensors(main: list[Tensor], d: int, vocab: int) -> list[Tensor]:
    """DeepSeek's MTP module (checkpoint layer 61): enorm, hnorm, eh_proj, one full MoE decoder layer,
    and its own copies of embed_tokens and shared_head (stored, though tied to the main ones)."""
    layer = [Tensor(f"mtp.{x.name}", x.shape, "mtp", "mtp", x.kind, x.shard, x.copies)
             for x in main if x.scope in ("layer", "moe")]
    return [*layer,
            Tensor("mtp.enorm", (d,), "mtp", "mtp", "vector", "none"),
            Tensor("mtp.hnorm", (d,), "mtp", "mtp", "vector", "none"),
            Tensor("mtp.eh_proj", (d, 2 * d), "mtp", "mtp", "linear", "none"),
            Tensor("mtp.shared_head.norm", (d,), "mtp", "mtp", "vector", "none"),
            Tensor("mtp.embed_tokens", (vocab, d), "mtp", "mtp", "embed", "tp"),
            Tensor("mtp.shared_head.head", (vocab, d), "mtp", "mtp", "embed", "tp")]


def load_model(model: str, overrides: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of `model`; `overrides` replace config.json keys first (e.g. a reduced-depth variant:
    {"num_hidden_layers": 11, "first_k_dense_replace": 3}, see `layer_overrides`)."""
    name, config = load_config(model)
    if overrides:
        config = {**config, **overrides}
    return spec_from_config(name, config)


def layer_overrides(dense_layers: int, moe_layers: int) -> dict[str, Any]:
    """Config overrides for the same model with `dense_layers` dense then `moe_layers` MoE decoder layers
    (DeepSeek's first_k_dense_replace layout) and no MTP module: what benchmarks/h200_deepseek.py builds."""
    if dense_layers < 0 or moe_layers < 0 or dense_layers + moe_layers < 1:
        raise UsageError(f"layer counts must be >= 0 with at least one layer, got {dense_layers} dense + "
                         f"{moe_layers} MoE")
    return {"num_hidden_layers": dense_layers + moe_layers, "first_k_dense_replace": dense_layers,
            "moe_layer_freq": 1, "num_nextn_predict_layers": 0}
