"""Suite-wide setup. Without a GPU, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set
before anything imports triton (torch may do so while the other tests run), so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
