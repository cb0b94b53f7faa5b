"""Read a llama-architecture GGUF (llama.cpp's format) as an HF config, HF-named fp32 tensors and a tokenizer.

llama.cpp's converter permutes q_proj/k_proj rows so its rotary kernel can pair adjacent values;
we run transformers' rotate_half layout, so those rows are permuted back here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from r1deploy.weights import WeightLoadError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: Path) -> GGUFReader:
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"cannot read GGUF file {path}: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise WeightLoadError(f"GGUF file {path} has architecture {arch!r}; only 'llama' is supported")
    return reader


def gguf_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """An HF LlamaForCausalLM config.json dict built from the GGUF's llama.* metadata."""
    heads = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _field(reader, "llama.vocab_size", None) or len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": _field(reader, "llama.attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, "llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        "hidden_act": "silu",
        "torch_dtype": "float32",  # what dequantisation produces
    }


def iter_gguf_tensors(reader: GGUFReader, hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) for every GGUF tensor, dequantised and with q/k rows un-permuted."""
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name, kind = _hf_name(tensor.name)
        # dequantize gives the row-major [rows, cols] (ggml lists shapes fastest-first).
        data = torch.tensor(np.asarray(dequantize(tensor.data, tensor.tensor_type)), dtype=torch.float32)
        if kind in heads:
            data = _unpermute(data, heads[kind])
        yield name, data


def load_gguf_tokenizer(path: Path, reader: GGUFReader) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    # transformers' GGUF tokenizer import can pick the wrong special tokens (it takes eos = bos for
    # SmolLM2); the GGUF metadata is the authority.
    for role in ("bos", "eos", "pad", "unk"):
        token_id = _field(reader, f"tokenizer.ggml.{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # it would strip spaces before punctuation in BPE output
    return tokenizer


def convert_gguf_to_hf_dir(path: Path, target: Path) -> None:
    """Write config.json, model.safetensors (fp32) and tokenizer files for `path` to `target`, atomically:
    everything goes to a temporary sibling that is renamed into place, so a reader never sees half a cache."""
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the cache's mode
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(dict(iter_gguf_tensors(reader, hf_config)), tmp / "model.safetensors", metadata={"format": "pt"})
        load_gguf_tokenizer(path, reader).save_pretrained(tmp)
        _fsync_tree(tmp)  # the data is on disk before the name is: a crash after the rename finds whole files
        try:
            os.rename(tmp, target)
            _fsync_tree(target.parent, files=False)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(directory: Path, files: bool = True) -> None:
    if files:
        for item in directory.iterdir():
            if item.is_file():
                with item.open("rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's permute: rows (head, pair, half) -> (head, half, pair)."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> tuple[str, str]:
    """GGUF tensor name -> (HF name, GGUF module kind)."""
    if match := _LAYER_RE.fullmatch(gguf_name):
        layer, kind, suffix = match.groups()
        if kind in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}", kind
    module, _, suffix = gguf_name.rpartition(".")
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{suffix}", module
    raise WeightLoadError(f"GGUF tensor {gguf_name} is not supported (no HF equivalent known)")


_REQUIRED = object()


def _field(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise WeightLoadError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()
