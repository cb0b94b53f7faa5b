"""Structured output in the sampler and the engine: the batch bitmask and logit_bias on hand-built logits;
grammars in the overlapped engine (kept synchronous, exact masks), starting after </think> when asked."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import xgrammar as xgr

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig
from r1deploy.layers.sampler import Sampler, SamplingBatch
from r1deploy.sampling_params import SamplingParams
from r1deploy.structured import StructuredOutputsParams

VOCAB = 70


def batch(params: list[SamplingParams], bitmask: torch.Tensor | None = None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, [[1]] * n, [[]] * n, [None] * n, VOCAB, "cpu", token_bitmask=bitmask)


def only(allowed: list[set[int]]) -> torch.Tensor:
    bitmask = xgr.allocate_token_bitmask(len(allowed), VOCAB)
    bitmask.zero_()
    for row, tokens in enumerate(allowed):
        for t in tokens:
            word = int(bitmask[row, t // 32]) | (1 << (t % 32))
            bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 two's complement
    return bitmask


def test_bitmask_limits_greedy_and_sampled_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    allowed = [{5, 40}, {33, 63}, set(range(VOCAB))]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0)]
    for _ in range(20):
        out = Sampler()(logits, batch(params, only(allowed)))
        tokens = out.token_ids.tolist()
        assert tokens[0] == max(allowed[0], key=lambda t: logits[0, t]) and tokens[1] in allowed[1]
        assert tokens[2] == int(logits[2].argmax())  # an unconstrained row is untouched
    # logprobs stay the model's raw ones, as without a mask
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))


def test_logit_bias_moves_and_removes_tokens() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 5.0
    out = Sampler()(logits, batch([SamplingParams(temperature=0, logit_bias={7: -100, 9: 3.0}),
                                   SamplingParams(temperature=0)]))
    assert out.token_ids.tolist() == [9, 7]  # the bias is per row
    for _ in range(20):  # sampled: a -100 token never comes back
        sampled = Sampler()(logits[:1], batch([SamplingParams(temperature=1.0, logit_bias={7: -100})]))
        assert sampled.token_ids.item() != 7


def test_logit_bias_bounds() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    """The server tests' tiny Llama with a word-level tokenizer: tokens are whole words ("▁cat")."""
    spec = importlib.util.spec_from_file_location("server_tiny", Path(__file__).parents[1] / "server" / "tiny.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    path = module.save_tiny_model_dir(tmp_path_factory.mktemp("tiny_structured"))
    return LLMEngine(str(path), config=EngineConfig(num_gpu_blocks_override=64, max_model_len=128))


PATTERN = "▁(cat|dog)(▁(red|blue)){1,4}"  # the tiny vocabulary's words carry the Metaspace mark


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> tuple[list, list[bool]]:
    """Finished outputs in request order, and per launched step whether it overlapped the step before
    (launched with that step's samples still on the device)."""
    launch = engine.executor.execute
    overlapped: list[bool] = []

    def recording(model_input, previous):
        overlapped.append(previous is not None)
        return launch(model_input, previous)

    engine.executor.execute = recording
    try:
        ids = [engine.add_request(prompt, params) for prompt, params in requests]
        finished = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0]
    finally:
        del engine.executor.execute
    return [finished[i] for i in ids], overlapped


def test_grammar_in_the_overlapped_engine(engine: LLMEngine) -> None:
    assert engine.async_scheduling
    regex = StructuredOutputsParams(regex=PATTERN)
    requests = [([1, 7, 8 + s], SamplingParams(max_tokens=12, seed=s, structured_outputs=regex)) for s in range(4)]
    outs, overlapped = run(engine, [*requests, ([1, 9], SamplingParams(max_tokens=6, seed=1, ignore_eos=True))])
    for out in outs[:4]:
        assert out.error is None and out.finish_reason == "stop"
        assert re.fullmatch(r"(cat|dog)( (red|blue)){1,4}", out.text), out.text
    assert outs[4].finish_reason == "length"  # unconstrained, in the same batches
    assert not any(overlapped)  # structured requests keep every step synchronous
    _, alone = run(engine, [([1, 9], SamplingParams(max_tokens=6, seed=1, ignore_eos=True))])
    assert any(alone)  # without them the engine overlaps again


def test_constraint_starts_after_think(engine: LLMEngine) -> None:
    think_end = engine.tokenizer.convert_tokens_to_ids("</think>")
    forced = {think_end: 100.0}  # the free-running thought ends at once
    spec = StructuredOutputsParams(regex=PATTERN, after_reasoning=True)
    [out], _ = run(engine, [([1, 7], SamplingParams(max_tokens=12, seed=0, logit_bias=forced, structured_outputs=spec))])
    assert out.token_ids[0] == think_end and re.fullmatch(r"</think> ?(cat|dog)( (red|blue)){1,4}", out.text), out.text
    # A prompt that already closed the thought: the grammar holds from the first token (</think> is masked).
    [out], _ = run(engine, [([1, 3, 4], SamplingParams(max_tokens=12, seed=0, logit_bias=forced,
                                                        structured_outputs=spec))])
    assert think_end not in out.token_ids and re.fullmatch(r"(cat|dog)( (red|blue)){1,4}", out.text), out.text


def test_compile_errors_and_cache(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="regex"):
        engine.grammars.compile(StructuredOutputsParams(regex="(["))
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert engine.grammars.compile(spec) is not None
    assert StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}) == spec
