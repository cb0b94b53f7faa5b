"""Paged GQA attention on the Triton kernels (r1deploy/kernels): the default on CUDA, CUDA-graph capturable.

The decode path (decode_attention.py) takes its grid from the block table's width and the query-row count,
and its lengths from seq_lens on the device, so a captured graph replays any decode or verify step of its
(batch size, query length). The varlen path (prefill_attention.py) needs the longest query on the host and
runs eagerly.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from r1deploy.attention.base import AttentionBackend, AttentionMetadata
from r1deploy.kernels.decode_attention import decode_attention
from r1deploy.kernels.kv_cache import write_kv_cache
from r1deploy.kernels.prefill_attention import prefill_attention


class TritonAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "triton"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
        metadata: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> torch.Tensor:
        write_kv_cache(kv_cache, k, v, metadata.slot_mapping, k_scale, v_scale)
        if metadata.decode_query_len:
            return decode_attention(q, kv_cache, metadata.block_tables, metadata.seq_lens, scale,
                                    k_scale=k_scale, v_scale=v_scale, query_len=metadata.decode_query_len)
        return prefill_attention(q, kv_cache, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens,
                                 metadata.max_query_len, scale, k_scale=k_scale, v_scale=v_scale)
