"""Choose a deployment: every (GPU, count, layout) is scored; the cheapest feasible one wins.

Feasible = weights fit, the KV cache holds the workload (concurrent requests x (input + output)
tokens and one max_model_len sequence), prefill is not overloaded, and the SLOs hold if given.
Cheapest = lowest $/hour; ties go to the lower $ per million output tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import GpuSpec
from r1deploy.plan.memory import MemoryPlan, plan_memory, weights_bytes_total
from r1deploy.plan.model_spec import ModelSpec
from r1deploy.plan.parallel import Layout, candidate_gpu_counts, enumerate_layouts
from r1deploy.plan.precision import Precision
from r1deploy.plan.roofline import Efficiency, stage_cost
from r1deploy.plan.serving import Performance, SpecDecode, Workload, predict


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None  # p99
    tpot_s: float | None = None

    @property
    def given(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


@dataclass(frozen=True)
class Settings:
    """Everything about a plan that is not the GPU or the layout."""

    model: ModelSpec
    precision: Precision
    workload: Workload
    slo: Slo
    eff: Efficiency
    gpu_memory_utilization: float
    gpus_per_node: int
    engine: str | None = None  # the engine profile the factors come from (engines.py); None: the datasheet roofline
    spec: SpecDecode | None = None  # speculative decoding asked for (--spec-acceptance / --num-speculative-tokens)


@dataclass(frozen=True)
class Candidate:
    gpu: GpuSpec
    layout: Layout
    memory: MemoryPlan
    perf: Performance | None  # None when the weights do not fit
    problem: str | None  # why it is not feasible; None = feasible

    @property
    def usd_per_hour(self) -> float:
        return self.layout.num_gpus * self.gpu.price_usd_per_hour

    @property
    def usd_per_million_output_tokens(self) -> float:
        if not self.perf or not self.perf.output_tokens_per_s:
            return float("inf")
        return self.usd_per_hour / (self.perf.output_tokens_per_s * 3600) * 1e6

    def sort_key(self) -> tuple[float, float, int]:
        return self.usd_per_hour, self.usd_per_million_output_tokens, self.layout.pp


def evaluate(s: Settings, gpu: GpuSpec, layout: Layout) -> Candidate:
    mem = plan_memory(s.model, s.precision, layout, gpu, s.gpu_memory_utilization)
    if not mem.fits:
        short = -mem.kv_budget_bytes / 1e9
        return Candidate(gpu, layout, mem, None,
                         f"weights {mem.weights_bytes / 1e9:.1f} GB + activations + runtime overhead exceed the "
                         f"usable {mem.usable_bytes / 1e9:.1f} GB per GPU by {short:.1f} GB")
    perf = predict(stage_cost(s.model, s.precision, layout, gpu, s.eff), s.workload)
    return Candidate(gpu, layout, mem, perf, _problem(s, mem, perf, layout))


def _problem(s: Settings, mem: MemoryPlan, perf: Performance, layout: Layout) -> str | None:
    w = s.workload
    need = perf.concurrency / layout.replicas * w.tokens_per_request
    if mem.kv_capacity_tokens < w.max_model_len:
        return f"KV cache holds {mem.kv_capacity_tokens:,} tokens, less than one {w.max_model_len:,}-token sequence"
    if mem.kv_capacity_tokens < need:
        return (f"KV cache holds {mem.kv_capacity_tokens:,} tokens per instance; {perf.concurrency / layout.replicas:.0f} "
                f"requests x {w.tokens_per_request:,} tokens need {need:,.0f}")
    if perf.overloaded:
        return f"prefill saturated ({perf.prefill_utilization:.0%} busy): requests queue without bound"
    if s.slo.ttft_s is not None and perf.ttft_s > s.slo.ttft_s:
        return f"p99 TTFT {perf.ttft_s * 1e3:.0f} ms > SLO {s.slo.ttft_s * 1e3:.0f} ms"
    if s.slo.tpot_s is not None and perf.tpot_s > s.slo.tpot_s:
        return f"TPOT {perf.tpot_s * 1e3:.1f} ms > SLO {s.slo.tpot_s * 1e3:.1f} ms"
    return None


def _could_fit(s: Settings, gpu: GpuSpec, num_gpus: int) -> bool:
    """Cheap lower bound: the weights spread perfectly over all GPUs must fit."""
    total = weights_bytes_total(s.model, s.precision)
    return total / num_gpus < gpu.memory_bytes * s.gpu_memory_utilization


def search(s: Settings, gpus: Iterable[GpuSpec], *, counts: list[int] | None = None,
           fixed: dict[str, object] | None = None) -> tuple[Candidate | None, list[Candidate]]:
    """Best feasible candidate (or None) and every candidate scored. Per GPU, the GPU counts are
    tried in increasing order and the first count with a feasible layout ends that GPU's search:
    more GPUs of the same kind only cost more per hour."""
    fixed = fixed or {}
    scored: list[Candidate] = []
    best: Candidate | None = None
    for gpu in gpus:
        for n in counts or candidate_gpu_counts(s.gpus_per_node):
            if not _could_fit(s, gpu, n):
                continue
            if best is not None and n * gpu.price_usd_per_hour > best.usd_per_hour:
                break
            layouts = enumerate_layouts(s.model, n, s.gpus_per_node, **fixed)  # type: ignore[arg-type]
            found = [evaluate(s, gpu, lay) for lay in layouts]
            scored += found
            ok = [c for c in found if c.problem is None]
            if ok:
                top = min(ok, key=Candidate.sort_key)
                if best is None or top.sort_key() < best.sort_key():
                    best = top
                break
    return best, scored


def closest(scored: list[Candidate]) -> Candidate | None:
    """The candidate nearest to feasible, to explain a failure: one that fits, with the best TPOT."""
    fitting = [c for c in scored if c.perf is not None]
    if fitting:
        return min(fitting, key=lambda c: (c.perf.tpot_s if c.perf else 0.0, c.usd_per_hour))
    return max(scored, key=lambda c: c.memory.kv_budget_bytes, default=None)


def require(best: Candidate | None, scored: list[Candidate], what: str, suggestion: str = "") -> Candidate:
    if best is not None:
        return best
    near = closest(scored)
    why = f" (closest, {near.layout.num_gpus}x {near.gpu.name} {near.layout.describe()}: {near.problem})" if near else ""
    raise UsageError(f"no feasible deployment {what}{why}{suggestion}")
