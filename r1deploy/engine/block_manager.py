"""BlockManager: the paged KV pool's bookkeeping, with ref counts and prefix caching.

A full block is identified by a chained hash of (parent block's hash, its tokens), so equal
prefixes map to equal hashes. A hash hit is confirmed by comparing tokens, so a hash collision
can cost a cache miss but never a wrong answer. Free blocks keep their contents and hash until
they are reused, least recently freed first, so a finished request's prefix stays reusable.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from r1deploy.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered for prefix reuse
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order = LRU order: allocation pops from the front.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt blocks looked up at admission
        self.num_prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so the cache can hold num_computed + num_new_tokens of this request."""
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def can_allocate_for(self, request: Request, num_new_tokens: int) -> bool:
        """Whether the pool that holds `request` can grow it by num_new_tokens."""
        return self.can_allocate(self.blocks_needed(request, num_new_tokens))

    def same_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing a's blocks gives room to b (one pool: always)."""
        return True

    def match_prefix(self, request: Request) -> None:
        """At admission: reuse cached full blocks of the prompt. At least the prompt's last token is
        left to compute, because its logits are needed to sample the first output token."""
        assert not request.block_table and request.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        prompt = request.prompt_token_ids
        max_hit_blocks = (len(prompt) - 1) // self.block_size
        self.num_prefix_queries += max_hit_blocks
        parent: int | None = None
        for i in range(max_hit_blocks):
            tokens = tuple(prompt[i * self.block_size:(i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            request.block_table.append(block_id)
        hits = len(request.block_table)
        self.num_prefix_hits += hits
        request.num_hashed_blocks = hits
        request.num_computed_tokens = request.num_cached_tokens = hits * self.block_size

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Grow the request's block table for num_new_tokens more tokens. Caller checks can_allocate."""
        for _ in range(self.blocks_needed(request, num_new_tokens)):
            block_id, _ = self.free_block_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]  # evicting a cached prefix block
            block.hash, block.token_ids, block.ref_count = None, (), 1
            request.block_table.append(block_id)

    def register_full_blocks(self, request: Request) -> None:
        """After a step: make the request's newly filled blocks findable by later requests. Only blocks
        filled since the last call are hashed, so a step costs O(new blocks), not O(sequence)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        if num_full <= request.num_hashed_blocks:
            return
        tokens = request.token_slice(request.num_hashed_blocks * self.block_size, num_full * self.block_size)
        parent = self.blocks[request.block_table[request.num_hashed_blocks - 1]].hash \
            if request.num_hashed_blocks else None
        for i in range(request.num_hashed_blocks, num_full):
            block = self.blocks[request.block_table[i]]
            if block.hash is None:
                offset = (i - request.num_hashed_blocks) * self.block_size
                block.token_ids = tuple(tokens[offset:offset + self.block_size])
                block.hash = chain_hash(parent, block.token_ids)
                self.hash_to_block.setdefault(block.hash, block.block_id)
            parent = block.hash
        request.num_hashed_blocks = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Roll the request back to its first num_tokens cached tokens (rejected drafts): blocks past them
        return to the pool as never-filled ones. Hashed blocks stay: only full blocks of real tokens are hashed,
        and a rollback never reaches below num_hashed_blocks."""
        assert num_tokens <= request.num_computed_tokens, "trim only rolls back"
        assert num_tokens >= request.num_hashed_blocks * self.block_size, "a rollback must not reach a registered block"
        keep = -(-num_tokens // self.block_size)
        for block_id in reversed(request.block_table[keep:]):
            self._release(block_id)
        del request.block_table[keep:]
        request.num_computed_tokens = num_tokens

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} ref count went negative"
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash is None:
                self.free_block_ids.move_to_end(block_id, last=False)  # nothing to reuse: evict first

    def free(self, request: Request) -> None:
        """Release the request's blocks. Its last blocks are freed first so they are evicted first,
        keeping the shared early prefix cached longest."""
        for block_id in reversed(request.block_table):
            self._release(block_id)
        request.block_table = []
        request.num_computed_tokens = request.num_hashed_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0


class DataParallelBlockManager:
    """--dp-attention: one BlockManager per rank, each over that rank's own KV pool (block ids are local
    to the rank). A request is assigned a rank when it is admitted with no blocks (a preempted request
    may move) and stays there while it holds blocks: the rank with the fewest used blocks, net of the
    prefix-cache hits it would have there (ties: the lowest rank). The scheduler's calls go to the
    request's pool; the counters add up over the ranks."""

    def __init__(self, num_ranks: int, num_blocks_per_rank: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockManager(num_blocks_per_rank, block_size, enable_prefix_caching) for _ in range(num_ranks)]
        self._ranks: dict[int, tuple[Request, int]] = {}  # id(request) -> (request, rank) while it holds a rank

    def rank_of(self, request: Request) -> int:
        return self._ranks[id(request)][1]

    def _pool(self, request: Request) -> BlockManager:
        return self.pools[self.rank_of(request)]

    @property
    def num_blocks(self) -> int:
        return sum(p.num_blocks for p in self.pools)

    @property
    def num_free_blocks(self) -> int:
        return sum(p.num_free_blocks for p in self.pools)

    @property
    def num_used_blocks(self) -> int:
        return sum(p.num_used_blocks for p in self.pools)

    @property
    def blocks(self) -> list[Block]:
        return [b for p in self.pools for b in p.blocks]

    @property
    def num_prefix_queries(self) -> int:
        return sum(p.num_prefix_queries for p in self.pools)

    @property
    def num_prefix_hits(self) -> int:
        return sum(p.num_prefix_hits for p in self.pools)

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.num_prefix_queries
        return self.num_prefix_hits / queries if queries else 0.0

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        return self.pools[0].blocks_needed(request, num_new_tokens)

    def can_allocate_for(self, request: Request, num_new_tokens: int) -> bool:
        return self._pool(request).can_allocate_for(request, num_new_tokens)

    def same_pool(self, a: Request, b: Request) -> bool:
        return self.rank_of(a) == self.rank_of(b)

    def match_prefix(self, request: Request) -> None:
        """At admission: choose the request's rank, then reuse that rank's cached prefix blocks."""
        rank = min(range(len(self.pools)),
                   key=lambda r: (self.pools[r].num_used_blocks - self._prefix_hits(self.pools[r], request), r))
        self._ranks[id(request)] = (request, rank)
        self.pools[rank].match_prefix(request)

    def _prefix_hits(self, pool: BlockManager, request: Request) -> int:
        """Full prompt blocks `pool` holds for request (what its match_prefix would reuse; nothing is taken)."""
        if not self.enable_prefix_caching:
            return 0
        prompt, parent, hits = request.prompt_token_ids, None, 0
        for i in range((len(prompt) - 1) // self.block_size):
            tokens = tuple(prompt[i * self.block_size:(i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = pool.hash_to_block.get(parent)
            if block_id is None or pool.blocks[block_id].token_ids != tokens:
                break
            hits += 1
        return hits

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        self._pool(request).allocate(request, num_new_tokens)

    def register_full_blocks(self, request: Request) -> None:
        self._pool(request).register_full_blocks(request)

    def trim(self, request: Request, num_tokens: int) -> None:
        self._pool(request).trim(request, num_tokens)

    def free(self, request: Request) -> None:
        """Release the request's blocks on its rank and its rank with them (it holds nothing now)."""
        held = self._ranks.pop(id(request), None)
        self.pools[0 if held is None else held[1]].free(request)
