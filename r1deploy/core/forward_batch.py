"""ForwardBatch: everything a model needs to know about one engine step, passed explicitly to forward.

A step runs T new tokens belonging to B sequences. Each sequence contributes its next
`query_len` tokens (a prefill chunk, one decode token, or 1 + k tokens of a speculative verify step) on
top of `seq_len - query_len` tokens whose K/V already sit in the paged cache, and asks for the logits of
its last `num_sampled` positions (0 for a prefill chunk that stops short of its newest token).

The same schema travels to tensor-parallel workers: `columns()` gives its int64 host columns and
`from_columns` rebuilds the batch from them (distributed/messages.py), so the layout exists once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: new tokens of all sequences, concatenated in batch order
    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids of each sequence, 0-padded
    query_start_loc: torch.Tensor  # [B + 1] int32: prefix sums of query_lens
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache once this step's K/V are written
    logits_indices: torch.Tensor  # [R] int64: index into T of each sampled position, sequence by sequence
    query_lens_cpu: tuple[int, ...]  # the same lengths on the host, for loops and slicing
    seq_lens_cpu: tuple[int, ...]
    block_size: int
    num_sampled_cpu: tuple[int, ...]  # [B] positions sampled per sequence (its last ones); R = their sum
    # The attention backend's metadata for this step (r1deploy/attention/base.py), built on the host before
    # the forward by ModelRunner (AttentionBackend.build_metadata); None until then.
    attn_metadata: Any = None
    # --dp-attention: every rank's token count this step, in rank order (this batch is this rank's own part);
    # the MoE layers exchange tokens by them. None: one batch for every rank.
    dp_token_counts: tuple[int, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> ForwardBatch:
        """The batch with its tensors on `device` (asynchronous copies from pinned host memory)."""
        if self.input_ids.device == torch.device(device):
            return self
        tensors = {name: getattr(self, name).to(device, non_blocking=True) for name in _TENSOR_FIELDS}
        return dataclasses.replace(self, **tensors)

    @property
    def num_logits(self) -> int:
        return len(self.logits_indices)

    def columns(self) -> tuple[torch.Tensor, ...]:
        """The batch's host description as int64 tensors: input_ids, positions, slot_mapping [T], block_tables
        [B, W], query_lens, seq_lens, num_sampled [B]; from_columns inverts it."""
        return (self.input_ids.long().cpu(), self.positions.long().cpu(), self.slot_mapping.long().cpu(),
                self.block_tables.long().cpu(), torch.tensor(self.query_lens_cpu, dtype=torch.int64),
                torch.tensor(self.seq_lens_cpu, dtype=torch.int64),
                torch.tensor(self.num_sampled_cpu, dtype=torch.int64))

    @staticmethod
    def from_columns(columns: tuple[torch.Tensor, ...], block_size: int, device: torch.device | str
                     ) -> ForwardBatch:
        input_ids, positions, slots, tables, query_lens, seq_lens, num_sampled = columns
        query_lens_cpu, num_sampled_cpu = tuple(query_lens.tolist()), tuple(num_sampled.tolist())
        starts, logits_indices = _offsets(query_lens_cpu, num_sampled_cpu)

        def put(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return x.to(dtype).to(device, non_blocking=True)

        return ForwardBatch(
            input_ids=put(input_ids), positions=put(positions), slot_mapping=put(slots),
            block_tables=put(tables, torch.int32), query_start_loc=put(torch.tensor(starts), torch.int32),
            seq_lens=put(seq_lens, torch.int32), logits_indices=put(torch.tensor(logits_indices, dtype=torch.int64)),
            query_lens_cpu=query_lens_cpu, seq_lens_cpu=tuple(seq_lens.tolist()), block_size=block_size,
            num_sampled_cpu=num_sampled_cpu,
        )

    @staticmethod
    def build(
        token_chunks: list[list[int]],
        num_cached: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        num_sampled: list[int] | None = None,
    ) -> ForwardBatch:
        """Build a batch from per-sequence new tokens, how many tokens each already has cached,
        and each sequence's block table (which must cover num_cached + len(new tokens) slots);
        num_sampled: positions sampled per sequence (default: its last one).
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
        num_sampled = [1] * len(query_lens) if num_sampled is None else num_sampled
        starts, logits_indices = _offsets(query_lens, num_sampled)
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
            logits_indices=on_device(logits_indices, torch.int64),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            block_size=block_size,
            num_sampled_cpu=tuple(num_sampled),
        )


_TENSOR_FIELDS = ("input_ids", "positions", "slot_mapping", "block_tables", "query_start_loc", "seq_lens",
                  "logits_indices")


def _offsets(query_lens: Sequence[int], num_sampled: Sequence[int]) -> tuple[list[int], list[int]]:
    """query_start_loc [B + 1] and logits_indices [R]: each sequence's last num_sampled positions."""
    starts = [0]
    logits_indices: list[int] = []
    for query_len, sampled in zip(query_lens, num_sampled, strict=True):
        if not 0 <= sampled <= query_len:
            raise ValueError(f"a sequence samples 0..{query_len} of its new tokens, not {sampled}")
        starts.append(starts[-1] + query_len)
        logits_indices.extend(range(starts[-1] - sampled, starts[-1]))
    return starts, logits_indices


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
