"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from torch import nn

from r1deploy.config import ARCH_BY_MODEL_TYPE
from r1deploy.errors import UsageError
from r1deploy.models.deepseek_v3 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from r1deploy.models.llama import LlamaForCausalLM

# Each class names its frozen config class (`config_class`) and its paged-cache layout
# (`kv_cache_shape`, `kv_bytes_per_token`), so the loader and the runner stay model-agnostic.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # Llama with q/k/v bias, set by ModelConfig
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
}


_ARCH_BY_MODEL_TYPE = {**ARCH_BY_MODEL_TYPE, "deepseek_v3": "DeepseekV3ForCausalLM",
                       "deepseek_v2": "DeepseekV2ForCausalLM"}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_CLASSES:
        raise UsageError(f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[architecture]


def model_class_for_config(raw: dict) -> type[nn.Module]:
    """The model class for an HF config dict (its "architectures", else its model_type)."""
    archs = raw.get("architectures") or []
    name = str(archs[0]) if archs else _ARCH_BY_MODEL_TYPE.get(raw.get("model_type", ""))
    if name is None:
        raise UsageError("model config is missing required keys: architectures (or a known model_type)")
    return model_class(name)
