"""MTP speculation (DeepSeek's multi-token-prediction layer drafting k = 1..3 tokens) gives exactly the greedy
tokens of a plain run under batching, chunked prefill, prefix hits, preemption and abort, from bf16 and FP8
checkpoints; every draft it proposes is the one the paper's MTP computes from scratch (so its latent cache
follows chunks, rollbacks and preemption exactly); and a layer that predicts well gets its drafts accepted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_speculative import PROMPTS, generate, make_engine

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import write_fp8_checkpoint
from mtp_support import MTP, ReferenceMTP, write_mtp_checkpoint

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, ParallelConfig, SpeculativeConfig
from r1deploy.errors import UsageError
from r1deploy.spec.mtp import MTPProposer

CASES = {
    "batched": {},
    "chunked": {"max_num_batched_tokens": 7, "block_size": 4},
    "preempted": {"num_gpu_blocks_override": 14, "block_size": 4},
}


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("mtp_engine")
    return path, write_mtp_checkpoint(path, seed=5)


@pytest.fixture(scope="module")
def plain_tokens(mtp_checkpoint) -> dict[str, list[list[int]]]:
    """Greedy tokens without speculation, per case (the same model, MTP layer not loaded)."""
    return {case: list(generate(make_engine(mtp_checkpoint[0], **config), PROMPTS).values())
            for case, config in CASES.items()}


def record_drafts(proposer: MTPProposer) -> list[tuple[list[int], list[int]]]:
    """(tokens the drafts follow, drafts) of every proposal the MTP proposer makes."""
    assert isinstance(proposer, MTPProposer)
    seen: list[tuple[list[int], list[int]]] = []
    propose = proposer.propose_batch

    def recording(wanted):
        drafts = propose(wanted)
        seen.extend((request.all_token_ids, d) for (request, _), d in zip(wanted, drafts, strict=True) if d)
        return drafts

    proposer.propose_batch = recording
    return seen


def reference_drafts(reference: ReferenceMTP, tokens: list[int], k: int) -> list[int]:
    """The paper's MTP from scratch: draft 1 is its prediction at the position before the newest token (reading
    that token and the main model's hidden state there); draft j > 1 extends the sequence by draft j - 1 and
    reads the layer's own output hidden state at the position before."""
    hidden = reference.main_hidden(tokens)[: len(tokens) - 1]
    drafts: list[int] = []
    for _ in range(k):
        outputs = reference.outputs(tokens + drafts, hidden)
        drafts.append(int(reference.head(outputs[-1]).argmax()))
        hidden = torch.cat((hidden, outputs[-1:]))
    return drafts


@pytest.mark.parametrize(("case", "k"), [("batched", 1), ("chunked", 3), ("preempted", 3)])
def test_mtp_speculation_equals_plain_greedy(mtp_checkpoint, plain_tokens, case: str, k: int) -> None:
    spec = make_engine(mtp_checkpoint[0], speculative=SpeculativeConfig("mtp", k), **CASES[case])
    for _ in range(2):  # the second round hits the prefix cache the first left behind
        assert list(generate(spec, PROMPTS).values()) == plain_tokens[case]
    stats = spec.spec_stats
    assert stats.num_drafts > 0 and len(stats.accepted_per_position) == k
    assert spec.block_manager.num_prefix_hits > 0
    if case == "preempted":
        assert spec.scheduler.num_preemptions > 0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_mtp_drafts_are_the_papers_and_abort_frees_everything(mtp_checkpoint, plain_tokens) -> None:
    """Chunked prefill, preemption and rollbacks on a small pool, k = 3: each proposal equals the reference's."""
    path, tensors = mtp_checkpoint
    spec = make_engine(path, speculative=SpeculativeConfig("mtp", 3), max_num_batched_tokens=7, block_size=4,
                       num_gpu_blocks_override=14)
    seen = record_drafts(spec.proposer)
    got = generate(spec, PROMPTS, abort_after=4)
    assert spec.scheduler.num_preemptions > 0 and spec.block_manager.num_free_blocks == spec.block_manager.num_blocks
    expected = plain_tokens["preempted"]
    assert list(got.values())[1:] == expected[1:]
    aborted = next(iter(got.values()))
    assert 0 < len(aborted) < len(expected[0]) and aborted == expected[0][:len(aborted)]
    reference = ReferenceMTP(path, tensors)
    assert len(seen) > 20 and any(len(d) == 3 for _, d in seen)
    for tokens, drafts in seen:
        assert drafts == reference_drafts(reference, tokens, len(drafts)), tokens


