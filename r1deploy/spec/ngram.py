"""N-gram prompt lookup (vLLM's "ngram" method): when the sequence's last n tokens occurred earlier, propose
the tokens that followed their latest earlier occurrence. Needs no weights; pays off on echo-heavy tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NgramProposer:
    num_speculative_tokens: int
    min_n: int = 1
    max_n: int = 4

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The longest tail n-gram (max_n down to min_n) with an earlier match wins; the latest match of it."""
        k = min(max_tokens, self.num_speculative_tokens)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            tail = list(token_ids[length - n:])
            for start in range(length - n - 1, -1, -1):  # latest first; the tail itself is excluded
                if list(token_ids[start:start + n]) == tail:
                    return list(token_ids[start + n:start + n + k])
        return []
