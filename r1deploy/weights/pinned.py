"""Host memory the offload stores copy from: page-locked where CUDA is up, so host -> device copies are
asynchronous DMA. Shared by the tiered expert store's host pool and the layer stream's host buffers."""

from __future__ import annotations

import contextlib

import torch


class PinnedHostMemory:
    """Allocates host tensors, page-locked when `pin`: in place by cudaHostRegister (torch's pinned allocator
    rounds every request up to a power of two: 64 GiB for R1's 60 GB of gate_up in 4 layers), else through
    torch's pinned allocator, else pageable (no CUDA driver). `release` unpins what it registered."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.pinned_bytes = 0
        self._registered: list[torch.Tensor] = []

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes > 0

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype)
        if not self.pin or not t.numel():
            return t
        if _host_register(t):
            self._registered.append(t)
            self.pinned_bytes += t.nbytes
            return t
        try:
            t = torch.empty(*shape, dtype=dtype, pin_memory=True)
            self.pinned_bytes += t.nbytes
        except RuntimeError:  # no CUDA driver: page-locking unavailable, keep pageable memory
            pass
        return t

    def release(self) -> None:
        """Unpin every registered tensor (their memory goes with the last reference). Idempotent."""
        for t in self._registered:
            with contextlib.suppress(Exception):  # best effort at close
                torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))
        self._registered.clear()
        self.pinned_bytes = 0


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock an existing host tensor in place; False where CUDA (or the call) is unavailable."""
    try:
        if not torch.cuda.is_available():
            return False
        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0))
        return True
    except Exception:  # noqa: BLE001 - any failure: fall back to torch's pinned allocator
        return False
