"""Faults at startup: corrupt, truncated or missing weight files and a config.json with wrong types stop
the load with one clear error naming the file; the converted-GGUF cache is written atomically (temporary
name, fsync, rename), so a full disk or a SIGKILL mid-write leaves no half cache and the next start recovers."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from r1deploy.errors import UsageError
from r1deploy.models.loader import embedded_gguf_path, load_model
from r1deploy.weights import WeightLoadError, gguf_reader
from r1deploy.weights.gguf_reader import convert_gguf_to_hf_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from tiny import save_tiny_model_dir


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny_model_dir(tmp_path / "tiny")


def test_truncated_gguf_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "half.gguf"
    with embedded_gguf_path().open("rb") as f:
        bad.write_bytes(f.read(1_000_000))
    with pytest.raises(WeightLoadError, match="half.gguf"):
        load_model(str(bad))


def test_truncated_or_missing_shard_names_the_file(tiny_dir: Path) -> None:
    shard = next(tiny_dir.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=shard.name):
        load_model(str(tiny_dir))
    shard.unlink()
    with pytest.raises(WeightLoadError, match="safetensors"):
        load_model(str(tiny_dir))


@pytest.mark.parametrize("field, value", [("hidden_size", "big"), ("num_hidden_layers", [2]),
                                          ("vocab_size", None)])
def test_config_with_wrong_types_names_the_file(tiny_dir: Path, field: str, value: object) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    config[field] = value
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config\.json is not usable"):
        load_model(str(tiny_dir))


def _temp_dirs(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.*"))


def test_gguf_cache_survives_a_full_disk_and_a_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "smollm2"
    # SIGKILL while the converter writes: nothing under the cache's name, only a temporary sibling.
    code = ("import sys; from pathlib import Path; from r1deploy.weights.gguf_reader import convert_gguf_to_hf_dir; "
            "convert_gguf_to_hf_dir(Path(sys.argv[1]), Path(sys.argv[2]))")
    writer = subprocess.Popen([sys.executable, "-c", code, str(embedded_gguf_path()), str(target)],
                              cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 300
    while not any((d / "config.json").exists() for d in _temp_dirs(target)) and writer.poll() is None:
        assert time.monotonic() < deadline, "the converter never started writing"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert not target.exists()

    # A full disk half-way through the weights: the error reaches the caller, no cache and no temporary left.
    real_save = gguf_reader.save_file

    def disk_full(tensors: dict, path: Path, metadata: dict) -> None:
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_reader, "save_file", disk_full)
    leftover = set(_temp_dirs(target))
    with pytest.raises(OSError, match="No space left"):
        convert_gguf_to_hf_dir(embedded_gguf_path(), target)
    assert not target.exists() and set(_temp_dirs(target)) == leftover

    # The next start converts again and finds a complete cache.
    monkeypatch.setattr(gguf_reader, "save_file", real_save)
    convert_gguf_to_hf_dir(embedded_gguf_path(), target)
    assert json.loads((target / "config.json").read_text())["architectures"]
    with safe_open(target / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) > 10
