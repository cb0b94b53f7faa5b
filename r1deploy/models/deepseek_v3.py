"""DeepSeek-V3 / R1 and DeepSeek-V2 / V2-Lite: MLA attention + DeepSeekMoE, one code path.

The differences live in DeepseekConfig (router scoring and top-k method, q_lora, rope layout flag).
Parameter names follow transformers, except that dense/shared gate_proj + up_proj are one
`gate_up_proj` and routed experts are stacked (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I], transformers 5's layout); the checkpoint mapping (FP8 kept or dequantised,
AWQ repacking, expert stacking, the MTP layer loaded only when build_draft() built it) lives in deepseek_weights.py;
the MTP layer itself in deepseek_mtp.py.

AWQ INT4 checkpoints (config.awq, AutoAWQ "gemm"; tensor parallelism splits them like bf16 weights; no
--dp-attention, no expert offload yet): the attention projections, dense MLPs and shared experts are AWQ linears
(quant/awq.AWQLinearMethod) unless modules_to_not_convert names them; kv_b_proj stays a plain weight,
dequantised at load; the routed experts' per-expert qweight / qzeros / scales are repacked one tensor at
a time into AWQ stacks (layers/moe/experts_awq.py). Their forward loops over the busy experts on the host, so such a
model runs without CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.attention.selector import step_metadata
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.errors import UsageError
from r1deploy.layers.moe import DeepseekMoE
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.parallel import ParallelLMHead, VocabParallelEmbedding, size_rank
from r1deploy.layers.yarn import DeepseekRotary
from r1deploy.models.base import CausalLM, KVCacheSpec, ModelCapabilities
from r1deploy.models.deepseek_layer import DeepseekDecoderLayer, dp_attention_enabled
from r1deploy.models.deepseek_mtp import DeepseekMTP
from r1deploy.models.deepseek_weights import load_deepseek_weights
from r1deploy.quant.methods import NO_QUANT, LinearQuant
from r1deploy.weights.expert_cache import current_expert_store

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.core.forward_batch import ForwardBatch
    from r1deploy.distributed.group import TPGroup
    from r1deploy.weights.tiered_store import TieredExpertStore


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None,
                 store: TieredExpertStore | None = None, quant: LinearQuant = NO_QUANT) -> None:
        super().__init__()
        # Data-parallel attention: each rank embeds its own tokens, whole table.
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   None if dp_attention_enabled(tp) else tp)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i, tp, store, quant)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekRotary(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        dp_token_counts = batch.dp_token_counts
        h = self.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(batch.positions)  # [T, dr/2] each, shared by all layers
        attn = step_metadata(batch, "mla")
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if dp_token_counts is None:
                h = layer(h, cos, sin, kv_cache, attn)
            else:
                h = layer(h, cos, sin, kv_cache, attn, dp_token_counts)
        if not h.shape[0]:  # --dp-attention: a rank without sequences (no kernel launch for zero rows)
            return h
        return self.norm(h)


class DeepseekV3ForCausalLM(CausalLM):
    config_class = DeepseekConfig  # the loader builds this from config.json instead of ModelConfig
    attention_kind = "mla"  # the engine builds its step metadata with an MLA backend (r1deploy/attention)
    # Decode steps are capturable on CUDA (no host reads of lengths or routing: r1deploy.kernels), except where
    # `capabilities` says otherwise; MLA supports --dp-attention (r1deploy.distributed).
    ARCHITECTURE = ModelCapabilities(cuda_graphs=True, tensor_parallel=True, dp_attention=True,
                                     offload=frozenset({"experts", "layers"}))

    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None, quant: LinearQuant | None = None) -> None:
        """tp: MLA heads, dense MLPs and shared experts tensor-parallel, routed experts expert-parallel
        (rank r holds experts [r*E/N, (r+1)*E/N)), vocabulary split; the latent cache is replicated.
        tp.dp_attention: only the routed experts are split; everything else is whole on every rank, which runs
        its own sequences (and holds only their latent cache). quant: the linears' and experts' quantisation
        (the loader passes linear_quant(config, its FP8 choice)); None: linear_quant(config), FP8 dequantised."""
        super().__init__(config, tp)
        self.dp_attention = dp_attention_enabled(tp)
        self.check_parallel(config, size_rank(tp)[0], self.dp_attention)  # built directly, not by the loader
        # --offload experts: built under expert_cache.building_with(store), the routed experts are served
        # from it (load_weights routes their tensors there).
        self.offload_store: TieredExpertStore | None = current_expert_store()
        self.quant = self.linear_quant(config) if quant is None else quant  # the draft layer's too (build_draft)
        self.model = DeepseekModel(config, tp, self.offload_store, self.quant)
        self.host_routed_experts = any(
            isinstance(layer.mlp, DeepseekMoE) and layer.mlp.experts.method.reads_routing_on_host
            for layer in self.model.layers)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, None if self.dp_attention else tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def capabilities(self) -> ModelCapabilities:
        """No CUDA graphs with an offload store (experts: TieredExpertStore; whole layers, experts included:
        weights/layer_stream.LayerStream), which decides copies on the host, under --dp-attention (per-rank token
        counts change every step), or with experts whose method reads routing on the host (AWQ's busy-expert
        loop: layers/moe/experts_awq.py)."""
        base = super().capabilities
        return replace(base, cuda_graphs=base.cuda_graphs and not self.dp_attention and not self.host_routed_experts)

    @classmethod
    def linear_quant(cls, config: DeepseekConfig, fp8_block: tuple[int, int] | None = None) -> LinearQuant:
        return LinearQuant(config.awq, fp8_block)

    @classmethod
    def check_tensor_parallel(cls, config: DeepseekConfig, tp: int, dp_attention: bool = False) -> None:
        """UsageError (one line) unless tp splits the heads, the dense and shared MLPs and the experts
        (dp_attention: only the experts are split)."""
        arch = config.architecture
        if config.awq is not None and dp_attention:
            raise UsageError(f"--dp-attention (--tp {tp}) does not support AWQ checkpoints yet: run {arch} AWQ "
                             "with tensor parallelism (no --dp-attention)")
        if dp_attention:
            if config.n_routed_experts % tp:
                raise UsageError(f"--tp {tp} does not divide {arch}'s {config.n_routed_experts} routed experts "
                                 "(expert parallelism gives every rank the same number)")
            return
        if config.num_attention_heads % tp:
            raise UsageError(f"--tp {tp} does not divide {arch}'s {config.num_attention_heads} attention heads")
        if config.n_routed_experts % tp:
            raise UsageError(f"--tp {tp} does not divide {arch}'s {config.n_routed_experts} routed experts "
                             "(expert parallelism gives every rank the same number)")
        if config.first_k_dense_replace and config.intermediate_size % tp:
            raise UsageError(f"--tp {tp} does not divide {arch}'s dense MLP width {config.intermediate_size}")
        shared = config.moe_intermediate_size * config.n_shared_experts
        if shared % tp:
            raise UsageError(f"--tp {tp} does not divide {arch}'s shared-expert width {shared}")

    @classmethod
    def cache_spec(cls, config: DeepseekConfig, tp: TPGroup | None = None) -> KVCacheSpec:
        """One latent row per token and layer, replicated over ranks: the latent and the roped shared key (576
        for R1); layers/mla.py quantises it on write in an FP8 cache and dequantises it on read."""
        return KVCacheSpec(config.num_hidden_layers, (), (config.kv_cache_dim,), fp8=True)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states [T, hidden] of this step's tokens; writes their latents into kv_caches.
        batch.dp_token_counts (--dp-attention): every rank's token count this step, in rank order (batch is this
        rank's own sub-batch, possibly empty); the MoE layers exchange tokens by them."""
        return self.model(batch, kv_caches)

    def build_draft(self) -> nn.Module | None:
        """The checkpoint's first MTP layer as `self.draft` (models/deepseek_mtp.py), sharded like the main layers
        and quantised like them; None when the config declares no MTP layer (num_nextn_predict_layers 0)."""
        if self.draft is None and self.config.num_nextn_predict_layers > 0:
            self.draft = DeepseekMTP(self.config, self.model.embed_tokens, self.model.rotary_emb, self.lm_head,
                                     self.tp, self.quant).eval()
        return self.draft

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The checkpoint mapping (FP8 pairs, AWQ repacking, expert stacking, the MTP layer into `draft` when built,
        skipped otherwise): deepseek_weights.py."""
        load_deepseek_weights(self, weights)


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    """Same network; DeepseekConfig carries V2's softmax router and optional q_lora."""
