"""vLLM's Prometheus metric set, under vLLM's names and meanings, prefixed `r1deploy:` (or `vllm:` with
--metrics-prefix vllm, so dashboards, autoscalers and gateways built on vLLM's series work unchanged), every
series labelled with model_name.

Engine state (queue depths, KV usage, prefix-cache token counters, preemptions) is read at scrape time;
request histograms are observed as each request finishes, from the engine's timestamps:
  queue   = first scheduled - arrival       prefill = first token - first scheduled
  decode  = last token - first token        inference = last token - first scheduled
  e2e     = finish - arrival                inter-token latency: every gap between consecutive tokens
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from r1deploy.engine.outputs import CompletionOutput

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine

METRIC_PREFIXES = ("r1deploy", "vllm")
FINISH_REASONS = ("stop", "length", "abort")
# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over either server compares like for like.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))  # vLLM's 1-2-5 series


class _EngineState(Collector):
    def __init__(self, prefix: str, model_name: Callable[[], str], engine: Callable[[], LLMEngine | None]) -> None:
        self._prefix, self._model_name, self._engine = prefix, model_name, engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:  # still loading
            return
        labels, name = ["model_name"], self._model_name()

        def family(kind: type, metric: str, text: str, value: float) -> Metric:
            family = kind(f"{self._prefix}:{metric}", text, labels=labels)
            family.add_metric([name], value)
            return family

        blocks, scheduler, block_size = engine.block_manager, engine.scheduler, engine.config.block_size
        yield family(GaugeMetricFamily, "num_requests_running", "Requests in the running batch",
                     len(scheduler.running))
        yield family(GaugeMetricFamily, "num_requests_waiting", "Requests waiting to be scheduled",
                     len(scheduler.waiting))
        usage = blocks.num_used_blocks / max(1, blocks.num_blocks)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (1 = 100%)",
                     usage)
        # vLLM's name for it before 0.10, still what many autoscalers and gateways read
        yield family(GaugeMetricFamily, "gpu_cache_usage_perc", "Deprecated name of kv_cache_usage_perc", usage)
        yield family(CounterMetricFamily, "num_preemptions", "Requests preempted for KV space",
                     scheduler.num_preemptions)
        # vLLM counts these in tokens; our block manager looks prefixes up a block at a time.
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     blocks.num_prefix_queries * block_size)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache",
                     blocks.num_prefix_hits * block_size)
        info = GaugeMetricFamily(f"{self._prefix}:cache_config_info", "KV cache configuration",
                                 labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"])
        info.add_metric([name, str(block_size), str(blocks.num_blocks), str(engine.config.enable_prefix_caching)], 1)
        yield info


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str, model_name: Callable[[], str],
                 engine: Callable[[], LLMEngine | None]) -> None:
        if prefix not in METRIC_PREFIXES:
            raise ValueError(f"metrics prefix must be one of {', '.join(METRIC_PREFIXES)}, got {prefix!r}")
        self._model_name = model_name
        labels = ["model_name"]

        def counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{prefix}:{name}", text, [*labels, *extra], registry=registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{prefix}:{name}", text, labels, buckets=buckets, registry=registry)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self.request_success = counter("request_success", "Finished requests, by finish reason", ("finished_reason",))
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request",
                                                   TOKEN_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens", ITL_BUCKETS)
        # vLLM's name for the same per-gap series before 0.11 (deprecated there), still on many dashboards
        self.tpot_deprecated = histogram("time_per_output_token_seconds", "Deprecated name of "
                                         "inter_token_latency_seconds", ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (output tokens - 1)", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled (WAITING)", REQUEST_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "First scheduled to last token (RUNNING)",
                                   REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token", REQUEST_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to last token", REQUEST_BUCKETS)
        registry.register(_EngineState(prefix, model_name, engine))

    def observe_finished(self, output: CompletionOutput, num_prompt_tokens: int) -> None:
        name, m = self._model_name(), output.metrics
        self.prompt_tokens.labels(name).inc(num_prompt_tokens)
        self.generation_tokens.labels(name).inc(len(output.token_ids))
        self.request_success.labels(name, output.finish_reason or "abort").inc()
        self.request_prompt_tokens.labels(name).observe(num_prompt_tokens)
        self.request_generation_tokens.labels(name).observe(len(output.token_ids))
        if m.finish_time is not None:
            self.e2e.labels(name).observe(m.finish_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is None:  # aborted before its first token: no token timings
            return
        self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
        last = m.token_times[-1]
        for before, after in zip(m.token_times, m.token_times[1:]):
            self.itl.labels(name).observe(after - before)
            self.tpot_deprecated.labels(name).observe(after - before)
        if len(m.token_times) > 1:
            self.tpot.labels(name).observe((last - m.first_token_time) / (len(m.token_times) - 1))
        self.decode.labels(name).observe(last - m.first_token_time)
        if m.first_scheduled_time is not None:
            self.prefill.labels(name).observe(m.first_token_time - m.first_scheduled_time)
            self.inference.labels(name).observe(last - m.first_scheduled_time)
