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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.kernels.kv_quant import dequantize_kv, is_fp8, quantize_kv
from r1deploy.layers.linear import Linear
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.parallel import ColumnParallelLinear, RowParallelLinear
from r1deploy.layers.yarn import apply_rope
from r1deploy.models.deepseek_config import DeepseekConfig
from r1deploy.quant.awq import AWQLinearMethod

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.distributed.group import TPGroup
    from r1deploy.engine.batch import ForwardBatch


def write_latent_cache(
    kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
    latent: torch.Tensor,  # [T, dc]
    k_pe: torch.Tensor,  # [T, dr]
    slot_mapping: torch.Tensor,  # [T]; on CUDA a slot of -1 (a CUDA-graph padding row) is skipped
    scale: float = 1.0,  # FP8 caches only: stored = value / scale
) -> None:
    if kv_cache.is_cuda:
        from r1deploy.kernels.kv_cache import write_latent_cache as write  # triton only where there is a GPU

        write(kv_cache, latent, k_pe, slot_mapping, scale)
        return
    slots = kv_cache.view(-1, kv_cache.shape[-1])  # [num_blocks * block_size, dc + dr]
    rows = quantize_kv(torch.cat((latent, k_pe), dim=-1), scale, kv_cache.dtype)  # [T, dc + dr]
    if is_fp8(kv_cache.dtype):  # index_copy_ has no FP8 kernel on the CPU: copy the bytes
        slots, rows = slots.view(torch.uint8), rows.view(torch.uint8)
    slots.index_copy_(0, slot_mapping, rows)


def expanded_attention(
    q_nope: torch.Tensor,  # [L, H, dn]
    q_pe: torch.Tensor,  # [L, H, dr]
    cached: torch.Tensor,  # [S, dc + dr]: the sequence's dequantised latents; the L queries are its last L
    kv_b_weight: torch.Tensor,  # [H * (dn + dv), dc]
    scale: float,
) -> torch.Tensor:  # [L, H, dv]
    num_queries, num_heads, nope_dim = q_nope.shape
    seq_len = cached.shape[0]
    latent_dim = kv_b_weight.shape[1]
    latent, k_pe = cached.to(q_nope.dtype).split([latent_dim, cached.shape[1] - latent_dim], dim=-1)
    kv = F.linear(latent, kv_b_weight).view(seq_len, num_heads, -1)  # [S, H, dn + dv]
    k_nope, v = kv.split([nope_dim, kv.shape[-1] - nope_dim], dim=-1)
    k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, num_heads, -1)), dim=-1)  # [S, H, dn + dr]
    q = torch.cat((q_nope, q_pe), dim=-1)  # [L, H, dn + dr]
    # Query j sits at position S - L + j and sees keys up to there (bottom-right causal alignment;
    # SDPA's is_causal aligns top-left, which is only right when nothing was cached).
    mask = None
    if num_queries != seq_len:
        key_pos = torch.arange(seq_len, device=q.device)
        mask = key_pos[None, :] <= (torch.arange(num_queries, device=q.device) + seq_len - num_queries)[:, None]
    value_dim = v.shape[-1]
    if mask is None and value_dim < q.shape[-1]:
        # SDPA's flash kernel needs one head dim for q, k and v (R1: 192 vs 128); zero columns of v
        # give zero output columns, sliced off, instead of the math fallback's [H, L, S] scores.
        v = F.pad(v, (0, q.shape[-1] - value_dim))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [H, L|S, .]
        attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(0, 1)[..., :value_dim]  # [L, H, dv]


def absorbed_decode(
    q_nope: torch.Tensor,  # [B, H, dn]: one query per sequence, at its last position
    q_pe: torch.Tensor,  # [B, H, dr]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    max_seq_len: int,
    kv_b_weight: torch.Tensor,  # [H * (dn + dv), dc]
    scale: float,
    kv_scale: float = 1.0,  # FP8 caches only
) -> torch.Tensor:  # [B, H, dv]
    _, num_heads, nope_dim = q_nope.shape
    block_size, latent_dim = kv_cache.shape[1], kv_b_weight.shape[1]
    acc = torch.promote_types(q_nope.dtype, torch.float32)  # fp32 math for bf16 models
    w_kv_b = kv_b_weight.to(acc).view(num_heads, -1, latent_dim)  # [H, dn + dv, dc]
    w_uk, w_uv = w_kv_b[:, :nope_dim], w_kv_b[:, nope_dim:]  # [H, dn, dc], [H, dv, dc]
    q_lat = torch.einsum("bhn,hnc->bhc", q_nope.to(acc), w_uk)  # [B, H, dc]
    query = torch.cat((q_lat, q_pe.to(acc)), dim=-1)  # [B, H, dc + dr]
    num_blocks = math.ceil(max_seq_len / block_size)
    gathered = kv_cache[block_tables[:, :num_blocks].long()].flatten(1, 2)  # [B, S, dc + dr]
    cached = dequantize_kv(gathered, kv_scale, acc)
    scores = torch.einsum("bhc,bsc->bhs", query, cached) * scale  # [B, H, S]
    valid = torch.arange(cached.shape[1], device=cached.device)[None, :] < seq_lens[:, None]  # [B, S]
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    out_lat = torch.einsum("bhs,bsc->bhc", probs, cached[..., :latent_dim])  # [B, H, dc]
    return torch.einsum("bhc,hvc->bhv", out_lat, w_uv).to(q_nope.dtype)  # [B, H, dv]


