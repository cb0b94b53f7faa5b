"""DeepSeek's block-scaled FP8 (e4m3): weights with one fp32 scale per 128 x 128 tile, activations
with one scale per token per 128 channels.

The checkpoint stores `weight` as float8_e4m3fn and `weight_scale_inv` [ceil(out/128), ceil(in/128)]
(the factor that takes FP8 back to real values). Edge tiles are partial: 576 rows give 5 scale rows,
so the tile size must come from the format, never from rows / scale_rows (transformers 5.17's CPU
dequantiser makes that mistake). `act_quant` and `fp8_block_gemm` are the torch reference for the
Triton W8A8 kernels; on CPU the model runs dequantised weights.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128
_AMAX_FLOOR = 1e-4  # DeepSeek kernel.py: keeps all-zero blocks from dividing by zero


def _expand_scales(scales: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[ceil(R/br), ceil(C/bc)] tile scales -> [R, C] per element, edge tiles cut to the tensor."""
    rows, cols = shape
    return scales.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize_fp8_block(
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    scale_inv: torch.Tensor,  # [ceil(out/128), ceil(in/128)] fp32
    dtype: torch.dtype,
    block: tuple[int, int] = (BLOCK, BLOCK),
) -> torch.Tensor:  # [out, in] in dtype
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight {tuple(weight.shape)} with {block} tiles needs scales {expected}, "
                         f"got {tuple(scale_inv.shape)}")
    # fp32 product, one rounding to the target dtype: DeepSeek's weight_dequant_kernel.
    scales = _expand_scales(scale_inv.float(), tuple(weight.shape), block)
    return (weight.float() * scales).to(dtype)


def quantize_fp8_block(
    weight: torch.Tensor,  # [out, in]
    block: tuple[int, int] = (BLOCK, BLOCK),
) -> tuple[torch.Tensor, torch.Tensor]:  # ([out, in] e4m3, [ceil(out/128), ceil(in/128)] fp32)
    """Per-tile amax scaling, the way DeepSeek made its checkpoints (zero-padded edge tiles)."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = weight.new_zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(grid[0], block[0], grid[1], block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=_AMAX_FLOOR)  # [grid_r, grid_c]
    scale_inv = amax / FP8_MAX
    quantized = (weight.float() / _expand_scales(scale_inv, (rows, cols), block)).to(FP8_DTYPE)
    return quantized, scale_inv


def act_quant(
    x: torch.Tensor,  # [..., K], K a multiple of 128
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., K] e4m3, [..., K/128] fp32)
    """Dynamic activation quantisation, one scale per token per 128 contiguous channels."""
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {block}")
    groups = x.float().unflatten(-1, (-1, block))  # [..., K/128, 128]
    scale = groups.abs().amax(dim=-1).clamp(min=_AMAX_FLOOR) / FP8_MAX  # [..., K/128]
    quantized = (groups / scale[..., None]).to(FP8_DTYPE).flatten(-2)
    return quantized, scale


def fp8_block_gemm(
    a: torch.Tensor,  # [M, K] e4m3, from act_quant
    a_scale: torch.Tensor,  # [M, K/128]
    b: torch.Tensor,  # [N, K] e4m3 weight
    b_scale: torch.Tensor,  # [ceil(N/128), K/128] weight_scale_inv
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [M, N] = a @ b.T
    """Reference semantics of DeepSeek's fp8_gemm: fp32 partial sums per 128-wide K block, each
    scaled by its token's and its weight tile's scale, summed in fp32."""
    num_k_blocks = a_scale.shape[-1]
    a_blocks = a.float().unflatten(-1, (num_k_blocks, -1))  # [M, KB, 128]
    b_blocks = b.float().unflatten(-1, (num_k_blocks, -1))  # [N, KB, 128]
    partial = torch.einsum("mkc,nkc->mnk", a_blocks, b_blocks)  # [M, N, KB]
    b_rows = b_scale.float().repeat_interleave(BLOCK, dim=0)[: b.shape[0]]  # [N, KB]
    return (partial * a_scale.float()[:, None, :] * b_rows[None, :, :]).sum(-1).to(out_dtype)


def dequantize_expert(gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor,
                      down_scale: torch.Tensor, dtype: torch.dtype, block: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8 routed expert (gate_up [2I, H] with scales [2 * ceil(I/bn), ...], down [H, I]) in dtype: gate
    and up dequantised separately, each with its own tile rows (they never share a tile)."""
    size, tiles = gate_up.shape[0] // 2, gate_up_scale.shape[0] // 2
    gate = dequantize_fp8_block(gate_up[:size], gate_up_scale[:tiles], dtype, block)
    up = dequantize_fp8_block(gate_up[size:], gate_up_scale[tiles:], dtype, block)
    return torch.cat([gate, up]), dequantize_fp8_block(down, down_scale, dtype, block)
