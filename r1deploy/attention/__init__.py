"""Attention backends: paged GQA (AttentionBackend) and MLA (MLABackend), each in plain PyTorch (the CPU's
and the kernels' one reference) and in Triton (CUDA). base.py holds the protocols and the per-step metadata,
selector.py picks a backend by name (--attention-backend)."""
