"""SpecStats: how speculative decoding fared since start (the engine records; /metrics, bench and the
benchmarks read). Counters only, so two snapshots subtract (SpecStats.since) into one phase's numbers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


def _minus(after: list[int], before: list[int]) -> list[int]:
    return [a - (before[i] if i < len(before) else 0) for i, a in enumerate(after)]


@dataclass
class SpecStats:
    """Speculative decoding since start: drafts verified and accepted, by position within the step, and the
    engine's wall time proposing drafts and running the steps that verify them."""

    num_drafts: int = 0  # verify steps of one request (vLLM's spec_decode_num_drafts)
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)  # drafts that reached position i
    draft_s: float = 0.0  # the engine's time in the proposer (every step, all requests)
    verify_s: float = 0.0  # schedule + forward + sampling + acceptance of the steps that verified drafts
    num_verify_steps: int = 0  # engine steps that verified at least one draft

    @property
    def num_accepted_tokens(self) -> int:
        return sum(self.accepted_per_position)

    def record(self, num_drafts: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        missing = [0] * (num_drafts - len(self.accepted_per_position))
        self.accepted_per_position += missing
        self.proposed_per_position += missing
        for position in range(num_drafts):
            self.proposed_per_position[position] += 1
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    def record_verify_step(self, seconds: float) -> None:
        self.num_verify_steps += 1
        self.verify_s += seconds

    def snapshot(self) -> SpecStats:
        return copy.deepcopy(self)

    def since(self, earlier: SpecStats) -> SpecStats:
        """The counts between `earlier` (a snapshot of the same counters) and now; positions no draft reached
        in between (a longer k before) are left out."""
        proposed = _minus(self.proposed_per_position, earlier.proposed_per_position)
        while proposed and proposed[-1] == 0:
            proposed.pop()
        accepted = _minus(self.accepted_per_position, earlier.accepted_per_position)[:len(proposed)]
        return SpecStats(self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
                         accepted, proposed,
                         self.draft_s - earlier.draft_s, self.verify_s - earlier.verify_s,
                         self.num_verify_steps - earlier.num_verify_steps)

    @property
    def acceptance_per_position(self) -> list[float]:
        """Share of the drafts proposed at position i that were accepted (it needs every draft before it
        accepted too); with full-length drafts this is vLLM's accepted_per_pos / num_drafts."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position,
                                                     strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens one verify step of one request yields: 1 (the target's own) + the drafts accepted (vLLM's)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def summary(self) -> dict[str, Any]:
        """The report's numbers (bench's `speculative` section, the GPU benchmark's JSON)."""
        steps = max(1, self.num_verify_steps)
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
                "acceptance_per_position": self.acceptance_per_position,
                "mean_accepted_length": self.mean_accepted_length,
                "num_verify_steps": self.num_verify_steps, "draft_ms_per_verify_step": self.draft_s * 1e3 / steps,
                "verify_ms_per_verify_step": self.verify_s * 1e3 / steps,
                "draft_s": self.draft_s, "verify_s": self.verify_s}
