"""Tensor parallelism on the CPU (gloo, 2 ranks): greedy tokens and logprobs equal TP = 1 and transformers
(heads split; KV heads replicated when tp > KV heads; a vocabulary that does not split evenly), through
chunked prefill and preemption; a dead or hung worker fails the engine with a clear error instead of a
hang; step messages are typed tensors; a --tp that cannot split the model is a one-line usage error."""

from __future__ import annotations

import inspect
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.distributed import messages
from r1deploy.distributed.group import TensorParallelError, kv_head_shard
from r1deploy.distributed.messages import HEADER_LEN, Op, StepChannel, StepMessage
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, ParallelConfig
from r1deploy.errors import UsageError
from r1deploy.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
NEW_TOKENS = 10
# A budget of 8 tokens chunks the prompts; 12 blocks of 4 cannot hold all four requests at once.
STRESS = {"block_size": 4, "max_num_batched_tokens": 8, "num_gpu_blocks_override": 12}


def save_tiny(path: Path, arch: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float32"}
    torch.manual_seed(0)
    if arch == "qwen2":  # q/k/v bias, tied embeddings, KV heads split 2 -> 1 per rank
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common))
    else:  # one KV head, replicated on both ranks; o_proj bias is added once, after the all-reduce
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False,
                                             **common))
    with torch.no_grad():  # HF zeroes biases: randomise everything so every shard's loading is tested
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


def hf_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def engine(model_dir: Path, tp: int, **options: object) -> LLMEngine:
    parallel = ParallelConfig(tensor_parallel_size=tp, **options.pop("parallel", {}))  # type: ignore[arg-type]
    return LLMEngine(str(model_dir), config=EngineConfig(**options, parallel=parallel),  # type: ignore[arg-type]
                     device="cpu", dtype="float32")


def generate(llm: LLMEngine) -> list[tuple[list[int], list[float], list[dict[int, float]]]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    ids = [llm.add_request(p, params) for p in PROMPTS]
    done = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [(list(done[i].token_ids), list(done[i].logprobs), list(done[i].top_logprobs)) for i in ids]


def test_tp2_equals_tp1_and_transformers_under_chunking_and_preemption(tiny: Path) -> None:
    single = engine(tiny, 1, **STRESS)
    expected = generate(single)
    assert [tokens for tokens, _, _ in expected] == hf_greedy(tiny)
    tp = engine(tiny, 2, **STRESS)
    sent = []  # step messages that carried pending tokens: async scheduling ran under TP
    send = tp.executor.channel.send
    tp.executor.channel.send = lambda message: (sent.append(message.pending.shape[1]), send(message))[1]
    try:
        got = generate(tp)
        assert tp.async_scheduling and sum(n > 0 for n in sent) > NEW_TOKENS // 2
        assert tp.scheduler.num_preemptions > 0
        assert tp.block_manager.num_free_blocks == tp.block_manager.num_blocks
        # Each rank holds half the q heads and its own KV heads (Llama's one KV head is replicated).
        attn = tp.runner.model.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        assert tp.runner.kv_caches[0].shape[3] == 1
    finally:
        tp.shutdown()
    for (tokens, logprobs, top), (ref_tokens, ref_logprobs, ref_top) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-5
        for row, ref_row in zip(top, ref_top, strict=True):
            assert row.keys() == ref_row.keys()
            assert all(abs(row[k] - ref_row[k]) < 1e-5 for k in row)


def _start_and_step(model_dir: Path, **parallel: object) -> LLMEngine:
    llm = engine(model_dir, 2, parallel=parallel)
    llm.add_request(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    llm.step()
    return llm


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_dead_or_hung_worker_fails_the_engine_clearly(tmp_path_factory: pytest.TempPathFactory, fault: str) -> None:
    model_dir = save_tiny(tmp_path_factory.mktemp("fault"), "qwen2")
    llm = _start_and_step(model_dir, timeout_s=3.0)
    worker = llm.executor.processes[0]
    try:
        os.kill(worker.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        if fault == "killed":
            worker.join(10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError) as failure:
            while llm.has_unfinished_requests():
                llm.step()
        assert time.monotonic() - start < 30
        message = str(failure.value)
        if fault == "killed":
            assert "worker 1 exited (killed by signal 9)" in message
        else:
            assert "timed out after 3s" in message
        with pytest.raises(TensorParallelError):  # and it stays failed: no step runs on a broken group
            llm.step()
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)  # our own worker, stopped or not
        started = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - started < 15


def test_step_messages_are_typed_tensors_never_pickle() -> None:
    batch = ForwardBatch.build([[5, 6, 7], [8]], [0, 4], [[3], [1, 2]], 4)
    message = StepMessage.of_batch(batch)
    header, payload = message.header(), message.payload()
    assert header.dtype == payload.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    back = StepMessage.unpack(header, payload).to_batch("cpu")
    for field in ("input_ids", "positions", "slot_mapping", "block_tables", "query_start_loc", "seq_lens",
                  "logits_indices"):
        assert torch.equal(getattr(back, field), getattr(batch, field)), field
    assert (back.query_lens_cpu, back.seq_lens_cpu, back.block_size) == (batch.query_lens_cpu, batch.seq_lens_cpu, 4)
    # A verify step's 1 + k sampled positions travel too, and round-trip to the same logits rows.
    verify = ForwardBatch.build([[5, 6, 7], [8]], [0, 4], [[3], [1, 2]], 4, num_sampled=[3, 0])
    back = StepMessage.unpack(StepMessage.of_batch(verify).header(), StepMessage.of_batch(verify).payload())
    assert back.to_batch("cpu").logits_indices.tolist() == verify.logits_indices.tolist() == [0, 1, 2]
    assert StepMessage.unpack(StepMessage.shutdown().header(), torch.zeros(0, dtype=torch.int64)).op is Op.SHUTDOWN
    # Async scheduling: the pending-token index travels too, and an index past the step's tokens is refused.
    with_pending = StepMessage.of_batch(batch, [[2, 3], [0, 1]])
    back = StepMessage.unpack(with_pending.header(), with_pending.payload())
    assert back.pending.tolist() == [[2, 3], [0, 1]]
    with pytest.raises(ValueError, match="pending"):
        beyond = StepMessage.of_batch(batch, [[4], [0]])
        StepMessage.unpack(beyond.header(), beyond.payload())
    # The transport refuses anything but a StepMessage, and its module never (un)pickles objects.
    with pytest.raises(TypeError):
        StepChannel(group=None).send({"op": 1})  # type: ignore[arg-type]
    from r1deploy.distributed import custom_all_reduce, group, worker

    for module in (messages, worker, group, custom_all_reduce):
        source = inspect.getsource(module)
        for forbidden in ("import pickle", "_object", "send_object", "recv_object", "torch.load", "eval("):
            assert forbidden not in source, (module.__name__, forbidden)
    bad = header.clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="magic"):
        StepMessage.unpack(bad, payload)
    with pytest.raises(ValueError, match="header"):
        StepMessage.unpack(header, payload[:-1])


def test_kv_heads_split_or_replicated() -> None:
    assert [kv_head_shard(8, r, 4) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [kv_head_shard(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


def test_bad_tp_is_a_one_line_usage_error(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from r1deploy.cli import main

    assert main(["serve", str(tiny), "--tp", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tp 3 does not divide" in err and "4 attention heads" in err
    with pytest.raises(UsageError, match="does not divide"):  # before any process starts
        engine(tiny, 3)
    assert main(["serve", str(tiny), "--tp", "0"]) == 2
