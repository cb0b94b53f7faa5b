"""Test-side GPTQ: quantise an fp32 weight on GPTQ's grid (Quantizer.find_params: the range includes 0; sym
puts the zero at 8) with round-to-nearest, in act-order when given one, and pack it with AutoGPTQ's
QuantLinear.pack loops (v1 zeros minus one, or v2 as is), independently of r1deploy.quant; and a float64
reference dequantisation. GPTQ's Hessian error compensation changes the integers, not the format."""

from __future__ import annotations

import numpy as np
import torch


def gptq_quantize(
    weight: torch.Tensor, group_size: int, order: torch.Tensor | None = None, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] fp32 -> (intweight [in, out], zeros [G, out] 0..15, scales [G, out] fp16, g_idx [in]).
    order: act-order (the input channels in quantisation order; group j is channels order[j*g : (j+1)*g])."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    order = torch.arange(in_f) if order is None else order
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // g).to(torch.int32)
    intweight = torch.empty(in_f, out_f, dtype=torch.int32)
    zeros, scales = [], []
    for j in range(in_f // g):
        cols = order[j * g : (j + 1) * g]
        w = weight[:, cols].float()  # [out, g]
        xmin, xmax = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
        scale = ((xmax - xmin) / 15).half()  # the checkpoint's fp16 scales round the weights
        zero = torch.full_like(xmin, 8.0) if sym else torch.round(-xmin / scale.float())
        intweight[cols] = torch.clamp(torch.round(w / scale.float()[:, None]) + zero[:, None], 0, 15).t().int()
        zeros.append(zero.int())
        scales.append(scale)
    return intweight, torch.stack(zeros), torch.stack(scales), g_idx


def autogptq_pack(intweight: torch.Tensor, zeros: torch.Tensor, v2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's loops: qweight[row] |= intweight[8 row + j] << 4j; qzeros[:, col] |= (zeros - 1)[:, 8 col + j] << 4j."""
    iw = intweight.numpy().astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 8, iw.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= iw[8 * row + j] << np.uint32(4 * j)
    z = (zeros.numpy().astype(np.int64) - (0 if v2 else 1)).astype(np.uint32)  # v1: zero - 1 (wraps for 0)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8):
            qzeros[:, col] |= z[:, 8 * col + j] << np.uint32(4 * j)
    return torch.from_numpy(qweight.view(np.int32).copy()), torch.from_numpy(qzeros.view(np.int32).copy())


def gptq_checkpoint_tensors(weight: torch.Tensor, group_size: int, order: torch.Tensor | None = None,
                            sym: bool = False, v2: bool = False) -> dict[str, torch.Tensor]:
    intweight, zeros, scales, g_idx = gptq_quantize(weight, group_size, order, sym)
    qweight, qzeros = autogptq_pack(intweight, zeros, v2)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def gptq_reference_dequant(intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                           g_idx: torch.Tensor) -> torch.Tensor:
    """float64 [in, out] from the unpacked values: W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]."""
    g = g_idx.long()
    return (intweight.double() - zeros.double()[g]) * scales.double()[g]
