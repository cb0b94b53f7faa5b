"""The expert store a model is being built with (`--offload experts`).

Models are built by `cls(config)` inside the loader; rather than thread a store through every
constructor, the loader builds under `building_with(store)`: DeepseekV3ForCausalLM reads it once and hands
it to each MoE block, whose routed experts take the OffloadedExperts method (layers/moe/experts_offload.py:
empty stacks, no resident copy of the experts, ever).
Kept free of r1deploy imports so the layers can import it without cycles.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r1deploy.weights.tiered_store import TieredExpertStore

_CURRENT: contextvars.ContextVar[TieredExpertStore | None] = contextvars.ContextVar("expert_store", default=None)


def current_expert_store() -> TieredExpertStore | None:
    return _CURRENT.get()


@contextlib.contextmanager
def building_with(store: TieredExpertStore | None) -> Iterator[None]:
    token = _CURRENT.set(store)
    try:
        yield
    finally:
        _CURRENT.reset(token)
