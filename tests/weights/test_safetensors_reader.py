"""Reading safetensors model directories: shards through an index, and errors that name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from r1deploy.weights import WeightLoadError
from r1deploy.weights.safetensors_reader import INDEX_FILE, iter_safetensors

TENSORS = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(4), "c.bias": torch.zeros(2)}


def write_sharded(path: Path) -> None:
    save_file({k: TENSORS[k] for k in ("a.weight", "b.weight")}, path / "model-00001-of-00002.safetensors")
    save_file({"c.bias": TENSORS["c.bias"]}, path / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
                  "c.bias": "model-00002-of-00002.safetensors"}
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_directory_yields_every_tensor(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    (tmp_path / "stray.safetensors").write_bytes(b"not in the index, so never opened")
    loaded = dict(iter_safetensors(tmp_path))
    assert loaded.keys() == TENSORS.keys()
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_single_file_without_index(tmp_path: Path) -> None:
    save_file(TENSORS, tmp_path / "model.safetensors")
    assert dict(iter_safetensors(tmp_path)).keys() == TENSORS.keys()


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="model-00002-of-00002.safetensors"):
        list(iter_safetensors(tmp_path))


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the data, cut in the header
def test_truncated_file_is_named(tmp_path: Path, keep: float) -> None:
    write_sharded(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightLoadError, match="model-00001-of-00002.safetensors"):
        list(iter_safetensors(tmp_path))


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match="no \\*.safetensors"):
        list(iter_safetensors(tmp_path))
