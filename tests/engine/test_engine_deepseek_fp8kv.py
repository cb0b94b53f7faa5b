"""DeepSeek-V3 through the engine with an FP8 (e4m3) latent cache (kv_cache_dtype="fp8") against the same
engine with the model's own cache ("auto": fp32 here): pool capacity for one budget, and greedy tokens and
logprobs under batching, chunked prefill and a prefix-cache hit.

Stated tolerances, for this tiny random model (top-2 logits often within 0.01, so greedy choices are
fragile): wherever the two runs have generated the same tokens so far (identical contexts), the top-20
logprobs differ by at most LOGPROB_TOL nats (measured 0.137) and the greedy tokens agree at AGREEMENT of
those positions or more (measured 15 of 18). Chunked prefill and the prefix hit store the same bytes as the
batched FP8 run: the same tokens, logprobs within 1e-4 (measured 2e-6)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3, randomize_

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine.outputs import CompletionOutput
from r1deploy.engine_config import EngineConfig
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE
from r1deploy.sampling_params import MAX_LOGPROBS, SamplingParams

PROMPTS = [[5, 9, 13, 40, 41, 3], [7] * 19, list(range(10, 43)), [3, 4]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=MAX_LOGPROBS)
LOGPROB_TOL = 0.25
AGREEMENT = 0.75


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("deepseek_v3_fp8kv_engine")
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_V3)).float().eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(path, safe_serialization=True)
    return path


def make_llm(model_dir: Path, kv_cache_dtype: str, device: str = "cpu", dtype: str = "float32",
             **config: object) -> LLM:
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(model_dir), config=EngineConfig(kv_cache_dtype=kv_cache_dtype, **config),
                           device=device, dtype=dtype)
    return llm


def generate(llm: LLM, prompts: list[list[int]]) -> list[CompletionOutput]:
    return [o.outputs[0] for o in llm.generate(prompts, PARAMS)]


def compare(ref: list[CompletionOutput], out: list[CompletionOutput]) -> tuple[int, int, float]:
    """(positions compared, greedy tokens equal, largest top-logprob difference) over the positions whose
    contexts are identical: each sequence up to and including its first differing token."""
    compared = agreed = 0
    worst = 0.0
    for r, o in zip(ref, out, strict=True):
        for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids, strict=True)):
            top_r, top_o = r.top_logprobs[i], o.top_logprobs[i]
            worst = max(worst, max(abs(top_r[t] - top_o[t]) for t in top_r.keys() & top_o.keys()))
            compared, agreed = compared + 1, agreed + (a == b)
            if a != b:
                break
    return compared, agreed, worst


def assert_same_run(a: list[CompletionOutput], b: list[CompletionOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4


@pytest.fixture(scope="module")
def auto_out(deepseek_dir: Path) -> list[CompletionOutput]:
    return generate(make_llm(deepseek_dir, "auto"), PROMPTS)


@pytest.fixture(scope="module")
def fp8_out(deepseek_dir: Path) -> list[CompletionOutput]:
    return generate(make_llm(deepseek_dir, "fp8"), PROMPTS)


@pytest.mark.parametrize(("dtype", "ratio"), [("float32", 4), ("bfloat16", 2)])
def test_fp8_pool_holds_more_tokens(deepseek_dir: Path, dtype: str, ratio: int) -> None:
    """One byte per cached value: the same cpu_kv_cache_bytes hold 2x the blocks of a bf16 cache, 4x fp32."""
    pools = {}
    for kv in ("auto", "fp8"):
        runner = make_llm(deepseek_dir, kv, dtype=dtype, cpu_kv_cache_bytes=1 << 22).engine.runner
        pools[kv] = runner.pool.num_blocks
        assert runner.kv_caches[0].dtype == (FP8_KV_DTYPE if kv == "fp8" else getattr(torch, dtype))
    assert pools["fp8"] == ratio * pools["auto"]


def test_fp8_batched_close_to_auto(auto_out: list[CompletionOutput], fp8_out: list[CompletionOutput]) -> None:
    compared, agreed, worst = compare(auto_out, fp8_out)
    assert worst < LOGPROB_TOL, worst
    assert agreed >= AGREEMENT * compared, (agreed, compared)


def test_fp8_chunked_prefill(deepseek_dir: Path, auto_out: list[CompletionOutput],
                             fp8_out: list[CompletionOutput]) -> None:
    chunked = generate(make_llm(deepseek_dir, "fp8", max_num_batched_tokens=5, block_size=4), PROMPTS)
    assert_same_run(chunked, fp8_out)
    compared, agreed, worst = compare(auto_out, chunked)
    assert worst < LOGPROB_TOL and agreed >= AGREEMENT * compared


def test_fp8_prefix_cache_hit(deepseek_dir: Path, fp8_out: list[CompletionOutput]) -> None:
    """The second request reads its first 32 prompt tokens' latents from FP8 blocks the first one wrote."""
    llm = make_llm(deepseek_dir, "fp8", block_size=4)
    first = generate(llm, [PROMPTS[2]])
    again = llm.generate([PROMPTS[2]], PARAMS)[0]
    assert again.metrics.num_cached_tokens == 32  # 8 full blocks of the 33-token prompt
    assert_same_run([again.outputs[0]], first)
    assert_same_run(first, [fp8_out[2]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda_graphs", "eager"])
def test_fp8_gpu_close_to_cpu(deepseek_dir: Path, fp8_out: list[CompletionOutput], eager: bool) -> None:
    """Triton latent write (FP8) and MLA decode over the FP8 cache, with and without decode graphs, against
    the CPU's FP8 run (the same quantisation; only summation order differs, which may move a value across an
    e4m3 rounding boundary)."""
    llm = make_llm(deepseek_dir, "fp8", "cuda", enforce_eager=eager, max_num_seqs=8, max_model_len=128,
                   block_size=4, max_num_batched_tokens=16)
    assert (llm.engine.runner.graphs is None) == eager
    compared, agreed, worst = compare(fp8_out, generate(llm, PROMPTS))
    assert worst < LOGPROB_TOL and agreed >= AGREEMENT * compared
