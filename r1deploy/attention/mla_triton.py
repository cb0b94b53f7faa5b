"""MLA on the Triton kernels: the latent write (kernels/kv_cache.py) and the absorbed split-K decode
(kernels/mla_decode.py) for decode and verify rows, CUDA-graph capturable; prefilling sequences attend
expanded, as in the Torch backend (GEMMs and SDPA, eager)."""

from __future__ import annotations

from typing import ClassVar

import torch

from r1deploy.attention.base import MLABackend, MLAMetadata
from r1deploy.attention.mla_torch import expanded_prefills, new_output
from r1deploy.kernels.kv_cache import write_latent_cache
from r1deploy.kernels.mla_decode import mla_absorbed_decode


class TritonMLABackend(MLABackend):
    name: ClassVar[str] = "triton"

    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_cache: torch.Tensor, metadata: MLAMetadata, kv_b_weight: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        write_latent_cache(kv_cache, latent, k_pe, metadata.slot_mapping, kv_scale)
        out = new_output(q_nope, kv_b_weight)
        if metadata.decode_tokens is not None:
            rows = metadata.decode_tokens
            out[rows] = mla_absorbed_decode(q_nope[rows], q_pe[rows], kv_cache, metadata.decode_block_tables,
                                            metadata.decode_seq_lens, kv_b_weight, scale, kv_scale=kv_scale,
                                            query_len=metadata.decode_query_len)
        expanded_prefills(out, q_nope, q_pe, kv_cache, metadata, kv_b_weight, scale, kv_scale)
        return out
