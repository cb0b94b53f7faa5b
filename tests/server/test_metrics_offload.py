"""/metrics carries the expert store's counters when experts are offloaded (and nothing of it otherwise)."""

from __future__ import annotations

import types

from prometheus_client import CollectorRegistry, generate_latest

from r1deploy.server.metrics import _EngineCollector
from r1deploy.weights.tiered_store import TierStats


def _engine(store: object | None) -> types.SimpleNamespace:
    blocks = types.SimpleNamespace(num_used_blocks=1, num_blocks=4, prefix_cache_hit_rate=0.5)
    scheduler = types.SimpleNamespace(running=[], waiting=[], num_preemptions=0)
    return types.SimpleNamespace(block_manager=blocks, scheduler=scheduler, num_aborted=0,
                                 loaded=types.SimpleNamespace(model=types.SimpleNamespace(offload_store=store)),
                                 runner=types.SimpleNamespace(device=types.SimpleNamespace(type="cpu")))


def _scrape(engine: types.SimpleNamespace) -> str:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(lambda: engine))
    return generate_latest(registry).decode()


def test_expert_store_counters_are_exported() -> None:
    stats = TierStats(hits=3, misses=1, evictions=2, bytes_to_device=4096, bytes_from_disk=1024, stall_s=0.25)
    text = _scrape(_engine(types.SimpleNamespace(stats=lambda: stats)))
    assert "r1deploy_expert_cache_hit_rate 0.75" in text
    assert "r1deploy_expert_cache_misses_total 1.0" in text
    assert "r1deploy_expert_cache_bytes_to_device_total 4096.0" in text


def test_no_expert_series_without_offload() -> None:
    assert "expert_cache" not in _scrape(_engine(None))
