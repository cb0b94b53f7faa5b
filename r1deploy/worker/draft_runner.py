"""DraftRunner: a model's own draft head (DeepSeek's MTP layer) on one rank: its latent cache and its forward.

The cache is one more latent layer over the main pool's block ids, so a position's MTP latent lives at the
same slot as its main-model latents and follows the same block table, prefix-cache sharing and rollback; no
bookkeeping of its own. Past the pool it has one scratch block per sequence slot (ids num_blocks ..
num_blocks + max_num_seqs - 1): a draft chain of k > 1 tokens writes latents for positions past the blocks a
sequence holds, and those land there instead of in blocks other sequences may own. The draft runs eagerly
(no CUDA graphs); the main model's graphs are untouched.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from r1deploy.attention.base import AttentionBackend, MLABackend
from r1deploy.core.forward_batch import ForwardBatch


class DraftRunner:
    def __init__(self, draft: nn.Module, attn_backend: AttentionBackend | MLABackend, num_blocks: int,
                 block_size: int, max_num_seqs: int, kv_dtype: torch.dtype, device: torch.device) -> None:
        self.draft = draft
        self.attn_backend = attn_backend
        self.num_blocks = num_blocks  # the first scratch block's id
        self.cache = torch.zeros(draft.cache_spec.shape(num_blocks + max_num_seqs, block_size), dtype=kv_dtype,
                                 device=device)
        self.device = device

    def scratch_block(self, row: int) -> int:
        return self.num_blocks + row

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch, previous_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the draft over a host batch (writing its positions' latents); returns the logits [R, vocab] fp32
        and the draft's hidden states [R, hidden] of the batch's sampled positions."""
        batch = batch.to(self.device)
        batch = dataclasses.replace(batch, attn_metadata=self.attn_backend.build_metadata(batch))
        hidden = self.draft(batch, self.cache, previous_hidden)[batch.logits_indices]
        return self.draft.compute_logits(hidden), hidden
