"""What is sent: fixed or uniform lengths, a ShareGPT file, shared-prefix groups, R1 reasoning prompts.

Prompt lengths are exact when a tokenizer is known (text is cut and re-checked through it) or when
prompts are token ids (the in-process engine with dummy weights needs no tokenizer). Without
either, text prompts are built from common English words, about one token each, and the report
takes the server's `usage.prompt_tokens` as the count.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from r1deploy.errors import UsageError

# Common words that are one token each in Llama/Qwen BPE vocabularies (with a leading space).
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "has", "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "about", "can", "out", "up", "them", "some", "could", "into", "other", "than", "then", "now", "only", "its", "over", "also", "new", "after", "first", "two", "may", "any", "these", "way", "most", "where", "just", "made", "through", "back", "over", "year", "work", "well", "even", "day", "good", "each", "know", "need", "long", "great", "find", "give", "take", "small", "place", "home", "water"]

# DeepSeek's recommended R1 prompt suffix (deepseek-ai/DeepSeek-R1 README, usage recommendations).
REASONING_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
REASONING_QUESTIONS = (
    "What is the sum of all positive integers n < 100 such that n^2 + 1 is divisible by 5?",
    "A train leaves at 3:40 pm and arrives at 6:15 pm. How many minutes is the trip?",
    "How many ways can 8 rooks be placed on a chessboard so that none attacks another?",
    "Find the remainder when 7^2024 is divided by 13.",
    "If x + 1/x = 3, what is x^4 + 1/x^4?",
    "A bag has 5 red and 7 blue balls. Two are drawn without replacement. What is P(both red)?",
    "What is the smallest positive integer with exactly 12 divisors?",
    "Solve for real x: sqrt(x + 7) = x - 5.",
    "How many trailing zeros does 125! have?",
    "The angles of a triangle are in the ratio 2:3:4. What is the largest angle in degrees?",
    "Is 2^31 - 1 prime? Justify briefly.",
    "A rectangle has perimeter 34 and diagonal 13. What is its area?",
)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A transformers tokenizer seen as plain encode/decode without special tokens (the server or
    chat template adds those, and usage.prompt_tokens counts them)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | None  # text; None when prompt_ids is set
    prompt_ids: tuple[int, ...] | None
    input_len: int  # exact when exact, else an estimate the server's usage replaces
    output_len: int
    exact: bool


@dataclass(frozen=True)
class PromptMaker:
    """Makes prompts of a given token length: ids (vocab_size set), exact text (tokenizer), or words."""

    tokenizer: Tokenizer | None = None
    vocab_size: int | None = None  # token-id prompts: the engine with no tokenizer

    def random(self, n: int, rng: random.Random) -> RequestSpec:
        if self.vocab_size is not None:
            # Middle of the vocabulary: special tokens sit at the ends of real vocabularies.
            low, high = self.vocab_size // 8, max(self.vocab_size * 3 // 4, self.vocab_size // 8 + 1)
            return RequestSpec(None, tuple(rng.randrange(low, high) for _ in range(n)), n, 0, True)
        return self.text(" ".join(rng.choice(WORDS) for _ in range(n)), n)

    def text(self, text: str, n: int | None = None) -> RequestSpec:
        """A text prompt, cut to n tokens when n is given and a tokenizer can count."""
        if self.vocab_size is not None:
            raise UsageError("this workload needs text prompts, but the model has no tokenizer "
                             "(dummy weights): use a model directory with a tokenizer, or --workload fixed")
        if self.tokenizer is None:
            return RequestSpec(text, None, n if n is not None else len(text.split()), 0, False)
        ids = self.tokenizer.encode(text)
        if n is not None:
            text, ids = self._fit(text, ids, n)
        return RequestSpec(text, None, len(ids), 0, True)

    def count(self, text: str) -> int | None:
        return None if self.tokenizer is None else len(self.tokenizer.encode(text))

    def _fit(self, text: str, ids: list[int], n: int) -> tuple[str, list[int]]:
        # decode(encode(t)[:n]) can re-encode to n +- 1 tokens at a merge boundary: pad with words
        # or trim ids until the round trip is exact (a few tries; lengths are reported as counted).
        tok = self.tokenizer
        assert tok is not None
        for _ in range(8):
            while len(ids) < n:
                text = text + " " + " ".join(WORDS[: n - len(ids)])
                ids = tok.encode(text)
            text = tok.decode(ids[:n])
            ids = tok.encode(text)
            if len(ids) == n:
                break
        return text, ids


def _with_output(spec: RequestSpec, output_len: int) -> RequestSpec:
    return RequestSpec(spec.prompt, spec.prompt_ids, spec.input_len, output_len, spec.exact)


def fixed(maker: PromptMaker, n: int, input_len: int, output_len: int, rng: random.Random) -> list[RequestSpec]:
    _check_len(input_len, output_len)
    return [_with_output(maker.random(input_len, rng), output_len) for _ in range(n)]


def uniform(maker: PromptMaker, n: int, input_range: tuple[int, int], output_range: tuple[int, int],
            rng: random.Random) -> list[RequestSpec]:
    _check_len(input_range[0], output_range[0])
    return [_with_output(maker.random(rng.randint(*input_range), rng), rng.randint(*output_range))
            for _ in range(n)]


def prefix_groups(maker: PromptMaker, n: int, groups: int, prefix_len: int, input_len: int,
                  output_len: int, rng: random.Random) -> list[RequestSpec]:
    """Request i belongs to group i % groups: the group's shared prefix, then its own suffix, so a
    prefix cache can serve prefix_len of every prompt after the group's first request."""
    if groups < 1 or prefix_len < 1:
        raise UsageError("--prefix-groups and --prefix-len must be >= 1")
    _check_len(input_len, output_len)
    prefixes = [maker.random(prefix_len, rng) for _ in range(groups)]
    specs = []
    for i in range(n):
        head, tail = prefixes[i % groups], maker.random(input_len, rng)
        if head.prompt_ids is not None and tail.prompt_ids is not None:
            ids = head.prompt_ids + tail.prompt_ids
            specs.append(RequestSpec(None, ids, len(ids), output_len, True))
        else:
            joined = maker.text(f"{head.prompt} {tail.prompt}")
            specs.append(_with_output(joined, output_len))
    return specs


