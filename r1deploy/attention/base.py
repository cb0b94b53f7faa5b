"""The attention seam: per-step metadata built on the host before the forward, and the backend protocols.

A step runs T new tokens of B sequences over a paged cache. Before the model runs, the engine asks the
model's attention backend for the step's metadata (`build_metadata`, host only: lengths come from the
batch's host tuples, never from device tensors) and carries it on ForwardBatch.attn_metadata; every
attention layer hands it back to `metadata.backend.forward`. The same metadata serves every layer.

Decode path: when every sequence has the same number q <= DECODE_MAX_QUERY_LEN of new tokens (q = 1 for
a decode step, 1+k for a speculative verify step), attention runs the decode path, with q query rows per
sequence in sequence order; otherwise the varlen (prefill) path. CUDA graphs capture decode steps, one
graph per (batch size, q): `capture_metadata` builds a step's metadata over the graph's static buffers,
`prepare_for_replay` refreshes whatever a backend keeps beside them before each replay.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # the engine imports the models, which import this: only type-check the batch
    from r1deploy.core.forward_batch import ForwardBatch

# The longest uniform query that still runs the decode path (a verify step of 1 + 7 draft tokens); longer
# chunks are prefill work, which the varlen kernels tile better.
DECODE_MAX_QUERY_LEN = 8


def uniform_query_len(query_lens: tuple[int, ...]) -> int:
    """q when every sequence has q new tokens and q fits the decode path, else 0."""
    if not query_lens or any(n != query_lens[0] for n in query_lens):
        return 0
    return query_lens[0] if query_lens[0] <= DECODE_MAX_QUERY_LEN else 0


@dataclass(frozen=True)
class AttentionMetadata:
    """One step of paged GQA attention. The tensors are the batch's own (views, no copies)."""

    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes (-1: nowhere, a graph's padding)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, this step's tokens included
    query_start_loc: torch.Tensor  # [B + 1] int32
    decode_query_len: int  # q > 0: the decode path, q rows per sequence; 0: the varlen path
    gather_blocks: int  # block-table columns that cover the longest sequence (the graph's full width)
    max_query_len: int  # varlen grids
    query_lens_cpu: tuple[int, ...]  # varlen in plain PyTorch: per-sequence slices
    seq_lens_cpu: tuple[int, ...]


@dataclass(frozen=True)
class MLAMetadata:
    """One step of MLA over the latent cache: which rows decode (absorbed, all at once) and which sequences
    prefill (expanded, one by one). Built once per step for all layers."""

    backend: MLABackend
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks]
    # Rows of T that decode: [D * q] indices, or slice(None) when every row does (a pure decode or verify
    # step builds no tensors, so it can be captured in a CUDA graph); None when nothing decodes.
    decode_tokens: torch.Tensor | slice | None
    decode_block_tables: torch.Tensor | None  # [D, max_blocks]
    decode_seq_lens: torch.Tensor | None  # [D]
    decode_query_len: int  # q rows per decoding sequence (0 when nothing decodes)
    decode_max_len: int  # the longest decoding sequence (the graph's full table width when captured)
    prefills: tuple[tuple[int, int, int, int], ...]  # (sequence, first row in T, query_len, seq_len)


def build_attention_metadata(backend: AttentionBackend, batch: ForwardBatch, capture: bool = False
                             ) -> AttentionMetadata:
    """capture: a CUDA graph's static batch, whose host lengths are placeholders; the decode path then
    gathers the table's full width."""
    q = uniform_query_len(batch.query_lens_cpu)
    width = batch.block_tables.shape[1]
    if capture:
        gather = width
    else:
        gather = min(width, math.ceil(max(batch.seq_lens_cpu, default=0) / batch.block_size))
    return AttentionMetadata(
        backend=backend, slot_mapping=batch.slot_mapping, block_tables=batch.block_tables, seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc, decode_query_len=q, gather_blocks=gather,
        max_query_len=max(batch.query_lens_cpu, default=0), query_lens_cpu=batch.query_lens_cpu,
        seq_lens_cpu=batch.seq_lens_cpu,
    )


