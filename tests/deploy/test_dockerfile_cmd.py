"""The emitted Dockerfiles' CMDs, run here as plain commands (no container runtime): the CUDA image's for a plan
of the embedded SmolLM2 (falling back to the CPU, as serve does without a GPU) and the CPU image's, each
answering a chat request. Only the port (a free one) and the bind address (loopback) are changed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from r1deploy.cli import main
from r1deploy.models.loader import embedded_model_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from serve_util import free_port, wait_ready  # noqa: E402

REPO = Path(__file__).parents[2]


def dockerfile_cmd(path: Path) -> list[str]:
    (line,) = [line for line in path.read_text().splitlines() if line.startswith("CMD ")]
    return json.loads(line[len("CMD "):])


def as_local_command(cmd: list[str], port: int) -> list[str]:
    """The image's command on this machine: the `r1deploy` console script as `python -m r1deploy` (this
    checkout), a free port instead of the image's, loopback instead of every interface."""
    assert cmd[:2] == ["r1deploy", "serve"] and "0.0.0.0" in cmd and "--port" in cmd
    local = [sys.executable, "-m", "r1deploy", *cmd[1:]]
    local[local.index("--port") + 1] = str(port)
    local[local.index("0.0.0.0")] = "127.0.0.1"
    return local


@pytest.mark.slow
def test_both_dockerfile_cmds_serve_a_chat_request(tmp_path: Path) -> None:
    model_dir = embedded_model_dir()
    assert main(["plan", str(model_dir), "--gpu", "l40s", "--input-len", "64", "--output-len", "32",
                 "--emit", "docker", "--model-path", str(model_dir), "--out", str(tmp_path)]) == 0
    cuda_cmd, cpu_cmd = dockerfile_cmd(tmp_path / "Dockerfile"), dockerfile_cmd(tmp_path / "Dockerfile.cpu")
    assert cuda_cmd[:3] == ["r1deploy", "serve", str(model_dir)] and "--max-model-len" in cuda_cmd
    assert cpu_cmd == ["r1deploy", "serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]
    assert re.search(r"^USER r1deploy$", (tmp_path / "Dockerfile").read_text(), re.MULTILINE)
    assert "HEALTHCHECK" in (tmp_path / "Dockerfile.cpu").read_text()
    with ExitStack() as stack:
        servers = []
        for cmd in (cuda_cmd, cpu_cmd):  # both load at once: half the wall time
            port = free_port()
            proc = subprocess.Popen(as_local_command(cmd, port), cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            stack.callback(lambda p=proc: (p.kill(), p.wait()))
            servers.append((proc, f"http://127.0.0.1:{port}"))
        for proc, base in servers:
            wait_ready(proc, base, timeout_s=240)
            model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
            reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"]
