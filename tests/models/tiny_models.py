"""Tiny random transformers Llama/Qwen2 models and a runner that drives ours through ForwardBatches."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.models.loader import LoadedModel

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
VARIANTS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **TINY)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **TINY)),
    "llama3-rope-tied": lambda: LlamaForCausalLM(LlamaConfig(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                                             **TINY)),
}


def make_hf_model(variant: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = VARIANTS[variant]().float().eval()
    # HF initialises biases to zero and norms to one; randomise everything so loading is really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


@dataclass
class Pair:
    hf: PreTrainedModel
    ours: LoadedModel
    path: Path

    def reference(self, tokens: list[int]) -> torch.Tensor:  # [L, vocab]: transformers, full recompute
        with torch.no_grad():
            return self.hf(torch.tensor([tokens])).logits[0].float()


class Runner:
    """Our model over a paged cache of num_blocks x block_size; returns logits for every new token."""

    def __init__(self, loaded: LoadedModel, num_blocks: int = 32, block_size: int = 4) -> None:
        self.loaded = loaded
        self.block_size = block_size
        param = next(loaded.model.parameters())
        self.device = param.device
        spec = loaded.model.kv_cache_spec
        self.kv_caches = [torch.zeros(spec.shape(num_blocks, block_size), dtype=param.dtype, device=param.device)
                          for _ in range(spec.num_layers)]

    @torch.inference_mode()
    def step(self, chunks: list[list[int]], num_cached: list[int], tables: list[list[int]]) -> list[torch.Tensor]:
        batch = ForwardBatch.build(chunks, num_cached, tables, self.block_size, self.device)
        logits = self.loaded.model.compute_logits(self.loaded.model(batch, self.kv_caches)).cpu()  # [T, vocab]
        starts = batch.query_start_loc.tolist()
        return [logits[a:b] for a, b in itertools.pairwise(starts)]
