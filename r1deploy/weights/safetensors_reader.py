"""Iterate (name, tensor) over a model directory's safetensors files, memory-mapped, one tensor at a time (per
shard too: models/loader.py reads the shards in turn through startup.weights_with_progress)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from r1deploy.weights import WeightLoadError

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shard files named by the index, or every *.safetensors file when there is no index."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"{index} names missing files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        yield from iter_safetensors_file(path)


def iter_safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # truncated or corrupt header, unreadable file
        raise WeightLoadError(f"cannot read {path}: {e}") from None
    with handle as f:
        for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise WeightLoadError(f"cannot read tensor {name} from {path}: {e}") from None
            yield name, tensor
