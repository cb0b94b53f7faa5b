"""Speculative decoding's drafters: each proposes up to k tokens after a sequence's newest token, which the
engine verifies in one forward of 1 + k tokens (engine/engine.py accepts them; the scheduler rolls back
the rejected ones' K/V). A `Proposer` drafts from a sequence's tokens alone (ngram); a `BatchProposer` runs a
model of its own (mtp: DeepSeek's MTP layer), sees every step and drafts for all requests at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from r1deploy.engine_config import SpeculativeConfig
from r1deploy.spec.ngram import NgramProposer
from r1deploy.spec.oracle import OracleProposer

if TYPE_CHECKING:
    from r1deploy.engine.request import Request
    from r1deploy.engine.scheduler import ScheduledChunk
    from r1deploy.worker.model_runner import ModelRunner


class Proposer(Protocol):
    num_speculative_tokens: int

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to max_tokens (<= num_speculative_tokens) drafts to follow token_ids; [] for none."""
        ...


@runtime_checkable
class BatchProposer(Protocol):
    num_speculative_tokens: int

    def after_step(self, chunks: Sequence[ScheduledChunk], num_rejected: Mapping[int, int]) -> None:
        """A step ran (chunks in batch order; drafts each verification rejected, by id(request)): follow it."""
        ...

    def propose_batch(self, wanted: Sequence[tuple[Request, int]]) -> list[list[int]]:
        """Up to `room` drafts for each (request, room) after its newest token."""
        ...


def make_proposer(config: SpeculativeConfig | None, vocab_size: int, runner: ModelRunner | None = None
                  ) -> Proposer | BatchProposer | None:
    """runner: the engine's rank-0 runner, whose model carries the draft head ("mtp")."""
    if config is None:
        return None
    if config.method == "oracle":  # tests and benchmarks only
        inner = None if config.inner is None else make_proposer(
            dataclasses.replace(config, method=config.inner, acceptance=(), references=None, inner=None), vocab_size,
            runner)
        return OracleProposer(config.num_speculative_tokens, config.references or {}, config.acceptance, vocab_size,
                              config.seed, inner)
    if config.method == "mtp":
        from r1deploy.spec.mtp import MTPProposer

        assert runner is not None, "the mtp method runs the model's draft head"
        return MTPProposer(runner, config.num_speculative_tokens, runner.config.block_size)
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)


def propose_drafts(proposer: Proposer | BatchProposer, wanted: Sequence[tuple[Request, int]]) -> list[list[int]]:
    """Drafts for each (request, room) the engine wants them for."""
    if isinstance(proposer, BatchProposer):
        return proposer.propose_batch(wanted)
    return [proposer.propose(request.all_token_ids, room) for request, room in wanted]
