"""DeepseekDecoderLayer: one DeepSeek-V2/V3 decoder layer (MLA + DeepSeekMoE or a dense MLP), shared by the main
model (deepseek_v3.py) and its MTP draft layer (deepseek_mtp.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.attention.base import MLAMetadata
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.layers.mla import MLAttention
from r1deploy.layers.moe import DeepseekMLP, DeepseekMoE
from r1deploy.layers.norm import RMSNorm
from r1deploy.quant.methods import NO_QUANT, LinearQuant

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.weights.tiered_store import TieredExpertStore


def dp_attention_enabled(tp: TPGroup | None) -> bool:
    """--dp-attention: attention and the dense MLPs whole on every rank, only the routed experts split."""
    return tp is not None and tp.size > 1 and tp.dp_attention


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, tp: TPGroup | None = None,
                 store: TieredExpertStore | None = None, quant: LinearQuant = NO_QUANT) -> None:
        """Under --dp-attention (tp.dp_attention) attention and the dense MLP are whole on every rank (no tp);
        the MoE block keeps its routed experts expert-parallel. quant: every linear's method, by checkpoint name."""
        super().__init__()
        local = None if dp_attention_enabled(tp) else tp
        prefix = f"model.layers.{layer_idx}"  # checkpoint names, for AWQ's modules_to_not_convert
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, local, prefix=f"{prefix}.self_attn", linear_method=quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            DeepseekMoE(config, tp, prefix=f"{prefix}.mlp", layer_idx=layer_idx, store=store, quant=quant)
            if config.is_moe_layer(layer_idx)
            else DeepseekMLP(config.hidden_size, config.intermediate_size, local, linear_method=quant,
                             prefix=f"{prefix}.mlp"))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, attn: MLAMetadata,
        dp_token_counts: tuple[int, ...] | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        if dp_token_counts is None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, attn)
            return h + self.mlp(self.post_attention_layernorm(h))
        if not h.shape[0]:  # --dp-attention, no sequences on this rank this step: only join the MoE's exchange
            if isinstance(self.mlp, DeepseekMoE):
                self.mlp(h, dp_token_counts)
            return h
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, attn)
        if isinstance(self.mlp, DeepseekMoE):
            return h + self.mlp(self.post_attention_layernorm(h), dp_token_counts)
        return h + self.mlp(self.post_attention_layernorm(h))
