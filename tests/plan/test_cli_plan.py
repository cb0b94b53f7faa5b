"""`r1deploy plan` through the real CLI: the JSON contract, the human outputs, and one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from r1deploy.cli import main

CONTRACT = (
    "model.total_params", "model.active_params", "memory.weights_bytes", "memory.kv_bytes_per_token",
    "deployment.gpu", "deployment.num_gpus", "deployment.tp", "deployment.ep", "deployment.pp",
    "deployment.nodes", "deployment.gpu_memory_bytes", "deployment.fp8_compute",
    "performance.ttft_s", "performance.tpot_s", "performance.output_tokens_per_s",
    "cost.usd_per_million_output_tokens", "host.ram_bytes", "host.disk_bytes", "host.cpu_cores",
    "host.load_time_s", "host.disk_read_bytes_per_s", "host.internode_bytes_per_s",
)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def lookup(d: dict, key: str):  # type: ignore[no-untyped-def]
    for part in key.split("."):
        d = d[part]
    return d


def test_json_contract_default_r1_on_h200(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys)
    for key in CONTRACT:
        assert lookup(d, key) is not None, key
    assert d["deployment"]["gpu"] == "h200" and d["deployment"]["num_gpus"] == 8
    assert isinstance(d["deployment"]["fp8_compute"], bool) and d["deployment"]["fp8_compute"]
    assert d["memory"]["kv_bytes_per_token"] == 70_272
    assert isinstance(d["host"]["ram_bytes"], int) and d["host"]["internode_bytes_per_s"] == 0


def test_planner_does_not_import_torch() -> None:
    import subprocess

    code = ("import sys; from r1deploy.cli import main; main(['plan', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_json_multi_node_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "deepseek-r1", "--gpu", "h100", "--num-gpus", "16", "--tp", "8", "--pp", "2",
                 "--kv-cache-dtype", "fp8")
    assert d["deployment"]["nodes"] == 2 and d["deployment"]["pp"] == 2
    assert d["memory"]["kv_bytes_per_token"] == 35_136
    assert d["host"]["internode_bytes_per_s"] > 0


def test_json_awq_and_positional_model(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "r1-distill-llama-70b", "--weights", "awq", "--group-size", "64", "--gpu", "a100-80gb",
                 "--concurrency", "4")
    assert d["precision"]["weights"] == "awq" and d["precision"]["group_size"] == 64
    assert d["deployment"]["num_gpus"] == 1


def test_human_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "H200" in out and "TPOT" in out and "70,272" in out
    assert main(["plan", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "61 x (512 + 64) x 2 = 70,272" in out and "(a)" in out and "(b)" in out and "(c)" in out
    assert main(["plan", "--matrix"]) == 0
    out = capsys.readouterr().out
    for band in ("1.5B", "7B", "8B", "14B", "32B", "70B", "671B"):
        assert band in out


def test_matrix_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--matrix", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["matrix"]
    assert [r["band"] for r in rows] == ["1.5B", "7B", "8B", "14B", "32B", "70B", "671B"]


@pytest.mark.parametrize("argv, message", [
    (["plan", "gpt-5"], "unknown model"),
    (["plan", "--gpu", "tpu"], "unknown GPU"),
    (["plan", "--tp", "3"], "does not divide"),
    (["plan", "--concurrency", "8", "--request-rate", "2"], "not both"),
    (["plan", "--matrix", "--tp", "8"], "--matrix"),
    (["plan", "--json", "--explain"], "pick one"),
    (["plan", "--gpu", "rtx-4090", "--num-gpus", "8"], "no feasible deployment"),
    (["plan", "--weights", "int3"], "invalid choice"),
    (["plan", "--num-gpus", "12", "--tp", "8"], "multiple"),
])
def test_cli_errors_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
