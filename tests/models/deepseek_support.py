"""Shared pieces of the DeepSeek tests: tiny transformers reference models with weights large enough
to matter, and a paged-cache driver for our model."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1deploy.quant.fp8_block import dequantize_fp8_block, quantize_fp8_block

TOL = 1e-4

TINY_V3 = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 512, "rope_theta": 10000.0,
    # factor = 512 / 128; mscale != mscale_all_dim so cos/sin get a non-unit attention factor too.
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0},
}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """O(1) activations everywhere (the default 0.02 init would hide errors under 1e-4), and a
    router bias of both signs so biased and unbiased expert choices differ."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=generator))
        else:
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.6 - 0.3)


def read_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a single-file checkpoint; the tests need no shard index handling."""
    with safe_open(path / "model.safetensors", framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable in every version
            yield name, f.get_tensor(name)


def load_ours(path: Path) -> DeepseekV3ForCausalLM:
    config = DeepseekConfig.from_hf(path)
    model = DeepseekV3ForCausalLM(config).eval()
    model.load_weights(read_checkpoint(path))
    return model


@torch.no_grad()
def reference_logits(hf_model: nn.Module, token_ids: list[int]) -> torch.Tensor:  # [L, vocab]
    return hf_model(torch.tensor([token_ids])).logits[0].float()


class PagedDriver:
    """Owns our model's latent caches and hands out shuffled physical blocks, like the engine."""

    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int = 64, block_size: int = 4) -> None:
        self.model = model
        self.block_size = block_size
        config = model.config
        dtype = model.model.embed_tokens.weight.dtype
        self.kv_caches = [torch.zeros(model.kv_cache_spec.shape(num_blocks, block_size), dtype=dtype)
                          for _ in range(config.num_hidden_layers)]
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)

    def allocate(self, table: list[int], num_tokens: int) -> list[int]:
        """Grow a block table to cover num_tokens."""
        while len(table) * self.block_size < num_tokens:
            table.append(self.free.pop())
        return table

    @torch.no_grad()
    def step(self, chunks: list[list[int]], num_cached: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Run one engine step; logits of every new token, [T, vocab]."""
        for chunk, cached, table in zip(chunks, num_cached, tables, strict=True):
            self.allocate(table, cached + len(chunk))
        batch = ForwardBatch.build(chunks, num_cached, tables, self.block_size)
        return self.model.compute_logits(self.model(batch, self.kv_caches))


# FP8 checkpoints in miniature. Small tiles, so the tiny shapes span several, with partial edge tiles
# (kv_a_proj_with_mqa has 32 + 8 = 40 rows: 3 row tiles, the last 8 tall): R1's 576-row case.
FP8_TILE = (16, 16)
_NOT_FP8 = ("norm", "embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight")  # unquantised in R1's checkpoint


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not any(s in name for s in _NOT_FP8)


def write_fp8_checkpoint(tensors: dict[str, torch.Tensor], config: dict, fp8_dir: Path,
                         block: tuple[int, int] = FP8_TILE) -> dict[str, torch.Tensor]:
    """DeepSeek's format into fp8_dir: every 2-D linear weight as float8_e4m3fn + its `weight_scale_inv`,
    config.json with the fp8 quantization_config. Returns the dequantised twin state (fp32)."""
    fp8: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_fp8_weight(name, tensor):
            q, scale_inv = quantize_fp8_block(tensor, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
            twin[name] = dequantize_fp8_block(q, scale_inv, torch.float32, block)
        else:
            fp8[name] = twin[name] = tensor
    save_file({k: v.contiguous() for k, v in fp8.items()}, str(fp8_dir / "model.safetensors"))
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return twin


def run_steps(model: DeepseekV3ForCausalLM) -> list[torch.Tensor]:
    """A batched prefill and three decode steps of three sequences (seeded): their logits."""
    driver = PagedDriver(model)
    generator = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, TINY_V3["vocab_size"], (n,), generator=generator).tolist() for n in (7, 3, 11)]
    tables: list[list[int]] = [[] for _ in seqs]
    outs = [driver.step(seqs, [0] * len(seqs), tables)]
    for _ in range(3):
        new = [[int(torch.randint(0, TINY_V3["vocab_size"], (1,), generator=generator))] for _ in seqs]
        outs.append(driver.step(new, [len(s) for s in seqs], tables))
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
    return outs
