"""A tensor-parallel worker killed with SIGKILL during decode, end to end through `serve --tp 2` (gloo): the
client gets an error within the timeout, readiness turns 503, and the process exits non-zero so that a
supervisor restarts it."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from test_tensor_parallel import save_tiny

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from serve_util import serving  # noqa: E402


def _workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


def test_worker_sigkill_during_decode_fails_requests_and_exits_non_zero(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path, "qwen2")
    with serving([str(model_dir), "--tp", "2", "--max-model-len", "128"]) as (proc, base):
        answer: dict[str, object] = {}
        decoding = threading.Event()

        def stream() -> None:
            body = {"prompt": "the cat", "max_tokens": 120, "ignore_eos": True, "stream": True}
            began = time.monotonic()
            try:
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                    answer["status"] = response.status_code
                    for line in response.iter_lines():
                        decoding.set()
                        if '"error"' in line:
                            answer["error"] = line
            except httpx.HTTPError as exc:
                answer["error"] = repr(exc)
            answer["seconds"] = time.monotonic() - began

        client = threading.Thread(target=stream)
        client.start()
        assert decoding.wait(60), "no token streamed"
        workers = _workers(proc.pid)
        assert workers, "no tensor-parallel worker process found"
        os.kill(workers[0].pid, signal.SIGKILL)
        client.join(60)
        assert not client.is_alive() and "error" in answer, answer
        try:
            ready = httpx.get(f"{base}/health/ready", timeout=5).status_code
        except httpx.TransportError:
            ready = None  # already gone: exiting is the other half of the contract, checked next
        print("ANSWER", answer, "READY", ready, flush=True)
        try:
            code = proc.wait(30)
        except Exception:
            proc.kill()
            code = proc.wait()
        output = proc.stdout.read() if proc.stdout else ""
        print("OUTPUT", output[-2500:], flush=True)
        assert ready in (503, None), (ready, answer, output[-3000:])
        assert code != 0, output[-3000:]
