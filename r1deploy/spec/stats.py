"""SpecStats: how speculative decoding fared since start (the engine records, metrics and benchmarks read)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Speculative decoding since start: drafts verified and accepted, by position within the step."""

    num_drafts: int = 0  # verify steps of one request
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(self.accepted_per_position)

    def record(self, num_drafts: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for position in range(accepted):
            self.accepted_per_position[position] += 1
