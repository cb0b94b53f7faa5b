from __future__ import annotations

import csv
import json
from pathlib import Path

from bench_harness import run_bench


def test_html_report_embeds_plots_and_csv_has_every_request(fake_server, tmp_path: Path) -> None:
    url = fake_server()
    run_bench(["--url", url, "--batch", "3", "--repeat", "2", "--seq", "8", "--output-len", "4",
               "--out", str(tmp_path), "--no-progress", "--warmup", "0"])
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # CDFs, over time, telemetry
    assert "Latency CDFs" in page and "NOT MEASURED" in page and "TPOT" in page
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert len(rows) == 6 and rows[0]["ttft_ms"]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["schema"] == "r1deploy-bench/1" and "tpot" in rep["definitions"]
    assert rep["slo"]["profile"] == "seed" and not rep["slo"]["passed"]
