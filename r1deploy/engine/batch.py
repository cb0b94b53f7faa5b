"""ForwardBatch: everything a model needs to know about one engine step, passed explicitly to forward.

A step runs T new tokens belonging to B sequences. Each sequence contributes its next
`query_len` tokens (a prefill chunk or one decode token) on top of `seq_len - query_len`
tokens whose K/V already sit in the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: new tokens of all sequences, concatenated in batch order
    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids of each sequence, 0-padded
    query_start_loc: torch.Tensor  # [B + 1] int32: prefix sums of query_lens
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache once this step's K/V are written
    logits_indices: torch.Tensor  # [B] int64: index into T of each sequence's last new token
    query_lens_cpu: tuple[int, ...]  # the same lengths on the host, for loops and slicing
    seq_lens_cpu: tuple[int, ...]
    block_size: int
    # --dp-attention: every rank's token count this step, in rank order (this batch is this rank's own part);
    # the MoE layers exchange tokens by them. None: one batch for every rank.
    dp_token_counts: tuple[int, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @staticmethod
    def build(
        token_chunks: list[list[int]],
        num_cached: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> ForwardBatch:
        """Build a batch from per-sequence new tokens, how many tokens each already has cached,
        and each sequence's block table (which must cover num_cached + len(new tokens) slots).
        A batch for a GPU is staged in pinned host memory, so its copies do not block the host;
        pin_memory asks for that on a host batch the caller copies to the GPU itself (CUDA graphs)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for chunk, cached, table in zip(token_chunks, num_cached, block_tables, strict=True):
            for pos in range(cached, cached + len(chunk)):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            input_ids.extend(chunk)
            query_lens.append(len(chunk))
            seq_lens.append(cached + len(chunk))
        width = max(1, max(len(t) for t in block_tables))
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        pin = pin_memory or torch.device(device).type == "cuda"

        def on_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device, pin)

        return ForwardBatch(
            input_ids=on_device(input_ids, torch.int64),
            positions=on_device(positions, torch.int64),
            slot_mapping=on_device(slots, torch.int64),
            block_tables=on_device([t + [0] * (width - len(t)) for t in block_tables], torch.int32),
            query_start_loc=on_device(starts, torch.int32),
            seq_lens=on_device(seq_lens, torch.int32),
            logits_indices=on_device([s - 1 for s in starts[1:]], torch.int64),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            block_size=block_size,
        )


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens of a step that the previous step sampled and the host has not seen yet (async
    scheduling). They are gathered from that step's sampled ids on the device, so launching this step
    needs no sync; the host batch holds a dummy id in their place."""

    index: torch.Tensor  # [2, K] int64 on the device: (position in this step's input_ids, row of `sampled`)
    sampled: torch.Tensor  # [B_prev] int64 on the device: the previous step's sampled ids

    def fill(self, input_ids: torch.Tensor) -> None:
        """Overwrite the pending entries of input_ids [T] in place, on the device."""
        input_ids.index_copy_(0, self.index[0], self.sampled.index_select(0, self.index[1]))


def to_device(values: list, dtype: torch.dtype, device: torch.device | str, pin_memory: bool) -> torch.Tensor:
    """A host list as a tensor on `device`. Staged in pinned memory, the copy is asynchronous: the host
    does not wait for the GPU's queue (a pageable source would), and the caching host allocator keeps
    the buffer until the copy has run."""
    return torch.tensor(values, dtype=dtype, pin_memory=pin_memory).to(device, non_blocking=True)
