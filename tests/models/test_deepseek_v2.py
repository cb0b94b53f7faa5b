"""Tiny DeepSeek-V2-Lite-like (softmax greedy router, no q_lora) and V2-like (group-limited greedy,
q_lora) models against transformers' DeepseekV2 (fp32): prefill, chunked prefill, decode."""

from __future__ import annotations

import pytest
import torch
from deepseek_support import TOL, PagedDriver, load_ours, randomize_, reference_logits
from transformers import DeepseekV2Config
from transformers import DeepseekV2ForCausalLM as HFDeepseekV2

COMMON = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": False,
    "max_position_embeddings": 512, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}
VARIANTS = {
    "v2-lite": {"q_lora_rank": None, "n_shared_experts": 2, "topk_method": "greedy", "routed_scaling_factor": 1.0},
    "v2": {"q_lora_rank": 32, "n_shared_experts": 2, "topk_method": "group_limited_greedy", "n_group": 4,
           "topk_group": 2, "routed_scaling_factor": 16.0},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config = DeepseekV2Config(**COMMON, **VARIANTS[request.param], attn_implementation="eager")
    hf = HFDeepseekV2(config).float().eval()
    randomize_(hf, seed=10)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_ours(path)
    assert ours.config.scoring_func == "softmax" and ours.config.topk_method == VARIANTS[request.param]["topk_method"]
    return hf, ours


def test_prefill_chunks_and_decode_match_transformers(models) -> None:
    hf, ours = models
    driver = PagedDriver(ours)
    generator = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (6, 11)]
    tables: list[list[int]] = [[], []]
    logits = driver.step([seqs[0], seqs[1][:5]], [0, 0], tables)
    expected = torch.cat([reference_logits(hf, seqs[0]), reference_logits(hf, seqs[1][:5])])
    torch.testing.assert_close(logits, expected, atol=TOL, rtol=0)
    logits = driver.step([seqs[1][5:]], [5], tables[1:])  # second chunk over cached latents
    torch.testing.assert_close(logits, reference_logits(hf, seqs[1])[5:], atol=TOL, rtol=0)
    for _ in range(3):
        new = torch.randint(0, 256, (2, 1), generator=generator).tolist()
        logits = driver.step(new, [len(s) for s in seqs], tables)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        torch.testing.assert_close(logits, torch.stack([reference_logits(hf, s)[-1] for s in seqs]),
                                   atol=TOL, rtol=0)
