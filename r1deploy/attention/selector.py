"""Pick an attention backend by name and attention kind; the step metadata a model runs with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r1deploy.attention.base import AttentionBackend, AttentionMetadata, MLABackend, MLAMetadata

if TYPE_CHECKING:
    from r1deploy.core.forward_batch import ForwardBatch

ATTENTION_BACKENDS = ("torch", "triton")
ATTENTION_KINDS = ("gqa", "mla")  # a model class's `attention_kind`


def default_attention_backend(device: torch.device | str) -> str:
    """Triton on CUDA, PyTorch elsewhere (triton is not a CPU dependency)."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def make_attention_backend(name: str, kind: str) -> AttentionBackend | MLABackend:
    """name: one of ATTENTION_BACKENDS; kind: "gqa" or "mla". The Triton modules are imported only here."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {kind!r}")
    if name == "torch":
        from r1deploy.attention.mla_torch import TorchMLABackend
        from r1deploy.attention.torch_backend import TorchAttentionBackend

        return TorchMLABackend() if kind == "mla" else TorchAttentionBackend()
    from r1deploy.attention.mla_triton import TritonMLABackend
    from r1deploy.attention.triton_backend import TritonAttentionBackend

    return TritonMLABackend() if kind == "mla" else TritonAttentionBackend()


def step_metadata(batch: ForwardBatch, kind: str) -> AttentionMetadata | MLAMetadata:
    """The metadata a model's forward runs with: the one the engine built before the forward
    (ModelRunner), or, for a caller that runs a model directly (tests, benchmarks), the default backend's
    for the batch's device, built here on the host."""
    expected = MLAMetadata if kind == "mla" else AttentionMetadata
    metadata = batch.attn_metadata
    if metadata is None:
        metadata = make_attention_backend(default_attention_backend(batch.input_ids.device), kind).build_metadata(batch)
    if not isinstance(metadata, expected):
        raise TypeError(f"a {kind} model needs {expected.__name__}, got {type(metadata).__name__}")
    return metadata
