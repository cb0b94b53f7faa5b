"""The real `serve` command under uvicorn in a subprocess, on loopback: ready, answer, drain on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

# `r1deploy serve` as registered by r1deploy.server.cli.register (what r1deploy/cli.py wires in).
SERVE = ("import argparse, sys; from r1deploy.server.cli import register; p = argparse.ArgumentParser(); "
         "register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_ready_answer_drain(tiny_dir: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", str(tiny_dir), "--port", str(port),
                             "--device", "cpu", "--max-model-len", "128", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                          "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

            long_body = {"prompt": [1, 7], "max_tokens": 60, "n": 4, "ignore_eos": True}
            result: dict[str, httpx.Response] = {}
            worker = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions", json=long_body)))
            worker.start()
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            with httpx.Client(base_url=base, timeout=5) as fresh:
                assert fresh.get("/health/ready").status_code == 503  # draining
                assert fresh.post("/v1/completions", json={"prompt": "the"}).status_code == 503
            worker.join(30)
            assert result["r"].status_code == 200  # the in-flight request finished
            assert all(c["finish_reason"] == "length" for c in result["r"].json()["choices"])
        proc.wait(30)
        output = proc.stdout.read() if proc.stdout else ""
        assert "curl http://127.0.0.1" in output and "from openai import OpenAI" in output, output
        assert proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal it drained on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
