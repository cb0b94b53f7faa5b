"""The engine side of the attention seam, on the CPU: which path a step's metadata picks, the CUDA-graph
buffers filled from one ForwardBatch by one method, the backend choice and its validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from r1deploy.attention.base import DECODE_MAX_QUERY_LEN, AttentionMetadata, MLAMetadata
from r1deploy.attention.mla_torch import TorchMLABackend
from r1deploy.attention.selector import make_attention_backend, step_metadata
from r1deploy.attention.torch_backend import TorchAttentionBackend
from r1deploy.core.forward_batch import ForwardBatch, PendingTokens
from r1deploy.engine_config import EngineConfig, SpeculativeConfig
from r1deploy.errors import UsageError
from r1deploy.worker.cuda_graphs import GraphBuffers

TABLES = [[3, 4, 5, 6], [0, 1, 2, 10], [7, 8, 9, 11]]


def _batch(query_lens: list[int], cached: list[int]) -> ForwardBatch:
    return ForwardBatch.build([[5] * n for n in query_lens], cached, TABLES[: len(query_lens)], 4)


@pytest.mark.parametrize(("query_lens", "decode_query_len"), [
    ([1, 1, 1], 1), ([3, 3, 3], 3), ([DECODE_MAX_QUERY_LEN] * 2, DECODE_MAX_QUERY_LEN),
    ([DECODE_MAX_QUERY_LEN + 1] * 2, 0), ([1, 2, 1], 0), ([5], 5)])
def test_gqa_metadata_picks_the_path_on_the_host(query_lens: list[int], decode_query_len: int) -> None:
    cached = [2] * len(query_lens)
    metadata = TorchAttentionBackend().build_metadata(_batch(query_lens, cached))
    assert metadata.decode_query_len == decode_query_len
    assert metadata.max_query_len == max(query_lens)
    longest = max(q + c for q, c in zip(query_lens, cached, strict=True))
    assert metadata.gather_blocks == -(-longest // 4)


def test_mla_metadata_decodes_uniform_steps_whole_and_splits_mixed_ones() -> None:
    backend = TorchMLABackend()
    verify = backend.build_metadata(_batch([3, 3], [4, 1]))
    assert verify.decode_tokens == slice(None) and verify.decode_query_len == 3 and verify.prefills == ()
    mixed = backend.build_metadata(_batch([1, 5, 1], [6, 0, 2]))
    assert mixed.decode_query_len == 1 and mixed.decode_tokens.tolist() == [0, 6]
    assert mixed.decode_seq_lens.tolist() == [7, 3] and mixed.decode_max_len == 7
    assert mixed.prefills == ((1, 1, 5, 5),)  # (sequence, first row, query_len, seq_len)


def test_capture_metadata_reads_the_full_table() -> None:
    """A graph's static batch has placeholder host lengths: capture metadata bounds the decode by the table."""
    buffers = GraphBuffers(max_batch=4, max_query_len=2, table_width=6, block_size=4, device=torch.device("cpu"))
    batch = buffers.batch(4, 2)
    gqa = TorchAttentionBackend().capture_metadata(batch)
    assert gqa.decode_query_len == 2 and gqa.gather_blocks == 6
    mla = TorchMLABackend().capture_metadata(batch)
    assert mla.decode_query_len == 2 and mla.decode_max_len == 24 and mla.decode_tokens == slice(None)


def test_graph_buffers_fill_a_verify_step_and_pad_the_bucket() -> None:
    buffers = GraphBuffers(max_batch=4, max_query_len=3, table_width=5, block_size=4, device=torch.device("cpu"))
    static = buffers.batch(4, 3)
    batch = ForwardBatch.build([[11, 12, 13], [21, 22, 23]], [4, 1], TABLES[:2], 4)
    batch = dataclasses.replace(batch, logits_indices=torch.tensor([0, 1, 2, 3, 4, 5]))
    pending = PendingTokens(index=torch.tensor([[2, 5], [1, 0]]), sampled=torch.tensor([90, 91]))
    buffers.fill(batch, bucket=4, pending=pending)
    assert static.input_ids[:6].tolist() == [11, 12, 91, 21, 22, 90]  # the pending ids, gathered on the device
    assert static.positions[:6].tolist() == [4, 5, 6, 1, 2, 3]
    assert static.slot_mapping[:6].tolist() == batch.slot_mapping.tolist()
    assert static.slot_mapping[6:].tolist() == [-1] * 6  # the padded sequences write nowhere
    assert static.seq_lens.tolist() == [7, 4, 3, 3]  # padded sequences see as many tokens as they query
    assert static.block_tables[:2, :4].tolist() == TABLES[:2]
    assert static.logits_indices[:6].tolist() == [0, 1, 2, 3, 4, 5]
    assert static.query_start_loc.tolist() == [0, 3, 6, 9, 12]


def test_step_metadata_is_the_engines_or_the_default_backends() -> None:
    batch = _batch([1, 1], [3, 3])
    built = make_attention_backend("torch", "gqa").build_metadata(batch)
    assert step_metadata(dataclasses.replace(batch, attn_metadata=built), "gqa") is built
    assert isinstance(step_metadata(batch, "gqa"), AttentionMetadata)  # a direct caller on the CPU: torch
    assert isinstance(step_metadata(batch, "mla"), MLAMetadata)
    with pytest.raises(TypeError, match="MLAMetadata"):
        step_metadata(dataclasses.replace(batch, attn_metadata=built), "mla")


def test_verify_steps_get_graphs_by_default_when_speculating() -> None:
    assert EngineConfig().graph_query_lens == (1,)
    spec = SpeculativeConfig("ngram", 3)
    assert EngineConfig(speculative=spec).graph_query_lens == (1, 4)
    assert EngineConfig(speculative=spec, graph_query_lens=(1,)).graph_query_lens == (1,)  # an explicit choice stays
    too_long = SpeculativeConfig("ngram", DECODE_MAX_QUERY_LEN)
    assert EngineConfig(speculative=too_long).graph_query_lens == (1,)  # past the decode kernels' query axis


def test_engine_config_validates_the_attention_options() -> None:
    assert EngineConfig(attention_backend="torch", graph_query_lens=(1, 3)).graph_query_lens == (1, 3)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    for lens in ((), (0,), (DECODE_MAX_QUERY_LEN + 1,)):
        with pytest.raises(ValueError, match="graph_query_lens"):
            EngineConfig(graph_query_lens=lens)


def test_engine_runs_the_torch_backend_and_refuses_triton_without_cuda(tiny_model_dir: Path) -> None:
    from r1deploy.engine.engine import LLMEngine

    engine = LLMEngine(str(tiny_model_dir), config=EngineConfig(attention_backend="torch",
                                                                cpu_kv_cache_bytes=1 << 20), device="cpu")
    assert isinstance(engine.runner.attn_backend, TorchAttentionBackend)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="needs a CUDA device"):
            LLMEngine(str(tiny_model_dir), config=EngineConfig(attention_backend="triton",
                                                               cpu_kv_cache_bytes=1 << 20), device="cpu")
