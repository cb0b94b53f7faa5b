"""Model-path safety: a model argument is an existing path, a preset or a well-formed Hub id, and nothing else
reaches the filesystem or the Hub (exit 2 at the CLI); a request's `model` that looks like a path is refused
with 400 in OpenAI's shape (only ever compared with the served name, never opened)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from test_errors import assert_openai_error

from r1deploy.cli import main
from r1deploy.errors import UsageError
from r1deploy.models.model_names import check_model_source, is_repo_id
from r1deploy.presets import PRESET_DIR, preset_path, resolve_config_path

ODD_HUB_IDS = ["org/na me", "org/naïve", "org/name.", "-org/name", "org/" + "a" * 97, "a/b/c", "org/name\n",
               "org/na;me", "org//name"]


@pytest.mark.parametrize("model", ["org/../x", "../no/such/model", "/no/such/model", *ODD_HUB_IDS])
def test_serve_refuses_a_model_that_is_no_path_preset_or_hub_id(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--device", "cpu", "--", model]) == 2
    err = capsys.readouterr().err
    assert f"unknown model {model!r}" in err and len(err.strip().splitlines()) == 1, err


def test_a_preset_name_never_reaches_outside_the_presets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A config.json planted where PRESET_DIR/<name>.json would point for a name with '..' in it.
    (tmp_path / "planted.json").write_text((PRESET_DIR / "r1-distill-qwen-1.5b.json").read_text())
    name = os.path.relpath(tmp_path / "planted", PRESET_DIR)
    assert ".." in name and not Path(name).exists()
    assert preset_path(name) is None
    with pytest.raises(UsageError, match="unknown model"):
        resolve_config_path(name)
    assert main(["serve", name, "--load-format", "dummy", "--device", "cpu"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_paths_presets_and_hub_ids_pass(tmp_path: Path) -> None:
    for model in (None, str(tmp_path), "r1", "deepseek-ai/DeepSeek-R1", "Qwen/Qwen2.5-0.5B-Instruct", "a_b/c.d-1"):
        check_model_source(model)
    assert is_repo_id("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert not any(is_repo_id(m) for m in ODD_HUB_IDS)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a\tb", "~root", "x" * 300])
def test_served_model_name_that_looks_like_a_path_exits_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--served-model-name", name, "--device", "cpu"]) == 2
    assert "--served-model-name" in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc/passwd", "tiny/../tiny", "C:\\models\\x", "a\u0000b",
                                   "x" * 300])
async def test_api_refuses_a_path_like_model_with_400(client: httpx.AsyncClient, route: str, model: str) -> None:
    body = {"model": model, "max_tokens": 1, **({"prompt": "the"} if route == "completions" else
                                                 {"messages": [{"role": "user", "content": "the"}]})}
    error = assert_openai_error(await client.post(f"/v1/{route}", json=body), 400, param="model")
    assert error["code"] == "invalid_model_name"


@pytest.mark.anyio
async def test_api_still_answers_404_for_another_models_name(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "deepseek-ai/DeepSeek-R1", "prompt": "the", "max_tokens": 1})
    assert assert_openai_error(r, 404, param="model")["code"] == "model_not_found"
