"""`r1deploy up --once` on the embedded model, on the CPU: doctor, plan, serve, ready, a tiny benchmark, planned vs
measured printed, the server stopped, exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from serve_util import free_port  # noqa: E402

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_up_once_on_the_embedded_model(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "r1deploy", "up", "--once", "--input-len", "8", "--output-len", "4",
         "--concurrency", "2", "--num-requests", "2", "--slo-tpot-ms", "60000", "--port", str(port),
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "up: ready after" in out
    assert "planned vs measured" in out and "TPOT p50 (ms)" in out and "output tokens/s" in out
    assert "SLO PASS: P99 TPOT" in out and "up: verdict PASS" in out
    assert "up: server stopped (exit status 0)" in out  # drained and exited on SIGTERM
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["deployment"]["gpu"] == "cpu" and plan["workload"]["input_len"] == 8
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert report["summary"]["completed"] == 2 and report["summary"]["failed"] == 0
    with pytest.raises(httpx.ConnectError):  # nothing left listening
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)


def test_up_refuses_a_preset_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    from r1deploy.cli import main

    assert main(["up", "deepseek-r1", "--once"]) == 2
    err = capsys.readouterr().err
    assert "presets carry no weights" in err and err.count("\n") == 1
