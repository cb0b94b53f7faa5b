"""The oracle drafter (tests and benchmarks only): it proposes the target's own greedy continuation, corrupted
per position with probability 1 - acceptance; the engine's counters then show that acceptance, and greedy output
stays the plain run's token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, SpeculativeConfig
from r1deploy.sampling_params import SamplingParams
from r1deploy.spec import make_proposer
from r1deploy.spec.oracle import OracleProposer
from r1deploy.spec.stats import SpecStats

PROMPTS = [[5, 9, 13, 5, 9], [7, 8, 9, 10, 11, 12], [3, 4, 3, 4, 3, 20, 21]]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def oracle_engine(model_dir: Path, references: dict, acceptance: float | list[float], k: int = 3) -> LLMEngine:
    spec = SpeculativeConfig.of({"method": "oracle", "num_speculative_tokens": k, "acceptance": acceptance,
                                 "references": [[p, o] for p, o in references.items()], "seed": 0})
    return LLMEngine(str(model_dir), config=EngineConfig(speculative=spec), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path) -> dict[tuple[int, ...], tuple[int, ...]]:
    plain = LLMEngine(str(tiny_model_dir), config=EngineConfig(), device="cpu", dtype="float32")
    return {tuple(p): out for p, out in zip(PROMPTS, greedy(plain, PROMPTS), strict=True)}


@pytest.mark.parametrize("acceptance", [1.0, 0.0])
def test_oracle_acceptance_shows_in_the_counters_and_greedy_is_unchanged(
        tiny_model_dir: Path, references: dict, acceptance: float) -> None:
    engine = oracle_engine(tiny_model_dir, references, acceptance)
    assert greedy(engine, PROMPTS) == list(references.values())
    stats = engine.spec_stats
    assert stats.num_drafts > 0 and len(stats.acceptance_per_position) == 3
    assert stats.acceptance_per_position == [acceptance] * 3
    assert stats.num_verify_steps > 0 and stats.verify_s > 0 and stats.draft_s > 0
    if acceptance == 1.0:  # 3 drafts + the target's token per step, but fewer drafts fit near max_tokens
        assert 3.0 < stats.mean_accepted_length <= 4.0
    else:
        assert stats.mean_accepted_length == 1.0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_oracle_corrupts_each_position_at_its_rate_deterministically() -> None:
    reference = tuple(range(10, 2010))
    oracle = OracleProposer(2, {(1, 2): reference}, (0.8, 0.5), vocab_size=5000, seed=7)
    right = [0, 0]
    for generated in range(2000 - 2):
        drafts = oracle.propose([1, 2, *reference[:generated]], 2)
        assert drafts == oracle.propose([1, 2, *reference[:generated]], 2)  # seeded by prompt and position
        for i, token in enumerate(drafts):
            right[i] += token == reference[generated + i]
    assert abs(right[0] / 1998 - 0.8) < 0.04 and abs(right[1] / 1998 - 0.5) < 0.04
    other_seed = OracleProposer(2, {(1, 2): reference}, (0.8, 0.5), vocab_size=5000, seed=8)
    assert any(other_seed.propose([1, 2, *reference[:g]], 2) != oracle.propose([1, 2, *reference[:g]], 2)
               for g in range(50))
    assert oracle.propose([3, 3, 3], 2) == []  # a prompt it was not given
    assert oracle.propose([1, 2, *reference], 2) == []  # past the reference's end
    assert len(oracle.propose([1, 2], 1)) == 1


def test_oracle_runs_its_inner_proposer_for_the_cost_only() -> None:
    class Counting:
        num_speculative_tokens = 2
        calls = 0

        def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
            Counting.calls += 1
            return [99, 99]

    oracle = OracleProposer(2, {(1,): (4, 5, 6)}, (1.0, 1.0), vocab_size=100, inner=Counting())
    assert oracle.propose([1, 4], 2) == [5, 6] and Counting.calls == 1
    config = SpeculativeConfig("oracle", 2, acceptance=(1.0,), references={(1,): (4, 5)}, inner="ngram")
    built = make_proposer(config, 100)
    assert isinstance(built, OracleProposer) and built.inner is not None and built.inner.num_speculative_tokens == 2


def test_oracle_config_is_checked() -> None:
    config = SpeculativeConfig.of('{"method": "oracle", "num_speculative_tokens": 3, "acceptance": [0.85, 0.7, 0.55],'
                                  ' "references": [[[1, 2], [3, 4, 5]]], "seed": 3}')
    assert config.acceptance == (0.85, 0.7, 0.55) and config.references == {(1, 2): (3, 4, 5)}
    assert SpeculativeConfig("oracle", 2, acceptance=0.8, references={}).acceptance == (0.8, 0.8)
    for bad, reason in (({"acceptance": [0.5, 0.5]}, "acceptance"), ({"acceptance": 1.5}, "acceptance"),
                        ({"references": None}, "references .* are required"), ({"references": [[1, 2]]}, "references"),
                        ({"inner": "oracle"}, "inner")):
        options = {"method": "oracle", "num_speculative_tokens": 3, "acceptance": 0.5, "references": [], **bad}
        with pytest.raises(ValueError, match=reason):
            SpeculativeConfig.of(options)
    with pytest.raises(ValueError, match="options of method 'oracle'"):
        SpeculativeConfig("ngram", 2, acceptance=(0.5,))


def test_spec_stats_subtract_into_one_phase() -> None:
    stats = SpecStats()
    stats.record(3, 3)
    before = stats.snapshot()
    stats.record(3, 1)
    stats.record(2, 0)
    stats.record_verify_step(0.5)
    phase = stats.since(before)
    assert (phase.num_drafts, phase.num_draft_tokens, phase.num_accepted_tokens) == (2, 5, 1)
    assert phase.proposed_per_position == [2, 2, 1] and phase.accepted_per_position == [1, 0, 0]
    assert phase.acceptance_per_position == [0.5, 0.0, 0.0] and phase.mean_accepted_length == 1.5
    assert phase.summary()["verify_ms_per_verify_step"] == 500.0
    later = stats.snapshot()
    stats.record(1, 1)  # a phase of k = 1 after k = 3: only position 0
    assert stats.since(later).acceptance_per_position == [1.0]
