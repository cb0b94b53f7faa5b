"""Engines at a given parallel layout on the CPU (gloo), and greedy runs to compare them by."""

from __future__ import annotations

from pathlib import Path

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, ParallelConfig
from r1deploy.sampling_params import SamplingParams


def engine(model_dir: Path, tp: int, dp_attention: bool = False, moe_all_to_all: bool = False,
           **options: object) -> LLMEngine:
    parallel = ParallelConfig(tensor_parallel_size=tp, dp_attention=dp_attention, moe_all_to_all=moe_all_to_all)
    return LLMEngine(str(model_dir), config=EngineConfig(**options, parallel=parallel), device="cpu", dtype="float32")


def generate(llm: LLMEngine, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy token ids and their logprobs per prompt, all prompts in flight together."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=1)
    ids = [llm.add_request(p, params) for p in prompts]
    done = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [(list(done[i].token_ids), list(done[i].logprobs)) for i in ids]
