"""ModelConfig: the facts about a dense Llama/Qwen2 checkpoint that the model, the loader and the
engine need, read once from an HF config.json and never mutated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1deploy.errors import UsageError

# model_type -> architecture, for configs that lack an "architectures" list: the one such map (every family).
ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # what ModelConfig covers
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling; llama3 fields are unused by 'linear'."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_bias: bool  # bias on q/k/v (Qwen2 always; Llama when attention_bias)
    o_proj_bias: bool  # Llama's attention_bias also covers o_proj; Qwen2's o_proj never has one
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype
    # config.json's quantization_config (AWQ INT4 weights: r1deploy.quant.awq); None = unquantised.
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @staticmethod
    def from_hf(source: dict[str, Any] | str | Path) -> ModelConfig:
        """Build from an HF config dict, a config.json path, or a directory holding one."""
        raw = read_hf_config(source) if isinstance(source, (str, Path)) else source
        missing = [k for k in _REQUIRED_KEYS if k not in raw]
        if missing:
            raise UsageError(f"model config is missing required keys: {', '.join(missing)}")
        architecture = architecture_of(raw)
        if architecture is None:
            raise UsageError("model config is missing required keys: architectures (or a known model_type)")
        if architecture not in _ARCHITECTURES:
            raise UsageError(f"ModelConfig covers {', '.join(_ARCHITECTURES)}, not {architecture}")
        if raw.get("hidden_act", "silu") != "silu":
            raise UsageError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("mlp_bias", False):
            raise UsageError("mlp_bias=true is not supported")
        if raw.get("use_sliding_window", False):
            raise UsageError("use_sliding_window=true is not supported")
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = _rope(raw)
        quantization = raw.get("quantization_config") or None
        if quantization is not None:  # validated here: an unsupported method is a UsageError at load
            from r1deploy.quant.registry import quant_config_from_hf

            quant_config_from_hf(quantization)
            quantization = dict(quantization)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            architecture=architecture,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=is_qwen2 or bool(raw.get("attention_bias", False)),
            o_proj_bias=not is_qwen2 and bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            eos_token_ids=eos_ids,
            torch_dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            quantization_config=quantization,
        )


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no model config at {path}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"model config {path} is not valid JSON: {e}") from None


def architecture_of(raw: dict[str, Any]) -> str | None:
    """An HF config's architecture: its "architectures" list, else its model_type's (None: neither known)."""
    archs = raw.get("architectures") or []
    return str(archs[0]) if archs else ARCH_BY_MODEL_TYPE.get(raw.get("model_type", ""))


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 nests everything in rope_parameters; older configs use rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UsageError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(rope_type=rope_type, **{k: params[k] for k in fields if k in params})


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16', 'torch.float16', or a torch.dtype -> torch.dtype; anything else is a UsageError."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return dtype
