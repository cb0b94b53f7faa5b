"""Speculative decoding's drafters: each proposes up to k tokens after a sequence's newest token, which the
engine verifies in one forward of 1 + k tokens (engine/engine.py accepts them; the scheduler rolls back
the rejected ones' K/V)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from r1deploy.engine_config import SpeculativeConfig
from r1deploy.spec.ngram import NgramProposer
from r1deploy.spec.oracle import OracleProposer


class Proposer(Protocol):
    num_speculative_tokens: int

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to max_tokens (<= num_speculative_tokens) drafts to follow token_ids; [] for none."""
        ...


def make_proposer(config: SpeculativeConfig | None, vocab_size: int) -> Proposer | None:
    if config is None:
        return None
    if config.method == "oracle":  # tests and benchmarks only
        inner = None if config.inner is None else make_proposer(
            dataclasses.replace(config, method=config.inner, acceptance=(), references=None, inner=None), vocab_size)
        return OracleProposer(config.num_speculative_tokens, config.references or {}, config.acceptance, vocab_size,
                              config.seed, inner)
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
