"""The embedded SmolLM2-135M Q4_1 GGUF: our conversion against transformers' own GGUF import, and our
greedy tokens against transformers' generate on the converted directory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.layers.attention import kv_cache_shape
from r1deploy.models.loader import LoadedModel, embedded_gguf_path, embedded_model_dir, load_model
from r1deploy.weights.gguf_reader import gguf_hf_config, iter_gguf_tensors, open_gguf

pytestmark = pytest.mark.slow
PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def hf_model() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()


@torch.inference_mode()
def greedy(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, block_size: int = 16) -> list[int]:
    table = list(range(-(-(len(prompt) + max_new_tokens) // block_size)))
    kv_caches = [torch.zeros(kv_cache_shape(loaded.config, len(table), block_size))
                 for _ in range(loaded.config.num_hidden_layers)]
    out: list[int] = []
    chunk, num_cached = prompt, 0
    for _ in range(max_new_tokens):
        batch = ForwardBatch.build([chunk], [num_cached], [table], block_size)
        logits = loaded.model.compute_logits(loaded.model(batch, kv_caches)[batch.logits_indices])
        num_cached += len(chunk)
        chunk = [int(logits.argmax(-1)[0])]
        out += chunk
    return out


def test_conversion_matches_transformers_gguf_import() -> None:
    path = embedded_gguf_path()
    reader = open_gguf(path)
    ours = dict(iter_gguf_tensors(reader, gguf_hf_config(reader)))
    with torch.device("meta"):  # transformers needs a model to name the tensors after
        skeleton = LlamaForCausalLM(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours  # tied: no output.weight
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name].float()), name


def test_direct_gguf_load_equals_cached_directory(embedded: LoadedModel) -> None:
    direct = load_model(str(embedded_gguf_path()))
    assert direct.config == embedded.config
    for (name, p), q in zip(embedded.model.named_parameters(), direct.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    chat = [{"role": "user", "content": "Hi there!"}]
    assert direct.tokenizer.apply_chat_template(chat) == embedded.tokenizer.apply_chat_template(chat)
    assert direct.eos_token_ids == embedded.eos_token_ids == (2,)  # <|im_end|>, per the GGUF metadata


def test_greedy_tokens_match_transformers(embedded: LoadedModel, hf_model: PreTrainedModel) -> None:
    for text in PROMPTS:
        prompt = embedded.tokenizer(text)["input_ids"]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
        assert greedy(embedded, prompt, 16) == ref[0, len(prompt):].tolist(), text


def test_chat_answer_names_paris(embedded: LoadedModel) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = embedded.tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    answer = embedded.tokenizer.decode(greedy(embedded, prompt, 16))
    assert "Paris" in answer


def test_cache_is_complete_and_leaves_no_temp_dirs(embedded: LoadedModel) -> None:
    cache = embedded_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(f".{cache.name}.")]
