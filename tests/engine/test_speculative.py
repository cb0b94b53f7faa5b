"""Multi-token steps: n-gram speculation verified in one forward of 1 + k tokens per sequence gives exactly the
greedy tokens of a plain run, under batching, chunked prefill, prefix hits, preemption and abort, and its
rollbacks leave the block pool and the prefix cache as a plain run leaves them."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1deploy.engine.block_manager import BlockManager
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.request import Request
from r1deploy.engine_config import EngineConfig, SpeculativeConfig
from r1deploy.sampling_params import SamplingParams
from r1deploy.spec.ngram import NgramProposer

# Repetitive prompts: prompt lookup finds matches at once, and random tiny models tend to loop as well.
PROMPTS = [[5, 9, 13, 5, 9, 13, 5, 9], [7] * 19, list(range(10, 30)) + list(range(10, 20)), [3, 4, 3, 4, 3]]
NEW_TOKENS = 14
NGRAM = SpeculativeConfig("ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)


def generate(engine: LLMEngine, prompts: list[list[int]], abort_after: int | None = None) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == abort_after:
            engine.abort(ids[0])
    return {i: done[i] for i in ids}


def make_engine(model_dir: Path, **config: object) -> LLMEngine:
    return LLMEngine(str(model_dir), config=EngineConfig(**config), device="cpu", dtype="float32")


CASES = {
    "batched": {},
    "chunked": {"max_num_batched_tokens": 7, "block_size": 4},
    "preempted": {"num_gpu_blocks_override": 14, "block_size": 4},
}


@pytest.mark.parametrize("case", CASES)
def test_ngram_speculation_equals_plain_greedy(tiny_model_dir: Path, case: str) -> None:
    plain = make_engine(tiny_model_dir, **CASES[case])
    spec = make_engine(tiny_model_dir, speculative=NGRAM, **CASES[case])
    # Twice: the second round hits the prefix cache that the first (with its rollbacks) left behind.
    for _ in range(2):
        assert list(generate(spec, PROMPTS).values()) == list(generate(plain, PROMPTS).values())
    assert not spec.async_scheduling
    assert spec.spec_stats.num_accepted_tokens > 0 and spec.spec_stats.num_draft_tokens > 0
    assert spec.spec_stats.num_accepted_tokens < spec.spec_stats.num_draft_tokens  # rejections rolled back too
    assert spec.block_manager.num_prefix_hits > 0
    if case == "preempted":
        assert spec.scheduler.num_preemptions > 0
    for engine in (plain, spec):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if case != "preempted":  # without evictions both runs leave the same full blocks findable
        assert set(spec.block_manager.hash_to_block) == set(plain.block_manager.hash_to_block)


def test_abort_in_the_middle_of_a_speculation_frees_everything(tiny_model_dir: Path) -> None:
    spec = make_engine(tiny_model_dir, speculative=NGRAM, block_size=4)
    plain = make_engine(tiny_model_dir, block_size=4)
    got = generate(spec, PROMPTS, abort_after=3)
    expected = generate(plain, PROMPTS)
    assert list(got.values())[1:] == list(expected.values())[1:]
    aborted = list(got.values())[0]
    assert 0 < len(aborted) < NEW_TOKENS and aborted == list(expected.values())[0][:len(aborted)]
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_ngram_proposer_takes_the_longest_latest_match() -> None:
    proposer = NgramProposer(num_speculative_tokens=3, min_n=1, max_n=3)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # latest match of [1, 2, 3]
    assert proposer.propose([4, 5, 6, 5], 3) == [6, 5]  # only [5] matches; what follows runs out
    assert proposer.propose([1, 2, 3], 3) == []
    assert proposer.propose([1, 2, 1, 2, 1, 2], 1) == [1]


def test_trim_returns_blocks_and_keeps_registered_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    request = Request("a", list(range(6)), SamplingParams(max_tokens=8), 8)
    bm.allocate(request, 6)
    request.num_computed_tokens = 6
    bm.register_full_blocks(request)
    bm.allocate(request, 5)  # a verify step: 1 + 4 tokens up to position 10, three blocks
    request.num_computed_tokens = 11
    assert len(request.block_table) == 3 and bm.num_free_blocks == 5
    bm.trim(request, 7)  # two drafts rejected: positions 7..10 go
    assert len(request.block_table) == 2 and bm.num_free_blocks == 6 and request.num_computed_tokens == 7
    assert bm.blocks[request.block_table[0]].hash is not None
    with pytest.raises(AssertionError):
        bm.trim(request, 3)  # would drop the registered first block


def test_speculative_config_takes_vllm_json_and_refuses_the_rest(tiny_model_dir: Path) -> None:
    from r1deploy.engine.llm import LLM

    assert SpeculativeConfig.of('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}') == \
        SpeculativeConfig("ngram", 2, prompt_lookup_max=3)
    for bad, reason in (('{"method": "eagle", "num_speculative_tokens": 1}', "method"),
                        ('{"method": "ngram"}', "num_speculative_tokens"), ("{oops", "JSON"),
                        ('{"method": "ngram", "num_speculative_tokens": 1, "draft": 1}', "unknown keys")):
        with pytest.raises(ValueError, match=reason):
            SpeculativeConfig.of(bad)
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32",
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    plain = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert llm.engine.proposer is not None
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in plain.generate(PROMPTS, params)]


def test_sampling_with_speculation_keeps_the_target_distribution(tmp_path: Path) -> None:
    """Two-sample chi-square over the four sampled tokens of 1,500 requests each way, on a 5-token vocabulary
    (625 outcomes, pooled where counts are small). The threshold is the statistic's
    99.9% quantile (Wilson-Hilferty), so a correct engine fails this test once in a thousand seeds; the seeds
    here are fixed, so the outcome is deterministic."""
    import math
    from collections import Counter

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=4, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data.normal_(0, 0.5)  # peaked enough that drafts are often right, not so peaked that all are
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    n = 1500

    class NextTokenProposer:
        """A drafter that is right about a fifth of the time on its own: token + 1, token + 2, ..."""

        num_speculative_tokens = 3

        def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
            return [(token_ids[-1] + i) % 5 for i in range(1, max_tokens + 1)]

    def outcomes(**config: object) -> tuple[Counter, LLMEngine]:
        engine = make_engine(tmp_path, max_num_seqs=256, **config)
        if engine.proposer is not None:
            engine.proposer = NextTokenProposer()
        for seed in range(n):
            engine.add_request(prompt, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=seed))
        counts: Counter = Counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    counts[tuple(out.outputs[0].token_ids)] += 1
        return counts, engine

    plain, _ = outcomes()
    spec, engine = outcomes(speculative=NGRAM)
    stats = engine.spec_stats
    assert stats.num_accepted_tokens > 0.1 * n  # the verify path decided many tokens, and rejected many
    assert stats.num_draft_tokens - stats.num_accepted_tokens > 0.1 * n
    assert sum(plain.values()) == sum(spec.values()) == n
    # Pool outcomes rarer than 10 in the plain run into one bin.
    common = [k for k in plain if plain[k] >= 10]
    bins = [(plain[k], spec[k]) for k in common]
    bins.append((n - sum(a for a, _ in bins), n - sum(b for _, b in bins)))
    statistic = sum((a - b) ** 2 / (a + b) for a, b in bins if a + b)
    dof = len(bins) - 1
    z = 3.090  # the normal's 99.9% quantile
    threshold = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert statistic < threshold, (statistic, threshold, dof)
