"""The bench report's `speculative` section: acceptance per draft position, mean accepted length and draft /
verify time over the measured phase, from the in-process engine's SpecStats or a server's /metrics
(spec_decode_* series under any prefix: ours, or vLLM's, which has no per-position proposals and no times)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from r1deploy.spec.stats import SpecStats

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine

SpecCounters = Callable[[], SpecStats | None]  # the counters now; None: this target does not speculate


def engine_counters(engine: LLMEngine) -> SpecCounters:
    return lambda: None if engine.proposer is None else engine.spec_stats.snapshot()


def server_counters(base_url: str, api_key: str | None) -> SpecCounters:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def read() -> SpecStats | None:
        try:
            response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=5.0)
        except httpx.HTTPError:
            return None
        return parse_spec_metrics(response.text) if response.status_code == 200 else None

    return read


def parse_spec_metrics(text: str) -> SpecStats | None:
    """SpecStats from a /metrics page (summed over model_name); None when it has no spec_decode series."""
    values: dict[str, float] = {}
    per_position: dict[str, dict[int, float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:  # not Prometheus text
        return None
    for sample in (sample for family in families for sample in family.samples):
        _, found, metric = sample.name.rpartition("spec_decode_")
        if not found or metric.endswith("_created"):
            continue
        metric = metric.removesuffix("_total")  # counters' samples carry it; untyped pages name it anyway
        if "position" in sample.labels:
            slots = per_position.setdefault(metric, {})
            position = int(sample.labels["position"])
            slots[position] = slots.get(position, 0.0) + sample.value
        else:
            values[metric] = values.get(metric, 0.0) + sample.value
    if "num_drafts" not in values:
        return None

    def positions(metric: str) -> list[int]:
        slots = per_position.get(metric, {})
        return [int(slots.get(i, 0)) for i in range(max(slots) + 1)] if slots else []

    accepted = positions("num_accepted_tokens_per_pos")
    num_drafts = int(values["num_drafts"])
    # vLLM counts no proposals per position: every draft of its steps is k long, so num_drafts each
    proposed = positions("num_draft_tokens_per_pos") or [num_drafts] * len(accepted)
    return SpecStats(num_drafts, int(values.get("num_draft_tokens", 0)), accepted, proposed,
                     values.get("draft_time_seconds", 0.0), values.get("verify_time_seconds", 0.0),
                     int(values.get("num_verify_steps", 0)))


def section(before: SpecStats | None, after: SpecStats | None, counted_from: str) -> dict[str, Any] | None:
    """The measured phase's numbers, or None when the target does not speculate."""
    if after is None:
        return None
    phase = after if before is None else after.since(before)
    return {"counted_from": counted_from, **phase.summary()}


def print_section(spec: dict[str, Any], console: Console) -> None:
    table = Table(title=f"speculative decoding (since the {spec['counted_from']})", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rates = " / ".join(f"{r:.2f}" for r in spec["acceptance_per_position"]) or "-"
    for label, value in (("Drafts verified (tokens)", f"{spec['num_drafts']:,} ({spec['num_draft_tokens']:,})"),
                         ("Acceptance rate", f"{spec['acceptance_rate']:.3f}"),
                         ("Acceptance per position", rates),
                         ("Mean accepted length", f"{spec['mean_accepted_length']:.2f}"),
                         ("Draft time per verify step (ms)", f"{spec['draft_ms_per_verify_step']:.3f}"),
                         ("Verify step time (ms)", f"{spec['verify_ms_per_verify_step']:.3f}")):
        table.add_row(label, value)
    console.print(table)
