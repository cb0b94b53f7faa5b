"""Running a missed expert where its host copy lives instead of copying it in (`--cpu-compute`): the cost
model that decides (bytes / PCIe bandwidth against max(FLOPs / CPU rate, bytes / host memory bandwidth)) and
the SwiGLU on the host copy."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1deploy.layers.activation import silu_and_mul
from r1deploy.quant.fp8_block import dequantize_expert

CPU_COMPUTE_MODES = ("never", "always", "auto")


@dataclass(frozen=True)
class CostModel:
    """Rates for choosing copy-then-compute vs compute-on-host for a missed expert."""

    pcie_bytes_per_s: float = 25e9
    cpu_flops_per_s: float = 1e12
    host_bytes_per_s: float = 100e9

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.pcie_bytes_per_s

    def cpu_s(self, nbytes: int, flops: float) -> float:
        return max(flops / self.cpu_flops_per_s, nbytes / self.host_bytes_per_s)

    def host_is_faster(self, expert_bytes: int, num_tokens: int, hidden_size: int, intermediate_size: int) -> bool:
        flops = 2.0 * num_tokens * 3 * hidden_size * intermediate_size
        return self.cpu_s(expert_bytes, flops) < self.copy_s(expert_bytes)

    @staticmethod
    def measure(device: torch.device, nbytes: int = 64 << 20, dim: int = 1024) -> CostModel:
        """Time one host->device copy of nbytes (pinned where CUDA), a host GEMM and a host copy."""
        device = torch.device(device)
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host_dst = torch.empty_like(src)
        for _ in range(2):  # first round warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            pcie = nbytes / max(time.perf_counter() - t0, 1e-9)
            t0 = time.perf_counter()
            host_dst.copy_(src)
            host = 2 * nbytes / max(time.perf_counter() - t0, 1e-9)
            a = torch.randn(dim, dim)
            t0 = time.perf_counter()
            a @ a
            flops = 2 * dim**3 / max(time.perf_counter() - t0, 1e-9)
        return CostModel(pcie, flops, host)


def host_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor | None,
                down_scale: torch.Tensor | None, fp8_block: tuple[int, int]) -> torch.Tensor:
    """One expert on its host copy; x [n, H] on any device -> [n, H] float32 on x's device. FP8: dequantised in
    the activations' dtype, as the resident path does."""
    if gate_up_scale is not None:
        gate_up, down = dequantize_expert(gate_up, down, gate_up_scale, down_scale, x.dtype, fp8_block)
    out = F.linear(silu_and_mul(F.linear(x.to(gate_up.device), gate_up)), down)
    return out.to(device=x.device, dtype=torch.float32)
