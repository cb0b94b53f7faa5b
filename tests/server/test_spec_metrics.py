"""/metrics with speculative decoding: vLLM's spec_decode_* counters (per position too), ours for proposals per
position, mean accepted length and draft/verify time; a tiny model with the oracle drafter at acceptance 1.0
shows 1.0 at every position, at 0.0 shows 0, and an engine without speculation exports none of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from r1deploy.bench.spec_report import parse_spec_metrics
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, SpeculativeConfig
from r1deploy.sampling_params import SamplingParams
from r1deploy.server.metrics import ServerMetrics

PROMPTS = [[5, 9, 13, 5, 9], [7, 8, 9, 10, 11, 12]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conftest = Path(__file__).parents[1] / "engine" / "conftest.py"
    spec = importlib.util.spec_from_file_location("engine_conftest", conftest)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def run(engine: LLMEngine) -> dict[tuple[int, ...], tuple[int, ...]]:
    ids = {engine.add_request(p, PARAMS): tuple(p) for p in PROMPTS}
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[ids[out.request_id]] = out.outputs[0].token_ids
    return outputs


def scrape(engine: LLMEngine) -> str:
    return ServerMetrics(lambda: engine, model_name=lambda: "tiny").render().decode()


@pytest.mark.parametrize("acceptance", [1.0, 0.0])
def test_spec_metrics_show_the_oracles_acceptance(model_dir: Path, acceptance: float) -> None:
    plain = LLMEngine(str(model_dir), device="cpu", dtype="float32")
    references = run(plain)
    assert "spec_decode" not in scrape(plain)
    oracle = SpeculativeConfig("oracle", 3, acceptance=(acceptance,), references=references)
    engine = LLMEngine(str(model_dir), config=EngineConfig(speculative=oracle), device="cpu", dtype="float32")
    assert run(engine) == references
    text = scrape(engine)
    for series in ('r1deploy:spec_decode_num_drafts_total{model_name="tiny"}',
                   'r1deploy:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="2"}',
                   'r1deploy:spec_decode_num_draft_tokens_per_pos_total{model_name="tiny",position="0"}',
                   'r1deploy:spec_decode_mean_accepted_length{model_name="tiny"}',
                   'r1deploy:spec_decode_draft_time_seconds_total', 'r1deploy:spec_decode_verify_time_seconds_total'):
        assert series in text
    stats = parse_spec_metrics(text)
    assert stats is not None and stats.num_drafts == engine.spec_stats.num_drafts > 0
    assert stats.acceptance_per_position == [acceptance] * 3
    assert stats.mean_accepted_length == pytest.approx(engine.spec_stats.mean_accepted_length)
    assert (stats.mean_accepted_length > 3.0) if acceptance else stats.mean_accepted_length == 1.0
    assert stats.verify_s > 0 and stats.num_verify_steps == engine.spec_stats.num_verify_steps
