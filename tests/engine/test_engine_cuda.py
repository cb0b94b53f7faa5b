"""On a GPU the engine (Triton kernels, decode CUDA graphs) must produce the CPU path's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_attention_backends_give_the_cpu_tokens(tiny_model_dir: Path, backend: str) -> None:
    cpu = greedy_tokens(tiny_model_dir, "cpu")
    gpu = greedy_tokens(tiny_model_dir, "cuda", attention_backend=backend, max_num_seqs=8, max_model_len=128,
                        block_size=4, max_num_batched_tokens=16)
    assert gpu == cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_verify_step_graph_replays_the_eager_step(tiny_model_dir: Path) -> None:
    """A step of 3 new tokens per sequence (a speculative verify step) replays its (batch, 3) graph and
    gives the eager decode path's logits and cache."""
    from r1deploy.core.forward_batch import ForwardBatch

    engine = LLMEngine(str(tiny_model_dir), config=EngineConfig(graph_query_lens=(1, 3), max_num_seqs=4,
                                                                max_model_len=64, block_size=4),
                       device="cuda", dtype="float32")
    runner = engine.runner
    assert runner.graphs is not None and (4, 3) in runner.graphs.graphs and (4, 1) in runner.graphs.graphs
    assert runner.graphs.covers([3, 3, 3]) and not runner.graphs.covers([3, 1, 3])
    tables = [list(range(4)), list(range(4, 8)), list(range(8, 12))]
    prefill = ForwardBatch.build([[5, 6, 7, 8, 9], [4, 2], [11] * 9], [0, 0, 0], tables, 4, "cuda")
    runner.execute(prefill)
    verify = ForwardBatch.build([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [5, 2, 9], tables, 4, "cpu", pin_memory=True,
                                num_sampled=[3, 3, 3])  # every token's logits
    saved = [c.clone() for c in runner.kv_caches]
    graphed = runner.graphs.run(verify).clone()
    graphed_caches = [c.clone() for c in runner.kv_caches]
    for cache, old in zip(runner.kv_caches, saved, strict=True):
        cache.copy_(old)
    eager_batch = ForwardBatch.build([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [5, 2, 9], tables, 4, "cuda")
    eager = runner.model.compute_logits(runner.model(runner._with_attn_metadata(eager_batch), runner.kv_caches))
    torch.testing.assert_close(graphed, eager, rtol=2e-3, atol=2e-3)
    for a, b in zip(graphed_caches, runner.kv_caches, strict=True):
        torch.testing.assert_close(a, b)
