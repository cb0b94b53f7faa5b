"""RMSNorm (+ residual), rotary and SiLU-and-mul against the layers' PyTorch math.

These kernels round like the PyTorch path, so they must match the same-dtype reference to about
one bf16 rounding (tight) and the float64 one within bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.kernels.activation import silu_and_mul, silu_and_mul_ref
from r1deploy.kernels.rmsnorm import rms_norm
from r1deploy.kernels.rotary import rotary_embedding, rotary_embedding_ref
from r1deploy.layers.norm import rms_norm_torch as rms_norm_ref

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# (tokens, hidden, intermediate, heads, head_dim): small for the interpreter, 7B's for the GPU.
SHAPES = [
    pytest.param((7, 48, 40, 5, 16), torch.float32, id="small-fp32"),
    pytest.param((7, 48, 40, 5, 16), torch.bfloat16, id="small-bf16"),
    pytest.param((1024, 3584, 18944, 32, 128), torch.bfloat16, id="real-bf16", marks=gpu),
]


def _tols(dtype: torch.dtype) -> tuple[float, float]:  # (same-dtype reference, float64 reference)
    # On the H200 rotary differed from torch's bf16 path by 2.3e-3 (not bit-equal), so bf16 gets 4e-3.
    return (1e-6, 1e-5) if dtype == torch.float32 else (4e-3, 1e-2)


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape: tuple[int, ...], dtype: torch.dtype, with_residual: bool) -> None:
    tokens, hidden = shape[0], shape[1]
    x, weight = _rand(tokens, hidden, dtype=dtype), (1 + 0.1 * _rand(hidden, dtype=torch.float32)).to(dtype)
    residual = _rand(tokens, hidden, dtype=dtype) if with_residual else None
    out = rms_norm(x, weight, 1e-6, residual)
    same = rms_norm_ref(x, weight, 1e-6, residual)
    wide = rms_norm_ref(x.double(), weight.double(), 1e-6, None if residual is None else residual.double())
    if residual is None:
        out, same, wide = (out,), (same,), (wide,)
    tight, loose = _tols(dtype)
    for o, s, w in zip(out, same, wide, strict=True):
        assert rel_err(o, s) < tight and rel_err(o, w) < loose


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_rotary(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tokens, heads, head_dim = shape[0], shape[3], shape[4]
    qkv = _rand(tokens, (heads + 2) * head_dim, dtype=dtype)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # a strided view, as the model passes
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    out = rotary_embedding(x, cos, sin)
    tight, loose = _tols(dtype)
    assert rel_err(out, rotary_embedding_ref(x, cos, sin)) < tight
    assert rel_err(out, rotary_embedding_ref(x.double(), cos.double(), sin.double())) < loose


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _rand(shape[0], 2 * shape[2], dtype=dtype)
    out = silu_and_mul(x)
    tight, loose = _tols(dtype)
    assert rel_err(out, silu_and_mul_ref(x)) < tight
    assert rel_err(out, silu_and_mul_ref(x.double())) < loose
