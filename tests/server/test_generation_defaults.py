"""Generation defaults from generation_config.json (vLLM's --generation-config / --override-generation-config):
applied to what a request (or LLM.generate without SamplingParams) leaves unset, never to what it sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from server_harness import running_app, tiny_engine, wait_for_phase

from r1deploy.cli import main
from r1deploy.engine.generation_defaults import generation_defaults
from r1deploy.engine.llm import LLM
from r1deploy.errors import UsageError
from r1deploy.sampling_params import SamplingParams
from r1deploy.server.state import Phase

MODEL_DEFAULTS = {"temperature": 0.25, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repetition_penalty": 1.1,
                  "max_new_tokens": 4, "do_sample": True}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generation")
    (folder / "generation_config.json").write_text(json.dumps(MODEL_DEFAULTS))
    return folder


def test_r1_presets_carry_deepseeks_recommendation() -> None:
    for name in ("r1", "deepseek-ai/DeepSeek-R1", "r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"):
        assert generation_defaults("auto", None, name) == {"temperature": 0.6, "top_p": 0.95}, name
    assert generation_defaults("vllm", None, "r1") == {} and generation_defaults("none", None, "r1") == {}
    assert generation_defaults("auto", None, "v3") == {}


def test_sources_and_overrides(config_dir: Path, tmp_path: Path) -> None:
    expected = {"temperature": 0.25, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repetition_penalty": 1.1,
                "max_tokens": 4}
    assert generation_defaults("auto", config_dir, "x") == expected
    assert generation_defaults(str(config_dir), None, "r1") == expected  # a folder wins over the preset
    assert generation_defaults("auto", config_dir, "x", {"temperature": 0.9, "max_new_tokens": 8}) == {
        **expected, "temperature": 0.9, "max_tokens": 8}
    assert generation_defaults("vllm", config_dir, "x", {"top_k": 3}) == {"top_k": 3}
    with pytest.raises(UsageError, match="--generation-config"):
        generation_defaults(str(tmp_path), None, "x")
    with pytest.raises(UsageError, match="--override-generation-config: unknown field.*do_samples"):
        generation_defaults("auto", None, "x", {"do_samples": True})
    with pytest.raises(UsageError, match="--override-generation-config.*temperature"):
        generation_defaults("auto", None, "x", {"temperature": -1})


@pytest.mark.parametrize(("flags", "message"), [
    (["--override-generation-config", "{temperature: 1"], "--override-generation-config: not valid JSON"),
    (["--override-generation-config", "[1]"], "--override-generation-config: expected a JSON object"),
])
def test_serve_flag_errors_exit_2(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


def _spy(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    seen: list[SamplingParams] = []
    make_request = engine.make_request

    def spy(prompt: Any, params: SamplingParams, *args: Any) -> Any:
        seen.append(params)
        return make_request(prompt, params, *args)

    monkeypatch.setattr(engine, "make_request", spy)
    return seen


@pytest.mark.anyio
async def test_server_fills_only_unset_fields(tiny_dir: Path, config_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    load = lambda: tiny_engine(tiny_dir, generation_config=str(config_dir))
    async with running_app(tiny_dir, load=load) as running:
        await wait_for_phase(running.state, Phase.READY)
        seen = _spy(running.state.llm_engine, monkeypatch)
        chat = {"messages": [{"role": "user", "content": "hello"}]}
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "the cat"})):
            assert (await running.client.post(path, json=body)).status_code == 200
            p = seen[-1]
            assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (
                0.25, 0.5, 7, 0.1, 1.1, 4), path
        # Explicit values stay, even when they equal SamplingParams' own defaults; max_tokens is capped (vLLM).
        explicit = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 10}
        assert (await running.client.post("/v1/chat/completions", json={**chat, **explicit})).status_code == 200
        p = seen[-1]
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1.0, 1.0, 0, 0.1, 4)
        r = await running.client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "ignore_eos": True})
        assert seen[-1].max_tokens == 2 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.anyio
async def test_server_override_over_engine_defaults(tiny_dir: Path, config_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    load = lambda: tiny_engine(tiny_dir, generation_config="vllm",
                               override_generation_config={"temperature": 0.0, "max_new_tokens": 3})
    async with running_app(tiny_dir, load=load) as running:
        await wait_for_phase(running.state, Phase.READY)
        seen = _spy(running.state.llm_engine, monkeypatch)
        r = await running.client.post("/v1/completions", json={"prompt": "the", "ignore_eos": True})
        p = seen[-1]
        assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.0, 1.0, 0, 3)
        assert r.json()["usage"]["completion_tokens"] == 3


def test_llm_applies_defaults_without_sampling_params(tiny_dir: Path, config_dir: Path) -> None:
    llm = LLM(str(tiny_dir), device="cpu", max_model_len=64, num_gpu_blocks_override=16,
              generation_config=str(config_dir))
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.25, 7, 4)
    assert len(llm.generate("the cat")[0].token_ids) <= 4
    explicit = llm.generate("the cat", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(explicit.token_ids) == 6
    plain = LLM(str(tiny_dir), device="cpu", max_model_len=64, num_gpu_blocks_override=16)
    assert plain.get_default_sampling_params() == SamplingParams()  # the tiny model's file sets no sampling field
