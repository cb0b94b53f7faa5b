"""Step messages from rank 0 to the workers: typed fields in a fixed int64 layout, over torch.distributed.

A message is two broadcasts on the control group: a fixed 10-int64 header (magic, version, op and the
sizes), then one int64 payload holding the step's tensors back to back. With async scheduling a step
also carries the [2, P] index of its pending tokens (PendingTokens): positions whose ids the previous
step sampled, which every rank fills from its copy of those samples (broadcast by rank 0 on the device). A data-parallel-attention step
(--dp-attention) carries one sub-batch per rank, concatenated in rank order, and a [D, 3] table of
each part's (tokens, sequences, sampled rows); every rank receives all parts and runs its own. Nothing is pickled: the
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

from r1deploy.engine.batch import ForwardBatch

MAGIC = 0x52314450  # "R1DP"
VERSION = 3
# magic, version, op, T tokens, B sequences, W block-table width, R sampled rows, block size, D data-parallel parts,
# P pending tokens
HEADER_LEN = 10
_MAX_ELEMENTS = 1 << 31


class Op(enum.IntEnum):
    STEP = 1  # run the model on the batch and join its collectives
    SHUTDOWN = 2  # leave the worker loop


@dataclass(frozen=True)
class StepMessage:
    op: Op
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, W] int64
    query_lens: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int64
    sample_rows: torch.Tensor  # [R] int64: the sequences whose logits are computed this step
    block_size: int
    # --dp-attention: [D, 3] int64, each rank's (tokens, sequences, sampled rows), the parts concatenated in
    # rank order above (sample_rows index sequences within their part); [0, 3]: an ordinary step
    dp_sizes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.int64))
    # async scheduling: [2, P] int64, (position in input_ids, row of the previous step's samples); [2, 0]: none
    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 0, dtype=torch.int64))

    @staticmethod
    def shutdown() -> StepMessage:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepMessage(Op.SHUTDOWN, empty, empty, empty, empty.view(0, 0), empty, empty, empty, 0)

    @property
    def is_data_parallel(self) -> bool:
        return self.dp_sizes.shape[0] > 0

    @staticmethod
    def of_parts(parts: list[tuple[ForwardBatch | None, list[int]]], block_size: int) -> StepMessage:
        """A data-parallel-attention step: one (sub-batch or None for a rank without sequences, sampled rows
        of that sub-batch) per rank, in rank order; block tables padded to the widest."""
        width = max([1] + [b.block_tables.shape[1] for b, _ in parts if b is not None])
        empty = torch.zeros(0, dtype=torch.int64)
        columns: list[list[torch.Tensor]] = [[] for _ in range(7)]
        sizes = []
        for batch, rows in parts:
            if batch is None:
                if rows:
                    raise ValueError("a rank without sequences samples no rows")
                sizes.append((0, 0, 0))
                continue
            tables = batch.block_tables.long()
            tables = torch.cat([tables, tables.new_zeros(tables.shape[0], width - tables.shape[1])], dim=1)
            values = (batch.input_ids.long(), batch.positions.long(), batch.slot_mapping.long(), tables,
                      torch.tensor(batch.query_lens_cpu, dtype=torch.int64),
                      torch.tensor(batch.seq_lens_cpu, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64))
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            sizes.append((batch.num_tokens, batch.num_seqs, len(rows)))

        def cat(i: int, shape: tuple[int, ...] = (0,)) -> torch.Tensor:
            return torch.cat(columns[i]) if columns[i] else empty.view(shape)

        return StepMessage(Op.STEP, cat(0), cat(1), cat(2), cat(3, (0, width)), cat(4), cat(5), cat(6), block_size,
                           torch.tensor(sizes, dtype=torch.int64).view(-1, 3))

    def part(self, rank: int) -> StepMessage:
        """Rank's own sub-batch of a data-parallel-attention step, as an ordinary step message."""
        sizes = self.dp_sizes.tolist()
        if not 0 <= rank < len(sizes):
            raise ValueError(f"step message: no part for rank {rank} ({len(sizes)} parts)")
        t0, b0, r0 = (sum(s[i] for s in sizes[:rank]) for i in range(3))
        t, b, r = sizes[rank]
        return StepMessage(self.op, self.input_ids[t0:t0 + t], self.positions[t0:t0 + t],
                           self.slot_mapping[t0:t0 + t], self.block_tables[b0:b0 + b], self.query_lens[b0:b0 + b],
                           self.seq_lens[b0:b0 + b], self.sample_rows[r0:r0 + r], self.block_size)

    @staticmethod
    def of_batch(batch: ForwardBatch, rows: list[int], pending: list[list[int]] | None = None) -> StepMessage:
        """A step from a ForwardBatch built on the host; pending: PendingTokens' [2, P] index, if any."""
        return StepMessage(
            Op.STEP, batch.input_ids.long(), batch.positions.long(), batch.slot_mapping.long(),
            batch.block_tables.long(), torch.tensor(batch.query_lens_cpu, dtype=torch.int64),
            torch.tensor(batch.seq_lens_cpu, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64),
            batch.block_size,
            pending=torch.tensor(pending, dtype=torch.int64).view(2, -1) if pending else torch.zeros(2, 0,
                                                                                                  dtype=torch.int64),
        )

    def header(self) -> torch.Tensor:
        b, w = self.block_tables.shape
        return torch.tensor([MAGIC, VERSION, int(self.op), self.input_ids.numel(), b, w, self.sample_rows.numel(),
                             self.block_size, self.dp_sizes.shape[0], self.pending.shape[1]], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        return torch.cat([self.input_ids, self.positions, self.slot_mapping, self.block_tables.flatten(),
                          self.query_lens, self.seq_lens, self.sample_rows, self.dp_sizes.flatten(),
                          self.pending.flatten()]).to(torch.int64)

    @staticmethod
    def sizes(header: torch.Tensor) -> tuple[Op, int, int, int, int, int, int]:
        """Validate a header: (op, T, B, W, R, block size, D, P)."""
        if header.dtype != torch.int64 or header.shape != (HEADER_LEN,):
            raise ValueError("step message: bad header layout")
        magic, version, op, t, b, w, r, block_size, d, p = (int(v) for v in header.tolist())
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"step message: bad magic/version {magic:#x}/{version}")
        if op not in Op.__members__.values():
            raise ValueError(f"step message: unknown op {op}")
        if (min(t, b, w, r, block_size, d, p) < 0 or (r > b and not d) or d > 1 << 16 or p > t or (p and d)
                or b * w + 3 * t + 2 * b + r + 3 * d + 2 * p > _MAX_ELEMENTS):
            raise ValueError("step message: sizes out of range")
        return Op(op), t, b, w, r, block_size, d, p

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, t, b, w, r, _, d, p = StepMessage.sizes(header)
        return 3 * t + b * w + 2 * b + r + 3 * d + 2 * p

    @staticmethod
    def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepMessage:
        op, t, b, w, r, block_size, d, p = StepMessage.sizes(header)
        if payload.dtype != torch.int64 or payload.shape != (3 * t + b * w + 2 * b + r + 3 * d + 2 * p,):
            raise ValueError("step message: payload does not match its header")
        parts = payload.split([t, t, t, b * w, b, b, r, 3 * d, 2 * p])
        message = StepMessage(op, parts[0], parts[1], parts[2], parts[3].view(b, w), parts[4], parts[5], parts[6],
                              block_size, parts[7].view(d, 3), parts[8].view(2, p))
        if p and not (0 <= int(message.pending[0].min()) and int(message.pending[0].max()) < t
                      and 0 <= int(message.pending[1].min())):
            raise ValueError("step message: pending-token index out of range")
        if op is Op.STEP and int(message.query_lens.sum()) != t:
            raise ValueError("step message: query lengths do not add up to the token count")
        if d:
            message._check_parts()
        return message

    def _check_parts(self) -> None:
        """Each part's sizes add up, its query lengths sum to its tokens and its rows index its sequences."""
        sizes = self.dp_sizes.tolist()
        if min(min(s) for s in sizes) < 0 or any(r > b for _, b, r in sizes):
            raise ValueError("step message: data-parallel part sizes out of range")
        if [sum(s[i] for s in sizes) for i in range(3)] != [self.input_ids.numel(), self.query_lens.numel(),
                                                            self.sample_rows.numel()]:
            raise ValueError("step message: data-parallel parts do not add up to the step")
        for rank, (t, b, r) in enumerate(sizes):
            part = self.part(rank)
            if int(part.query_lens.sum()) != t or (r and not 0 <= int(part.sample_rows.min()) <= int(
                    part.sample_rows.max()) < b):
                raise ValueError(f"step message: data-parallel part {rank} is inconsistent")

    def to_batch(self, device: torch.device | str) -> ForwardBatch:
        """The ForwardBatch every rank runs (rank 0 too, so all ranks run the same tensors)."""
        query_lens = self.query_lens.tolist()
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)

        def put(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return x.to(dtype).to(device, non_blocking=True)

        return ForwardBatch(
            input_ids=put(self.input_ids), positions=put(self.positions), slot_mapping=put(self.slot_mapping),
            block_tables=put(self.block_tables, torch.int32),
            query_start_loc=put(torch.tensor(starts), torch.int32), seq_lens=put(self.seq_lens, torch.int32),
            logits_indices=put(torch.tensor([s - 1 for s in starts[1:]], dtype=torch.int64)),
            query_lens_cpu=tuple(query_lens), seq_lens_cpu=tuple(self.seq_lens.tolist()),
            block_size=self.block_size,
        )


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
