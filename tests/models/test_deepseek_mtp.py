"""DeepSeek's MTP layer (models/deepseek_mtp.py) loaded from an R1-layout checkpoint (bf16 names and FP8 block
pairs) matches a reference written from the paper's equations over transformers' decoder block, through the
paged latent cache in chunks and one position at a time; models without an MTP layer are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepseek_support import TOL, read_checkpoint, write_fp8_checkpoint
from mtp_support import MTP, ReferenceMTP, write_mtp_checkpoint

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.errors import UsageError
from r1deploy.models.loader import load_model
from r1deploy.quant.fp8_block import FP8_DTYPE
from r1deploy.weights import WeightLoadError

TOKENS = [5, 200, 17, 3, 99, 41, 41, 7, 250, 13, 64, 8]


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("mtp")
    return path, write_mtp_checkpoint(path)


@torch.no_grad()
def paged_mtp_logits(model, hidden: torch.Tensor, chunks: list[int], block_size: int = 4) -> torch.Tensor:
    """Our MTP layer over TOKENS' positions 0..L-2 in chunks of the given sizes, on shuffled cache blocks."""
    draft = model.draft
    length = len(TOKENS) - 1
    table = list(range(31, 31 - (length + block_size - 1) // block_size, -1))
    cache = torch.zeros(draft.cache_spec.shape(32, block_size))
    out, start = [], 0
    for size in chunks:
        batch = ForwardBatch.build([TOKENS[start + 1:start + 1 + size]], [start], [table], block_size,
                                   num_sampled=[size])
        out.append(draft.compute_logits(draft(batch, cache, hidden[start:start + size])))
        start += size
    assert start == length
    return torch.cat(out)


def test_mtp_forward_matches_the_paper_reference(mtp_dir) -> None:
    path, tensors = mtp_dir
    reference = ReferenceMTP(path, tensors)
    hidden = reference.main_hidden(TOKENS)
    expected = reference.logits(TOKENS, hidden)
    model = load_model(str(path), dtype="float32", draft=True).model
    assert model.draft is not None and len(model.model.layers) == MTP
    torch.testing.assert_close(model.draft.eh_proj.weight, tensors[f"model.layers.{MTP}.eh_proj.weight"])
    assert model.draft.compute_logits(hidden[:1]).shape == (1, 256)
    for chunks in ([11], [5, 4, 1, 1], [1] * 11):  # one prefill; chunked prefill then decode; decode throughout
        torch.testing.assert_close(paged_mtp_logits(model, hidden, chunks), expected, atol=TOL, rtol=TOL)
    # The main model's own final hidden states are what the engine feeds it: the same ones.
    batch = ForwardBatch.build([TOKENS], [0], [list(range(4))], 4)
    torch.testing.assert_close(model(batch, [torch.zeros(model.kv_cache_spec.shape(4, 4))] * MTP), hidden,
                               atol=TOL, rtol=TOL)


def test_fp8_checkpoint_loads_the_mtp_layer_like_the_main_layers(mtp_dir, tmp_path: Path) -> None:
    path, tensors = mtp_dir
    config = json.loads((path / "config.json").read_text())
    twin = write_fp8_checkpoint(tensors, config, tmp_path)
    stored = dict(read_checkpoint(tmp_path))
    assert stored[f"model.layers.{MTP}.mlp.experts.0.up_proj.weight"].dtype == FP8_DTYPE
    assert f"model.layers.{MTP}.eh_proj.weight_scale_inv" in stored
    kept = load_model(str(tmp_path), dtype="float32", quantization="fp8", draft=True).model
    assert kept.draft.mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    assert kept.draft.self_attn.q_a_proj.weight.dtype == FP8_DTYPE
    dequantised = load_model(str(tmp_path), dtype="float32", quantization="none", draft=True).model
    reference = ReferenceMTP(path, twin)
    hidden = reference.main_hidden(TOKENS)
    expected = reference.logits(TOKENS, hidden)
    for model in (kept, dequantised):
        torch.testing.assert_close(paged_mtp_logits(model, hidden, [6, 5]), expected, atol=TOL, rtol=TOL)


def test_models_without_an_mtp_layer_are_refused(mtp_dir, tmp_path: Path) -> None:
    path, tensors = mtp_dir
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(UsageError, match="num_nextn_predict_layers"):
        load_model(str(tmp_path), draft=True)
    assert load_model(str(tmp_path)).model.draft is None  # without speculation the MTP tensors are skipped
    from safetensors.torch import save_file

    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.startswith(f"model.layers.{MTP}.")},
              str(stripped / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="no complete MTP layer"):
        load_model(str(stripped), draft=True)
    with pytest.raises(UsageError, match="needs a model with its own MTP layer"):
        load_model(None, draft=True)  # the embedded Llama
