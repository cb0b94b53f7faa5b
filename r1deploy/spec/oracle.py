"""The oracle drafter: FOR TESTS AND BENCHMARKS ONLY, never for production (it must be told the target model's
own greedy output in advance, so it has nothing to propose for a prompt it was not given).

Random weights accept almost no real drafts, so speculative decoding's speed cannot be measured on them with a
real drafter. The oracle knows each prompt's reference continuation (the target's greedy output from a plain
run) and proposes the next k reference tokens after the request's current output, each position i replaced by
a different random token with probability 1 - acceptance[i], independently (seeded by the prompt and the output
position, so a run repeats whatever the batch). Under greedy a right draft is accepted and a wrong one rejected,
so the engine's real end-to-end speed at that acceptance is measured, not computed. Positions are independent,
so the share of drafts accepted at position i (vLLM's per-position rate) is acceptance[0] x ... x acceptance[i].

`inner`: another proposer (n-gram, or DeepSeek's MTP head, which also follows every step) that runs first for its
cost, its drafts discarded, so a drafter's own time is in the measurement at a chosen acceptance.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r1deploy.engine.request import Request
    from r1deploy.engine.scheduler import ScheduledChunk
    from r1deploy.spec import BatchProposer, Proposer


@dataclass(frozen=True)
class OracleProposer:
    num_speculative_tokens: int
    references: Mapping[tuple[int, ...], tuple[int, ...]]  # prompt token ids -> the target's greedy output ids
    acceptance: tuple[float, ...]  # per draft position: the probability it is left right
    vocab_size: int  # a corrupted draft is another token of the vocabulary
    seed: int = 0
    inner: Proposer | BatchProposer | None = None
    # prompt length -> prompt -> (its index, its reference): a lookup costs one slice per distinct prompt length
    _by_length: dict[int, dict[tuple[int, ...], tuple[int, tuple[int, ...]]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.acceptance) != self.num_speculative_tokens:
            raise ValueError(f"oracle: {len(self.acceptance)} acceptance values for "
                             f"{self.num_speculative_tokens} draft positions")
        if self.vocab_size < 2:
            raise ValueError("oracle: a corrupted draft needs a vocabulary of at least 2 tokens")
        by_length: dict[int, dict[tuple[int, ...], tuple[int, tuple[int, ...]]]] = {}
        for index, (prompt, reference) in enumerate(self.references.items()):
            by_length.setdefault(len(prompt), {})[tuple(prompt)] = (index, tuple(reference))
        object.__setattr__(self, "_by_length", dict(sorted(by_length.items(), reverse=True)))

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The reference tokens after the current output, corrupted per position; [] for an unknown prompt."""
        if self.inner is not None:
            self.inner.propose(token_ids, max_tokens)  # run for its cost only
        return self._drafts(token_ids, max_tokens)

    def propose_batch(self, wanted: Sequence[tuple[Request, int]]) -> list[list[int]]:
        """The engine's entry (spec.propose_drafts): a batch drafter inside (MTP) runs on the whole batch, as it
        would alone, for its cost only."""
        if hasattr(self.inner, "propose_batch"):
            self.inner.propose_batch(wanted)
            return [self._drafts(request.all_token_ids, room) for request, room in wanted]
        return [self.propose(request.all_token_ids, room) for request, room in wanted]

    def after_step(self, chunks: Sequence[ScheduledChunk], num_rejected: Mapping[int, int]) -> None:
        """A batch drafter inside follows every step (its own cache), with the oracle's drafts as verified."""
        if hasattr(self.inner, "after_step"):
            self.inner.after_step(chunks, num_rejected)

    def _drafts(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The longest known prompt that token_ids starts with is the request's."""
        for length, prompts in self._by_length.items():
            if length > len(token_ids):
                continue
            found = prompts.get(tuple(token_ids[:length]))
            if found is not None:
                index, reference = found
                return self._corrupted(index, reference, len(token_ids) - length, max_tokens)
        return []

    def _corrupted(self, index: int, reference: tuple[int, ...], generated: int, max_tokens: int) -> list[int]:
        drafts = list(reference[generated:generated + min(max_tokens, self.num_speculative_tokens)])
        rng = random.Random(f"{self.seed}:{index}:{generated}")  # str seeds hash the same in every process
        for i, token in enumerate(drafts):
            if rng.random() >= self.acceptance[i]:
                drafts[i] = (token + 1 + rng.randrange(self.vocab_size - 1)) % self.vocab_size
        return drafts
