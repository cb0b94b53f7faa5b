"""build_model_input: a SchedulerOutput -> the ModelInput an executor runs (worker/model_input.py), on the host."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine.request import Request
from r1deploy.engine.scheduler import ScheduledChunk
from r1deploy.structured.grammar import batch_bitmask
from r1deploy.worker.model_input import ModelInput, SamplingRows


def build_model_input(chunks: tuple[ScheduledChunk, ...], previous: tuple[Request, ...] | None, block_size: int,
                      pin_memory: bool, vocab_size: int, dp_rank_of: Callable[[Request], int] | None = None,
                      num_ranks: int = 1) -> tuple[ModelInput, tuple[Request, ...]]:
    """The step's ModelInput and the request of each of its sampling rows. previous: the request of each row of the in-flight step's samples (async scheduling), whose tokens
    this step's placeholders take on the device. dp_rank_of: --dp-attention's request -> rank; the sampling
    rows then follow rank order, the order in which the ranks' logits are gathered."""
    token_chunks, pending_index = _token_chunks(chunks, previous)
    if dp_rank_of is None:
        batch = _build(chunks, range(len(chunks)), token_chunks, block_size, pin_memory)
        order = list(range(len(chunks)))
        parts: tuple[ForwardBatch | None, ...] = ()
    else:
        members: list[list[int]] = [[] for _ in range(num_ranks)]  # chunk indices of each rank, in step order
        for i, chunk in enumerate(chunks):
            members[dp_rank_of(chunk.request)].append(i)
        parts = tuple(_build(chunks, own, token_chunks, block_size, False) if own else None for own in members)
        batch, order = None, [i for own in members for i in own]
    sampled = [chunks[i] for i in order if chunks[i].samples]
    return (ModelInput(batch, parts, _sampling_rows(sampled, vocab_size), pending_index),
            tuple(c.request for c in sampled for _ in range(c.num_sampled)))


def _build(chunks: tuple[ScheduledChunk, ...], members: Sequence[int], token_chunks: list[list[int]],
           block_size: int, pin_memory: bool) -> ForwardBatch:
    return ForwardBatch.build([token_chunks[i] for i in members], [chunks[i].num_cached_before for i in members],
                              [chunks[i].request.block_table for i in members], block_size, "cpu",
                              pin_memory=pin_memory, num_sampled=[chunks[i].num_sampled for i in members])


def _sampling_rows(chunks: list[ScheduledChunk], vocab_size: int) -> SamplingRows | None:
    if not chunks:
        return None
    params, prompts, outputs, generators, counts, grammars = [], [], [], [], [], []
    for chunk in chunks:
        r = chunk.request
        assert r.grammar is None or (chunk.num_sampled == 1 and not r.num_placeholders), \
            "a grammar's mask is for the token after every accepted one"
        for j in range(chunk.num_sampled):
            params.append(r.params)
            prompts.append(r.prompt_token_ids)
            outputs.append(r.output_token_ids + list(chunk.draft_token_ids[:j]) if j else r.output_token_ids)
            generators.append(r.generator)
            counts.append(r.num_output_tokens + r.num_placeholders + j)
            grammars.append(r.grammar)
    return SamplingRows(tuple(params), tuple(prompts), tuple(outputs), tuple(generators), tuple(counts),
                        batch_bitmask(grammars, vocab_size) if any(grammars) else None)


def _token_chunks(chunks: tuple[ScheduledChunk, ...], previous: tuple[Request, ...] | None
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Each chunk's new tokens on the host, and the [2, K] index of PendingTokens: a chunk that runs
    past its request's known tokens ends with the one token `previous` sampled for it (a placeholder)."""
    rows = {} if previous is None else {id(r): i for i, r in enumerate(previous)}
    token_chunks: list[list[int]] = []
    index: list[list[int]] = [[], []]
    start = 0
    for c in chunks:
        end = c.num_cached_before + c.num_new_tokens
        if c.request.num_placeholders and end > c.request.num_tokens:
            token_chunks.append(c.request.token_slice(c.num_cached_before, end - 1) + [0])
            index[0].append(start + c.num_new_tokens - 1)
            index[1].append(rows[id(c.request)])
        else:
            token_chunks.append(c.request.token_slice(c.num_cached_before, end))
        start += c.num_new_tokens
    return token_chunks, index if index[0] else []
