"""Async scheduling (step N+1 launched before step N's tokens reach the host) produces exactly the tokens,
texts and finish reasons of the synchronous engine, on the same workloads, on the CPU, and exactly its
logprobs whenever the two run the same batches.

When a request ends early (stop token, EOS, stop string, abort) the overlapped engine has already
launched one more step with it (its token is discarded), so the other rows of that step run in a batch
of another size. The synchronous engine's own logprobs move by an ulp then (a CPU GEMM's rounding
depends on the batch size: 4.8e-7 measured on these models), so such workloads compare logprobs to 1e-5.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from r1deploy.engine.async_engine import AsyncLLMEngine
from r1deploy.engine.block_manager import chain_hash
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.outputs import RequestOutput
from r1deploy.engine_config import EngineConfig
from r1deploy.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4], list(range(20, 52)) + [60, 61]]
# One request arriving per engine step, with prompts 0..4 (index = step it arrives at).
Workload = list[tuple[int, list[int], SamplingParams]]


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server tests' tiny Llama with a word-level tokenizer (EOS = </s>, stop strings work)."""
    path = Path(__file__).parents[1] / "server" / "tiny.py"
    spec = importlib.util.spec_from_file_location("server_tiny", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.save_tiny_model_dir(tmp_path_factory.mktemp("tiny_text"))


def engine_for(model_dir: Path, async_scheduling: bool, **config: object) -> LLMEngine:
    config.setdefault("cpu_kv_cache_bytes", 16 << 20)  # 32k tokens of these models: plenty, quick to zero
    return LLMEngine(str(model_dir), config=EngineConfig(async_scheduling=async_scheduling, **config),
                     device="cpu", dtype="float32")


def drive(engine: LLMEngine, workload: Workload, abort_after: dict[str, int] | None = None
          ) -> dict[str, RequestOutput]:
    """Add each request at its step, step until everything (including an in-flight step) is done, and
    abort a request as soon as an output shows it has the given number of tokens."""
    abort_after = abort_after or {}
    results: dict[str, RequestOutput] = {}
    step = 0
    while step <= max(s for s, _, _ in workload) or engine.has_unfinished_requests():
        for i, (arrive, prompt, params) in enumerate(workload):
            if arrive == step:
                engine.add_request(prompt, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
            elif len(out.outputs[0].token_ids) >= abort_after.get(out.request_id, 1 << 30):
                assert engine.abort(out.request_id)
        step += 1
    check_engine_is_clean(engine, results)
    return results


def check_engine_is_clean(engine: LLMEngine, results: dict[str, RequestOutput]) -> None:
    """Every block is free, no placeholder is left, and the prefix cache hashed only real tokens."""
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert engine._in_flight is None and not engine.requests
    real: set[int] = set()
    for out in results.values():
        seq = [*out.prompt_token_ids, *out.outputs[0].token_ids]
        parent = None
        for i in range(len(seq) // bm.block_size):
            parent = chain_hash(parent, tuple(seq[i * bm.block_size:(i + 1) * bm.block_size]))
            real.add(parent)
    assert set(bm.hash_to_block) <= real


def summary(results: dict[str, RequestOutput]) -> dict[str, tuple]:
    """Everything but the logprobs, which the two engines must agree on exactly, per request."""
    return {rid: (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.metrics.num_cached_tokens,
                  None if c.top_logprobs is None else [list(t) for t in c.top_logprobs])
            for rid, out in results.items() for c in [out.outputs[0]]}


def logprobs(results: dict[str, RequestOutput]) -> dict[str, list[float]]:
    """Sampled-token and top-N logprobs of every request, flattened."""
    return {rid: [*(c.logprobs or ()), *(lp for t in c.top_logprobs or () for lp in t.values())]
            for rid, out in results.items() for c in [out.outputs[0]]}


def assert_same(got: dict[str, RequestOutput], expected: dict[str, RequestOutput], logprob_tol: float) -> None:
    assert summary(got) == summary(expected)
    if logprob_tol == 0.0:
        assert logprobs(got) == logprobs(expected)
    else:
        assert logprobs(got) == {rid: pytest.approx(lps, abs=logprob_tol) for rid, lps in logprobs(expected).items()}


def same_both_ways(model_dir: Path, workload: Workload, abort_after: dict[str, int] | None = None,
                   logprob_tol: float = 0.0, **config: object) -> dict[str, RequestOutput]:
    sync = drive(engine_for(model_dir, False, **config), workload, abort_after)
    overlapped = drive(engine_for(model_dir, True, **config), workload, abort_after)
    assert_same(overlapped, sync, logprob_tol)
    assert len(sync) == len(workload)
    return sync


def greedy(max_tokens: int = 12, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **kwargs)


def seeded(seed: int, max_tokens: int = 12, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True, logprobs=1, **kwargs)


def staggered(params: list[SamplingParams]) -> Workload:
    return [(i, PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(params)]


def together(params: list[SamplingParams]) -> Workload:
    return [(0, PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(params)]


def test_greedy_and_max_tokens(tiny_model_dir: Path) -> None:
    out = same_both_ways(tiny_model_dir, together([greedy(n) for n in (1, 12, 5, 9, 2)]))
    assert [len(out[str(i)].outputs[0].token_ids) for i in range(5)] == [1, 12, 5, 9, 2]


def test_seeded_sampling_with_arrivals_at_different_steps(tiny_model_dir: Path) -> None:
    same_both_ways(tiny_model_dir, staggered([seeded(i, max_tokens=4 + 3 * i) for i in range(8)]))


def test_stop_tokens_and_min_tokens(tiny_model_dir: Path) -> None:
    # Stop on the tokens the synchronous engine emits at a few positions, so requests end mid-batch.
    free = {rid: out.outputs[0].token_ids
            for rid, out in drive(engine_for(tiny_model_dir, False), together([greedy() for _ in PROMPTS])).items()}
    params = [greedy(stop_token_ids=[free[str(i)][2 + i]]) for i in range(4)]
    # min_tokens = k lets the stop token through exactly at index k, k + 1 masks it there: a count that
    # missed the token in flight, or counted it twice, would change the token at k.
    f = free["4"]
    k = next(k for k in range(2, len(f)) if f[k] not in f[:k])
    params += [greedy(stop_token_ids=[f[k]], min_tokens=k), greedy(stop_token_ids=[f[k]], min_tokens=k + 1)]
    workload = together(params)
    workload[5] = (0, PROMPTS[4], params[5])
    out = same_both_ways(tiny_model_dir, workload, logprob_tol=1e-5)
    assert [out[str(i)].outputs[0].finish_reason for i in range(5)] == ["stop"] * 5
    assert out["4"].outputs[0].token_ids == f[:k + 1] and out["5"].outputs[0].token_ids[k] != f[k]


def test_eos_and_stop_strings(text_model_dir: Path) -> None:
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, logprobs=0) for s in range(6)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=40, stop=["the", "a"]) for s in range(6)]
    out = same_both_ways(text_model_dir, staggered(params), logprob_tol=1e-5)
    reasons = {out[str(i)].outputs[0].finish_reason for i in range(len(params))}
    assert "stop" in reasons


def test_abort_mid_run(tiny_model_dir: Path) -> None:
    out = same_both_ways(tiny_model_dir, staggered([greedy(), seeded(1), greedy(), seeded(2)]),
                         abort_after={"1": 3, "2": 1}, logprob_tol=1e-5)
    assert [out[str(i)].outputs[0].finish_reason for i in range(4)] == ["length", "abort", "abort", "length"]


def test_preemption(tiny_model_dir: Path) -> None:
    workload = together([greedy(), seeded(3), greedy(), seeded(4), greedy()])
    same_both_ways(tiny_model_dir, workload, block_size=4, num_gpu_blocks_override=14)
    engine = engine_for(tiny_model_dir, True, block_size=4, num_gpu_blocks_override=14)
    drive(engine, workload)
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_and_prefix_cache_hits(tiny_model_dir: Path) -> None:
    shared = list(range(20, 52))
    workload = [(0, shared + [60, 61], greedy()), (3, shared + [70], seeded(5)), (6, shared + [60, 61], greedy()),
                (6, PROMPTS[1], seeded(6))]
    out = same_both_ways(tiny_model_dir, workload, max_num_batched_tokens=5, block_size=4)
    assert out["2"].outputs[0].metrics.num_cached_tokens == 32


def test_penalties_fall_back_to_synchronous_steps(tiny_model_dir: Path) -> None:
    params = [seeded(7, repetition_penalty=1.3, presence_penalty=0.5), greedy(), seeded(8),
              greedy(frequency_penalty=0.7), seeded(9)]
    same_both_ways(tiny_model_dir, staggered(params))


def test_async_llm_engine_streams(tiny_model_dir: Path) -> None:
    workload = staggered([greedy(), seeded(1), greedy(stop_token_ids=[3]), seeded(2, max_tokens=3)])
    expected = drive(engine_for(tiny_model_dir, False), workload)

    async def run_all() -> dict[str, RequestOutput]:
        engine = AsyncLLMEngine(engine_for(tiny_model_dir, True))

        async def one(i: int, prompt: list[int], params: SamplingParams) -> RequestOutput:
            await asyncio.sleep(0.01 * i)
            async for out in engine.generate(prompt, params, request_id=str(i)):
                last = out
            return last

        try:
            outs = await asyncio.gather(*(one(i, p, params) for i, (_, p, params) in enumerate(workload)))
        finally:
            engine.shutdown()
        return {o.request_id: o for o in outs}

    assert_same(asyncio.run(run_all()), expected, logprob_tol=1e-5)  # arrivals at other steps


def test_shutdown_frees_the_kv_cache(tiny_model_dir: Path) -> None:
    """A second engine built around the same model in one process needs the first one's cache back at once."""
    import weakref

    engine = engine_for(tiny_model_dir, True)
    drive(engine, together([greedy(4)]))
    cache = weakref.ref(engine.runner.kv_caches[0])
    engine.shutdown()
    assert engine.runner.kv_caches == [] and engine.runner.graphs is None
    assert cache() is None  # nothing else held the cache tensors
