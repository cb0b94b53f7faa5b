"""Llama and Qwen2 (the R1-Distill family): one decoder, q/k/v bias as a config flag.

Parameter names follow transformers (model.layers.N.self_attn.q_proj.weight, ...), except that
q/k/v and gate/up run as merged matmuls; `packed_modules_mapping` tells the loader which merged
parameter and shard each HF tensor fills.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from r1deploy.attention.base import AttentionMetadata
from r1deploy.attention.selector import step_metadata
from r1deploy.config import ModelConfig
from r1deploy.distributed.group import check_tensor_parallel, kv_head_shard
from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    size_rank,
)
from r1deploy.layers.rotary import RotaryEmbedding, apply_rotary
from r1deploy.models.base import CausalLM, KVCacheSpec, ModelCapabilities
from r1deploy.quant.methods import NO_QUANT, LinearMethodFor, LinearQuant
from r1deploy.quant.registry import quant_config_from_hf

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.core.forward_batch import ForwardBatch
    from r1deploy.distributed.group import TPGroup


def local_config(config: ModelConfig, tp: TPGroup | None) -> ModelConfig:
    """The config as one tensor-parallel rank sees it: its attention heads and KV heads."""
    size, rank = size_rank(tp)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // size,
                               num_key_value_heads=kv_head_shard(config.num_key_value_heads, rank, size)[1])


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "self_attn", tp: TPGroup | None = None,
                 linear_method: LinearMethodFor = NO_QUANT) -> None:
        super().__init__()
        size, rank = size_rank(tp)
        local = local_config(config, tp)  # this rank's q and KV heads; o_proj sums the heads' outputs over ranks
        self.num_heads, self.num_kv_heads = local.num_attention_heads, local.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.split_sizes = [local.q_size, local.kv_size, local.kv_size]
        kv_start = kv_head_shard(config.num_key_value_heads, rank, size)[0] * config.head_dim
        specs = {"q": ShardSpec(config.q_size, rank * local.q_size, local.q_size),
                 "k": ShardSpec(config.kv_size, kv_start, local.kv_size),
                 "v": ShardSpec(config.kv_size, kv_start, local.kv_size)}
        self.qkv_proj = MergedColumnParallelLinear(config.hidden_size, specs, bias=config.attention_bias,
                                                   quant_method=linear_method(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, config.o_proj_bias, tp,
                                        quant_method=linear_method(f"{prefix}.o_proj"))
        # FP8 KV cache scales (real value = stored value * scale); 1.0 unless calibrated (set_kv_cache_scales).
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = apply_rotary(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = apply_rotary(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)  # [T, KV, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attn.backend.forward(q, k, v, kv_cache, attn, self.scale, self.k_scale, self.v_scale)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "mlp", tp: TPGroup | None = None,
                 linear_method: LinearMethodFor = NO_QUANT) -> None:
        super().__init__()
        spec = ShardSpec.even(config.intermediate_size, tp)  # this rank's gate/up columns; down_proj sums
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, {"gate": spec, "up": spec}, bias=False,
                                                       quant_method=linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, False, tp,
                                           quant_method=linear_method(f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str = "model.layers.0", tp: TPGroup | None = None,
                 linear_method: LinearMethodFor = NO_QUANT) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, f"{prefix}.self_attn", tp, linear_method)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, f"{prefix}.mlp", tp, linear_method)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        kv_cache: torch.Tensor, attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, residual stream before it) [T, hidden] each. The residual add is fused into the
        next norm (one kernel on CUDA); the sum is the same `h = h + f(h)` of the reference."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, attn)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None, linear_method: LinearMethodFor = NO_QUANT
                 ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, f"model.layers.{i}", tp, linear_method)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(batch.positions, h.dtype)  # [T, D] each, shared by all layers
        residual = None
        attn = step_metadata(batch, "gqa")
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, cos, sin, kv_cache, attn)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(CausalLM):
    # HF projection name -> (merged parameter's module, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    config_class = ModelConfig
    attention_kind = "gqa"  # the engine builds its step metadata with a paged GQA backend (r1deploy/attention)
    # Decode steps are capturable on CUDA (every op takes its lengths from device tensors: r1deploy.kernels),
    # except with streamed layers (--offload layers), whose copies are decided on the host (CausalLM.capabilities).
    ARCHITECTURE = ModelCapabilities(cuda_graphs=True, tensor_parallel=True, dp_attention=False,
                                     offload=frozenset({"layers"}))

    def __init__(self, config: ModelConfig, tp: TPGroup | None = None, quant: LinearQuant | None = None) -> None:
        """tp: heads, MLP columns and vocabulary split (layers/parallel.py; AWQ / GPTQ weights too). quant: the
        linears' quantisation; None: linear_quant(config), the checkpoint's AWQ / GPTQ."""
        super().__init__(config, tp)
        self.model = LlamaModel(config, tp, self.linear_quant(config) if quant is None else quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            # One tensor under two names; named_parameters() reports it once, as the embedding.
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def linear_quant(cls, config: ModelConfig, fp8_block: tuple[int, int] | None = None) -> LinearQuant:
        return LinearQuant(quant_config_from_hf(config.quantization_config), fp8_block)

    @classmethod
    def check_tensor_parallel(cls, config: ModelConfig, tp: int, dp_attention: bool = False) -> None:
        check_tensor_parallel(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size, tp,
                              cls.__name__)

    @classmethod
    def cache_spec(cls, config: ModelConfig, tp: TPGroup | None = None) -> KVCacheSpec:
        """K and V of each layer's KV heads (a tensor-parallel rank: its own heads); layers/attention.py quantises
        them on write in an FP8 cache and the kernels dequantise on read."""
        local = local_config(config, tp)
        return KVCacheSpec(local.num_hidden_layers, (2,), (local.num_key_value_heads, local.head_dim), fp8=True)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states [T, hidden] of this step's tokens; writes their K/V into kv_caches."""
        return self.model(batch, kv_caches)
