"""The AWQ kernels' packed weight format, owned here beside the kernels that read it (kernels/ is a leaf):
after loading, quant/awq.repack_awq turns AutoAWQ's [in, out/8] into [out, in/8] group chunks; word j of
chunk c holds input c*g + i*g/8 + j in nibble i, with one uint8 zero and one fp16 scale per chunk. These
are the plain-PyTorch references of that layout."""

from __future__ import annotations

import torch

PACK_FACTOR = 8  # 4-bit values per int32


def unpack_awq_packed(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight_packed int32 [out, in / 8] -> int32 [out, in] of 0..15 in input order (repack_awq's inverse)."""
    out_features, in_words = packed.shape
    words = group_size // PACK_FACTOR
    shifts = 4 * torch.arange(PACK_FACTOR, dtype=torch.int32, device=packed.device)
    chunks = packed.view(out_features, in_words // words, 1, words)
    return ((chunks >> shifts[:, None]) & 0xF).reshape(out_features, in_words * PACK_FACTOR)


def dequantize_awq_packed(
    packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [out, in]
    """The repacked layout's W, exact in fp32 then one rounding (as dequantize_awq)."""
    q = unpack_awq_packed(packed, group_size)
    z = zeros.to(torch.int32).repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return ((q - z).float() * s).to(dtype)
