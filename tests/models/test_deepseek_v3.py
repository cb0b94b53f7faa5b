"""Tiny random DeepSeek-V3 against transformers 5.17 (fp32): batched prefill, chunked prefill,
absorbed decode, prefix reuse of cached latent blocks, MTP skipping, config facts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepseek_support import (
    TINY_V3,
    TOL,
    PagedDriver,
    load_ours,
    randomize_,
    read_checkpoint,
    reference_logits,
)
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1deploy.weights import WeightLoadError

R1_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFDeepseekV3, Path]:
    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=0)
    path = tmp_path_factory.mktemp("deepseek_v3")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture()
def driver(checkpoint: tuple[HFDeepseekV3, Path]) -> PagedDriver:
    return PagedDriver(load_ours(checkpoint[1]))


def random_tokens(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, TINY_V3["vocab_size"], (n,), generator=generator).tolist()


def test_batched_prefill_matches_transformers(checkpoint, driver) -> None:
    hf, _ = checkpoint
    generator = torch.Generator().manual_seed(1)
    prompts = [random_tokens(generator, n) for n in (7, 13, 1, 4)]
    logits = driver.step(prompts, [0] * len(prompts), [[] for _ in prompts])
    expected = torch.cat([reference_logits(hf, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=TOL, rtol=0)


def test_decode_after_prefill_matches_transformers(checkpoint, driver) -> None:
    """Decode steps go through the absorbed path; compare with transformers' full-sequence logits."""
    hf, _ = checkpoint
    generator = torch.Generator().manual_seed(2)
    seqs = [random_tokens(generator, n) for n in (5, 9, 2)]
    tables: list[list[int]] = [[] for _ in seqs]
    driver.step(seqs, [0] * len(seqs), tables)
    for _ in range(5):
        new = [random_tokens(generator, 1) for _ in seqs]
        logits = driver.step(new, [len(s) for s in seqs], tables)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        expected = torch.stack([reference_logits(hf, s)[-1] for s in seqs])
        torch.testing.assert_close(logits, expected, atol=TOL, rtol=0)


def test_chunked_prefill_mixed_with_decode(checkpoint, driver) -> None:
    """A long prompt in chunks that straddle blocks while another sequence decodes in the same steps."""
    hf, _ = checkpoint
    generator = torch.Generator().manual_seed(3)
    long, short = random_tokens(generator, 19), random_tokens(generator, 6)
    tables: list[list[int]] = [[], []]
    driver.step([short], [0], tables[1:])
    done = 0
    for chunk_len in (5, 7, 7):
        chunk, step = long[done : done + chunk_len], random_tokens(generator, 1)
        logits = driver.step([chunk, step], [done, len(short)], tables)
        short += step
        done += chunk_len
        torch.testing.assert_close(logits[:chunk_len], reference_logits(hf, long[:done])[-chunk_len:],
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(logits[chunk_len], reference_logits(hf, short)[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("new_tokens", [6, 1])
def test_prefix_reuse_of_cached_latent_blocks(checkpoint, driver, new_tokens: int) -> None:
    """A second sequence maps the first one's full latent blocks and computes only its suffix
    (one suffix token takes the absorbed path)."""
    hf, _ = checkpoint
    generator = torch.Generator().manual_seed(4)
    first = random_tokens(generator, 13)
    first_table: list[int] = []
    driver.step([first], [0], [first_table])
    shared = 8  # two full blocks of 4
    second = first[:shared] + random_tokens(generator, new_tokens)
    second_table = first_table[: shared // driver.block_size]
    logits = driver.step([second[shared:]], [shared], [second_table])
    torch.testing.assert_close(logits, reference_logits(hf, second)[shared:], atol=TOL, rtol=0)


def test_router_bias_changes_expert_choice(checkpoint, driver) -> None:
    """Guards the tests above: with this bias the chosen experts differ from unbiased ones."""
    gate = driver.model.model.layers[1].mlp.gate
    x = torch.randn(64, TINY_V3["hidden_size"], generator=torch.Generator().manual_seed(5))
    _, biased = gate(x)
    bias = gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and (bias < 0).any() and (bias > 0).any()
    gate.e_score_correction_bias = None
    try:
        _, unbiased = gate(x)
    finally:
        gate.e_score_correction_bias = bias
    assert not torch.equal(biased.sort(-1).values, unbiased.sort(-1).values)


def test_mtp_layer_is_skipped_and_unknown_tensors_fail(checkpoint) -> None:
    _, path = checkpoint
    model = DeepseekV3ForCausalLM(DeepseekConfig.from_hf(path))
    mtp = [("model.layers.3.eh_proj.weight", torch.zeros(64, 128)),
           ("model.layers.3.self_attn.kv_b_proj.weight", torch.zeros(96, 32))]
    model.load_weights([*read_checkpoint(path), *mtp])
    with pytest.raises(WeightLoadError, match="does not use"):
        model.load_weights([*read_checkpoint(path), ("model.layers.0.mlp.bogus.weight", torch.zeros(1))])
    missing = [(n, t) for n, t in read_checkpoint(path) if "experts.3.up_proj" not in n]
    with pytest.raises(WeightLoadError, match="missing"):
        DeepseekV3ForCausalLM(DeepseekConfig.from_hf(path)).load_weights(missing)


def test_r1_config_facts() -> None:
    config = DeepseekConfig.from_hf(R1_CONFIG)
    assert config.qk_head_dim == 192 and config.kv_cache_dim == 576
    assert config.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert config.fp8_block_size == (128, 128)
    assert [config.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert DeepseekV3ForCausalLM.cache_spec(config).shape(10, 64) == (10, 64, 576)
    assert DeepseekV3ForCausalLM.cache_spec(config).bytes_per_token(torch.bfloat16) == 70272


def test_neox_rope_layout_and_single_q_proj(tmp_path: Path) -> None:
    """V3 with rope_interleave=false rotates NeoX halves; q_lora_rank=None uses one q_proj."""
    config = DeepseekV3Config(**{**TINY_V3, "rope_interleave": False, "q_lora_rank": None},
                              attn_implementation="eager")
    hf = HFDeepseekV3(config).float().eval()
    randomize_(hf, seed=6)
    hf.save_pretrained(tmp_path)
    driver = PagedDriver(load_ours(tmp_path))
    tokens = list(range(5, 30))
    table: list[int] = []
    torch.testing.assert_close(driver.step([tokens[:-1]], [0], [table]), reference_logits(hf, tokens[:-1]),
                               atol=TOL, rtol=0)
    torch.testing.assert_close(driver.step([tokens[-1:]], [len(tokens) - 1], [table])[0],
                               reference_logits(hf, tokens)[-1], atol=TOL, rtol=0)
