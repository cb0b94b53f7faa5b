"""`r1deploy serve --tp 2` (gloo, CPU) with a worker SIGKILLed, as a supervisor would see it: in-flight
clients get an OpenAI-shaped error (in the stream, or a 500), /health/ready turns 503 and the process exits 1
so it is restarted, whether the worker died during decode or while the server was idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
from serve_util import SLOW_STEPS, serving
from test_errors import assert_openai_error

# 50 ms per step: a 100-token request is surely still decoding when the worker dies.
ENV = {"PYTHONPATH": os.pathsep.join([str(SLOW_STEPS), os.environ.get("PYTHONPATH", "")]),
       "R1DEPLOY_TEST_STEP_S": "0.05"}
LONG = {"prompt": [1, 7], "max_tokens": 100, "ignore_eos": True}
DEATH_NOTICED_S = 15.0  # well inside --dist-timeout: a killed worker closes its sockets, gloo fails at once


def _args(model_dir: Path) -> list[str]:
    return [str(model_dir), "--max-model-len", "128", "--tp", "2", "--dist-timeout", "20", "--log-level", "warning"]


def _kill_worker(server_pid: int) -> None:
    """SIGKILL rank 1: the server's multiprocessing.spawn child (not its resource tracker, also a child)."""
    workers = [p for p in psutil.Process(server_pid).children()
               if any("spawn_main" in part for part in p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in psutil.Process(server_pid).children()]
    os.kill(workers[0].pid, signal.SIGKILL)


def _health_until_gone(base: str, timeout_s: float) -> list[int]:
    """/health/ready statuses, polled until the server stops answering (it exits) or timeout_s passes."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                statuses.append(client.get("/health/ready").status_code)
            except httpx.TransportError:
                break
            time.sleep(0.02)
    return statuses


def _assert_exits_1_naming_the_worker(proc: subprocess.Popen[str]) -> None:
    assert proc.wait(DEATH_NOTICED_S) == 1
    output = proc.stdout.read()
    assert "r1deploy serve: error: tensor-parallel" in output and "worker 1 exited (killed by signal 9)" in output, \
        output


def test_worker_killed_during_decode_fails_clients_turns_health_503_and_exits_1(tiny_dir: Path) -> None:
    with serving(_args(tiny_dir), ENV) as (proc, base), httpx.Client(base_url=base, timeout=60) as client:
        plain: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=lambda: plain.update(r=client.post("/v1/completions", json=LONG)))
        waiting.start()
        lines: list[str] = []
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line and not lines:
                    killed_at = time.monotonic()
                    _kill_worker(proc.pid)
                lines += [line] if line else []
        errored_after_s = time.monotonic() - killed_at
        statuses = _health_until_gone(base, DEATH_NOTICED_S)
        waiting.join(DEATH_NOTICED_S)
        assert errored_after_s < DEATH_NOTICED_S
        # the stream: some tokens, then an OpenAI error event, then [DONE]; never a normal finish
        assert lines[-1] == "data: [DONE]", lines
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_dead" and set(error) == {"message", "type", "param", "code"}, error
        assert len(lines) - 2 < LONG["max_tokens"] and "finish_reason\":\"length" not in "".join(lines)
        assert assert_openai_error(plain["r"], 500)["code"] == "engine_dead"
        assert 200 not in statuses, statuses  # 503 until the process is gone
        _assert_exits_1_naming_the_worker(proc)


def test_worker_killed_while_idle_turns_health_503_and_exits_1_without_a_request(tiny_dir: Path) -> None:
    with serving(_args(tiny_dir), ENV) as (proc, base):
        _kill_worker(proc.pid)
        statuses = _health_until_gone(base, DEATH_NOTICED_S)
        # no /v1 request is sent: the idle engine loop notices the dead rank by itself
        first_failed = statuses.index(503) if 503 in statuses else len(statuses)
        assert set(statuses[first_failed:]) <= {503}, statuses  # ready until noticed, then 503 until gone
        _assert_exits_1_naming_the_worker(proc)
