"""Architecture name (config.json "architectures") -> model class: the one registry. Configs without an
"architectures" list are mapped by model_type through config.ARCH_BY_MODEL_TYPE (the one such map)."""

from __future__ import annotations

from r1deploy.config import architecture_of
from r1deploy.errors import UsageError
from r1deploy.models.base import CausalLM
from r1deploy.models.deepseek_v3 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from r1deploy.models.llama import LlamaForCausalLM

# Each class names its frozen config class (`config_class`), its capabilities and its paged-cache layout
# (models/base.CausalLM), so the loader and the runner stay model-agnostic.
MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # Llama with q/k/v bias, set by ModelConfig
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in MODEL_CLASSES:
        raise UsageError(f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[architecture]


def model_class_for_config(raw: dict) -> type[CausalLM]:
    """The model class for an HF config dict (its "architectures", else its model_type)."""
    name = architecture_of(raw)
    if name is None:
        raise UsageError("model config is missing required keys: architectures (or a known model_type)")
    return model_class(name)
