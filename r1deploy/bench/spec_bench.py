"""Speculative decoding measured on one in-process engine (benchmarks/gpu_spec.py; its CPU smoke run in the tests):

- oracle_speedup: plain greedy first (its output is the reference continuation and the correctness bar), then the
  oracle drafter at a chosen acceptance; tokens must equal the plain run's, then output tok/s both ways.
- verify_step_cost: the wall time of one engine step that verifies 1 + k tokens per sequence against a plain
  1-token step, at several batch sizes, in steady decode.

One engine serves both sides (one set of weights, one KV pool, the CUDA graphs of every query length asked for in
EngineConfig.graph_query_lens): use_proposer switches it between plain and speculative runs.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from r1deploy.sampling_params import SamplingParams
from r1deploy.spec.oracle import OracleProposer

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine
    from r1deploy.spec import Proposer


def use_proposer(engine: LLMEngine, proposer: Proposer | None) -> None:
    """Speculative steps run synchronously (the next drafts need the verified tokens); plain steps overlap as the
    engine's config says. Call between runs, with no request in flight."""
    assert not engine.has_unfinished_requests(), "switch proposers between runs"
    engine.proposer = proposer
    engine.async_scheduling = (proposer is None and engine.config.async_scheduling
                               and not engine.config.parallel.dp_attention)


def _sync(engine: LLMEngine) -> None:
    if engine.runner.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def greedy_run(engine: LLMEngine, prompts: Sequence[Sequence[int]], new_tokens: int
               ) -> tuple[float, list[tuple[int, ...]]]:
    """All prompts at once, greedy, EOS ignored: seconds and each prompt's output ids."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    _sync(engine)
    started = time.perf_counter()
    ids = [engine.add_request(list(p), params) for p in prompts]
    done: dict[str, tuple[int, ...]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(final_only=True):
            done[out.request_id] = out.outputs[0].token_ids
    _sync(engine)
    return time.perf_counter() - started, [done[i] for i in ids]


def _first_mismatch(got: list[tuple[int, ...]], want: list[tuple[int, ...]]) -> int | None:
    """The first output position (over the concatenated outputs) where speculation differs; None: equal."""
    for g, w in zip(got, want, strict=True):
        for i, (a, b) in enumerate(zip(g, w, strict=False)):
            if a != b:
                return i
        if len(g) != len(w):
            return min(len(g), len(w))
    return None


def oracle_speedup(engine: LLMEngine, prompts: Sequence[Sequence[int]], new_tokens: int, k: int,
                   acceptance: Sequence[float], *, seed: int = 0, inner: Proposer | None = None,
                   repeats: int = 2) -> dict[str, Any]:
    """Output tok/s with the oracle drafter at `acceptance` against the same engine without speculation (median of
    `repeats` timed runs each, after one untimed run that warms up and gives the reference). The engine must run
    without prefix caching: a prompt served from the cache is a different (bf16-rounded) computation, so the
    token-for-token check would compare unlike runs."""
    if engine.block_manager.enable_prefix_caching:
        raise ValueError("oracle_speedup: build the engine with enable_prefix_caching=False")
    use_proposer(engine, None)
    _, reference = greedy_run(engine, prompts, new_tokens)
    plain_s = statistics.median(greedy_run(engine, prompts, new_tokens)[0] for _ in range(repeats))
    oracle = OracleProposer(k, {tuple(p): out for p, out in zip(prompts, reference, strict=True)},
                            tuple(acceptance), engine.model_config.vocab_size, seed, inner)
    use_proposer(engine, oracle)
    _, first = greedy_run(engine, prompts, new_tokens)  # warm-up (verify graphs, shapes) and the correctness check
    mismatch = _first_mismatch(first, reference)
    before = engine.spec_stats.snapshot()
    spec_s = statistics.median(greedy_run(engine, prompts, new_tokens)[0] for _ in range(repeats))
    stats = engine.spec_stats.since(before)
    use_proposer(engine, None)
    tokens = len(prompts) * new_tokens
    return {"batch": len(prompts), "new_tokens": new_tokens, "k": k, "acceptance": list(acceptance),
            "inner": None if inner is None else type(inner).__name__,
            "tokens_equal": mismatch is None, "first_mismatch": mismatch,
            "plain_tok_s": tokens / plain_s, "spec_tok_s": tokens / spec_s, "speedup": plain_s / spec_s,
            "spec": stats.summary()}


def verify_step_cost(engine: LLMEngine, k: int, batch_sizes: Sequence[int], *, prompt_len: int = 128,
                     steps: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Per batch size: the mean wall time of a plain decode step and of a step verifying 1 + k tokens per
    sequence (the oracle drafting k random tokens, which the target rejects: each step verifies exactly k drafts),
    both synchronous, in steady decode at the same context lengths."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    rows = []
    for batch in batch_sizes:
        prompts = [tuple(rng.randrange(vocab) for _ in range(prompt_len)) for _ in range(batch)]
        drafts = OracleProposer(k, {p: tuple(rng.randrange(vocab) for _ in range(4 * steps * (k + 1)))
                                    for p in prompts}, (1.0,) * k, vocab)
        use_proposer(engine, None)
        engine.async_scheduling = False  # both sides synchronous: the ratio is the step's, not the overlap's
        plain_ms = _steady_step_ms(engine, prompts, steps)
        use_proposer(engine, drafts)
        before = engine.spec_stats.snapshot()
        verify_ms = _steady_step_ms(engine, prompts, steps)
        verified = engine.spec_stats.since(before)
        use_proposer(engine, None)
        rows.append({"batch": batch, "k": k, "plain_step_ms": plain_ms, "verify_step_ms": verify_ms,
                     "verify_over_plain": verify_ms / plain_ms,
                     "drafts_per_sequence_step": verified.num_draft_tokens / max(1, verified.num_drafts)})
    return rows


def _steady_step_ms(engine: LLMEngine, prompts: Sequence[Sequence[int]], steps: int) -> float:
    """Mean ms of `steps` engine steps once every request decodes (prefill done, two steps of warm-up); the
    requests are aborted afterwards."""
    params = SamplingParams(temperature=0.0, max_tokens=8 * steps + 64, ignore_eos=True)
    ids = [engine.add_request(list(p), params) for p in prompts]
    while any(engine.requests[i].num_output_tokens == 0 for i in ids):
        engine.step(final_only=True)
    for _ in range(2):
        engine.step(final_only=True)
    _sync(engine)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step(final_only=True)
    _sync(engine)
    elapsed = time.perf_counter() - started
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step(final_only=True)
    return elapsed * 1e3 / steps
