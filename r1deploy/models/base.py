"""The model contract the engine, the loader and the workers rely on: `CausalLM`.

A model family subclasses CausalLM and declares, explicitly rather than by duck typing:
* `config_class`: its frozen config type, parsed from config.json by the loader;
* `ARCHITECTURE`: what the family supports at all (ModelCapabilities); `capabilities` refines it for one
  built instance (CUDA graphs are off under an offload store, for example);
* `cache_spec(config, tp)` / `kv_cache_spec`: one layer's paged-cache layout and its bytes per token;
* `check_parallel(config, tp, dp_attention)`: a UsageError before any process starts when the layout cannot
  split the model; `check_tensor_parallel` is the family's own part of it;
* `linear_quant(config, fp8_block)`: every linear's quantisation method (quant/methods.LinearQuant: the
  checkpoint's AWQ / GPTQ, and FP8 kept with the loader's tiles); the loader builds `cls(config, tp=tp,
  quant=cls.linear_quant(config, fp8_block))` and the model hands it to every layer that builds linears;
* `load_weights(weights)`: HF-named tensors into the parameters (a family with its own checkpoint mapping
  overrides it; the mapping lives beside the model, not in its maths);
* `build_draft()`: the family's own speculative-decoding head (DeepSeek's MTP layer), built as the submodule
  `draft` before load_weights (the loader calls it when the engine asks for it); None by default;
* `forward(batch, kv_caches)` -> hidden [T, hidden] and `compute_logits(hidden)` -> [B, vocab] fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.quant.methods import LinearQuant

if TYPE_CHECKING:
    from r1deploy.core.forward_batch import ForwardBatch
    from r1deploy.distributed.group import TPGroup
    from r1deploy.weights.offload import OffloadStore


@dataclass(frozen=True)
class ModelCapabilities:
    cuda_graphs: bool  # decode steps can be captured (no host reads of lengths or routing)
    tensor_parallel: bool  # a TP build exists (tp= in the constructor)
    dp_attention: bool  # --dp-attention (data-parallel attention, expert-parallel MoE)
    offload: frozenset[str]  # --offload targets: "experts" (MoE), "layers" (any decoder)


@dataclass(frozen=True)
class KVCacheSpec:
    """One layer's paged cache: `leading + (num_blocks, block_size) + token_shape` values of the cache dtype."""

    num_layers: int
    leading: tuple[int, ...]  # (2,) K and V (GQA); () one latent row (MLA)
    token_shape: tuple[int, ...]  # one token's entry per leading index: (KV heads, head_dim) or (latent dim,)
    fp8: bool  # whether the model reads and writes an FP8 cache (--kv-cache-dtype fp8)

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (*self.leading, num_blocks, block_size, *self.token_shape)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Cache bytes one token costs across all layers: dtype.itemsize per value, 1 in an FP8 cache."""
        return self.num_layers * math.prod(self.leading) * math.prod(self.token_shape) * dtype.itemsize


class CausalLM(nn.Module):
    config_class: ClassVar[type]
    ARCHITECTURE: ClassVar[ModelCapabilities]

    def __init__(self, config: Any, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        # --offload: the store serving this model's weights (weights/offload.OffloadStore), read by the engine,
        # /metrics and bench; None when every weight is resident.
        self.offload_store: OffloadStore | None = None
        self.draft: nn.Module | None = None  # build_draft(): the speculative draft head, loaded with the model

    # ---- what the family supports, before and after building -----------------------------------------

    @property
    def capabilities(self) -> ModelCapabilities:
        """ARCHITECTURE for this instance: no CUDA graphs under an offload store (copies decided on the host)."""
        from dataclasses import replace

        return replace(self.ARCHITECTURE, cuda_graphs=self.ARCHITECTURE.cuda_graphs and self.offload_store is None)

    @classmethod
    def check_parallel(cls, config: Any, tp: int, dp_attention: bool = False) -> None:
        """UsageError (one line) unless this family splits over tp ranks (dp_attention: --dp-attention)."""
        if dp_attention and not cls.ARCHITECTURE.dp_attention:
            raise UsageError(f"--dp-attention needs a DeepSeek (MLA) model, not {cls.__name__}")
        if tp < 1:
            raise UsageError(f"--tp must be >= 1, got {tp}")
        if tp == 1:
            return
        if not cls.ARCHITECTURE.tensor_parallel:
            raise UsageError(f"tensor parallelism supports the Llama / Qwen2 (R1-Distill) and DeepSeek-V2/V3 models "
                             f"so far, not {cls.__name__}")
        cls.check_tensor_parallel(config, tp, dp_attention)

    @classmethod
    def check_tensor_parallel(cls, config: Any, tp: int, dp_attention: bool = False) -> None:
        """The family's own divisibility rules for tp > 1."""
        raise NotImplementedError

    @classmethod
    def linear_quant(cls, config: Any, fp8_block: tuple[int, int] | None = None) -> LinearQuant:
        """Every linear's quantisation for this config: the checkpoint's INT4 method (the family knows where its
        config keeps it) and, where the loader keeps an FP8 checkpoint in FP8, fp8_block's tiles."""
        return LinearQuant(fp8_block=fp8_block)

    # ---- the paged cache ---------------------------------------------------------------------------

    @classmethod
    def cache_spec(cls, config: Any, tp: TPGroup | None = None) -> KVCacheSpec:
        raise NotImplementedError

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """This instance's cache (a tensor-parallel rank's share of the heads where the family splits them)."""
        return self.cache_spec(self.config, self.tp)

    # ---- weights, speculative head, maths ----------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors through each parameter's weight_loader (packed_modules_mapping: merged q/k/v, gate/up)."""
        from r1deploy.weights import load_weights

        load_weights(self, weights)

    def build_draft(self) -> nn.Module | None:
        """Build the family's own draft model for speculative decoding as `self.draft` (before load_weights,
        under the loader's dtype / device / FP8 context) and return it; None: this model has none."""
        return None

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states [T, hidden] of this step's tokens; writes their K/V (or latents) into kv_caches."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] fp32
        return self.lm_head(hidden).float()
