"""DeepSeek (MLA + MoE) under tensor / expert parallelism on the CPU (gloo, 2 ranks): greedy tokens equal
TP = 1 and transformers through chunked prefill, for a tiny DeepSeek-V3 (per-expert checkpoint names) and a
tiny V2-Lite-like model (no q_lora, softmax greedy router, fused expert tensors); each rank holds half the
heads and half the routed experts, and the whole latent cache; experts that do not split are a usage error."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3, randomize_
from parallel_engines import engine, generate

from r1deploy.errors import UsageError

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
NEW_TOKENS = 8
CHUNKED = {"block_size": 4, "max_num_batched_tokens": 8}

V2_LITE = {
    "vocab_size": 255, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": False, "n_shared_experts": 2,
    "topk_method": "greedy", "routed_scaling_factor": 1.0, "max_position_embeddings": 512, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(path: Path) -> None:
    """Rewrite the checkpoint with stacked `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I]."""
    tensors = load_file(path / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    per: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _EXPERT.match(name)
        if match:
            per.setdefault(match.group(1), {})[(match.group(3), int(match.group(2)))] = tensor
        else:
            out[name] = tensor
    for prefix, parts in per.items():
        n = 1 + max(i for _, i in parts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((parts["gate", i], parts["up", i])) for i in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts["down", i] for i in range(n)])
    assert per
    (path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")


@pytest.fixture(scope="module", params=["v3", "v2-lite-fused"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    if request.param == "v3":
        hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3, attn_implementation="eager"))
    else:  # a vocabulary of 255 does not split evenly over 2 ranks
        hf = DeepseekV2ForCausalLM(DeepseekV2Config(**V2_LITE, attn_implementation="eager"))
    hf = hf.float().eval()
    randomize_(hf, seed=3)
    hf.save_pretrained(path, safe_serialization=True)
    if request.param != "v3":
        fuse_experts(path)
    return path


def hf_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def test_tp2_expert_parallel_equals_tp1_and_transformers(model_dir: Path) -> None:
    single = engine(model_dir, 1, **CHUNKED)
    expected = generate(single, PROMPTS, NEW_TOKENS)
    assert [tokens for tokens, _ in expected] == hf_greedy(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tp = engine(model_dir, 2, **CHUNKED)
    try:
        got = generate(tp, PROMPTS, NEW_TOKENS)
        model = tp.runner.model
        attn = model.model.layers[0].self_attn
        assert attn.num_heads == 2
        assert attn.kv_b_proj.weight.shape == (2 * (16 + 16), 32)
        assert attn.kv_a_proj_with_mqa.weight.shape == (32 + 8, 64)  # replicated
        assert attn.o_proj.weight.shape == (64, 2 * 16)
        assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 64)  # dense: 2 x 128 / 2
        moe = model.model.layers[1].mlp
        assert moe.experts.gate_up_proj.shape == (4, 64, 64) and moe.experts.down_proj.shape == (4, 64, 32)
        assert moe.experts.first == 0  # rank 0 holds experts 0..3
        shared = 32 * config["n_shared_experts"]
        assert moe.shared_experts.gate_up_proj.weight.shape == (shared, 64)  # 2 x shared / 2
        # The latent cache is replicated: every rank holds the full 32 + 8 values per token.
        assert tp.runner.kv_caches[0].shape[-1] == 40
        assert tp.block_manager.num_free_blocks == tp.block_manager.num_blocks
    finally:
        tp.shutdown()
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-5


def test_rank1_holds_the_other_experts(tmp_path: Path) -> None:
    """Building rank 1's shard without a process group: it owns experts 4..7 and skips the rest on load."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from r1deploy.core.deepseek_config import DeepseekConfig
    from r1deploy.distributed.group import TPGroup
    from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM as Ours

    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3)).float().eval()
    randomize_(hf, seed=4)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = Ours(DeepseekConfig.from_hf(tmp_path), tp=TPGroup(rank=1, size=2, device=torch.device("cpu")))
    tensors = load_file(tmp_path / "model.safetensors")
    ours.load_weights(iter(tensors.items()))
    experts = ours.model.layers[1].mlp.experts
    assert experts.first == 4 and experts.gate_up_proj.shape[0] == 4
    torch.testing.assert_close(experts.down_proj[1], tensors["model.layers.1.mlp.experts.5.down_proj.weight"])
    torch.testing.assert_close(experts.gate_up_proj[3, 32:], tensors["model.layers.1.mlp.experts.7.up_proj.weight"])
    kv_b = tensors["model.layers.2.self_attn.kv_b_proj.weight"]  # heads 2, 3
    torch.testing.assert_close(ours.model.layers[2].self_attn.kv_b_proj.weight, kv_b[2 * 32:])


def test_experts_that_do_not_split_are_a_one_line_usage_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import DeepseekV2Config

    from r1deploy.cli import main

    DeepseekV2Config(**{**V2_LITE, "n_routed_experts": 6}).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="does not divide .*6 routed experts"):  # before any process starts
        engine(tmp_path, 4)
    assert main(["serve", str(tmp_path), "--tp", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tp 4 does not divide" in err and "6 routed experts" in err
