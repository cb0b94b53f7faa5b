"""Scheduler: decides which requests run in the next step and how many tokens each computes.

There are no prefill and decode phases: under one token budget per step, each running request's
computed tokens catch up with its tokens (a decode is a catch-up of 1, a long prompt is cut into
chunks). Running requests go first, in arrival order, then waiting ones in FIFO order. When the KV
pool is full the most recently arrived running request is preempted: its blocks are freed and it
is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from r1deploy.engine.block_manager import BlockManager, DataParallelBlockManager
from r1deploy.engine.request import Request, RequestStatus
from r1deploy.engine_config import EngineConfig


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_new_tokens: int
    num_cached_before: int  # request.num_computed_tokens when scheduled
    # Positions whose logits are sampled: 0 for a prefill chunk that stops short of the newest token, 1 for one
    # that reaches it, 1 + k for a verify step of k drafts (the newest token and each draft give a next token).
    num_sampled: int
    draft_token_ids: tuple[int, ...] = ()  # the drafts this chunk verifies (its last len(...) tokens)

    @property
    def samples(self) -> bool:
        return self.num_sampled > 0

    @staticmethod
    def of(request: Request, num_new_tokens: int) -> ScheduledChunk:
        done = request.num_computed_tokens
        end = done + num_new_tokens
        drafts = tuple(request.spec_token_ids) if end == request.num_tokens_with_drafts else ()
        reaches = end >= request.num_tokens_with_placeholders
        return ScheduledChunk(request, num_new_tokens, done, 1 + len(drafts) if reaches else 0, drafts)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager | DataParallelBlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []

        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.ends_in_flight:
                continue  # a step now would only be discarded
            self._fit_drafts(request, budget)
            num_new = min(request.num_tokens_with_drafts - request.num_computed_tokens, budget)
            while not self.block_manager.can_allocate_for(request, num_new):
                # the newest running request whose blocks share the pool (--dp-attention: the rank) with request's
                victim = next(r for r in reversed(self.running) if self.block_manager.same_pool(r, request))
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            self.block_manager.allocate(request, num_new)
            chunks.append(ScheduledChunk.of(request, num_new))
            budget -= num_new

        if not preempted and not self._hold_for_batching(now):
            budget = self._admit_waiting(chunks, budget)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _fit_drafts(self, request: Request, budget: int) -> None:
        """Keep a request's drafts only where the whole verify step fits this step's token budget and
        its pool, and never past max_tokens: a draft is verified in full or not scheduled at all."""
        drafts = request.spec_token_ids
        if not drafts:
            return
        missing = request.num_tokens_with_placeholders - request.num_computed_tokens
        room = min(budget - missing, request.max_tokens - request.num_output_tokens - 1)
        while drafts and (len(drafts) > room or
                          not self.block_manager.can_allocate_for(request, missing + len(drafts))):
            drafts.pop()

    def _admit_waiting(self, chunks: list[ScheduledChunk], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not request.block_table:
                self.block_manager.match_prefix(request)
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens, budget)
            if not self.block_manager.can_allocate_for(request, num_new):
                self.block_manager.free(request)  # give back prefix hits; retry when blocks free up
                request.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.block_manager.allocate(request, num_new)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # the end of its queue time (metrics), not of a re-queue
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chunks.append(ScheduledChunk.of(request, num_new))
            budget -= num_new
        return budget

    def _hold_for_batching(self, now: float | None) -> bool:
        """The seed guide's optional wait: with nothing running, hold a prefill until the batch is full
        or the oldest waiting request has waited batch_wait_timeout_s."""
        wait = self.config.batch_wait_timeout_s
        if wait <= 0 or self.running or not self.waiting or len(self.waiting) >= self.config.max_num_seqs:
            return False
        now = time.monotonic() if now is None else now
        return now - self.waiting[0].arrival_time < wait

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.spec_token_ids.clear()
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_after_step(self, output: SchedulerOutput, num_rejected: dict[int, int] | None = None) -> None:
        """Advance computed-token counters and publish newly filled blocks to the prefix cache. The engine
        calls this once the step's input tokens are all known on the host (so only real tokens are hashed)
        and before it finishes requests on this step's samples; requests that finished since the step was
        scheduled (async scheduling: ended by the previous step, or aborted) were already freed.
        num_rejected (speculative steps, by id(request)): drafts the verification rejected; their K/V is
        rolled back (BlockManager.trim) before anything is hashed, so the prefix cache sees real tokens only."""
        for chunk in output.chunks:
            request = chunk.request
            if request.status.finished:
                continue
            request.num_computed_tokens += chunk.num_new_tokens
            rejected = 0 if num_rejected is None else num_rejected.get(id(request), 0)
            if rejected:
                self.block_manager.trim(request, request.num_computed_tokens - rejected)
            self.block_manager.register_full_blocks(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request at any point (stop, length or abort) and free its blocks at once."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = status
        request.finish_time = time.monotonic()
