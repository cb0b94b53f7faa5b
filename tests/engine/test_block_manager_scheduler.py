"""Block manager and scheduler properties, without a model: a fake step appends a token per sampling chunk."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1deploy.engine.block_manager import BlockManager
from r1deploy.engine.request import Request, RequestStatus
from r1deploy.engine.scheduler import Scheduler
from r1deploy.engine_config import EngineConfig
from r1deploy.sampling_params import SamplingParams


def make_request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens)


def fake_step(scheduler: Scheduler, next_token: int = 7) -> list[Request]:
    """One engine step without a model: every chunk that samples appends next_token."""
    out = scheduler.schedule()
    scheduler.update_after_step(out)
    finished = []
    for chunk in out.chunks:
        if chunk.samples:
            request = chunk.request
            request.output_token_ids.append(next_token)
            if request.num_output_tokens >= request.max_tokens:
                scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                finished.append(request)
    return finished


def check_invariants(bm: BlockManager, scheduler: Scheduler) -> None:
    refs = Counter(b for r in scheduler.running for b in r.block_table)
    refs.update(b for r in scheduler.waiting for b in r.block_table)
    for block in bm.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == refs.get(block.block_id, 0), f"block {block.block_id} ref count"
        assert (block.ref_count == 0) == (block.block_id in bm.free_block_ids)
    for r in scheduler.running:
        assert len(r.block_table) * bm.block_size >= r.num_computed_tokens


def test_prefix_cache_hit_reuses_blocks_and_checks_tokens() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4), bm)
    first = make_request("a", list(range(10)), max_tokens=1)
    sched.add(first)
    fake_step(sched)
    assert first.status is RequestStatus.FINISHED_LENGTH
    second = make_request("b", list(range(8)) + [99, 98, 97])
    sched.add(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 8  # two full blocks of the shared prefix
    assert out.chunks[0].num_new_tokens == 3
    assert second.block_table[:2] == first_blocks_of(bm, list(range(8)))
    # A different prefix with the same length gets no hit.
    third = make_request("c", [5] * 11)
    sched.add(third)
    sched.schedule()
    assert third.num_cached_tokens == 0
    check_invariants(bm, sched)


def first_blocks_of(bm: BlockManager, tokens: list[int]) -> list[int]:
    ids = []
    for i in range(0, len(tokens), bm.block_size):
        chunk = tuple(tokens[i:i + bm.block_size])
        ids.append(next(b.block_id for b in bm.blocks if b.token_ids == chunk))
    return ids


def test_full_prompt_hit_still_computes_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4), bm)
    sched.add(make_request("a", list(range(8)), max_tokens=1))
    fake_step(sched)
    again = make_request("b", list(range(8)))
    sched.add(again)
    out = sched.schedule()
    assert again.num_cached_tokens == 4 and out.chunks[0].num_new_tokens == 4 and out.chunks[0].samples


def test_chunked_prefill_respects_token_budget() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4, max_num_batched_tokens=8), bm)
    long = make_request("long", list(range(20)))
    sched.add(long)
    budgets = []
    while long.num_output_tokens == 0:
        out = sched.schedule()
        budgets.append(out.num_tokens)
        sched.update_after_step(out)
        for chunk in out.chunks:
            if chunk.samples:
                chunk.request.output_token_ids.append(1)
    assert budgets == [8, 8, 4]


def test_preemption_when_pool_is_full_then_everything_finishes() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4), bm)
    requests = [make_request(str(i), list(range(i, i + 7)), max_tokens=6) for i in range(3)]
    for r in requests:
        sched.add(r)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        fake_step(sched)
        check_invariants(bm, sched)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)
    assert sched.num_preemptions > 0
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs_caps_the_batch() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4, max_num_seqs=2), bm)
    for i in range(5):
        sched.add(make_request(str(i), [i, i + 1]))
    out = sched.schedule()
    assert len(out.chunks) == 2 and len(sched.waiting) == 3


def test_batch_wait_holds_first_prefill_until_timeout() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4, batch_wait_timeout_s=0.5, max_num_seqs=4), bm)
    r = make_request("a", [1, 2, 3])
    sched.add(r)
    assert not sched.schedule(now=r.arrival_time + 0.1).chunks
    assert sched.schedule(now=r.arrival_time + 0.6).chunks


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 1000)), max_size=60),
       st.integers(3, 12), st.integers(2, 6))
def test_random_add_step_abort_never_leaks(ops, num_blocks: int, budget: int) -> None:
    bm = BlockManager(num_blocks=num_blocks, block_size=2)
    sched = Scheduler(EngineConfig(block_size=2, max_num_batched_tokens=budget, max_num_seqs=4), bm)
    live: list[Request] = []
    done: list[Request] = []
    shared_prefix = [1, 2, 3, 4]
    for i, (op, x) in enumerate(ops):
        if op == "add":
            # Prompts fit the pool alone (<= 2 blocks plus generated tokens), some share a prefix.
            prompt = (shared_prefix[: x % 5] + [x % 7, i])[: 1 + x % 3]
            r = make_request(str(i), prompt, max_tokens=1 + x % 3)
            sched.add(r)
            live.append(r)
        elif op == "step":
            done.extend(fake_step(sched, next_token=x % 5))
        elif live:
            victim = live[x % len(live)]
            if not victim.status.finished:
                sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        check_invariants(bm, sched)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        fake_step(sched)
        check_invariants(bm, sched)
    assert not sched.has_unfinished()
    assert all(r.status.finished for r in live)
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_frees_blocks_at_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(EngineConfig(block_size=4), bm)
    r = make_request("a", list(range(9)))
    sched.add(r)
    sched.schedule()
    assert bm.num_used_blocks == 3
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert bm.num_used_blocks == 0 and r.block_table == []


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_freed_blocks_are_reused_lru(prefix_caching: bool) -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=prefix_caching)
    sched = Scheduler(EngineConfig(block_size=2), bm)
    for i in range(6):  # more requests over time than blocks: eviction must recycle cached blocks
        r = make_request(str(i), [i, i + 1, i + 2], max_tokens=2)
        sched.add(r)
        while sched.has_unfinished():
            fake_step(sched)
    assert bm.num_free_blocks == 4
