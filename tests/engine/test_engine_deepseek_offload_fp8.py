"""The engine serves a DeepSeek-V3 FP8 checkpoint (block-scaled e4m3 + weight_scale_inv, R1's format in
miniature) with `--offload experts` holding FP8 experts (issue 9): greedy tokens equal the same model
resident in forced-FP8 mode, with one GPU slot (eviction on every miss), with the host tier empty (the
checkpoint's FP8 tensors read from disk) and with host compute; the byte counters count FP8 bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import FP8_TILE, TINY_V3, randomize_, read_checkpoint, write_fp8_checkpoint

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig, OffloadConfig
from r1deploy.models.loader import load_model
from r1deploy.quant.fp8_block import FP8_DTYPE
from r1deploy.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
NEW_TOKENS = 8
BLOCK = FP8_TILE
H, I = TINY_V3["hidden_size"], TINY_V3["moe_intermediate_size"]
# One byte a weight plus fp32 scales: gate and up [ceil(32/16), ceil(64/16)] each, down [ceil(64/16), ceil(32/16)].
FP8_EXPERT_BYTES = 3 * H * I + 4 * (2 * 2 * 4 + 4 * 2)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_dir, path = tmp_path_factory.mktemp("deepseek_v3_hf"), tmp_path_factory.mktemp("deepseek_v3_fp8")
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(hf_dir, safe_serialization=True)
    write_fp8_checkpoint(dict(read_checkpoint(hf_dir)), json.loads((hf_dir / "config.json").read_text()), path,
                         BLOCK)
    return path


def run(fp8_dir: Path, offload: OffloadConfig | None = None) -> tuple[list[list[int]], LLMEngine]:
    loaded = load_model(str(fp8_dir), dtype="float32", device="cpu", quantization="fp8", offload=offload)
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(fp8_dir), config=EngineConfig(offload=offload), device="cpu", dtype="float32",
                           loaded=loaded)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(PROMPTS, params)], llm.engine


@pytest.fixture(scope="module")
def resident(fp8_dir: Path) -> list[list[int]]:
    tokens, engine = run(fp8_dir)
    assert engine.loaded.model.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    engine.shutdown()
    return tokens


@pytest.mark.parametrize("offload", [
    OffloadConfig(gpu_weight_budget_gb=FP8_EXPERT_BYTES / 1e9),  # one slot: every miss evicts
    OffloadConfig(gpu_weight_budget_gb=2 * FP8_EXPERT_BYTES / 1e9, host_weight_budget_gb=0.0),  # misses from disk
    OffloadConfig(gpu_weight_budget_gb=FP8_EXPERT_BYTES / 1e9, cpu_compute="always"),  # host compute
], ids=["one_slot", "disk", "host_compute"])
def test_fp8_offloaded_equals_fp8_resident(fp8_dir: Path, resident: list[list[int]], offload: OffloadConfig) -> None:
    tokens, engine = run(fp8_dir, offload)
    assert tokens == resident
    store = engine.loaded.model.offload_store
    assert store.fp8 and store.gpu.gate_up.dtype == FP8_DTYPE and store.expert_bytes == FP8_EXPERT_BYTES
    assert store.expert_bytes < 3 * H * I * 2 // 2 + 100  # half of bf16's, plus the scales
    stats = store.stats()
    assert stats.misses > 0
    assert stats.bytes_to_device == (stats.misses - stats.cpu_computes + stats.prefetches) * FP8_EXPERT_BYTES
    if offload.cpu_compute == "always":
        assert stats.cpu_computes > 0
    elif offload.host_weight_budget_gb == 0.0:
        assert stats.disk_reads > 0 and stats.bytes_from_disk == stats.disk_reads * FP8_EXPERT_BYTES
    else:
        assert stats.gpu_slots == 1 and stats.evictions > 0
    engine.shutdown()
    assert store.stats().host_bytes == 0
