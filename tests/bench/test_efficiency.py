from __future__ import annotations

import pytest

from r1deploy.bench import efficiency
from r1deploy.bench.metrics import summarize
from r1deploy.bench.record import RequestRecord


def test_mbu_mfu_and_planned_vs_measured() -> None:
    pytest.importorskip("r1deploy.plan.catalog")
    if efficiency.gpu_peaks(["NVIDIA H200"]) is None:
        pytest.skip("the planner's catalog does not know the H200 under that name")
    bandwidth, flops = efficiency.gpu_peaks(["NVIDIA H200"])  # type: ignore[misc]
    # One request: 100 input, 11 output tokens, TTFT 0.1 s, then 10 tokens at 0.02 s: TPOT 20 ms.
    chunks = tuple(0.1 + 0.02 * i for i in range(11))
    r = RequestRecord("a", 0.0, chunks[-1], chunks, input_tokens=100, output_tokens=11)
    s = summarize([r], duration_s=0.3)
    plan = {"memory": {"weights_bytes": 10**10, "kv_bytes_per_token": 1000}, "model": {"active_params": 10**9},
            "performance": {"ttft_s": 0.05, "tpot_s": 0.01, "output_tokens_per_s": 50.0},
            "deployment": {"gpu": "h200", "num_gpus": 1, "tp": 1}}
    out = efficiency.compute(s, plan, ["NVIDIA H200"])
    context = 100 + 11 / 2
    concurrency = 0.3 / 0.3  # one request in flight for the whole run
    assert out["mbu_pct"] == pytest.approx(100 * (1e10 + 1000 * context * concurrency) / 0.02 / bandwidth)
    assert out["mfu_pct"] == pytest.approx(100 * 2 * 1e9 * 111 / 0.3 / flops)
    assert out["planned"]["tpot_ms"]["planned"] == pytest.approx(10.0)
    assert out["planned"]["tpot_ms"]["measured_over_planned"] == pytest.approx(2.0)
    assert out["planned_for"] == "1x H200 (TP1)"


def test_no_plan_or_gpu_is_explained() -> None:
    r = RequestRecord("a", 0.0, 0.2, (0.1, 0.2), output_tokens=2)
    out = efficiency.compute(summarize([r], 1.0), None, [])
    assert out["mbu_pct"] is None and "planner" in out["reason"]
