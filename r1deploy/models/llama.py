"""Llama and Qwen2 (the R1-Distill family): one decoder, q/k/v bias as a config flag.

Parameter names follow transformers (model.layers.N.self_attn.q_proj.weight, ...), except that
q/k/v and gate/up run as merged matmuls; `packed_modules_mapping` tells the loader which merged
parameter and shard each HF tensor fills.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from r1deploy.config import ModelConfig
from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers import attention
from r1deploy.layers.attention import paged_attention
from r1deploy.layers.embedding import Embedding
from r1deploy.layers.linear import Linear, MergedLinear
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.rotary import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.engine.batch import ForwardBatch


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.split_sizes = [config.q_size, config.kv_size, config.kv_size]
        shards = {"q": config.q_size, "k": config.kv_size, "v": config.kv_size}
        self.qkv_proj = MergedLinear(config.hidden_size, shards, bias=config.attention_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
        batch: ForwardBatch,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = apply_rotary(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = apply_rotary(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)  # [T, KV, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, batch, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        shards = {"gate": config.intermediate_size, "up": config.intermediate_size}
        self.gate_up_proj = MergedLinear(config.hidden_size, shards, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        kv_cache: torch.Tensor, batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, residual stream before it) [T, hidden] each. The residual add is fused into the
        next norm (one kernel on CUDA); the sum is the same `h = h + f(h)` of the reference."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, batch)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(batch.positions, h.dtype)  # [T, D] each, shared by all layers
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, cos, sin, kv_cache, batch)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    # HF projection name -> (merged parameter's module, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    config_class = ModelConfig
    cuda_graphs = True  # on CUDA every op takes its lengths from device tensors (r1deploy.kernels)
    kv_cache_shape = staticmethod(attention.kv_cache_shape)
    kv_bytes_per_token = staticmethod(attention.kv_bytes_per_token)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # One tensor under two names; named_parameters() reports it once, as the embedding.
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states [T, hidden] of this step's tokens; writes their K/V into kv_caches."""
        return self.model(batch, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] fp32
        return self.lm_head(hidden).float()
