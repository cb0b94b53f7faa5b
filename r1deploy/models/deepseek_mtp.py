"""DeepSeek-V3 / R1's multi-token-prediction (MTP) layer, used as a speculative-decoding draft head.

The checkpoint stores it as one more decoder layer at index num_hidden_layers (R1: model.layers.61.*): enorm,
hnorm, eh_proj, a full decoder layer (MLA + MoE, named like the main layers) and shared_head.norm. Its
embed_tokens and shared_head.head are copies of the main model's embedding and lm_head (the paper: "shared
embedding layer and output head"), so the loader skips them and the layer uses the main model's.

At position i, given the main model's hidden state h_i and the token t_{i+1} that follows position i:
    h'_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])           (embedding first, as the checkpoint's
    o_i  = shared_head.norm(DecoderLayer(h'_i))                     eh_proj is laid out; vLLM, SGLang agree)
    logits_i = lm_head(o_i)                                         -> a draft of t_{i+2}
The decoder layer attends causally over the MTP layer's own latent cache, one row per position i, at the
main model's positions (RoPE position i). h_i is the main model's output hidden state after its final norm,
what DeepseekV3ForCausalLM.forward returns: vLLM, SGLang and TensorRT-LLM all feed that one (the paper says
only "the representation given by the main model", and DeepSeek's public inference code has no MTP). A second
and third draft reuse o_i in place of h_i (SGLang's and TensorRT-LLM's chaining; DeepSeek trained depth 1 only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.attention.selector import step_metadata
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.layers.linear import Linear
from r1deploy.layers.norm import RMSNorm
from r1deploy.models.base import KVCacheSpec
from r1deploy.models.deepseek_layer import DeepseekDecoderLayer
from r1deploy.quant.methods import NO_QUANT, LinearQuant

if TYPE_CHECKING:
    from r1deploy.core.forward_batch import ForwardBatch
    from r1deploy.distributed.group import TPGroup
    from r1deploy.layers.parallel import ParallelLMHead, VocabParallelEmbedding
    from r1deploy.layers.yarn import DeepseekRotary


class SharedHead(nn.Module):
    """The MTP layer's final norm (its head is the main model's lm_head)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)


class DeepseekMTP(DeepseekDecoderLayer):
    """One MTP layer: the decoder layer's modules (input_layernorm, self_attn, post_attention_layernorm, mlp)
    plus enorm, hnorm, eh_proj and shared_head.norm, so checkpoint names map one to one. The main model's
    embedding, rotary table and lm_head are held by reference, not registered: their parameters are the main
    model's."""

    def __init__(self, config: DeepseekConfig, embed: VocabParallelEmbedding, rotary: DeepseekRotary,
                 lm_head: ParallelLMHead, tp: TPGroup | None = None, quant: LinearQuant = NO_QUANT) -> None:
        super().__init__(config, config.num_hidden_layers, tp, None, quant)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = Linear(2 * hidden, hidden, bias=False)  # replicated over TP ranks (small: 2H x H)
        self.shared_head = SharedHead(hidden, eps)
        self._shared = (embed, rotary, lm_head)  # a tuple: not registered as submodules
        self.cache_spec = KVCacheSpec(1, (), (config.kv_cache_dim,), fp8=True)  # one latent row per position

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,  # type: ignore[override]
                previous_hidden: torch.Tensor) -> torch.Tensor:
        """o [T, hidden] (after shared_head.norm) of this step's positions; batch.input_ids holds the token
        that follows each position, previous_hidden [T, hidden] the main model's (or the previous draft
        step's) hidden state there. Writes the positions' latents into kv_cache."""
        embed, rotary, _ = self._shared
        h = self.eh_proj(torch.cat((self.enorm(embed(batch.input_ids)), self.hnorm(previous_hidden)), dim=-1))
        cos, sin = rotary(batch.positions)
        h = super().forward(h, cos, sin, kv_cache, step_metadata(batch, "mla"))
        return self.shared_head.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [R, hidden] -> [R, vocab] fp32
        return self._shared[2](hidden).float()
