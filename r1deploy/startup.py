"""Start-up visibility: each phase (config, model build, weights, tokenizer, KV cache, CUDA graphs, warm-up) logged
with its time, and weight loading shown as it goes (shards, GB, GB/s): a rich progress bar on a terminal, one
log line per shard otherwise (a service log), since R1's 163 shards take minutes.

Lines go to the `r1deploy.startup` logger at INFO; `r1deploy serve` shows INFO, library callers choose."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger("r1deploy.startup")
Tensors = Iterator[tuple[str, torch.Tensor]]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    began = time.perf_counter()
    yield
    log.info("%s: %.2f s", name, time.perf_counter() - began)


def weights_with_progress(files: list[Path], read: Callable[[Path], Tensors], show: bool = True) -> Tensors:
    """read(file)'s tensors for every shard in turn; a tensor counts as loaded once the consumer asks for the
    next (memory-mapped reads happen when the model copies it)."""
    total = sum(f.stat().st_size for f in files)
    console = Console(stderr=True)
    bar = show and console.is_terminal
    progress = Progress(TextColumn("weights shard {task.fields[shard]}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task("weights", total=total, shard=f"0/{len(files)}")
    began, done = time.perf_counter(), 0
    with progress if bar else contextlib.nullcontext():
        for index, path in enumerate(files, 1):
            progress.update(task, shard=f"{index}/{len(files)}")
            for item in read(path):
                yield item
                done += item[1].numel() * item[1].element_size()
                progress.update(task, completed=min(done, total))
            if show and not bar:
                elapsed = max(time.perf_counter() - began, 1e-9)
                log.info("weights: shard %d/%d, %.2f/%.2f GB, %.2f GB/s", index, len(files), done / 1e9,
                         total / 1e9, done / 1e9 / elapsed)
    elapsed = max(time.perf_counter() - began, 1e-9)
    log.info("weights: %d shard(s), %.2f GB in %.2f s (%.2f GB/s)", len(files), done / 1e9, elapsed,
             done / 1e9 / elapsed)
