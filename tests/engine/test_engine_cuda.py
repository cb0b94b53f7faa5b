"""On a GPU the engine (Triton kernels, decode CUDA graphs) must produce the CPU path's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1deploy.engine.config import EngineConfig
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]


def greedy_tokens(model_dir: Path, device: str, **config: object) -> list[list[int]]:
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(model_dir), config=EngineConfig(**config), device=device, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(PROMPTS, params)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_greedy_equals_cpu(tiny_model_dir: Path, eager: bool) -> None:
    cpu = greedy_tokens(tiny_model_dir, "cpu")
    gpu = greedy_tokens(tiny_model_dir, "cuda", enforce_eager=eager, max_num_seqs=8, max_model_len=128,
                        block_size=4, max_num_batched_tokens=16)
    assert gpu == cpu
