"""load_weights: HF-named tensors into merged parameters, and errors naming missing or unused tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from r1deploy.config import ModelConfig
from r1deploy.models.llama import LlamaForCausalLM
from r1deploy.weights import WeightLoadError, load_weights

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in Qwen2ForCausalLM(Qwen2Config(**TINY)).state_dict().items()}


def ours() -> LlamaForCausalLM:
    return LlamaForCausalLM(ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], **TINY}))


def test_merged_shards_land_in_place(hf_state: dict[str, torch.Tensor]) -> None:
    model = ours()
    load_weights(model, hf_state.items())
    attn = model.model.layers[0].self_attn.qkv_proj
    q, k, v = (hf_state[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv")
    assert torch.equal(attn.bias, torch.cat([q, k, v]))
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up[48:], hf_state["model.layers.0.mlp.up_proj.weight"])


def test_missing_tensors_are_named(hf_state: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in hf_state.items() if not k.endswith(("k_proj.bias", "norm.weight"))}
    with pytest.raises(WeightLoadError, match="self_attn.k_proj.bias.*model.norm.weight"):
        load_weights(ours(), partial.items())


def test_unused_tensor_is_named(hf_state: dict[str, torch.Tensor]) -> None:
    extra = {**hf_state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),  # ignored, derived
             "model.mtp.weight": torch.ones(1)}
    with pytest.raises(WeightLoadError, match="model.mtp.weight"):
        load_weights(ours(), extra.items())


def test_shape_mismatch_names_tensor(hf_state: dict[str, torch.Tensor]) -> None:
    bad = {**hf_state, "model.layers.0.self_attn.v_proj.weight": torch.ones(3, 32)}
    with pytest.raises(WeightLoadError, match="v_proj.weight: shape mismatch"):
        load_weights(ours(), bad.items())
