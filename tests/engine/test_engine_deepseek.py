"""The engine runs DeepSeek-V3 (MLA latent cache + MoE) end to end: greedy tokens equal transformers' under
batching, chunked prefill, prefix-cache hits and forced preemption."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3, randomize_  # noqa: E402

from r1deploy.engine.engine import LLMEngine  # noqa: E402
from r1deploy.engine.llm import LLM  # noqa: E402
from r1deploy.engine_config import EngineConfig  # noqa: E402
from r1deploy.sampling_params import SamplingParams  # noqa: E402

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("deepseek_v3")
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def reference(deepseek_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(deepseek_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(tokens[0, len(prompt):].tolist())
    return out


def run(model_dir: Path, prompts: list[list[int]], device: str = "cpu",
        **config: object) -> tuple[list[list[int]], LLMEngine]:
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(model_dir), config=EngineConfig(**config), device=device, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(prompts, params)], llm.engine


@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 5, "block_size": 4},  # chunked prefill
    {"block_size": 4, "num_gpu_blocks_override": 12},  # the pool cannot hold all four: preemption
], ids=["batched", "chunked", "preempted"])
def test_deepseek_greedy_equals_transformers(deepseek_dir: Path, reference: list[list[int]], config: dict) -> None:
    tokens, engine = run(deepseek_dir, PROMPTS, **config)
    assert tokens == reference
    if "num_gpu_blocks_override" in config:
        assert engine.scheduler.num_preemptions > 0
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_deepseek_prefix_cache_hit(deepseek_dir: Path, reference: list[list[int]]) -> None:
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(deepseek_dir), config=EngineConfig(block_size=4), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate([PROMPTS[2]], params)[0]
    again = llm.generate([PROMPTS[2]], params)[0]
    assert list(first.token_ids) == list(again.token_ids) == reference[2]
    assert again.metrics.num_cached_tokens == 32  # 8 full blocks of the 33-token prompt


def test_deepseek_with_experts_offloaded_equals_resident(deepseek_dir: Path, reference: list[list[int]]) -> None:
    from r1deploy.engine_config import OffloadConfig

    expert_bytes = 3 * TINY_V3["hidden_size"] * TINY_V3["moe_intermediate_size"] * 4  # gate, up, down in fp32
    # Two GPU slots for 2 MoE layers x 8 experts, the rest read from the checkpoint on every miss.
    offload = OffloadConfig(gpu_weight_budget_gb=2 * expert_bytes / 1e9, host_weight_budget_gb=0.0)
    tokens, engine = run(deepseek_dir, PROMPTS, offload=offload)
    assert tokens == reference
    stats = engine.loaded.model.offload_store.stats()
    assert stats.misses > 0 and stats.disk_reads > 0 and stats.evictions > 0
    engine.shutdown()
    assert engine.loaded.model.offload_store.stats().host_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda_graphs", "eager"])
def test_deepseek_gpu_greedy_equals_transformers(deepseek_dir: Path, reference: list[list[int]], eager: bool) -> None:
    """Triton MLA decode, latent-cache write and fused MoE; with graphs, decode steps replay captures."""
    tokens, engine = run(deepseek_dir, PROMPTS, "cuda", enforce_eager=eager, max_num_seqs=8, max_model_len=128,
                         block_size=4, max_num_batched_tokens=16)
    assert (engine.runner.graphs is None) == eager
    assert tokens == reference
