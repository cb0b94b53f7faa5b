"""Step messages from rank 0 to the workers: typed fields in a fixed int64 layout, over torch.distributed.

A message is two broadcasts on the control group: a fixed 8-int64 header (magic, version, op and the
sizes), then one int64 payload holding the step's tensors back to back. Nothing is pickled: the
transport takes and returns only `StepMessage`s, and a receiver checks every size before it
slices, so a malformed message fails loudly instead of running a wrong step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from r1deploy.engine.batch import ForwardBatch

MAGIC = 0x52314450  # "R1DP"
VERSION = 1
HEADER_LEN = 8  # magic, version, op, T tokens, B sequences, W block-table width, R sampled rows, block size
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

    @staticmethod
    def shutdown() -> StepMessage:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepMessage(Op.SHUTDOWN, empty, empty, empty, empty.view(0, 0), empty, empty, empty, 0)

    @staticmethod
    def of_batch(batch: ForwardBatch, rows: list[int]) -> StepMessage:
        """A step from a ForwardBatch built on the host."""
        return StepMessage(
            Op.STEP, batch.input_ids.long(), batch.positions.long(), batch.slot_mapping.long(),
            batch.block_tables.long(), torch.tensor(batch.query_lens_cpu, dtype=torch.int64),
            torch.tensor(batch.seq_lens_cpu, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64),
            batch.block_size,
        )

    def header(self) -> torch.Tensor:
        b, w = self.block_tables.shape
        return torch.tensor([MAGIC, VERSION, int(self.op), self.input_ids.numel(), b, w, self.sample_rows.numel(),
                             self.block_size], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        return torch.cat([self.input_ids, self.positions, self.slot_mapping, self.block_tables.flatten(),
                          self.query_lens, self.seq_lens, self.sample_rows]).to(torch.int64)

    @staticmethod
    def sizes(header: torch.Tensor) -> tuple[Op, int, int, int, int, int]:
        """Validate a header: (op, T, B, W, R, block size)."""
        if header.dtype != torch.int64 or header.shape != (HEADER_LEN,):
            raise ValueError("step message: bad header layout")
        magic, version, op, t, b, w, r, block_size = (int(v) for v in header.tolist())
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"step message: bad magic/version {magic:#x}/{version}")
        if op not in Op.__members__.values():
            raise ValueError(f"step message: unknown op {op}")
        if min(t, b, w, r, block_size) < 0 or r > b or b * w + 3 * t + 2 * b + r > _MAX_ELEMENTS:
            raise ValueError("step message: sizes out of range")
        return Op(op), t, b, w, r, block_size

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, t, b, w, r, _ = StepMessage.sizes(header)
        return 3 * t + b * w + 2 * b + r

    @staticmethod
    def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepMessage:
        op, t, b, w, r, block_size = StepMessage.sizes(header)
        if payload.dtype != torch.int64 or payload.shape != (3 * t + b * w + 2 * b + r,):
            raise ValueError("step message: payload does not match its header")
        parts = payload.split([t, t, t, b * w, b, b, r])
        message = StepMessage(op, parts[0], parts[1], parts[2], parts[3].view(b, w), parts[4], parts[5], parts[6],
                              block_size)
        if op is Op.STEP and int(message.query_lens.sum()) != t:
            raise ValueError("step message: query lengths do not add up to the token count")
        return message

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
