"""`r1deploy bench compare A.json B.json`: two run reports side by side (ours vs vLLM, today vs last week)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from r1deploy.bench import report

# (label, summary key, True when higher is better)
ROWS = (
    ("completed", "completed", True), ("failed", "failed", False),
    ("request/s", "request_throughput", True), ("goodput req/s", "request_goodput", True),
    ("output tok/s", "output_throughput", True), ("total tok/s", "total_token_throughput", True),
    ("peak concurrency", "max_concurrent_requests", True),
    *((f"{stat} {name} ms", f"{stat}_{key}_ms", False) for name, key in
      (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2el")) for stat in ("median", "p99")),
)


def compare(path_a: str, path_b: str, console: Console | None = None) -> int:
    a, b = report.load(Path(path_a)), report.load(Path(path_b))
    console = console or Console(highlight=False)
    table = Table(title="r1deploy bench compare")
    table.add_column("metric")
    table.add_column(f"A: {a['config'].get('target', path_a)}", justify="right")
    table.add_column(f"B: {b['config'].get('target', path_b)}", justify="right")
    table.add_column("B vs A", justify="right")
    for label, key, higher_better in ROWS:
        va, vb = a["summary"].get(key), b["summary"].get(key)
        table.add_row(label, _fmt(va), _fmt(vb), _delta(va, vb, higher_better))
    verdicts = [("PASS" if (r.get("slo") or {}).get("passed") else "FAIL") + f" ({(r.get('slo') or {}).get('profile')})"
                for r in (a, b)]
    table.add_row("SLO verdict", *verdicts, "")
    console.print(table)
    return 0


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def _delta(a: object, b: object, higher_better: bool) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return "-"
    change = 100.0 * (b - a) / abs(a)
    better = (change > 0) == higher_better
    return f"[{'green' if better else 'red'}]{change:+.1f}%[/]" if change else "0.0%"
