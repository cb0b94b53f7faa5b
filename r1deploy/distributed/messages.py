"""Step messages from rank 0 to the workers: typed fields in a fixed int64 layout, over torch.distributed.

A message is two broadcasts on the control group: a fixed 10-int64 header (magic, version, op and the
sizes), then one int64 payload holding the step's ForwardBatch columns (ForwardBatch.columns) back to back. With async scheduling a step
also carries the [2, P] index of its pending tokens (PendingTokens): positions whose ids the previous
step sampled, which every rank fills from its copy of those samples (broadcast by rank 0 on the device). A data-parallel-attention step
(--dp-attention) carries one sub-batch per rank, concatenated in rank order, and a [D, 3] table of
each part's (tokens, sequences, sampled positions); every rank receives all parts and runs its own. Nothing is pickled: the
transport takes and returns only `StepMessage`s, and a receiver checks every size before it
slices, so a malformed message fails loudly instead of running a wrong step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from r1deploy.core.forward_batch import ForwardBatch

MAGIC = 0x52314450  # "R1DP"
VERSION = 4
# magic, version, op, T tokens, B sequences, W block-table width, R sampled positions, block size,
# D data-parallel parts, P pending tokens
HEADER_LEN = 10
_MAX_ELEMENTS = 1 << 31


class Op(enum.IntEnum):
    STEP = 1  # run the model on the batch and join its collectives
    SHUTDOWN = 2  # leave the worker loop


@dataclass(frozen=True)
class StepMessage:
    op: Op
    # ForwardBatch.columns(): input_ids, positions, slot_mapping [T], block_tables [B, W], query_lens, seq_lens,
    # num_sampled [B] (int64); --dp-attention: the parts' columns concatenated in rank order
    columns: tuple[torch.Tensor, ...]
    block_size: int
    # --dp-attention: [D, 3] int64, each rank's (tokens, sequences, sampled positions); [0, 3]: an ordinary step
    dp_sizes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.int64))
    # async scheduling: [2, P] int64, (position in input_ids, row of the previous step's samples); [2, 0]: none
    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 0, dtype=torch.int64))

    @property
    def input_ids(self) -> torch.Tensor:
        return self.columns[0]

    @property
    def block_tables(self) -> torch.Tensor:
        return self.columns[3]

    @property
    def query_lens(self) -> torch.Tensor:
        return self.columns[4]

    @property
    def num_sampled(self) -> torch.Tensor:
        return self.columns[6]

    @staticmethod
    def shutdown() -> StepMessage:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepMessage(Op.SHUTDOWN, (empty, empty, empty, empty.view(0, 0), empty, empty, empty), 0)

    @property
    def is_data_parallel(self) -> bool:
        return self.dp_sizes.shape[0] > 0

    @staticmethod
    def of_parts(parts: list[ForwardBatch | None], block_size: int) -> StepMessage:
        """A data-parallel-attention step: one sub-batch (or None for a rank without sequences) per rank, in
        rank order; block tables padded to the widest."""
        width = max([1] + [b.block_tables.shape[1] for b in parts if b is not None])
        empty = torch.zeros(0, dtype=torch.int64)
        columns: list[list[torch.Tensor]] = [[] for _ in range(7)]
        sizes = []
        for batch in parts:
            if batch is None:
                sizes.append((0, 0, 0))
                continue
            values = list(batch.columns())
            tables = values[3]
            values[3] = torch.cat([tables, tables.new_zeros(tables.shape[0], width - tables.shape[1])], dim=1)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            sizes.append((batch.num_tokens, batch.num_seqs, batch.num_logits))

        def cat(i: int) -> torch.Tensor:
            return torch.cat(columns[i]) if columns[i] else empty.view((0, width) if i == 3 else (0,))

        return StepMessage(Op.STEP, tuple(cat(i) for i in range(7)), block_size,
                           torch.tensor(sizes, dtype=torch.int64).view(-1, 3))

    def part(self, rank: int) -> StepMessage:
        """Rank's own sub-batch of a data-parallel-attention step, as an ordinary step message."""
        sizes = self.dp_sizes.tolist()
        if not 0 <= rank < len(sizes):
            raise ValueError(f"step message: no part for rank {rank} ({len(sizes)} parts)")
        t0, b0 = (sum(s[i] for s in sizes[:rank]) for i in range(2))
        t, b, _ = sizes[rank]
        tokens, sequences = slice(t0, t0 + t), slice(b0, b0 + b)
        return StepMessage(self.op, tuple(c[tokens] if i < 3 else c[sequences] for i, c in enumerate(self.columns)),
                           self.block_size)

    @staticmethod
    def of_batch(batch: ForwardBatch, pending: list[list[int]] | None = None) -> StepMessage:
        """A step from a ForwardBatch built on the host; pending: PendingTokens' [2, P] index, if any."""
        index = torch.tensor(pending, dtype=torch.int64).view(2, -1) if pending else torch.zeros(2, 0, dtype=torch.int64)
        return StepMessage(Op.STEP, batch.columns(), batch.block_size, pending=index)

    def header(self) -> torch.Tensor:
        b, w = self.block_tables.shape
        return torch.tensor([MAGIC, VERSION, int(self.op), self.input_ids.numel(), b, w, int(self.num_sampled.sum()),
                             self.block_size, self.dp_sizes.shape[0], self.pending.shape[1]], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        return torch.cat([c.flatten() for c in self.columns] + [self.dp_sizes.flatten(), self.pending.flatten()]
                         ).to(torch.int64)

    @staticmethod
    def sizes(header: torch.Tensor) -> tuple[Op, int, int, int, int, int, int, int]:
        """Validate a header: (op, T, B, W, R, block size, D, P)."""
        if header.dtype != torch.int64 or header.shape != (HEADER_LEN,):
            raise ValueError("step message: bad header layout")
        magic, version, op, t, b, w, r, block_size, d, p = (int(v) for v in header.tolist())
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"step message: bad magic/version {magic:#x}/{version}")
        if op not in Op.__members__.values():
            raise ValueError(f"step message: unknown op {op}")
        if (min(t, b, w, r, block_size, d, p) < 0 or r > t or d > 1 << 16 or p > t or (p and d)
                or b * w + 3 * t + 3 * b + 3 * d + 2 * p > _MAX_ELEMENTS):
            raise ValueError("step message: sizes out of range")
        return Op(op), t, b, w, r, block_size, d, p

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, t, b, w, _, _, d, p = StepMessage.sizes(header)
        return 3 * t + b * w + 3 * b + 3 * d + 2 * p

    @staticmethod
    def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepMessage:
        op, t, b, w, r, block_size, d, p = StepMessage.sizes(header)
        if payload.dtype != torch.int64 or payload.shape != (StepMessage.payload_len(header),):
            raise ValueError("step message: payload does not match its header")
        parts = payload.split([t, t, t, b * w, b, b, b, 3 * d, 2 * p])
        columns = (*parts[:3], parts[3].view(b, w), *parts[4:7])
        message = StepMessage(op, columns, block_size, parts[7].view(d, 3), parts[8].view(2, p))
        if p and not (0 <= int(message.pending[0].min()) and int(message.pending[0].max()) < t
                      and 0 <= int(message.pending[1].min())):
            raise ValueError("step message: pending-token index out of range")
        if op is Op.STEP:
            if int(message.query_lens.sum()) != t:
                raise ValueError("step message: query lengths do not add up to the token count")
            if b and (int(message.num_sampled.min()) < 0 or bool((message.num_sampled > message.query_lens).any())
                      or int(message.num_sampled.sum()) != r):
                raise ValueError("step message: sampled positions out of range")
        if d:
            message._check_parts()
        return message

    def _check_parts(self) -> None:
        """Each part's sizes add up and its query lengths sum to its tokens."""
        sizes = self.dp_sizes.tolist()
        if min(min(s) for s in sizes) < 0:
            raise ValueError("step message: data-parallel part sizes out of range")
        totals = [self.input_ids.numel(), self.query_lens.numel(), int(self.num_sampled.sum())]
        if [sum(s[i] for s in sizes) for i in range(3)] != totals:
            raise ValueError("step message: data-parallel parts do not add up to the step")
        for rank, (t, _, r) in enumerate(sizes):
            part = self.part(rank)
            if int(part.query_lens.sum()) != t or int(part.num_sampled.sum()) != r:
                raise ValueError(f"step message: data-parallel part {rank} is inconsistent")

    def to_batch(self, device: torch.device | str) -> ForwardBatch:
        """The ForwardBatch every rank runs (rank 0 too, so all ranks run the same tensors)."""
        return ForwardBatch.from_columns(self.columns, self.block_size, device)


class StepChannel:
    """Broadcasts StepMessages from rank 0 over a torch.distributed group; tensors only, never objects."""

    def __init__(self, group: Any, src: int = 0, send_timeout_s: float = 300.0) -> None:
        self.group = group
        self.src = src
        # Receivers wait without limit (an idle server sends nothing); a send to a rank that stopped
        # receiving (hung) must not block rank 0 forever.
        self.send_timeout = timedelta(seconds=send_timeout_s)

    def send(self, message: StepMessage) -> None:
        if not isinstance(message, StepMessage):
            raise TypeError(f"StepChannel sends StepMessage only, got {type(message).__name__}")
        payload = message.payload()
        for tensor in (message.header(), payload) if payload.numel() else (message.header(),):
            dist.broadcast(tensor, src=self.src, group=self.group, async_op=True).wait(timeout=self.send_timeout)

    def recv(self) -> StepMessage:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=self.src, group=self.group)
        payload = torch.empty(StepMessage.payload_len(header), dtype=torch.int64)
        if payload.numel():
            dist.broadcast(payload, src=self.src, group=self.group)
        return StepMessage.unpack(header, payload)