def build_mla_metadata(backend: MLABackend, batch: ForwardBatch, capture: bool = False) -> MLAMetadata:
    """A uniform step of q <= DECODE_MAX_QUERY_LEN tokens per sequence decodes whole; otherwise the
    one-token sequences decode and the rest prefill. capture: as build_attention_metadata."""
    lens = list(zip(batch.query_lens_cpu, batch.seq_lens_cpu, strict=True))
    max_len = batch.block_tables.shape[1] * batch.block_size if capture else max(batch.seq_lens_cpu, default=0)
    q = uniform_query_len(batch.query_lens_cpu)
    if q:
        return MLAMetadata(backend, batch.slot_mapping, batch.block_tables, slice(None), batch.block_tables,
                           batch.seq_lens, q, max_len, ())
    starts = [0]
    for n in batch.query_lens_cpu:
        starts.append(starts[-1] + n)
    decode = [i for i, (query_len, _) in enumerate(lens) if query_len == 1]
    prefills = tuple((i, starts[i], n, s) for i, (n, s) in enumerate(lens) if n != 1)
    if not decode:
        return MLAMetadata(backend, batch.slot_mapping, batch.block_tables, None, None, None, 0, 0, prefills)
    device = batch.input_ids.device
    seqs = torch.tensor(decode, device=device)
    return MLAMetadata(
        backend=backend, slot_mapping=batch.slot_mapping, block_tables=batch.block_tables,
        decode_tokens=torch.tensor([starts[i] for i in decode], device=device),
        decode_block_tables=batch.block_tables[seqs], decode_seq_lens=batch.seq_lens[seqs], decode_query_len=1,
        decode_max_len=max(batch.seq_lens_cpu[i] for i in decode), prefills=prefills,
    )


class _GraphHooks:
    """CUDA-graph hooks (mini-sglang's BaseAttnBackend). The defaults fit a backend whose metadata holds only
    views of the batch: the engine's graph buffers are that batch, refilled before every replay, so there
    is nothing to allocate at capture and nothing to refresh at replay. A backend with its own plan
    (FlashInfer-style work buffers) overrides all three."""

    supports_cuda_graphs: ClassVar[bool] = True

    def init_capture_graph(self, max_batch: int, query_lens: tuple[int, ...]) -> None:
        """Before any capture: allocate static buffers for up to max_batch sequences of each query length."""

    def prepare_for_replay(self, metadata: AttentionMetadata | MLAMetadata, batch: ForwardBatch) -> None:
        """Before a replay, once the graph's batch buffers hold `batch`: refresh backend-owned state."""


class AttentionBackend(_GraphHooks, ABC):
    """Paged GQA attention. Cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K,
    1 = V); an FP8 (float8_e4m3fn) cache stores K / k_scale and V / v_scale (r1deploy/kernels/kv_quant.py)."""

    name: ClassVar[str]

    def build_metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        """The step's metadata, on the host before the forward (no device reads)."""
        return build_attention_metadata(self, batch)

    def capture_metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        """Metadata over a CUDA graph's static decode batch (uniform query length, placeholder host lengths)."""
        return build_attention_metadata(self, batch, capture=True)

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
        metadata: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Write this step's k, v [T, KV, D] at metadata.slot_mapping, then attend: q [T, H, D] -> [T, H, D]."""


class MLABackend(_GraphHooks, ABC):
    """Multi-head latent attention over a cache of [c_kv ; k_pe] rows, [num_blocks, block_size, dc + dr];
    an FP8 cache stores row / kv_scale. Decode rows attend absorbed, prefills expanded (layers/mla.py)."""

    name: ClassVar[str]

    def build_metadata(self, batch: ForwardBatch) -> MLAMetadata:
        return build_mla_metadata(self, batch)

    def capture_metadata(self, batch: ForwardBatch) -> MLAMetadata:
        return build_mla_metadata(self, batch, capture=True)

    @abstractmethod
    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_cache: torch.Tensor, metadata: MLAMetadata, kv_b_weight: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        """Write latent [T, dc] and roped k_pe [T, dr] at metadata.slot_mapping, then attend q_nope [T, H, dn],
        roped q_pe [T, H, dr] -> [T, H, dv]. kv_b_weight [H * (dn + dv), dc] is kv_b_proj's weight."""
