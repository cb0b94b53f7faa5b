"""Start-up visibility: every loading phase logged with its time, weights shard by shard with GB and GB/s."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from r1deploy.models.loader import load_model
from r1deploy.startup import weights_with_progress
from r1deploy.weights.safetensors_reader import iter_safetensors_file

sys.path.insert(0, str(Path(__file__).parent / "server"))
from tiny import save_tiny_model_dir


def test_weights_progress_per_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"model-{i}.safetensors")
        save_file({f"w{i}": torch.zeros(1000, 250)}, files[-1])  # 1 MB each
    with caplog.at_level(logging.INFO, logger="r1deploy.startup"):
        names = [name for name, _ in weights_with_progress(files, iter_safetensors_file)]
    assert names == ["w0", "w1", "w2"]
    lines = [r.getMessage() for r in caplog.records]
    shards = [line for line in lines if "shard" in line and "/3," in line]
    assert [re.match(r"weights: shard (\d)/3, ([\d.]+)/([\d.]+) GB, [\d.]+ GB/s", s).group(1, 2) for s in shards] == [
        ("1", "0.00"), ("2", "0.00"), ("3", "0.00")]
    assert re.search(r"weights: 3 shard\(s\), 0\.00 GB in [\d.]+ s \([\d.]+ GB/s\)", lines[-1])


def test_each_loading_phase_is_timed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_tiny_model_dir(tmp_path)
    with caplog.at_level(logging.INFO, logger="r1deploy.startup"):
        load_model(str(tmp_path))
    timed = {m.group(1) for r in caplog.records if (m := re.fullmatch(r"(.+): \d+\.\d\d s", r.getMessage()))}
    assert {"config", "model build", "weights", "tokenizer"} <= timed
    assert any(r.getMessage().startswith("weights: shard 1/1, ") for r in caplog.records)
