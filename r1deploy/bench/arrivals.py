"""When requests are sent: batch rounds, fixed concurrency, or open-loop Poisson / gamma arrivals.

- Rounds(batch, repeat): the seed's `--batch 32 --repeat 100`: B requests at once, wait for all, repeat.
- Concurrency(c): closed loop, c requests always in flight (vLLM --max-concurrency with rate=inf).
- Rate(rate, burstiness): open loop; gaps drawn from a gamma distribution with shape = burstiness
  and mean 1/rate. burstiness 1 is a Poisson process; < 1 is burstier, > 1 smoother (vLLM's
  --burstiness). An optional max_concurrency caps requests in flight (the wait is client queueing,
  excluded from TTFT as in vLLM).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Rounds:
    batch: int
    repeat: int

    def __post_init__(self) -> None:
        if self.batch < 1 or self.repeat < 1:
            raise ValueError("--batch and --repeat must be >= 1")

    @property
    def total(self) -> int:
        return self.batch * self.repeat

    def describe(self) -> str:
        return f"{self.repeat} round{'s' if self.repeat != 1 else ''} of {self.batch} concurrent requests"


@dataclass(frozen=True)
class Concurrency:
    concurrency: int
    num_requests: int

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < 1:
            raise ValueError("--concurrency and --num-requests must be >= 1")

    @property
    def total(self) -> int:
        return self.num_requests

    def describe(self) -> str:
        return f"{self.num_requests} requests, {self.concurrency} in flight"


@dataclass(frozen=True)
class Rate:
    rate: float  # requests per second
    num_requests: int
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burstiness > 0 or self.num_requests < 1:
            raise ValueError("--rate and --burstiness must be > 0, --num-requests >= 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")

    @property
    def total(self) -> int:
        return self.num_requests

    def describe(self) -> str:
        kind = "Poisson" if self.burstiness == 1.0 else f"gamma burstiness {self.burstiness:g}"
        cap = f", at most {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"{self.num_requests} requests at {self.rate:g} req/s ({kind}){cap}"


Schedule = Rounds | Concurrency | Rate


def intervals(rate: float, burstiness: float, n: int, seed: int) -> list[float]:
    """n gaps (s) between arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate."""
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]
