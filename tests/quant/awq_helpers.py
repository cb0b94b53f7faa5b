"""Test-side AWQ: quantise an fp32 weight and pack it exactly as AutoAWQ writes a GEMM checkpoint
(pseudo_quantize_tensor + WQLinear_GEMM.from_linear), independently of r1deploy.quant.awq; and a
float64 reference dequantisation."""

from __future__ import annotations

import numpy as np
import torch

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear


def autoawq_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] fp32 -> (intweight [in, out], zeros [in/g, out] ints 0..15, scales [in/g, out] fp16)."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(-1, group_size)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).view(out_f, in_f // group_size)
    zeros = (-torch.round(min_val / scales.reshape(-1, 1))).clamp(0, 15).view(out_f, in_f // group_size)
    scales16 = scales.half()  # the checkpoint's scales; from_linear rounds with the fp16 ones
    s_full = scales16.float().repeat_interleave(group_size, dim=1)  # [out, in]
    z_full = zeros.repeat_interleave(group_size, dim=1)
    intweight = torch.clamp(torch.round(weight.float() / s_full) + z_full, 0, 15).to(torch.int32)
    return intweight.t().contiguous(), zeros.to(torch.int32).t().contiguous(), scales16.t().contiguous()


def autoawq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints 0..15 -> int32 [R, C/8], AutoAWQ's loop: qweight[:, col] |= v[:, col*8 + order[i]] << 4i."""
    v = values.numpy().astype(np.uint32)
    packed = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for col in range(v.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= v[:, col * 8 + ORDER_MAP[i]] << np.uint32(i * 4)
    return torch.from_numpy(packed.view(np.int32).copy())


def awq_checkpoint_tensors(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    intweight, zeros, scales = autoawq_quantize(weight, group_size)
    return {"qweight": autoawq_pack(intweight), "qzeros": autoawq_pack(zeros), "scales": scales}


def reference_dequant(intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 [in, out] from the unpacked values (no packing involved)."""
    z = zeros.double().repeat_interleave(group_size, dim=0)
    s = scales.double().repeat_interleave(group_size, dim=0)
    return (intweight.double() - z) * s
