"""From step times to served numbers: TTFT, TPOT and tokens/s at a concurrency or a request rate.

Continuous batching with prefill interleaved into decode (chunked prefill): the GPU spends a
fraction rho = arrival rate x prefill time on prompts, so a decode step effectively takes
t_step / (1 - rho), and a new prompt waits behind earlier ones (an M/D/1 queue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.errors import UsageError
from r1deploy.plan.roofline import (
    StageCost,
    StepTime,
    decode_stage,
    mtp_stage,
    pipeline_send_s,
    prefill_stage,
)

# p99 of an exponentially-tailed wait is ln(100) = 4.6 x its mean: the M/D/1 mean wait scaled to p99.
P99_WAIT_FACTOR = math.log(100)
# Past this prefill utilisation queues explode; report the deployment as overloaded.
MAX_PREFILL_UTILIZATION = 0.95
_ITERATIONS = 200
DEFAULT_INPUT_LEN = 2048
DEFAULT_OUTPUT_LEN = 4096  # R1 reasons at length: thousands of thinking tokens per answer
DEFAULT_CONCURRENCY = 64


@dataclass(frozen=True)
class Workload:
    input_len: int = DEFAULT_INPUT_LEN
    output_len: int = DEFAULT_OUTPUT_LEN
    concurrency: int | None = DEFAULT_CONCURRENCY
    request_rate: float | None = None
    max_model_len: int = DEFAULT_INPUT_LEN + DEFAULT_OUTPUT_LEN

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise UsageError("--input-len and --output-len must be at least 1")
        if self.concurrency is not None and self.request_rate is not None:
            raise UsageError("give --concurrency or --request-rate, not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise UsageError("--request-rate must be positive")
        if self.max_model_len < self.input_len + self.output_len:
            raise UsageError(f"--max-model-len {self.max_model_len} is shorter than --input-len + --output-len "
                             f"= {self.input_len + self.output_len}")

    @property
    def tokens_per_request(self) -> int:
        return self.input_len + self.output_len

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2


# DeepSeek-V3 technical report (section 5.4.3): the MTP module's second-token prediction is accepted 85-90% of the
# time; the low end is the default acceptance of the first draft token.
DEFAULT_SPEC_ACCEPTANCE = 0.85
DEFAULT_SPEC_DECAY = 1.0  # no published per-position figures for R1's MTP: each position as the first


@dataclass(frozen=True)
class SpecDecode:
    """Speculative decoding (MTP / EAGLE): `draft_tokens` k proposed per step; draft i is accepted with
    probability a_i = acceptance x decay^(i-1) given the ones before it were (the MTP module reused for later
    positions predicts them less well: decay <= 1), so a step yields 1 + a_1 + a_1 a_2 + ... tokens. The step
    verifies 1 + k query tokens per sequence, and each draft runs the MTP module once: one decoder layer and the
    shared logits head (roofline.mtp_stage)."""

    draft_tokens: int
    acceptance: float
    decay: float = DEFAULT_SPEC_DECAY

    def __post_init__(self) -> None:
        if self.draft_tokens < 1 or not 0 <= self.acceptance < 1:
            raise UsageError("speculative decoding needs draft_tokens >= 1 and an acceptance rate in [0, 1)")
        if not 0 < self.decay <= 1:
            raise UsageError("the per-position acceptance decay must be in (0, 1]")

    @property
    def acceptance_per_position(self) -> tuple[float, ...]:
        return tuple(self.acceptance * self.decay ** i for i in range(self.draft_tokens))

    @property
    def tokens_per_step(self) -> float:
        total = reach = 1.0
        for a in self.acceptance_per_position:
            reach *= a
            total += reach
        return total


@dataclass(frozen=True)
class Performance:
    concurrency: float  # requests in flight, all replicas
    request_rate: float  # requests/s, all replicas
    prefill_s: float  # one prompt alone: TTFT with no queue
    ttft_s: float  # p99, with queueing
    tpot_s: float
    output_tokens_per_s: float  # all replicas
    prefill_utilization: float
    overloaded: bool
    prefill: StepTime  # one stage
    decode: StepTime  # one stage, one micro-batch

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1 / self.tpot_s


def _mean_wait(rho: float, service_s: float) -> float:
    """M/D/1 mean queueing delay (Pollaczek-Khinchine with deterministic service)."""
    return rho / (2 * (1 - rho)) * service_s


def predict(cost: StageCost, work: Workload, spec: SpecDecode | None = None) -> Performance:
    lay = cost.layout
    replicas, pp = lay.replicas, lay.pp
    pre = prefill_stage(cost, work.input_len)
    prefill_s = pp * pre.total_s + pipeline_send_s(cost, work.input_len)
    service = pre.total_s  # a pipeline admits a new prompt every stage time
    out = work.output_len

    def tpot_at(conc_per_replica: float) -> tuple[float, StepTime]:
        micro = max(conc_per_replica / pp, 1.0)  # pp micro-batches in flight
        step = decode_stage(cost, micro, work.mean_context)
        if spec is None:
            return pp * step.total_s + pipeline_send_s(cost, micro) + cost.eff.step_overhead_s, step
        verify = decode_stage(cost, micro, work.mean_context, 1 + spec.draft_tokens)
        draft_s = spec.draft_tokens * decode_stage(mtp_stage(cost), micro, work.mean_context).total_s
        step_s = pp * (verify.total_s + draft_s) + pipeline_send_s(cost, micro) + cost.eff.step_overhead_s
        return step_s / spec.tokens_per_step, verify

    rho, overloaded = 0.0, False
    if work.request_rate is None:
        conc = (work.concurrency or 1) / replicas
        base, step = tpot_at(conc)
        for _ in range(_ITERATIONS):  # closed loop: rate = concurrency / latency, latency depends on rate
            lat = prefill_s + _mean_wait(rho, service) + (out - 1) * base / (1 - rho)
            new = min(conc / lat * service, MAX_PREFILL_UTILIZATION)
            if abs(new - rho) < 1e-9:
                break
            rho = (rho + new) / 2
        overloaded = rho >= MAX_PREFILL_UTILIZATION - 1e-6
        rate = conc / (prefill_s + _mean_wait(rho, service) + (out - 1) * base / (1 - rho))
    else:
        rate = work.request_rate / replicas
        rho = rate * service
        overloaded = rho >= MAX_PREFILL_UTILIZATION
        rho = min(rho, MAX_PREFILL_UTILIZATION)
        conc = rate * (prefill_s + out * tpot_at(1.0)[0])
        for _ in range(_ITERATIONS):  # open loop: in-flight requests = rate x latency (Little's law)
            base, step = tpot_at(conc)
            new = rate * (prefill_s + _mean_wait(rho, service) + (out - 1) * base / (1 - rho))
            if new > 1e7:
                overloaded = True
                break
            if abs(new - conc) < 1e-6 * conc:
                break
            conc = (conc + new) / 2
        base, step = tpot_at(conc)
    return Performance(
        concurrency=conc * replicas, request_rate=rate * replicas, prefill_s=prefill_s,
        ttft_s=prefill_s + _mean_wait(rho, service) * P99_WAIT_FACTOR, tpot_s=base / (1 - rho),
        output_tokens_per_s=rate * replicas * out, prefill_utilization=rho, overloaded=overloaded,
        prefill=pre, decode=step,
    )
