"""The real `python -m r1deploy serve` under uvicorn in a subprocess, on loopback: drain and exit 0 on
SIGTERM, clean logs, and a clear non-zero exit when the model does not fit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
from serve_util import SLOW_STEPS, free_port, serving, start

TINY = ["--max-model-len", "128"]


def test_sigterm_drains_in_flight_then_exits_0(tiny_dir: Path) -> None:
    # 20 ms per step: a 60-token request is surely still running when SIGTERM arrives.
    env = {"PYTHONPATH": os.pathsep.join([str(SLOW_STEPS), os.environ.get("PYTHONPATH", "")]),
           "R1DEPLOY_TEST_STEP_S": "0.02"}
    with serving([str(tiny_dir), *TINY, "--log-level", "warning"], env) as (proc, base):
        with httpx.Client(base_url=base, timeout=30) as client:
            long_body = {"prompt": [1, 7], "max_tokens": 60, "n": 2, "ignore_eos": True}
            result: dict[str, httpx.Response] = {}
            worker = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions", json=long_body)))
            worker.start()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            with httpx.Client(base_url=base, timeout=5) as fresh:
                assert fresh.get("/health/ready").status_code == 503  # draining
                assert fresh.post("/v1/completions", json={"prompt": "the"}).status_code == 503
            worker.join(30)
            assert result["r"].status_code == 200  # the in-flight request finished
            assert all(c["finish_reason"] == "length" for c in result["r"].json()["choices"])
        assert proc.wait(30) == 0, proc.stdout.read() if proc.stdout else ""


def test_default_logs_hold_no_prompt_completion_or_key(tiny_dir: Path) -> None:
    secret_prompt, key = "hello world cat dog bird", "sk-test-0123456789"
    with serving([str(tiny_dir), *TINY, "--api-key", key]) as (proc, base):  # default log level: info
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            r = client.post("/v1/completions", json={"prompt": secret_prompt, "max_tokens": 8, "ignore_eos": True})
            completion = r.json()["choices"][0]["text"]
            client.post("/v1/completions", json={"prompt": secret_prompt, "temperature": -1})  # an error too
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert "POST /v1/completions" in output  # the access log is on, and shows no body
    assert "curl http://127.0.0.1" in output and "from openai import OpenAI" in output
    for secret in (secret_prompt, completion.strip(), key):
        assert secret not in output, secret


def _fails_fast(args: list[str], message: str) -> None:
    began = time.monotonic()
    proc = start(args, free_port())
    try:
        output = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode != 0 and time.monotonic() - began < 60, output
    assert message in output and "Traceback" not in output, output


def test_startup_without_room_for_the_kv_cache_exits_non_zero(tiny_dir: Path) -> None:
    _fails_fast([str(tiny_dir), *TINY, "--cpu-kv-cache-bytes", "1"], "r1deploy serve: error: no memory left for the KV cache")


def test_startup_with_max_model_len_beyond_the_pool_exits_non_zero(tiny_dir: Path) -> None:
    # 16 KiB of KV is a few blocks of the tiny model: far less than 128 tokens of context.
    _fails_fast([str(tiny_dir), *TINY, "--cpu-kv-cache-bytes", "16384"], "less than max_model_len (128)")
