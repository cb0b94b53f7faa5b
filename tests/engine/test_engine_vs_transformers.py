"""The engine's greedy tokens equal transformers' on tiny random Qwen2 and Llama models, whether requests
run batched, one at a time, in small prefill chunks, through prefix-cache hits or under preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig
from r1deploy.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
NEW_TOKENS = 12


def hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # like ignore_eos: always n tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    return [hf_greedy(tiny_model_dir, p, NEW_TOKENS) for p in PROMPTS]


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run_engine(model_dir: Path, **config: object) -> list[list[int]]:
    engine = LLMEngine(str(model_dir), config=EngineConfig(**config), device="cpu", dtype="float32")
    llm = LLM.__new__(LLM)
    llm.engine = engine
    return [list(o.token_ids) for o in llm.generate(PROMPTS, greedy())]


def test_batched_equals_transformers(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    assert run_engine(tiny_model_dir) == reference


def test_one_at_a_time_equals_transformers(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    assert [list(llm.generate([p], greedy())[0].token_ids) for p in PROMPTS] == reference


def test_chunked_prefill_equals_transformers(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    assert run_engine(tiny_model_dir, max_num_batched_tokens=5, block_size=4) == reference


def test_forced_preemption_equals_transformers(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    # 12 blocks of 4 tokens cannot hold all four requests at once (they need 3+8+12+4 blocks at the end).
    engine = LLMEngine(str(tiny_model_dir), device="cpu", dtype="float32",
                       config=EngineConfig(block_size=4, num_gpu_blocks_override=12))
    llm = LLM.__new__(LLM)
    llm.engine = engine
    assert [list(o.token_ids) for o in llm.generate(PROMPTS, greedy())] == reference
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hits_equal_transformers(tiny_model_dir: Path) -> None:
    shared = list(range(20, 52))  # two full 16-token blocks
    prompts = [shared + [60, 61, 62], shared + [70]]
    expected = [hf_greedy(tiny_model_dir, p, NEW_TOKENS) for p in prompts]
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    first = llm.generate([prompts[0]], greedy())[0]
    second = llm.generate([prompts[1]], greedy())[0]
    assert [list(first.token_ids), list(second.token_ids)] == expected
    assert first.metrics.num_cached_tokens == 0 and second.metrics.num_cached_tokens == 32


def test_seeded_sampling_is_independent_of_batch(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, seeded, other])[1].token_ids
    assert alone == mixed


def test_n_fans_out_and_timings_are_recorded(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5,
                                                    ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in out.outputs)
    m = out.outputs[0].metrics
    assert m.arrival_time <= m.first_token_time <= m.token_times[-1] <= m.finish_time
    assert len(m.token_times) == 5


def test_stop_token_and_logprobs(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    stop_at = reference[0][3]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                     stop_token_ids=[stop_at], logprobs=2))[0]
    first = reference[0].index(stop_at)
    assert list(out.token_ids) == reference[0][: first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    lps = out.outputs[0].logprobs
    tops = out.outputs[0].top_logprobs
    assert len(lps) == len(out.token_ids) and all(lp <= 0 for lp in lps)
    # Greedy picks the most likely token, so it heads the top-2 list with the same logprob.
    assert all(next(iter(t)) == tok and abs(t[tok] - lp) < 1e-5
               for t, tok, lp in zip(tops, out.token_ids, lps, strict=True))


@pytest.mark.parametrize(("prompt", "kwargs", "param"), [
    ([], {}, "prompt"),
    (list(range(1, 90)) * 3, {}, "prompt"),
    ([1, 2, 3], {"max_tokens": 300}, "max_tokens"),
])
def test_bad_requests_name_the_parameter(tiny_model_dir: Path, prompt: list[int], kwargs: dict,
                                         param: str) -> None:
    engine = LLMEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=param):
        engine.add_request(prompt, SamplingParams(**kwargs))
    assert not engine.has_unfinished_requests()


def test_bad_request_in_a_batch_queues_nothing(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([PROMPTS[0], []], greedy())
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([PROMPTS[0]], greedy())[0].token_ids) == NEW_TOKENS


def test_abort_mid_generation_frees_blocks_and_spares_others(tiny_model_dir: Path,
                                                             reference: list[list[int]]) -> None:
    engine = LLMEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    keep = engine.add_request(PROMPTS[0], greedy())
    drop = engine.add_request(PROMPTS[2], greedy())
    for _ in range(3):
        engine.step()
    assert engine.abort(drop)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    assert results[drop].finish_reason == "abort"
    assert list(results[keep].token_ids) == reference[0]
    assert engine.block_manager.num_used_blocks == 0 or engine.config.enable_prefix_caching
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
