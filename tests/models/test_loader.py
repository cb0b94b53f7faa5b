"""load_model's sources and errors, dummy weights, sharded checkpoints, and the KV-cache helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import Pair, Runner

from r1deploy.config import ModelConfig
from r1deploy.errors import UsageError
from r1deploy.layers.attention import kv_bytes_per_token, kv_cache_shape
from r1deploy.models.loader import load_model
from r1deploy.models.registry import model_class


def test_sharded_checkpoint_with_index_loads(pair: Pair, tmp_path: Path) -> None:
    pair.hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_model(str(tmp_path))
    tokens = [5, 9, 200, 17, 3]
    (logits,) = Runner(sharded).step([tokens], [0], [[0, 1]])
    assert (logits - pair.reference(tokens)).abs().max().item() <= 1e-4


def test_bfloat16_load(pair: Pair) -> None:
    loaded = load_model(str(pair.path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert torch.get_default_dtype() == torch.float32  # the build-time default is restored


def test_dummy_weights_are_deterministic_and_shaped(pair: Pair) -> None:
    first = load_model(str(pair.path), load_format="dummy")
    second = load_model(str(pair.path), load_format="dummy")
    params = dict(first.model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(params.values(), second.model.parameters(), strict=True))
    assert torch.all(params["model.norm.weight"] == 1)
    embed = params["model.embed_tokens.weight"]
    assert embed.shape == (256, 64) and 0.015 < embed.std().item() < 0.025
    (logits,) = Runner(first).step([[1, 2, 3]], [0], [[0]])
    assert torch.isfinite(logits).all()


def test_preset_needs_dummy_format() -> None:
    with pytest.raises(UsageError, match="load_format='dummy'"):
        load_model("r1-distill-qwen-7b")
    with pytest.raises(UsageError, match="unknown model"):
        load_model("no-such-model", load_format="dummy")


def test_dummy_preset_at_tiny_shape(tmp_path: Path) -> None:
    # A preset at real size is too big for CI; the same path with a shrunken copy of its config.
    raw = json.loads(Path(__file__).parents[2].joinpath("r1deploy/presets/r1-distill-qwen-1.5b.json").read_text())
    raw.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)
    raw.pop("head_dim", None)
    (tmp_path / "tiny.json").write_text(json.dumps(raw))
    loaded = load_model(str(tmp_path / "tiny.json"), load_format="dummy")
    assert loaded.tokenizer is None and loaded.config.attention_bias and loaded.eos_token_ids == (151643,)
    assert loaded.model.model.layers[0].self_attn.qkv_proj.bias is not None


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(UsageError, match="LlamaForCausalLM, Qwen2ForCausalLM, DeepseekV3ForCausalLM"):
        model_class("MistralForCausalLM")


def test_kv_cache_helpers() -> None:
    config = ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 3584,
                                  "intermediate_size": 8, "num_hidden_layers": 28, "num_attention_heads": 28,
                                  "num_key_value_heads": 4})
    assert kv_cache_shape(config, 10, 16) == (2, 10, 16, 4, 128)
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 28 * 4 * 128 * 2  # 57,344 B: R1-Distill-Qwen-7B
