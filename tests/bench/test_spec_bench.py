"""The GPU benchmark's measurements (r1deploy/bench/spec_bench.py) on a tiny model on the CPU: the oracle's
speculative greedy equals plain greedy and its acceptance is what was asked; a verify-cost step verifies k drafts
per sequence; the engine is left plain and empty."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from r1deploy.bench.spec_bench import oracle_speedup, verify_step_cost
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    spec = importlib.util.spec_from_file_location(
        "engine_conftest", Path(__file__).parents[1] / "engine" / "conftest.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.save_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2")
    return LLMEngine(str(model), config=EngineConfig(enable_prefix_caching=False), device="cpu", dtype="float32")


@pytest.mark.parametrize("acceptance", [1.0, 0.0])
def test_oracle_speedup_checks_tokens_and_reports_the_acceptance(engine: LLMEngine, acceptance: float) -> None:
    row = oracle_speedup(engine, [[5, 9, 13, 5], [7, 8, 9, 10, 11]], 10, 2, (acceptance, acceptance), repeats=1)
    assert row["tokens_equal"] and row["first_mismatch"] is None
    assert row["spec"]["acceptance_per_position"] == [acceptance, acceptance]
    assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0 and row["speedup"] > 0
    assert engine.proposer is None and engine.async_scheduling and not engine.has_unfinished_requests()


def test_verify_step_cost_verifies_k_drafts_per_step(engine: LLMEngine) -> None:
    rows = verify_step_cost(engine, 3, (1, 2), prompt_len=6, steps=2)
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["drafts_per_sequence_step"] == 3.0 and row["plain_step_ms"] > 0 and row["verify_over_plain"] > 0
    assert engine.proposer is None and engine.async_scheduling and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
