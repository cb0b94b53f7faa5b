"""`r1deploy bench --tp N [--dp-attention]`: the flags, the can-it-run-here check over N GPUs (memory mocked),
and an in-process run of a tiny random DeepSeek-V3 over 2 CPU ranks (gloo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from bench_harness import run_bench

from r1deploy.bench import target
from r1deploy.bench.cli import register
from r1deploy.bench.target import ModelFacts, check_runs_here
from r1deploy.cli import _Parser
from r1deploy.errors import UsageError

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3

FAST = ["--no-progress", "--telemetry-interval", "0.05"]
GiB = 1 << 30
R1 = {"architectures": ["DeepseekV3ForCausalLM"], "max_position_embeddings": 163840}
R1_WEIGHTS = 627 * GiB  # the planner's FP8 weight bytes of DeepSeek-R1, rounded


def parse(argv: list[str]):
    parser = _Parser(prog="r1deploy")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser.parse_args(["bench", *argv])


def facts(weights: int) -> ModelFacts:
    return ModelFacts("deepseek-r1", R1, {"memory": {"weights_bytes": weights}}, preset=True)


def gpus(monkeypatch: pytest.MonkeyPatch, count: int, each_gib: int = 141) -> None:
    where = "this machine (no GPU; host RAM available)" if count == 0 else f"GPU 0 (H200, {each_gib} GiB)"
    monkeypatch.setattr(target, "available_memory", lambda device: (each_gib * GiB, where, count))


def test_flags_parse() -> None:
    args = parse(["--model", "r1", "--tp", "8", "--dp-attention"])
    assert args.tp == 8 and args.dp_attention
    args = parse(["--tensor-parallel-size", "2"])
    assert args.tp == 2 and not args.dp_attention
    assert parse([]).tp == 1


def test_tp_with_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(["--url", "http://localhost:1", "--tp", "2", *FAST]) == 2
    assert "r1deploy serve --tp" in capsys.readouterr().err
    assert run_bench(["--url", "http://localhost:1", "--dp-attention", *FAST]) == 2


def test_r1_fits_eight_h200s_not_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "DeepseekV3ForCausalLM" in target.engine_architectures()
    gpus(monkeypatch, 8)
    check_runs_here(facts(R1_WEIGHTS), "cuda", 2000, tp=8)  # ~78 GiB per card of 141
    with pytest.raises(UsageError, match=r"GiB for its weights"):
        check_runs_here(facts(R1_WEIGHTS), "cuda", 2000, tp=1)
    with pytest.raises(UsageError, match=r"per GPU .* one of 4 GPUs"):
        check_runs_here(facts(R1_WEIGHTS), "cuda", 2000, tp=4)  # ~157 GiB per card


def test_fewer_gpus_than_tp_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 4)
    with pytest.raises(UsageError, match="--tp 8 needs 8 GPUs, 4 visible"):
        check_runs_here(facts(R1_WEIGHTS), "cuda", 2000, tp=8)


def test_cpu_ranks_share_the_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(monkeypatch, 0, each_gib=100)
    check_runs_here(facts(80 * GiB), "cpu", 2000, tp=2)
    with pytest.raises(UsageError, match="more than this machine"):
        check_runs_here(facts(95 * GiB), "cpu", 2000, tp=2)  # not halved: both ranks live in this RAM


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json alone: --load-format dummy makes the random weights on each rank."""
    path = tmp_path_factory.mktemp("tiny-v3")
    config = {**TINY_V3, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
              "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("dp_attention", [False, True], ids=["tp2", "tp2-dp-attention"])
def test_in_process_bench_over_two_cpu_ranks(tiny_v3: Path, tmp_path: Path, dp_attention: bool) -> None:
    code = run_bench(["--model", str(tiny_v3), "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                      "--tp", "2", *(["--dp-attention"] if dp_attention else []), "--concurrency", "3",
                      "--num-requests", "4", "--seq", "12", "--output-len", "5", "--warmup", "1",
                      "--slo-profile", "none", "--out", str(tmp_path), *FAST])
    assert code == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    s = rep["summary"]
    assert s["completed"] == 4 and s["failed"] == 0
    assert s["total_input_tokens"] == 4 * 12 and s["total_output_tokens"] == 4 * 5
    assert "TP 2" in rep["config"]["target"]
