"""The report's `speculative` section: from a server's /metrics (vLLM's spec_decode_* counters, the measured
phase only) and from the in-process engine with --speculative-config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from bench_harness import FakeServerOptions, run_bench

FAST = ["--no-progress", "--warmup", "0", "--telemetry-interval", "0.05", "--slo-profile", "none"]


def test_url_report_reads_the_servers_spec_counters(fake_server, tmp_path: Path, capsys) -> None:
    url = fake_server(FakeServerOptions(spec_decode=True))
    code = run_bench(["--url", url, "--batch", "3", "--repeat", "2", "--seq", "8", "--output-len", "4",
                      "--out", str(tmp_path), *FAST])
    assert code == 0
    spec = json.loads((tmp_path / "report.json").read_text())["speculative"]
    assert spec["counted_from"] == "start of the measured phase"
    assert spec["num_drafts"] == 2 * 6 and spec["num_draft_tokens"] == 4 * 6  # 6 requests in the phase
    assert spec["acceptance_per_position"] == [1.0, 0.5] and spec["mean_accepted_length"] == 2.5
    assert "speculative decoding" in capsys.readouterr().out


def test_no_section_without_speculation(fake_server, tmp_path: Path) -> None:
    run_bench(["--url", fake_server(), "--batch", "2", "--repeat", "1", "--seq", "8", "--output-len", "3",
               "--out", str(tmp_path), *FAST])
    assert "speculative" not in json.loads((tmp_path / "report.json").read_text())


def test_speculative_config_is_for_the_in_process_engine(fake_server, capsys) -> None:
    ngram = '{"method": "ngram", "num_speculative_tokens": 2}'
    code = run_bench(["--url", fake_server(), "--speculative-config", ngram, *FAST])
    assert code == 2 and "r1deploy serve --speculative-config" in capsys.readouterr().err


def test_in_process_report_with_ngram(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "engine_conftest", Path(__file__).parents[1] / "engine" / "conftest.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.save_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2")
    code = run_bench(["--model", str(model), "--batch", "2", "--repeat", "1", "--seq", "12", "--output-len", "12",
                      "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                      "--out", str(tmp_path), *FAST])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["speculative"]
    assert section["num_drafts"] > 0 and len(section["acceptance_per_position"]) <= 3
    assert section["verify_ms_per_verify_step"] > 0 and section["mean_accepted_length"] >= 1.0
    assert report["summary"]["total_output_tokens"] == 2 * 12
