"""A tiny random Llama checkpoint plus a word-level tokenizer with a <think> chat template, saved as a
stock HF directory, so the server tests run the real loader and engine in a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<think>", "</think>", "<|user|>", "<|assistant|>"]
WORDS = ["the", "a", "an", "is", "are", "was", "be", "to", "of", "and", "in", "on", "at", "for", "with", "by", "from", "up", "down", "out", "over", "under", "again", "then", "once", "here", "there", "when", "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own", "same", "so", "than", "too", "very", "can", "will", "just", "don", "should", "now", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red", "blue", "green", "cat", "dog", "bird", "fish", "tree", "sky", "sun", "moon", "star", "rain", "snow", "wind", "hello", "world", "yes", "stop", "go"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)


def _save_tiny_model(path: Path) -> None:
    # The engine tests' builder, loaded by path: tests/ is not a package.
    spec = importlib.util.spec_from_file_location("engine_conftest", Path(__file__).parents[1] / "engine" / "conftest.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.save_tiny_model(path, "llama")  # qwen2 would get transformers' forced Qwen2Tokenizer


def save_tiny_tokenizer(path: Path, vocab_size: int = 97) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"\u2581{w}" for w in WORDS]  # SentencePiece-style word starts, so decoding restores spaces
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words][:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    # R1 keeps the think tags as non-special added tokens, so they survive skip_special_tokens.
    tok.add_tokens([AddedToken(t, special=False) for t in ("<think>", "</think>", "<|user|>", "<|assistant|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def save_tiny_model_dir(path: Path) -> Path:
    _save_tiny_model(path)
    save_tiny_tokenizer(path)
    return path
