"""The model contract (models/base.CausalLM): one registry, explicit capabilities, the paged-cache spec a rank
holds, check_parallel, and no draft head by default."""

from __future__ import annotations

import pytest
import torch

from r1deploy.config import ModelConfig, read_hf_config
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.distributed.group import TPGroup
from r1deploy.errors import UsageError
from r1deploy.models.deepseek_v3 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from r1deploy.models.llama import LlamaForCausalLM
from r1deploy.models.registry import model_class_for_config
from r1deploy.presets import resolve_config_path


@pytest.mark.parametrize(("model_type", "cls"), [("llama", LlamaForCausalLM), ("qwen2", LlamaForCausalLM),
                                                 ("deepseek_v2", DeepseekV2ForCausalLM),
                                                 ("deepseek_v3", DeepseekV3ForCausalLM)])
def test_one_registry_maps_every_model_type(model_type: str, cls: type) -> None:
    assert model_class_for_config({"model_type": model_type}) is cls


def test_capabilities_are_declared() -> None:
    assert LlamaForCausalLM.ARCHITECTURE.tensor_parallel and not LlamaForCausalLM.ARCHITECTURE.dp_attention
    assert LlamaForCausalLM.ARCHITECTURE.offload == {"layers"}
    assert DeepseekV3ForCausalLM.ARCHITECTURE.dp_attention
    assert DeepseekV3ForCausalLM.ARCHITECTURE.offload == {"experts", "layers"}


def test_kv_cache_spec_of_a_tensor_parallel_rank() -> None:
    """R1-Distill-Qwen-7B: 28 layers of 4 KV heads x 128; rank 1 of 2 holds 2 heads."""
    config = ModelConfig.from_hf(read_hf_config(resolve_config_path("r1-distill-qwen-7b")))
    whole = LlamaForCausalLM.cache_spec(config)
    half = LlamaForCausalLM.cache_spec(config, TPGroup(rank=1, size=2, device=torch.device("cpu")))
    assert whole.shape(10, 16) == (2, 10, 16, 4, 128) and half.shape(10, 16) == (2, 10, 16, 2, 128)
    assert whole.bytes_per_token(torch.bfloat16) == 2 * half.bytes_per_token(torch.bfloat16) == 57_344
    assert whole.fp8


def test_check_parallel_refuses_what_a_family_cannot_split() -> None:
    config = ModelConfig.from_hf(read_hf_config(resolve_config_path("r1-distill-qwen-7b")))
    with pytest.raises(UsageError, match="--dp-attention needs a DeepSeek"):
        LlamaForCausalLM.check_parallel(config, 2, dp_attention=True)
    with pytest.raises(UsageError, match="does not divide .*28 attention heads"):
        LlamaForCausalLM.check_parallel(config, 3)
    LlamaForCausalLM.check_parallel(config, 2)
    r1 = DeepseekConfig.from_hf(resolve_config_path("deepseek-r1"))
    with pytest.raises(UsageError, match="--tp must be >= 1"):
        DeepseekV3ForCausalLM.check_parallel(r1, 0)
    DeepseekV3ForCausalLM.check_parallel(r1, 8, dp_attention=True)


def test_no_draft_head_by_default() -> None:
    tiny = ModelConfig.from_hf({**read_hf_config(resolve_config_path("r1-distill-qwen-1.5b")), "num_hidden_layers": 1,
                                "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "vocab_size": 128})
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny)
    assert model.build_draft() is None and model.capabilities.cuda_graphs and model.offload_store is None
