"""ModelConfig.from_hf over the shipped presets, transformers-5 and legacy rope layouts, and bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1deploy.config import ModelConfig, RopeScaling
from r1deploy.errors import UsageError
from r1deploy.presets import resolve_config_path

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4}


def test_distill_presets() -> None:
    qwen = ModelConfig.from_hf(resolve_config_path("r1-distill-qwen-7b"))
    assert (qwen.architecture, qwen.hidden_size, qwen.num_key_value_heads, qwen.head_dim) == (
        "Qwen2ForCausalLM", 3584, 4, 128)
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.rope_scaling is None
    assert qwen.torch_dtype == torch.bfloat16 and not qwen.tie_word_embeddings
    llama = ModelConfig.from_hf(resolve_config_path("r1-distill-llama-70b"))
    assert llama.rope_theta == 500000.0 and not llama.attention_bias
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert llama.eos_token_ids == (128001, 128008, 128009) and llama.bos_token_id == 128000


def test_defaults_and_model_type_fallback() -> None:
    config = ModelConfig.from_hf({**BASE, "architectures": None, "model_type": "qwen2", "eos_token_id": 7})
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias
    assert (config.num_key_value_heads, config.head_dim, config.rope_theta) == (4, 4, 10000.0)
    assert config.eos_token_ids == (7,) and config.torch_dtype == torch.float32


def test_rope_parameters_nested_like_transformers_5(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_parameters": rope, "dtype": "bfloat16"}))
    config = ModelConfig.from_hf(tmp_path)
    assert config.rope_theta == 5e5 and config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert config.torch_dtype == torch.bfloat16


def test_missing_keys_are_named() -> None:
    with pytest.raises(UsageError, match="hidden_size, intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k not in ("hidden_size", "intermediate_size")})


@pytest.mark.parametrize("extra", [{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {"hidden_act": "gelu"},
                                   {"torch_dtype": "float99"},
                                   {"architectures": ["DeepseekV3ForCausalLM"]}])
def test_unsupported_settings_are_refused(extra: dict) -> None:
    with pytest.raises(UsageError):
        ModelConfig.from_hf({**BASE, **extra})
