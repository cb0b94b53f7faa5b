"""Prometheus metrics: one CollectorRegistry per app (so tests and embedded apps never collide).

Request-level series are observed as requests finish; engine state (queue depths, KV blocks, prefix
hits, preemptions, aborts, expert-store counters, CUDA allocator) is read at scrape time, so it can
never go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from r1deploy.engine.outputs import CompletionOutput
from r1deploy.server.process_metrics import register_process_metrics
from r1deploy.server.spec_metrics import SpecDecodeMetrics
from r1deploy.server.vllm_metrics import VllmMetrics

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], LLMEngine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:  # still loading
            return
        # Plain reads of counters and list lengths that the engine thread updates; each is atomic
        # under the GIL, and a scrape need not be a consistent snapshot.
        blocks = engine.block_manager
        yield GaugeMetricFamily("r1deploy_num_requests_running", "Requests in the running batch",
                                value=len(engine.scheduler.running))
        yield GaugeMetricFamily("r1deploy_num_requests_waiting", "Requests waiting to be scheduled",
                                value=len(engine.scheduler.waiting))
        yield GaugeMetricFamily("r1deploy_kv_cache_blocks_used", "KV cache blocks in use",
                                value=blocks.num_used_blocks)
        yield GaugeMetricFamily("r1deploy_kv_cache_blocks_total", "KV cache blocks in the pool",
                                value=blocks.num_blocks)
        yield GaugeMetricFamily("r1deploy_prefix_cache_hit_rate", "Prompt blocks served by the prefix cache",
                                value=blocks.prefix_cache_hit_rate)
        yield CounterMetricFamily("r1deploy_preemptions", "Requests preempted for KV space",
                                  value=engine.scheduler.num_preemptions)
        yield CounterMetricFamily("r1deploy_aborted_requests", "Engine requests aborted (client gone)",
                                  value=engine.num_aborted)
        store = engine.loaded.model.offload_store
        if store is not None:  # --offload experts: the tiered expert store's counters
            stats = store.stats()
            yield GaugeMetricFamily("r1deploy_expert_cache_hit_rate", "Expert requests served by a GPU slot",
                                    value=stats.hit_rate)
            for name, text in (("hits", "Expert requests served by a GPU slot"),
                               ("misses", "Expert requests that copied or computed on the host"),
                               ("evictions", "GPU expert slots overwritten"),
                               ("bytes_to_device", "Expert bytes copied to the GPU"),
                               ("bytes_from_disk", "Expert bytes read from the checkpoint"),
                               ("stall_s", "Seconds the step waited for expert copies")):
                yield CounterMetricFamily(f"r1deploy_expert_cache_{name}", text, value=getattr(stats, name))
        device = engine.runner.device
        if device.type == "cuda":
            import torch

            # reserved - allocated is what the caching allocator holds but cannot use: fragmentation.
            yield GaugeMetricFamily("r1deploy_cuda_memory_reserved_bytes", "CUDA caching allocator reserved",
                                    value=torch.cuda.memory_reserved(device))
            yield GaugeMetricFamily("r1deploy_cuda_memory_allocated_bytes", "CUDA memory held by tensors",
                                    value=torch.cuda.memory_allocated(device))


class ServerMetrics:
    """Our r1deploy_* series (below) and vLLM's set (vllm_metrics.py) in one registry."""

    def __init__(self, engine: Callable[[], LLMEngine | None], prefix: str = "r1deploy",
                 model_name: Callable[[], str] = str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.vllm = VllmMetrics(r, prefix, model_name, engine)
        self.http_requests = Counter("r1deploy_http_requests", "HTTP responses by route and status code",
                                     ["route", "code"], registry=r)
        self.finished = Counter("r1deploy_request_finished", "Engine requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("r1deploy_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("r1deploy_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("r1deploy_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("r1deploy_time_per_output_token_seconds", "Mean time per output token after "
                              "the first", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("r1deploy_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))
        r.register(SpecDecodeMetrics(prefix, model_name, engine))  # --speculative-config only
        register_process_metrics(r)  # process_resident_memory_bytes, process_open_fds, process_threads

    def observe_finished(self, output: CompletionOutput, num_prompt_tokens: int) -> None:
        self.vllm.observe_finished(output, num_prompt_tokens)
        m = output.metrics
        self.finished.labels(output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(len(output.token_ids))
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        if m.finish_time is not None:
            self.e2e.observe(m.finish_time - m.arrival_time)
        if m.first_token_time is not None and m.finish_time is not None and len(m.token_times) > 1:
            self.tpot.observe((m.token_times[-1] - m.first_token_time) / (len(m.token_times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
