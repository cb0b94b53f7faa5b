"""Tensor parallelism over torch.distributed: process groups, typed step messages, worker processes."""