def test_fp8_checkpoint_speculates_exactly(mtp_checkpoint, tmp_path: Path) -> None:
    path, tensors = mtp_checkpoint
    write_fp8_checkpoint(tensors, json.loads((path / "config.json").read_text()), tmp_path)
    plain = generate(make_engine(tmp_path), PROMPTS)
    spec = make_engine(tmp_path, speculative=SpeculativeConfig("mtp", 2))
    assert generate(spec, PROMPTS) == plain and spec.spec_stats.num_draft_tokens > 0


def write_predictive_checkpoint(path: Path) -> None:
    """A main model close to a bigram table (attention and MLP outputs scaled down) and an MTP layer that copies
    its next-token rule from the embedding of the token it reads: its drafts are mostly right."""
    from safetensors.torch import save_file

    tensors = write_mtp_checkpoint(path, seed=7)
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    for name in list(tensors):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = tensors[name] * (0.0 if name.startswith(f"model.layers.{MTP}.") else 0.05)
    tensors[f"model.layers.{MTP}.eh_proj.weight"] = torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), 1)
    tensors[f"model.layers.{MTP}.enorm.weight"] = torch.ones(hidden)
    tensors[f"model.layers.{MTP}.shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def assert_mostly_accepted(engine: LLMEngine) -> None:
    stats = engine.spec_stats
    assert stats.num_accepted_tokens > 0.5 * stats.num_draft_tokens
    assert stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.accepted_per_position[2] > 0


def test_a_layer_that_predicts_well_gets_drafts_accepted(tmp_path: Path) -> None:
    """Most drafts accepted, some rejected (rollbacks of several positions), the plain run's tokens."""
    write_predictive_checkpoint(tmp_path)
    plain = generate(make_engine(tmp_path), PROMPTS)
    spec = make_engine(tmp_path, speculative=SpeculativeConfig("mtp", 3), block_size=4)
    assert generate(spec, PROMPTS) == plain
    assert_mostly_accepted(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_mtp_speculation_with_and_without_graphs(tmp_path: Path, eager: bool) -> None:
    """On CUDA (Triton kernels; verify steps of 1 + 3 and decode steps replayed from graphs, whose final hidden
    states the draft reads, or everything eager): the plain run's tokens, and the drafts still mostly right."""
    write_predictive_checkpoint(tmp_path)
    config = {"enforce_eager": eager, "max_num_seqs": 8, "max_model_len": 128, "block_size": 4,
              "max_num_batched_tokens": 16, "graph_query_lens": (1, 4)}

    def engine(**extra: object) -> LLMEngine:
        return LLMEngine(str(tmp_path), config=EngineConfig(**config, **extra), device="cuda", dtype="float32")

    plain = generate(engine(), PROMPTS)
    spec = engine(speculative=SpeculativeConfig("mtp", 3))
    assert (spec.runner.graphs is None) == eager
    assert generate(spec, PROMPTS) == plain
    assert_mostly_accepted(spec)


def test_mtp_is_refused_where_it_cannot_run(mtp_checkpoint) -> None:
    """(A model without an MTP layer: tests/models/test_deepseek_mtp.py.)"""
    with pytest.raises(ValueError, match="1..3"):
        SpeculativeConfig("mtp", 4)
    with pytest.raises(ValueError, match="--tp 1"):
        EngineConfig(speculative=SpeculativeConfig("mtp", 1), parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="block_size >= 2"):
        EngineConfig(speculative=SpeculativeConfig("mtp", 3), block_size=1)
    with pytest.raises(UsageError, match="without its MTP layer"):
        MTPProposer(make_engine(mtp_checkpoint[0]).runner, 1, 16)


def test_oracle_times_the_mtp_head_and_keeps_greedy(mtp_checkpoint, plain_tokens) -> None:
    """gpu_spec.py's setup: the oracle's drafts at acceptance 1.0, the MTP head run beside them for its cost (and
    following every step with its own cache); greedy output unchanged, every draft accepted."""
    references = {tuple(p): tuple(t) for p, t in zip(PROMPTS, plain_tokens["batched"], strict=True)}
    spec = SpeculativeConfig.of({"method": "oracle", "num_speculative_tokens": 2, "acceptance": 1.0,
                                 "references": references, "inner": "mtp"})
    engine = make_engine(mtp_checkpoint[0], speculative=spec)
    mtp_proposals = record_drafts(engine.proposer.inner)  # run for its cost, its drafts discarded
    assert list(generate(engine, PROMPTS).values()) == plain_tokens["batched"]
    assert mtp_proposals and engine.spec_stats.acceptance_per_position == [1.0, 1.0]

