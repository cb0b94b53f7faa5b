"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache that holds only the latent.

Per token and layer the cache keeps [c_kv (kv_lora_rank, after kv_a_layernorm) ; k_pe (roped,
qk_rope_head_dim)], 576 values for R1, in one tensor [num_blocks, block_size, 576]. Two equivalent
ways to attend over it (notation: dc = kv_lora_rank, dn = qk_nope, dr = qk_rope, dv = v_head_dim):
- expanded (prefill): kv_b_proj turns every cached latent into per-head K [H, dn] and V [H, dv];
  K gets the shared k_pe appended, then ordinary causal attention with head dim dn + dr. Compute
  bound work does best with the small head dim.
- absorbed (decode): W_UK is folded into the query (q_lat = W_UK^T q_nope, [H, dc]) and W_UV is
  applied after attending, so attention runs as MQA with one 576-wide key and a 512-wide value
  read straight from the cache, no per-token expansion. Memory bound work does best this way.

The attention itself runs in an MLA backend (r1deploy/attention: mla_torch.py on the CPU and as the one
reference, mla_triton.py on CUDA), which takes the step's MLAMetadata (which rows decode, which prefill).

FP8 KV cache (a float8_e4m3fn cache tensor is the switch, as for GQA in layers/attention.py): the row
is stored / kv_scale, saturated to +-448, and read back stored * kv_scale. One scale per layer for the
whole row (MLAttention.kv_scale), 1.0 as vLLM's default. That is safe for c_kv: kv_a_layernorm leaves
it at RMS 1 times the norm weight, so |c| <= sqrt(dc) * max|weight| (about 23x the weight for R1's 512,
and only when one channel holds all the energy) - far inside +-448, and typical values sit in e4m3's
normal range (>= 2^-6), where the error is at most 2^-4 relative. k_pe is not normalised (roped
kv_a_proj output; rotation keeps each pair's norm), so it has no such bound, but it is a projection
of the RMS-normalised hidden state, of the same O(1) size in practice, and saturation at +-448 turns
an outlier into a clipped value, never inf/NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from r1deploy.attention.base import MLAMetadata
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.layers.linear import Linear
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.parallel import ColumnParallelLinear, RowParallelLinear, size_rank
from r1deploy.layers.yarn import apply_rope
from r1deploy.quant.methods import NO_QUANT, LinearMethodFor

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.distributed.group import TPGroup


class MLAttention(nn.Module):
    """tp: this rank's heads. q_proj / q_b_proj and kv_b_proj are column-parallel by heads, o_proj
    row-parallel (one all-reduce); q_a_proj, kv_a_proj_with_mqa and the norms are replicated, and so is
    the latent cache: every rank writes the same latents and expands them for its own heads. tp=None: every
    layer is the plain one (layers/parallel.py).

    linear_method(name): each projection's quantisation (FP8 block, AWQ) from its checkpoint name
    (prefix: this block's, model.layers.{i}.self_attn), except kv_b_proj: both attention forms read its matrix
    directly, so it stays a plain weight (an FP8 or AWQ one is dequantised at load, models/deepseek_weights.py)."""

    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None, prefix: str = "self_attn",
                 linear_method: LinearMethodFor = NO_QUANT) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads // size_rank(tp)[0]
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.head_dim = config.qk_head_dim
        self.v_dim = config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        hidden, bias = config.hidden_size, config.attention_bias
        heads = config.num_attention_heads

        def method(name: str) -> Any:
            return linear_method(f"{prefix}.{name}")

        self.has_q_lora = config.q_lora_rank is not None
        if not self.has_q_lora:
            self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, False, tp, method("q_proj"))
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=bias, quant_method=method("q_a_proj"))
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, heads * self.head_dim, False, tp,
                                                 method("q_b_proj"))
        self.kv_a_proj_with_mqa = Linear(hidden, config.kv_cache_dim, bias=bias,
                                         quant_method=method("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(config.kv_lora_rank, heads * (self.nope_dim + self.v_dim), False, tp)
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias, tp, quant_method=method("o_proj"))
        self.kv_scale = 1.0  # FP8 cache only: real row = stored * kv_scale (see the module docstring)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, dr/2] fp32
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
        attn: MLAMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = x.shape[0]
        if self.has_q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(num_tokens, self.num_heads, self.head_dim).split([self.nope_dim, self.rope_dim], -1)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)  # [T, H, dr]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, dc]
        k_pe = apply_rope(k_pe[:, None, :], cos, sin, self.rope_interleave)[:, 0]  # [T, dr], one head for all
        out = attn.backend.forward(q_nope, q_pe, latent, k_pe, kv_cache, attn, self.kv_b_proj.weight, self.scale,
                                   self.kv_scale)  # [T, H, dv]
        return self.o_proj(out.reshape(num_tokens, -1))
