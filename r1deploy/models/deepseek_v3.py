"""DeepSeek-V3 / R1 and DeepSeek-V2 / V2-Lite: MLA attention + DeepSeekMoE, one code path.

The differences live in DeepseekConfig (router scoring and top-k method, q_lora, rope layout flag).
Parameter names follow transformers, except that dense/shared gate_proj + up_proj are one
`gate_up_proj` and routed experts are stacked (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I], transformers 5's layout); `load_weights` maps checkpoint names,
keeps FP8 weights where the model holds them in FP8 (built under quant/fp8_linear.building_fp8),
dequantises them elsewhere, and skips the MTP layer.

AWQ INT4 checkpoints (config.awq, AutoAWQ "gemm"; one process: no tensor parallelism, no --dp-attention,
no expert offload yet): the attention projections, dense MLPs and shared experts are AWQ linears
(quant/awq.AWQLinearMethod) unless modules_to_not_convert names them; kv_b_proj stays a plain weight,
dequantised at load; the routed experts' per-expert qweight / qzeros / scales are repacked one tensor at
a time into AWQ stacks (layers/moe/experts_awq.py). Their forward loops over the busy experts on the host, so such a
model runs without CUDA graphs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.layers.embedding import Embedding
from r1deploy.layers.linear import Linear, default_weight_loader
from r1deploy.layers.mla import MLAPlan, MLAttention
from r1deploy.layers.moe import DeepseekMLP, DeepseekMoE
from r1deploy.layers.norm import RMSNorm
from r1deploy.layers.parallel import ParallelLMHead, VocabParallelEmbedding
from r1deploy.layers.yarn import DeepseekRotary
from r1deploy.models.deepseek_config import DeepseekConfig
from r1deploy.quant.awq import AWQ_PARTS, dequantize_awq_modules, repack_awq_tensor
from r1deploy.quant.fp8_block import dequantize_fp8_block
from r1deploy.quant.fp8_checkpoint import SCALE_SUFFIX, fp8_pairs
from r1deploy.weights import WeightLoadError, process_weights_after_loading
from r1deploy.weights.expert_cache import current_expert_store

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.distributed.group import TPGroup
    from r1deploy.engine.batch import ForwardBatch
    from r1deploy.weights.tiered_store import TieredExpertStore

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale_inv|qweight|qzeros|scales)$")
# A per-expert tensor's kind -> the suffix of the stack it fills: experts.{gate_up,down}_proj<suffix>.
_EXPERT_STACK_SUFFIX = {"weight": "", "weight_scale_inv": SCALE_SUFFIX,
                        "qweight": "_packed", "qzeros": "_zeros", "scales": "_scales"}
_MERGED = re.compile(r"\.(gate|up)_proj\.")  # dense and shared MLPs
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_OTHER_RANK = "<an expert another rank holds>"  # _load_one's answer for a known tensor this rank skips


def _dp_attention(tp: TPGroup | None) -> bool:
    return tp is not None and tp.size > 1 and tp.dp_attention


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, tp: TPGroup | None = None,
                 store: TieredExpertStore | None = None) -> None:
        """Under --dp-attention (tp.dp_attention) attention and the dense MLP are whole on every rank (no tp);
        the MoE block keeps its routed experts expert-parallel."""
        super().__init__()
        local = None if _dp_attention(tp) else tp
        prefix = f"model.layers.{layer_idx}"  # checkpoint names, for AWQ's modules_to_not_convert
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, local, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            DeepseekMoE(config, tp, prefix=f"{prefix}.mlp", layer_idx=layer_idx, store=store)
            if config.is_moe_layer(layer_idx)
            else DeepseekMLP(config.hidden_size, config.intermediate_size, local, awq=config.awq,
                             prefix=f"{prefix}.mlp"))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, plan: MLAPlan,
        dp_token_counts: list[int] | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        if dp_token_counts is None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, plan)
            return h + self.mlp(self.post_attention_layernorm(h))
        if not h.shape[0]:  # --dp-attention, no sequences on this rank this step: only join the MoE's exchange
            if isinstance(self.mlp, DeepseekMoE):
                self.mlp(h, dp_token_counts)
            return h
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, plan)
        if isinstance(self.mlp, DeepseekMoE):
            return h + self.mlp(self.post_attention_layernorm(h), dp_token_counts)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None,
                 store: TieredExpertStore | None = None) -> None:
        super().__init__()
        if tp is None or _dp_attention(tp):  # data-parallel attention: each rank embeds its own tokens, whole table
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i, tp, store) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekRotary(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor],
                dp_token_counts: list[int] | None = None) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(batch.positions)  # [T, dr/2] each, shared by all layers
        plan = MLAPlan.build(batch)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if dp_token_counts is None:
                h = layer(h, cos, sin, kv_cache, plan)
            else:
                h = layer(h, cos, sin, kv_cache, plan, dp_token_counts)
        if not h.shape[0]:  # --dp-attention: a rank without sequences (no kernel launch for zero rows)
            return h
        return self.norm(h)


class DeepseekV3ForCausalLM(nn.Module):
    config_class = DeepseekConfig  # the loader builds this from config.json instead of ModelConfig
    fp8_kv_cache = True  # layers/mla.py quantises the latent rows on write and dequantises them on read
    supports_dp_attention = True  # MLA: --dp-attention (r1deploy.distributed)

    @property
    def cuda_graphs(self) -> bool:
        """Decode steps are capturable on CUDA (no host reads of lengths or routing: r1deploy.kernels),
        except with an offload store (experts: TieredExpertStore; whole layers, experts included:
        weights/layer_stream.LayerStream), which decides copies on the host, under --dp-attention
        (per-rank token counts change every step), and with AWQ routed experts (their loop reads the
        busy experts on the host: layers/moe/experts_awq.py)."""
        return self.expert_store is None and not self.dp_attention and not self.host_routed_experts

    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None) -> None:
        """tp: MLA heads, dense MLPs and shared experts tensor-parallel, routed experts expert-parallel
        (rank r holds experts [r*E/N, (r+1)*E/N)), vocabulary split; the latent cache is replicated.
        tp.dp_attention: only the routed experts are split; everything else is whole on every rank, which runs
        its own sequences (and holds only their latent cache)."""
        super().__init__()
        self.config = config
        self.dp_attention = _dp_attention(tp)
        if tp is not None and tp.size > 1:
            self.check_tensor_parallel(config, tp.size, self.dp_attention)
        # --offload experts: built under expert_cache.building_with(store), the routed experts are served
        # from it (load_weights routes their tensors there).
        self.expert_store: TieredExpertStore | None = current_expert_store()
        self.model = DeepseekModel(config, tp, self.expert_store)
        self.host_routed_experts = any(isinstance(layer.mlp, DeepseekMoE) and layer.mlp.experts.method.reads_routing_on_host
                               for layer in self.model.layers)
        if tp is None or self.dp_attention:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def check_tensor_parallel(config: DeepseekConfig, tp: int, dp_attention: bool = False) -> None:
        """UsageError (one line) unless tp splits the heads, the dense and shared MLPs and the experts
        (dp_attention: only the experts are split)."""
        if tp < 1:
            raise UsageError(f"--tp must be >= 1, got {tp}")
        if tp == 1:
            return
        arch = config.architecture
        if config.awq is not None:
            how = "--dp-attention" if dp_attention else "tensor parallelism"
            raise UsageError(f"{how} (--tp {tp}) does not support AWQ checkpoints yet: run {arch} AWQ with --tp 1")
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

    @staticmethod
    def kv_cache_shape(config: DeepseekConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: only the latent and the roped shared key per token (576 for R1)."""
        return (num_blocks, block_size, config.kv_cache_dim)

    @staticmethod
    def kv_bytes_per_token(config: DeepseekConfig, dtype: torch.dtype) -> int:
        """Cache bytes one token costs across all layers: dtype.itemsize per value, 1 in an FP8 cache."""
        return config.num_hidden_layers * config.kv_cache_dim * dtype.itemsize

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor],
                dp_token_counts: list[int] | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of this step's tokens; writes their latents into kv_caches.
        dp_token_counts (--dp-attention): every rank's token count this step, in rank order (batch is this
        rank's own sub-batch, possibly empty); the MoE layers exchange tokens by them."""
        if dp_token_counts is None:
            return self.model(batch, kv_caches)
        return self.model(batch, kv_caches, dp_token_counts)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] fp32
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from HF-named tensors. An FP8 weight and its scales go to an FP8
        parameter and its `<param>_scale_inv` sibling as they are, or are dequantised to the model dtype
        where the model holds that weight unquantised; AWQ tensors likewise (_awq_tensors), and the AWQ
        linears repack theirs once all are in. Raises WeightLoadError on unknown tensors or unfilled
        parameters."""
        params = dict(self.named_parameters())
        filled = dict.fromkeys(params, 0)  # elements written, so merged/stacked params count every shard
        block = self.config.fp8_block_size or (128, 128)
        dtype = self.model.embed_tokens.weight.dtype
        unexpected: list[str] = []
        stream = self._main_layers(weights)
        if self.config.awq is not None:
            stream = self._awq_tensors(stream, params, dtype)
        try:
            for name, tensor, scale_inv in fp8_pairs(stream):
                keep_fp8 = scale_inv is not None and self._param_name(name) + SCALE_SUFFIX in params
                if scale_inv is not None and not keep_fp8:
                    tensor = dequantize_fp8_block(tensor, scale_inv, dtype, block)
                for part, value in [(name, tensor)] + ([(name + SCALE_SUFFIX, scale_inv)] if keep_fp8 else []):
                    target = self._load_one(params, part, value)
                    if target is None:
                        unexpected.append(part)
                    elif target is not _OTHER_RANK:
                        filled[target] += value.numel()
        except ValueError as e:
            raise WeightLoadError(f"checkpoint: {e}") from None
        if unexpected:
            raise WeightLoadError(f"checkpoint has tensors the model does not use: {', '.join(sorted(unexpected))}")
        missing = sorted(n for n, count in filled.items() if count < params[n].numel())
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise WeightLoadError(f"checkpoint is missing {len(missing)} parameters: {shown}")
        process_weights_after_loading(self)  # the AWQ linears' repack
        if self.expert_store is not None:  # every routed expert in the host tier or on disk
            config = self.config
            self.expert_store.finish_loading(
                (i, e) for i in range(config.num_hidden_layers) if config.is_moe_layer(i)
                for e in range(config.n_routed_experts))

    def _main_layers(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Drop the MTP layers (model.layers.{num_hidden_layers}...), kept in the checkpoint for
        speculative decoding later, and derived tables the model recomputes."""
        tied = self.config.tie_word_embeddings
        for name, tensor in weights:
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
                continue
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            yield name, tensor

    def _awq_tensors(self, weights: Iterable[tuple[str, torch.Tensor]], params: dict[str, nn.Parameter],
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """AWQ checkpoint tensors -> what the model holds: a quantised layer the model keeps unquantised
        (kv_b_proj) gets one dequantised `.weight`; each routed expert's qweight / qzeros / scales is
        repacked into the kernel layout on its own (quant/awq.repack_awq_tensor), so it can be copied into
        the stacks as it arrives. Everything else passes through."""
        group_size = self.config.awq.group_size

        def held_plain(module: str) -> bool:
            return (self._param_name(f"{module}.qweight") not in params
                    and self._param_name(f"{module}.weight") in params)

        for name, tensor in dequantize_awq_modules(weights, held_plain, group_size, dtype):
            expert = _EXPERT.match(name)
            kind = expert.group(4) if expert else None
            yield name, repack_awq_tensor(kind, tensor, group_size) if kind in AWQ_PARTS else tensor

    @staticmethod
    def _param_name(name: str) -> str:
        """The parameter a checkpoint tensor fills: per-expert tensors go to the stacks (_EXPERT_STACK_SUFFIX),
        gate/up to the merged gate_up_proj. A weight's `_scale_inv` maps to its parameter's `_scale_inv`
        sibling."""
        expert = _EXPERT.match(name)
        if expert:
            prefix, _, projection, kind = expert.groups()
            return f"{prefix}.{'down_proj' if projection == 'down' else 'gate_up_proj'}{_EXPERT_STACK_SUFFIX[kind]}"
        merged = _MERGED.search(name)
        return name.replace(merged.group(0), ".gate_up_proj.") if merged else name

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor into place; returns the parameter it filled, None if unknown."""
        target = self._param_name(name)
        if target not in params:
            return None
        try:
            expert = _EXPERT.match(name)
            if expert:
                prefix, index, projection, kind = expert.groups()
                experts = self.get_submodule(prefix)
                if not experts.owns(int(index)):
                    return _OTHER_RANK if int(index) < experts.num_experts else None
                experts.load_expert(int(index), projection, tensor, _EXPERT_STACK_SUFFIX[kind])
                return target
            merged = _MERGED.search(name)
            param = params[target]
            if merged:
                param.weight_loader(param, tensor, merged.group(1))
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            return target
        except ValueError as e:
            raise ValueError(f"tensor {name}: {e}") from None


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    """Same network; DeepseekConfig carries V2's softmax router and optional q_lora."""
