"""Soak traffic beyond the plain stream: clients that leave, and a mix of request shapes.

- abort: the client drops the request within 50 ms of sending it (queued or in prefill);
- disconnect: the client drops the stream part-way, after 20-90 % of the typical end-to-end time.
Both cancel the send: over HTTP the connection closes, in-process the engine aborts the request. A drop
that comes after the request already finished counts as a completed request.
- mix (--url only): a share of the requests are sent as one of VARIANTS (not streamed, n=2, stop strings,
  a shared prefix, a very short prompt) and tallied by HTTP status; latency percentiles come from the
  plain streamed requests, whose timing the variants would muddle.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from r1deploy.bench.client import Backend, HttpBackend
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.workload import RequestSpec
from r1deploy.errors import UsageError

ABORT_WITHIN_S = 0.05
VARIANTS = ("not streamed", "n=2", "stop strings", "shared prefix", "short prompt")
SHARED_PREFIX = "You are a careful assistant. Answer briefly and say when you are unsure. " * 8


@dataclass(frozen=True)
class DropPolicy:
    disconnect_rate: float = 0.0
    abort_rate: float = 0.0

    def __post_init__(self) -> None:
        for flag, rate in (("--disconnect-rate", self.disconnect_rate), ("--abort-rate", self.abort_rate)):
            if not 0.0 <= rate <= 1.0:
                raise UsageError(f"{flag} {rate}: expected a fraction between 0 and 1")
        if self.disconnect_rate + self.abort_rate > 1.0:
            raise UsageError("--disconnect-rate + --abort-rate must not exceed 1")

    def draw(self, rng: random.Random) -> str | None:
        u = rng.random()
        if u < self.abort_rate:
            return "abort"
        return "disconnect" if u < self.abort_rate + self.disconnect_rate else None


@dataclass
class Tally:
    """Requests that were not plain measured ones: drops by kind, mixed variants by outcome."""

    dropped: Counter = field(default_factory=Counter)
    variants: dict[str, Counter] = field(default_factory=dict)

    def count_variant(self, name: str, outcome: str) -> None:
        self.variants.setdefault(name, Counter())[outcome] += 1

    @property
    def server_errors(self) -> int:
        return sum(c["5xx"] for c in self.variants.values())

    def to_json(self) -> dict[str, Any]:
        return {"dropped": dict(self.dropped), "variants": {k: dict(v) for k, v in self.variants.items()}}


async def send_with_drops(backend: Backend, request_id: str, spec: RequestSpec, policy: DropPolicy,
                          rng: random.Random, typical_e2e_s: float, tally: Tally) -> RequestRecord | None:
    """The request's record, or None when the client dropped it on purpose (counted in the tally)."""
    kind = policy.draw(rng)
    if kind is None:
        return await backend.send(request_id, spec)
    leave_after = (rng.uniform(0.0, ABORT_WITHIN_S) if kind == "abort"
                   else rng.uniform(0.2, 0.9) * typical_e2e_s)
    try:
        return await asyncio.wait_for(backend.send(request_id, spec), leave_after)
    except TimeoutError:
        tally.dropped[kind] += 1
        return None


def check_mix(share: float, backend: Backend) -> None:
    if not 0.0 <= share <= 1.0:
        raise UsageError(f"--mix {share}: expected the share of mixed requests, between 0 and 1")
    if share and not isinstance(backend, HttpBackend):
        raise UsageError("--mix sends request shapes through the HTTP API: use it with --url")


async def send_variant(backend: HttpBackend, spec: RequestSpec, rng: random.Random, tally: Tally) -> None:
    """One request of a random VARIANTS shape; its outcome (2xx / 4xx / 5xx / transport) lands in the tally."""
    name = rng.choice(VARIANTS)
    path, body = backend._body(spec)  # the plain request's body, so the variants differ only as named
    text_key = "messages" if "messages" in body else "prompt"
    if name == "not streamed":
        body.update(stream=False)
        body.pop("stream_options")
    elif name == "n=2":
        body.update(n=2, temperature=0.8, seed=rng.randrange(1 << 31))
    elif name == "stop strings":
        body.update(stop=[" the", "\n\n"], ignore_eos=False)
    elif name in ("shared prefix", "short prompt"):
        prompt = SHARED_PREFIX + str(rng.randrange(1 << 20)) if name == "shared prefix" else "Hi"
        body[text_key] = [{"role": "user", "content": prompt}] if text_key == "messages" else prompt
    try:
        async with backend.client.stream("POST", backend.base + path, json=body) as response:
            await response.aread()
    except httpx.HTTPError:
        tally.count_variant(name, "transport error")
        return
    tally.count_variant(name, f"{response.status_code // 100}xx")
