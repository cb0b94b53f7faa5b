"""--dp-attention on the CPU (gloo, 2 ranks, a tiny random DeepSeek-V3 in fp32): each rank runs whole MLA heads
over its own requests and its own latent cache, the routed experts stay split and see every rank's tokens.
Greedy tokens and logprobs equal TP = 1 (chunked prefill, requests of different lengths on both ranks, a step
where one rank has no sequences, a prefix-cache hit), with the MoE exchange by all-gather / reduce-scatter and
by all-to-all (--moe-a2a); the KV capacity per rank; the usage errors; the typed step message's per-rank parts;
the block manager's per-rank pools."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from parallel_engines import engine, generate
from test_tensor_parallel import save_tiny

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3, randomize_

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.distributed.messages import StepMessage
from r1deploy.engine.block_manager import DataParallelBlockManager
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.request import Request
from r1deploy.engine_config import EngineConfig, ParallelConfig
from r1deploy.errors import UsageError
from r1deploy.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
ALONE = [list(range(60, 71))]  # one request: rank 1 runs every step with no sequences
# Shares its first 3 blocks (block_size 4) with PROMPTS[2], run after it: a prefix hit on PROMPTS[2]'s rank.
PREFIX = [list(range(10, 22)) + [99, 98, 97]]
NEW_TOKENS = 8
CHUNKED = {"block_size": 4, "max_num_batched_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("v3")
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=3)
    hf.save_pretrained(path, safe_serialization=True)
    return path


def assert_same(got: list[tuple[list[int], list[float]]], expected: list[tuple[list[int], list[float]]]) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-5


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[tuple[list[int], list[float]]]]:
    single = engine(model_dir, 1, **CHUNKED)
    return [generate(single, prompts, NEW_TOKENS) for prompts in (PROMPTS, ALONE, PREFIX)]


@pytest.mark.parametrize("moe_all_to_all", [False, True], ids=["allgather", "a2a"])
def test_dp_attention_equals_tp1(model_dir: Path, expected: list, moe_all_to_all: bool) -> None:
    dp = engine(model_dir, 2, dp_attention=True, moe_all_to_all=moe_all_to_all, **CHUNKED)
    try:
        ranks: dict[int, set[int]] = {}  # rank -> the prompt lengths it ran
        rank_of = dp.dp_rank_of

        def recording(request: Request) -> int:
            rank = rank_of(request)
            ranks.setdefault(rank, set()).add(len(request.prompt_token_ids))
            return rank

        dp.dp_rank_of = recording
        got = [generate(dp, PROMPTS, NEW_TOKENS)]
        assert set(ranks) == {0, 1}  # both ranks had requests of their own
        ranks.clear()
        got.append(generate(dp, ALONE, NEW_TOKENS))
        assert set(ranks) == {0}  # rank 1 joined every step's collectives with zero tokens
        hits = dp.block_manager.num_prefix_hits
        got.append(generate(dp, PREFIX, NEW_TOKENS))
        assert dp.block_manager.num_prefix_hits == hits + 3  # on the rank that ran PROMPTS[2]

        model = dp.runner.model
        attn = model.model.layers[0].self_attn
        assert attn.num_heads == 4  # whole heads on every rank
        assert attn.kv_b_proj.weight.shape == (4 * (16 + 16), 32) and attn.o_proj.weight.shape == (64, 4 * 16)
        assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (256, 64)  # dense MLP whole
        moe = model.model.layers[1].mlp
        assert moe.all_to_all == moe_all_to_all
        assert moe.experts.gate_up_proj.shape == (4, 64, 64)  # routed experts split: 4 of 8
        assert moe.shared_experts.gate_up_proj.weight.shape == (64, 64)  # shared experts whole
        assert model.lm_head.weight.shape == (256, 64) and model.model.embed_tokens.weight.shape == (256, 64)
        assert dp.runner.graphs is None
        # Each rank's pool holds its own requests: two pools, twice the capacity of one.
        per_rank = dp.kv_capacity_tokens
        assert per_rank == dp.runner.pool.num_blocks * CHUNKED["block_size"] > 0
        assert dp.kv_capacity_tokens_total == 2 * per_rank
        assert len(dp.block_manager.pools) == 2 and dp.block_manager.num_blocks == 2 * dp.runner.pool.num_blocks
        assert dp.block_manager.num_used_blocks == 0
    finally:
        dp.shutdown()
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)


def test_step_message_carries_each_rank_its_part() -> None:
    first = ForwardBatch.build([[1, 2, 3], [4]], [0, 5], [[7], [8, 9]], 4, num_sampled=[0, 1])
    message = StepMessage.of_parts([None, first], 4)
    back = StepMessage.unpack(message.header(), message.payload())
    assert back.is_data_parallel and back.dp_sizes.tolist() == [[0, 0, 0], [4, 2, 1]]
    empty, own = back.part(0), back.part(1)
    assert empty.input_ids.numel() == 0 and empty.to_batch("cpu").num_seqs == 0
    batch = own.to_batch("cpu")
    assert batch.input_ids.tolist() == [1, 2, 3, 4] and batch.seq_lens_cpu == (3, 6)
    assert own.num_sampled.tolist() == [0, 1] and batch.block_tables.tolist() == [[7, 0], [8, 9]]
    plain = StepMessage.of_batch(first)
    assert not StepMessage.unpack(plain.header(), plain.payload()).is_data_parallel
    bad = message.payload().clone()
    bad[-2] = 3  # part 1 claims 3 sequences; the step has 2
    with pytest.raises(ValueError, match="data-parallel"):
        StepMessage.unpack(message.header(), bad)


def test_requests_are_balanced_over_rank_pools_and_follow_their_prefix() -> None:
    manager = DataParallelBlockManager(2, 8, 4)
    params = SamplingParams(max_tokens=1)
    a, b, c = (Request(str(i), p, params, 1) for i, p in enumerate([[1] * 9, [2] * 5, [1] * 9]))
    for request, rank in ((a, 0), (b, 1)):
        manager.match_prefix(request)
        assert manager.rank_of(request) == rank
        manager.allocate(request, len(request.prompt_token_ids))
    a.num_computed_tokens = 9
    manager.register_full_blocks(a)
    manager.match_prefix(c)  # rank 0 is busier (3 blocks to 2) but holds c's first 2 blocks
    assert manager.rank_of(c) == 0 and c.num_cached_tokens == 8
    assert manager.same_pool(a, c) and not manager.same_pool(a, b)
    assert manager.num_used_blocks == 5 and manager.num_blocks == 16
    for request in (a, b, c):
        manager.free(request)
    assert manager.num_used_blocks == 0


def test_usage_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from r1deploy.cli import main

    with pytest.raises(ValueError, match="--dp-attention needs --tp > 1"):
        ParallelConfig(dp_attention=True)
    with pytest.raises(ValueError, match="--moe-a2a needs --dp-attention"):
        ParallelConfig(tensor_parallel_size=2, moe_all_to_all=True)
    assert main(["serve", str(model_dir), "--dp-attention", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--dp-attention needs --tp > 1" in err
    assert main(["serve", str(model_dir), "--tp", "2", "--moe-a2a", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--moe-a2a needs --dp-attention" in err
    llama = save_tiny(tmp_path / "llama", "llama")
    capsys.readouterr()
    with pytest.raises(UsageError, match="needs a DeepSeek \\(MLA\\) model, not LlamaForCausalLM"):
        engine(llama, 2, dp_attention=True)  # before any process starts
    assert main(["serve", str(llama), "--tp", "2", "--dp-attention", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--dp-attention needs a DeepSeek (MLA) model" in err
    with pytest.raises(UsageError, match="embedded Llama"):
        LLMEngine(config=EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2, dp_attention=True)),
                  device="cpu")
    # Only the routed experts split under --dp-attention: 3 ranks do not divide 8 experts (but would not need to
    # divide the 4 heads).
    with pytest.raises(UsageError, match="--tp 3 does not divide .*8 routed experts"):
        engine(model_dir, 3, dp_attention=True)


def test_plan_launch_line_carries_dp_attention() -> None:
    from r1deploy.plan.planner import plan_deployment

    launch = plan_deployment("deepseek-r1", "h200", tp=8, ep=8, dp_attention=True)["launch"]
    assert "--enable-dp-attention --dp 8" in launch["sglang"]
    assert "r1deploy serve /path/to/DeepSeek-R1 --tp 8 --dp-attention" in launch["r1deploy"]
    plain = plan_deployment("deepseek-r1", "h200", tp=8, ep=8, dp_attention=False)["launch"]
    assert "--tp 8 " in plain["r1deploy"] and "--dp-attention" not in plain["r1deploy"]


def test_dp_attention_without_processes_is_refused_for_one_rank() -> None:
    """A single-rank group never turns on --dp-attention's model build (nothing to exchange with)."""
    from transformers import DeepseekV3Config

    from r1deploy.core.deepseek_config import DeepseekConfig
    from r1deploy.distributed.group import TPGroup
    from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM

    config = DeepseekConfig.from_hf(DeepseekV3Config(**TINY_V3).to_dict())
    model = DeepseekV3ForCausalLM(config, tp=TPGroup(0, 1, torch.device("cpu"), dp_attention=True))
    assert not model.dp_attention