def reasoning(maker: PromptMaker, n: int, output_len: int, rng: random.Random) -> list[RequestSpec]:
    """R1-style math prompts with DeepSeek's recommended instruction; long outputs are the point."""
    return [_with_output(maker.text(f"{rng.choice(REASONING_QUESTIONS)} {REASONING_SUFFIX}"), output_len)
            for _ in range(n)]


def sharegpt(maker: PromptMaker, path: Path, n: int, output_len: int | None,
             rng: random.Random) -> list[RequestSpec]:
    """The first human turn of each conversation is the prompt; the reply's length is the output
    length unless --output-len is given. Conversations with fewer than two turns are skipped (vLLM)."""
    pairs = load_sharegpt(path)
    rng.shuffle(pairs)
    specs = []
    for prompt, reply in pairs[:n]:
        reply_len = output_len or maker.count(reply) or max(1, round(len(reply.split()) * 1.3))
        specs.append(_with_output(maker.text(prompt), max(1, reply_len)))
    if len(specs) < n:
        # Cycle rather than silently run fewer requests than asked.
        specs = [specs[i % len(specs)] for i in range(n)]
    return specs


def load_sharegpt(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"dataset {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read dataset {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"dataset {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                         f"{exc.msg}") from None
    if not isinstance(data, list):
        raise UsageError(f"dataset {path}: expected a JSON list of {{\"conversations\": [...]}} objects "
                         "(ShareGPT format)")
    pairs = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise UsageError(f"dataset {path}: entry {i} has no \"conversations\" list (ShareGPT format)")
        if len(turns) < 2:
            continue
        texts = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
        if not all(isinstance(t, str) for t in texts):
            raise UsageError(f"dataset {path}: entry {i}: each turn must be an object with a string \"value\"")
        if texts[0].strip():
            pairs.append((texts[0], texts[1]))
    if not pairs:
        raise UsageError(f"dataset {path} has no conversation with a prompt and a reply")
    return pairs


def _check_len(input_len: int, output_len: int) -> None:
    if input_len < 1 or output_len < 1:
        raise UsageError("input and output lengths must be >= 1 token")
