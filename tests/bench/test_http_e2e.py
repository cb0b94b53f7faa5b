"""End-to-end runs through the CLI against OpenAI-compatible servers: the fake one in bench_harness
(errors on demand) and, when it is importable, r1deploy's own server on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from bench_harness import FakeServerOptions, free_port, run_bench

FAST = ["--no-progress", "--warmup", "0", "--telemetry-interval", "0.05"]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_batch_rounds_with_usage(fake_server, tmp_path: Path) -> None:
    url = fake_server()
    code = run_bench(["--url", url, "--batch", "3", "--repeat", "2", "--seq", "20", "--output-len", "6",
                      "--out", str(tmp_path), "--slo-profile", "none", *FAST])
    assert code == 0
    rep = _report(tmp_path)
    s = rep["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 36 and s["total_input_tokens"] == 120  # from usage
    assert s["max_concurrent_requests"] == 3
    assert {r["round"] for r in rep["requests"]} == {0, 1}
    assert all(r["output_tokens_source"] == "usage" and len(r["chunk_offsets_ms"]) == 6 for r in rep["requests"])
    assert rep["telemetry"]["fragmentation_max_pct"] == pytest.approx(3.0)  # scraped from /metrics


def test_errors_mid_run_are_counted_and_the_run_continues(fake_server, tmp_path: Path, capsys) -> None:
    url = fake_server(FakeServerOptions(fail_every=3))
    code = run_bench(["--url", url, "--concurrency", "2", "--num-requests", "9", "--seq", "8", "--output-len", "4",
                      "--out", str(tmp_path), "--slo-profile", "mlperf-r1", *FAST])
    rep = _report(tmp_path)
    assert rep["summary"]["completed"] == 6 and rep["summary"]["failed"] == 3
    assert rep["summary"]["errors"] == {"HTTP 500": 3}
    failed = [r for r in rep["requests"] if not r["success"]]
    assert all(r["status"] == 500 and "injected failure" in r["error"] for r in failed)
    assert code == 0  # latency targets met; failures are reported, not hidden
    assert "HTTP 500" in capsys.readouterr().out


def test_chat_reasoning_times_and_role_chunk(fake_server, tmp_path: Path) -> None:
    url = fake_server(FakeServerOptions(reasoning_tokens=3, token_delay_s=0.005))
    run_bench(["--url", url, "--api", "chat", "--workload", "reasoning", "--rate", "100", "--num-requests", "4",
               "--output-len", "6", "--out", str(tmp_path), *FAST])
    rep = _report(tmp_path)
    for r in rep["requests"]:
        assert r["ttfrt_ms"] == pytest.approx(r["ttft_ms"])  # the role-only chunk is not the first token
        assert r["ttfat_ms"] > r["ttfrt_ms"] and len(r["chunk_offsets_ms"]) == 6
    assert rep["summary"]["mean_ttfat_ms"] is not None


def test_no_usage_falls_back_to_chunk_count(fake_server, tmp_path: Path) -> None:
    url = fake_server(FakeServerOptions(include_usage=False))
    run_bench(["--url", url, "--batch", "2", "--repeat", "1", "--seq", "5", "--output-len", "3",
               "--out", str(tmp_path), *FAST])
    assert all(r["output_tokens_source"] == "chunks" and r["output_tokens"] == 3 for r in _report(tmp_path)["requests"])


def test_seed_profile_fails_on_cpu_and_no_fail_exits_zero(fake_server, capsys) -> None:
    url = fake_server()
    argv = ["--url", url, "--batch", "2", "--repeat", "1", "--seq", "5", "--output-len", "3", *FAST]
    assert run_bench(argv) == 1  # GPU utilisation and fragmentation cannot all pass here
    out = capsys.readouterr().out
    assert "GPU utilisation (mean) >= 95" in out and "verdict: FAIL" in out
    assert run_bench([*argv, "--no-fail"]) == 0


def test_unreachable_url_is_one_line_exit_2(capsys) -> None:
    assert run_bench(["--url", f"http://127.0.0.1:{free_port()}", *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_api_key_reports_401(fake_server, capsys) -> None:
    url = fake_server(FakeServerOptions(api_key="right"))
    assert run_bench(["--url", url, "--api-key", "wrong", *FAST]) == 2
    err = capsys.readouterr().err
    assert "401" in err and "API key" in err and "Traceback" not in err
    assert run_bench(["--url", url, "--api-key", "right", "--batch", "1", "--repeat", "1", "--seq", "4",
                      "--output-len", "2", "--slo-profile", "none", *FAST]) == 0


def test_malformed_dataset_exit_2(fake_server, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": "oops"}]')
    assert run_bench(["--url", fake_server(), "--dataset", str(bad), *FAST]) == 2
    err = capsys.readouterr().err
    assert "conversations" in err and "Traceback" not in err


def test_compare_two_runs(fake_server, tmp_path: Path, capsys) -> None:
    url = fake_server()
    for name in ("a", "b"):
        run_bench(["--url", url, "--batch", "2", "--repeat", "1", "--seq", "5", "--output-len", "3",
                   "--out", str(tmp_path / name), *FAST])
    capsys.readouterr()
    assert run_bench(["compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "p99 TTFT ms" in out and "output tok/s" in out
    assert run_bench(["compare", str(tmp_path / "a" / "requests.csv"), str(tmp_path / "b" / "report.json")]) == 2


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory):
    """r1deploy's server on the server tests' tiny model (with a <think> chat template), in a thread."""
    tiny_path = Path(__file__).parents[1] / "server" / "tiny.py"
    try:
        from r1deploy.engine.engine import LLMEngine
        from r1deploy.engine_config import EngineConfig
        from r1deploy.server.app import create_app
        from r1deploy.server.state import Phase, ServerSettings
    except ImportError as exc:
        pytest.skip(f"r1deploy server not importable: {exc}")
    if not tiny_path.is_file():
        pytest.skip("tests/server/tiny.py is not there")
    spec = importlib.util.spec_from_file_location("server_tiny", tiny_path)
    tiny = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tiny)  # type: ignore[union-attr]
    model_dir = tiny.save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    config = EngineConfig(max_model_len=128)
    app = create_app(ServerSettings(), lambda: LLMEngine(str(model_dir), config=config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    state = app.state.server
    deadline = time.monotonic() + 60
    while state.phase is not Phase.READY:
        if state.phase is Phase.FAILED:
            server.should_exit = True
            pytest.skip(f"r1deploy server failed to load the tiny model: {state.load_error}")
        assert time.monotonic() < deadline, "r1deploy server did not become ready"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_against_r1deploy_server(real_server: str, tmp_path: Path, api: str) -> None:
    code = run_bench(["--url", real_server, "--api", api, "--batch", "2", "--repeat", "2", "--seq", "12",
                      "--output-len", "5", "--out", str(tmp_path), "--slo-profile", "none", *FAST])
    assert code == 0
    rep = _report(tmp_path)
    assert rep["summary"]["completed"] == 4 and rep["summary"]["failed"] == 0
    assert all(r["output_tokens"] == 5 and r["output_tokens_source"] == "usage" for r in rep["requests"])
