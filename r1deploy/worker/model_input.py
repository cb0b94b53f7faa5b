"""ModelInput: one scheduled step as an executor runs it: a host ForwardBatch (or, under --dp-attention, one
sub-batch per rank), the index of tokens still on the device (async scheduling) and one sampling row per
sampled position, in the order the executor returns logits. Executors and ranks never see requests;
engine/model_input.py builds it from the scheduler's output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.layers.sampler import SamplingBatch
from r1deploy.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRows:
    """What the sampler needs of each sampled position (a verify step's position j sees the drafts before
    it as output, so penalties and min_tokens count them)."""

    params: tuple[SamplingParams, ...]
    prompt_ids: tuple[Sequence[int], ...]
    output_ids: tuple[Sequence[int], ...]
    generators: tuple[torch.Generator | None, ...]
    num_output_tokens: tuple[int, ...]
    # Structured output: [R, ceil(V / 32)] int32 of allowed tokens (structured/grammar.py), None when no row
    # is constrained. Built on the engine's host from grammars that have seen every token their request
    # sampled: structured requests never run with a placeholder or a draft.
    token_bitmask: torch.Tensor | None = None

    def to_batch(self, vocab_size: int, device: torch.device, eos_token_ids: Sequence[int]) -> SamplingBatch:
        return SamplingBatch.build(self.params, self.prompt_ids, self.output_ids, self.generators, vocab_size,
                                   device, eos_token_ids, num_output_tokens=self.num_output_tokens,
                                   token_bitmask=self.token_bitmask)


@dataclass(frozen=True)
class ModelInput:
    batch: ForwardBatch | None  # an ordinary step, on the host (pinned when bound for a GPU)
    parts: tuple[ForwardBatch | None, ...]  # --dp-attention: each rank's sub-batch (None: no sequences)
    sampling: SamplingRows | None  # one row per sampled position, in logits order; None: nothing sampled
    # async scheduling: [2, P] (position in input_ids, row of the in-flight step's samples); [] when none
    pending_index: list[list[int]]
