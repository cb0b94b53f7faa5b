"""Bytes per tensor for each weight format, and the KV-cache dtype.

Formats (shared reference planning.md section 3):
- bf16/fp16: 2 B per weight.
- fp8: DeepSeek block-wise e4m3, one fp32 `weight_scale_inv` per 128x128 block (ceil on both edges,
  so kv_a_proj_with_mqa's 576 rows get 5 scale rows).
- awq: as held on the GPU after loading (quant/awq.repack_awq): int4 weights packed 8 per int32, one uint8
  zero and one fp16 scale per group and output -> 4 + 24/g bits per weight (the checkpoint's int32 `qzeros`
  [in/g, out/8] pack the zeros to 4 bits: 4 + 20/g on disk).
- gptq: the same plus the act-order `g_idx` (one int32 per input channel).
Embeddings, lm_head, norms, biases and routers stay 16-bit in every format (the quantizers skip them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.errors import UsageError
from r1deploy.plan.model_spec import Tensor

WEIGHT_FORMATS = ("bf16", "fp16", "fp8", "awq", "gptq")
KV_DTYPES = ("auto", "bf16", "fp8")
FP8_BLOCK = 128  # DeepSeek weight_block_size [128, 128]
FP8_SCALE_BYTES = 4  # fp32 weight_scale_inv
DEFAULT_GROUP_SIZE = 128  # the AWQ/GPTQ default, and what most published R1-distill INT4 checkpoints use
VALID_GROUP_SIZES = (32, 64, 128, 256)
HALF_BYTES = 2


@dataclass(frozen=True)
class Precision:
    weights: str
    kv_cache: str  # "bf16" | "fp8"
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def kv_bytes(self) -> int:
        return 1 if self.kv_cache == "fp8" else 2

    @property
    def int4(self) -> bool:
        return self.weights in ("awq", "gptq")

    def linear_bytes(self, out_features: int, in_features: int) -> float:
        n = out_features * in_features
        if self.weights == "fp8":
            scales = math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK)
            return n + scales * FP8_SCALE_BYTES
        if self.int4:
            # group_size -1 (GPTQ): one group spans the whole input row
            groups = 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)
            qweight = n / 2
            zeros = groups * out_features  # uint8 per group and output, as repacked after loading
            scales = groups * out_features * HALF_BYTES
            g_idx = in_features * 4 if self.weights == "gptq" else 0
            return qweight + zeros + scales + g_idx
        return n * HALF_BYTES

    def tensor_bytes(self, t: Tensor) -> float:
        """Bytes of one copy of `t` (multiply by copies and scope count for the model total)."""
        if t.kind == "linear":
            return self.linear_bytes(*t.shape)
        if t.kind == "fp32":
            return t.numel * 4
        return t.numel * HALF_BYTES

    def describe(self) -> str:
        w = {"fp8": "FP8 e4m3, 128x128 fp32 block scales", "awq": f"INT4 AWQ g{self.group_size}",
             "gptq": f"INT4 GPTQ {'per row' if self.group_size == -1 else f'g{self.group_size}'}"}.get(self.weights, self.weights.upper())
        return f"weights {w}; KV cache {self.kv_cache.upper()}"


def make_precision(weights: str | None, kv_cache: str, group_size: int | None, checkpoint: str,
                   checkpoint_group: int) -> Precision:
    fmt = (weights or checkpoint).lower()
    if fmt not in WEIGHT_FORMATS:
        raise UsageError(f"unknown --weights {weights!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    if group_size is not None and fmt not in ("awq", "gptq"):
        raise UsageError("--group-size applies only to --weights awq or gptq")
    group = group_size or checkpoint_group or DEFAULT_GROUP_SIZE
    if group not in VALID_GROUP_SIZES and not (group == -1 and fmt == "gptq"):  # -1: GPTQ's one group per row
        raise UsageError(f"--group-size must be one of {', '.join(map(str, VALID_GROUP_SIZES))}")
    kv = kv_cache.lower()
    if kv not in KV_DTYPES:
        raise UsageError(f"unknown --kv-cache-dtype {kv_cache!r}; choose from {', '.join(KV_DTYPES)}")
    # "auto" = the model dtype, as in vLLM; a 16-bit cache for every format here.
    return Precision(weights=fmt, kv_cache="bf16" if kv == "auto" else kv, group_size=group)


def compute_note(precision: Precision, fp8_compute: bool, gpu_name: str) -> str | None:
    """What runs on the tensor cores, when that differs from the stored format."""
    if precision.weights == "fp8" and not fp8_compute:
        return (f"{gpu_name} has no FP8 tensor cores: FP8 weights run weight-only (dequantised to BF16 in the "
                "GEMM, e.g. Marlin), so compute runs at the BF16 rate; --weights bf16 doubles weight memory")
    if precision.kv_cache == "fp8" and not fp8_compute:
        return f"{gpu_name}: FP8 KV cache is storage only (dequantised to BF16 for attention)"
    if precision.int4:
        return "INT4 is weight-only: GEMMs dequantise to FP16/BF16 (Marlin), compute runs at the 16-bit rate"
    return None
