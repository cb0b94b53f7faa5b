"""The real `python -m r1deploy serve org/name` with vLLM's flags, from a Hub-layout cache under HF_HOME with
HF_HUB_OFFLINE=1, driven by the real openai client: the flags reach the engine and the server end to end."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_util import serving
from tiny import save_tiny_model_dir

REPO = "tiny-org/tiny-chat"
REVISION = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny-org--tiny-chat"
    snapshot = save_tiny_model_dir(repo / "snapshots" / REVISION)
    (snapshot / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 8}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


def test_serve_a_hub_id_offline_with_vllm_flags(hf_home: Path) -> None:
    args = [REPO, "--max-model-len", "128", "--metrics-prefix", "vllm",
            "--override-generation-config", '{"max_new_tokens": 3}']
    with serving(args, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}) as (proc, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [REPO]  # served under the repo id, as vLLM does
        done = client.completions.create(model=REPO, prompt="the cat", extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 3  # the override's max_new_tokens over the file's 8
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/health").status_code == 200
            assert http.post("/tokenize", json={"prompt": "the cat"}).json()["count"] == 3
            text = http.get("/metrics").text
        samples = {(s.name, s.labels.get("finished_reason")): s for family in text_string_to_metric_families(text)
                   for s in family.samples if s.labels.get("model_name") == REPO}
        assert samples[("vllm:request_success_total", "length")].value == 1
        assert samples[("vllm:generation_tokens_total", None)].value == 3
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    for line in ("r1deploy.startup: config: ", "weights: shard 1/1, ", "r1deploy.startup: tokenizer: ",
                 "KV cache sizing and allocation: ", "server ready: "):
        assert line in log, line
