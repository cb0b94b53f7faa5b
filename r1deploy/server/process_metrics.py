"""The server's own process on /metrics: resident memory, open fds, CPU (prometheus_client's process
collector, Linux /proc) and OS threads, so a load generator on another process or host (`bench --url`)
judges the server's growth rather than its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _ThreadCollector(Collector):
    """OS threads of this process; the process collector has no thread count."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("process_threads", "OS threads of the server process",
                                value=self._process.num_threads())


def register_process_metrics(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    registry.register(_ThreadCollector())
