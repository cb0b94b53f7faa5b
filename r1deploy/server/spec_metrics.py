"""Speculative decoding on /metrics, read from engine.spec_stats at scrape time (only when the engine speculates).

vLLM's series (vllm/v1/spec_decode/metrics.py), under its names with our prefix and the model_name label:
  spec_decode_num_drafts, spec_decode_num_draft_tokens, spec_decode_num_accepted_tokens,
  spec_decode_num_accepted_tokens_per_pos{position}
and ours beside them: spec_decode_num_draft_tokens_per_pos{position} (drafts proposed at each position, so the
per-position acceptance is exact when drafts are shorter than k), spec_decode_mean_accepted_length (tokens per
verify step of one request since start), spec_decode_draft_time_seconds, spec_decode_verify_time_seconds and
spec_decode_num_verify_steps (engine wall time proposing, and in the steps that verified drafts).
PromQL: acceptance at position i = rate(..._accepted_tokens_per_pos_total{position="i"}) /
rate(..._draft_tokens_per_pos_total{position="i"}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine


class SpecDecodeMetrics(Collector):
    def __init__(self, prefix: str, model_name: Callable[[], str], engine: Callable[[], LLMEngine | None]) -> None:
        self._prefix, self._model_name, self._engine = prefix, model_name, engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None or engine.proposer is None:
            return
        stats, name, prefix = engine.spec_stats, self._model_name(), self._prefix
        for metric, text, value in (
                ("num_drafts", "Verify steps of one request (drafts proposed and verified)", stats.num_drafts),
                ("num_draft_tokens", "Draft tokens verified", stats.num_draft_tokens),
                ("num_accepted_tokens", "Draft tokens accepted", stats.num_accepted_tokens),
                ("draft_time_seconds", "Engine time proposing drafts", stats.draft_s),
                ("verify_time_seconds", "Engine time of the steps that verified drafts (schedule to acceptance)",
                 stats.verify_s),
                ("num_verify_steps", "Engine steps that verified drafts", stats.num_verify_steps)):
            family = CounterMetricFamily(f"{prefix}:spec_decode_{metric}", text, labels=["model_name"])
            family.add_metric([name], value)
            yield family
        for metric, text, values in (
                ("num_accepted_tokens_per_pos", "Draft tokens accepted, by position in the draft",
                 stats.accepted_per_position),
                ("num_draft_tokens_per_pos", "Draft tokens proposed, by position in the draft",
                 stats.proposed_per_position)):
            family = CounterMetricFamily(f"{prefix}:spec_decode_{metric}", text, labels=["model_name", "position"])
            for position, value in enumerate(values):
                family.add_metric([name, str(position)], value)
            yield family
        mean = GaugeMetricFamily(f"{prefix}:spec_decode_mean_accepted_length", "Tokens per verify step of one "
                                 "request since start: 1 + accepted drafts (0 before the first)", labels=["model_name"])
        mean.add_metric([name], stats.mean_accepted_length)
        yield mean
