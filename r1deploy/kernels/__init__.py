"""Triton kernels for the CUDA path (a leaf package: imports only torch and triton, nothing of the project).

Each module holds one kernel and its launcher. The attention kernels' plain-PyTorch reference is the Torch
attention backend (r1deploy/attention: torch_backend.py, mla_torch.py) and RMSNorm's is
layers/norm.rms_norm_torch, the code the CPU runs; the other kernels keep a `_ref` beside them. The attention
backends and layers import these lazily, on CUDA only, so CPU runs never need triton.
"""