@dataclass(frozen=True)
class MLAPlan:
    """How one step splits between the two forms, worked out once per step for all layers:
    sequences with one new token decode absorbed, all at once; the rest prefill expanded."""

    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks]
    # Rows of T that decode: [D] indices, or slice(None) when every row does (a pure decode step builds
    # no tensors, so it can be captured in a CUDA graph); None when nothing decodes.
    decode_tokens: torch.Tensor | slice | None
    decode_block_tables: torch.Tensor | None  # [D, max_blocks]
    decode_seq_lens: torch.Tensor | None  # [D]
    decode_max_len: int
    prefills: tuple[tuple[int, int, int, int], ...]  # (sequence, first row in T, query_len, seq_len)

    @staticmethod
    def build(batch: ForwardBatch) -> MLAPlan:
        starts = [0]
        for n in batch.query_lens_cpu:
            starts.append(starts[-1] + n)
        lens = list(zip(batch.query_lens_cpu, batch.seq_lens_cpu, strict=True))
        decode = [i for i, (query_len, _) in enumerate(lens) if query_len == 1]
        prefills = tuple((i, starts[i], q, s) for i, (q, s) in enumerate(lens) if q != 1)
        if not decode:
            return MLAPlan(batch.slot_mapping, batch.block_tables, None, None, None, 0, prefills)
        if not prefills:
            return MLAPlan(batch.slot_mapping, batch.block_tables, slice(None), batch.block_tables, batch.seq_lens,
                           max(batch.seq_lens_cpu), prefills)
        device = batch.input_ids.device
        seqs = torch.tensor(decode, device=device)
        return MLAPlan(
            slot_mapping=batch.slot_mapping,
            block_tables=batch.block_tables,
            decode_tokens=torch.tensor([starts[i] for i in decode], device=device),
            decode_block_tables=batch.block_tables[seqs],
            decode_seq_lens=batch.seq_lens[seqs],
            decode_max_len=max(batch.seq_lens_cpu[i] for i in decode),
            prefills=prefills,
        )


class MLAttention(nn.Module):
    """tp: this rank's heads. q_proj / q_b_proj and kv_b_proj are column-parallel by heads, o_proj
    row-parallel (one all-reduce); q_a_proj, kv_a_proj_with_mqa and the norms are replicated, and so is
    the latent cache: every rank writes the same latents and expands them for its own heads.

    config.awq (no tp): the projections are AWQ linears where the checkpoint quantises them (prefix: this
    block's checkpoint name, model.layers.{i}.self_attn, for modules_to_not_convert), except kv_b_proj:
    both attention forms read its matrix directly, so it stays a plain weight (an AWQ one is dequantised
    at load, models/deepseek_v3.py)."""

    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None, prefix: str = "self_attn") -> None:
        super().__init__()
        size = 1 if tp is None else tp.size
        self.num_heads = config.num_attention_heads // size
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.head_dim = config.qk_head_dim
        self.v_dim = config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        hidden, bias = config.hidden_size, config.attention_bias
        heads = config.num_attention_heads

        def awq_method(name: str) -> AWQLinearMethod | None:
            return config.awq and config.awq.linear_method(f"{prefix}.{name}")

        def column(in_features: int, out_features: int, awq_name: str | None) -> Linear:
            if tp is None:
                return Linear(in_features, out_features, bias=False, quant_method=awq_name and awq_method(awq_name))
            return ColumnParallelLinear(in_features, out_features, False, tp)

        self.has_q_lora = config.q_lora_rank is not None
        if not self.has_q_lora:
            self.q_proj = column(hidden, heads * self.head_dim, "q_proj")
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=bias, quant_method=awq_method("q_a_proj"))
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = column(config.q_lora_rank, heads * self.head_dim, "q_b_proj")
        self.kv_a_proj_with_mqa = Linear(hidden, config.kv_cache_dim, bias=bias,
                                         quant_method=awq_method("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = column(config.kv_lora_rank, heads * (self.nope_dim + self.v_dim), None)  # plain under AWQ
        if tp is None:
            self.o_proj = Linear(heads * self.v_dim, hidden, bias=bias, quant_method=awq_method("o_proj"))
        else:
            self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias, tp)
        self.kv_scale = 1.0  # FP8 cache only: real row = stored * kv_scale (see the module docstring)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, dr/2] fp32
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
        plan: MLAPlan,
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
        write_latent_cache(kv_cache, latent, k_pe, plan.slot_mapping, self.kv_scale)
        out = self._attend(q_nope, q_pe, kv_cache, plan)  # [T, H, dv]
        return self.o_proj(out.reshape(num_tokens, -1))

    def _attend(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, plan: MLAPlan
    ) -> torch.Tensor:  # [T, H, dv]
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)
        if plan.decode_tokens is not None:
            tokens = plan.decode_tokens
            if kv_cache.is_cuda:  # triton only where there is a GPU
                from r1deploy.kernels.mla_decode import mla_absorbed_decode
                out[tokens] = mla_absorbed_decode(
                    q_nope[tokens], q_pe[tokens], kv_cache, plan.decode_block_tables, plan.decode_seq_lens,
                    self.kv_b_proj.weight, self.scale, kv_scale=self.kv_scale)
            else:
                out[tokens] = absorbed_decode(
                    q_nope[tokens], q_pe[tokens], kv_cache, plan.decode_block_tables, plan.decode_seq_lens,
                    plan.decode_max_len, self.kv_b_proj.weight, self.scale, self.kv_scale)
        block_size = kv_cache.shape[1]
        for seq, start, query_len, seq_len in plan.prefills:
            table = plan.block_tables[seq, : math.ceil(seq_len / block_size)].long()
            # [S, dc + dr], this step's tokens included
            cached = dequantize_kv(kv_cache[table].flatten(0, 1)[:seq_len], self.kv_scale, q_nope.dtype)
            rows = slice(start, start + query_len)
            out[rows] = expanded_attention(q_nope[rows], q_pe[rows], cached, self.kv_b_proj.weight, self.scale)
        return out
