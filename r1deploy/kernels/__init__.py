"""Triton kernels for the CUDA path of the dense models (a leaf package: imports only torch and triton).

Each module holds one kernel, its launcher and a plain-PyTorch reference of the same function.
The layers import these lazily, on CUDA tensors only, so CPU runs never need triton.
"""
