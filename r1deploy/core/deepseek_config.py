"""DeepseekConfig: the facts about a DeepSeek-V2/V3/R1 checkpoint (MLA + DeepSeekMoE), read once
from an HF config.json and never mutated.

V3/R1: sigmoid router with e_score_correction_bias (noaux_tc), q_lora_rank set, FP8 weights (or an
AutoAWQ INT4 "gemm" conversion: `awq`, quant/awq.py).
V2: softmax router, greedy (Lite) or group_limited_greedy top-k, no bias; V2-Lite has no q_lora.
transformers 5.x saves `rope_parameters` (rope_theta inside); stock checkpoints have the legacy
`rope_scaling` + `rope_theta`, so both are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1deploy.config import architecture_of, read_hf_config
from r1deploy.errors import UsageError
from r1deploy.quant.awq import AWQConfig

_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_SCORING = ("softmax", "sigmoid")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit cos/sin scale; derived from mscale* when None


@dataclass(frozen=True)
class DeepseekConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first_k_dense_replace layers
    moe_intermediate_size: int  # each routed and shared expert
    num_hidden_layers: int  # main layers; the MTP layers follow at index num_hidden_layers
    num_attention_heads: int
    q_lora_rank: int | None  # None: a single q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    routed_scaling_factor: float
    scoring_func: str  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str  # "noaux_tc" (V3), "greedy" (V2-Lite), "group_limited_greedy" (V2)
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    rope_interleave: bool  # pairs (x0, x1), (x2, x3) rotate together; V2 always, V3 by flag
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype
    fp8_block_size: tuple[int, int] | None  # set when the checkpoint holds block-scaled FP8 weights
    awq: AWQConfig | None = None  # set when the checkpoint holds AWQ INT4 weights (AutoAWQ "gemm")
    # MTP (multi-token prediction) layers the checkpoint holds at index num_hidden_layers on (R1: 1); the model
    # builds one only for speculative decoding (models/deepseek_mtp.py)
    num_nextn_predict_layers: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the normed latent and the roped shared key (576 for R1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @staticmethod
    def from_hf(source: dict[str, Any] | str | Path) -> DeepseekConfig:
        """Build from an HF config dict, a config.json path, or a directory holding one."""
        raw = read_hf_config(source) if isinstance(source, (str, Path)) else source
        architecture = _architecture(raw)
        is_v3 = architecture == "DeepseekV3ForCausalLM"
        if raw.get("hidden_act", "silu") != "silu":
            raise UsageError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        # transformers' V3 hard-codes the sigmoid/noaux_tc router and its config omits these keys.
        scoring = raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
        topk_method = raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
        if scoring not in _SCORING or topk_method not in _TOPK_METHODS:
            raise UsageError(f"unsupported router: scoring_func {scoring!r}, topk_method {topk_method!r}")
        n_experts = int(raw["n_routed_experts"])
        n_group = int(raw.get("n_group") or 1)
        if n_experts % n_group:
            raise UsageError(f"n_routed_experts {n_experts} is not divisible by n_group {n_group}")
        rope_theta, rope_scaling = _rope(raw)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        if dtype_name not in _DTYPES:
            raise UsageError(f"unsupported torch_dtype {dtype_name!r}")
        q_lora = raw.get("q_lora_rank")
        fp8_block_size, awq = _quantization(raw.get("quantization_config"))
        return DeepseekConfig(
            architecture=architecture,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            moe_intermediate_size=int(raw["moe_intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
            qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            n_routed_experts=n_experts,
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            num_experts_per_tok=int(raw["num_experts_per_tok"]),
            n_group=n_group,
            topk_group=int(raw.get("topk_group") or 1),
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
            scoring_func=scoring,
            topk_method=topk_method,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # V2 uses DeepSeek's complex (interleaved) form and has no flag.
            rope_interleave=bool(raw.get("rope_interleave", True)) if is_v3 else True,
            attention_bias=bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=_DTYPES[dtype_name],
            fp8_block_size=fp8_block_size,
            awq=awq,
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
        )


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _architecture(raw: dict[str, Any]) -> str:
    name = architecture_of(raw)
    if name not in _ARCHITECTURES:
        raise UsageError(f"not a DeepSeek-V2/V3 config: architectures {raw.get('architectures') or [name or '']}")
    return name


def _rope(raw: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise UsageError(f"rope type {rope_type!r} is not supported for DeepSeek (only yarn)")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or int(raw["max_position_embeddings"]) / original
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
    )


def _quantization(quant: dict[str, Any] | None) -> tuple[tuple[int, int] | None, AWQConfig | None]:
    """quantization_config -> (FP8 weight_block_size, AWQ config); at most one is set."""
    if not quant:
        return None, None
    method = str(quant.get("quant_method", "")).lower()
    if method == "awq":
        return None, AWQConfig.from_hf(quant)
    if method != "fp8":
        raise UsageError(f"quantization method {quant.get('quant_method')!r} is not supported for DeepSeek "
                         "(only fp8 and awq)")
    block = quant.get("weight_block_size") or [128, 128]
    return (int(block[0]), int(block[1])), None
