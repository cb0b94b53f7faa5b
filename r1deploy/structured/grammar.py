"""xgrammar behind two small objects: GrammarBackend (one per engine: the tokenizer's vocabulary, the
compiler and its cache) and RequestGrammar (one per request: a matcher advanced as tokens are accepted).

The engine never samples a structured request's next token before its previous one is accepted (engine.py
keeps such steps synchronous), so a mask always reflects every token the request has produced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from r1deploy.structured.params import StructuredOutputsParams

THINK_START = "<think>"
THINK_END = "</think>"
# A constraint the model's vocabulary cannot satisfy: the client's request, so a 400 (server/generation.py).
DEAD_END = "structured_outputs: no token of this model's vocabulary"


class GrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        # The compiler caches every compiled grammar (keyed by its source): a repeated schema compiles once.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        vocab = tokenizer.get_vocab()
        self.think_start, self.think_end = vocab.get(THINK_START), vocab.get(THINK_END)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); ValueError for a schema, regex or grammar xgrammar rejects."""
        compiler = self.compiler
        try:
            if spec.json is not None:
                # Compact separators: "any whitespace" lets a small model loop on blank lines forever.
                return compiler.compile_json_schema(spec.json, any_whitespace=False, strict_mode=spec.strict)
            if spec.json_object:
                return compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False,
                                                    strict_mode=False)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                # GBNF string literals escape like JSON strings.
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs: the {spec.kind} cannot be compiled: {exc}") from exc

    def request_grammar(self, spec: StructuredOutputsParams, prompt_ids: Sequence[int]) -> RequestGrammar:
        waits_for = None
        if spec.after_reasoning and self.think_end is not None and not self._thought_closed(prompt_ids):
            waits_for = self.think_end
        matcher = self._xgr.GrammarMatcher(self.compile(spec))
        if not allowed_tokens(matcher, self.vocab_size).any():
            # e.g. choices in a script the vocabulary cannot spell (a word-level tokenizer): refused up front
            raise ValueError(f"{DEAD_END} begins the {spec.kind}")
        return RequestGrammar(matcher, waits_for)

    def _thought_closed(self, prompt_ids: Sequence[int]) -> bool:
        """The prompt already ends the thought (a template that skips thinking writes `<think></think>`)."""
        ends = [i for i, t in enumerate(prompt_ids) if t == self.think_end]
        if not ends:
            return False
        return self.think_start not in prompt_ids[ends[-1]:]



class RequestGrammar:
    """One request's position in its grammar; `waits_for` is the token (</think>) that starts it."""

    def __init__(self, matcher: Any, waits_for: int | None) -> None:
        self.matcher = matcher
        self.waits_for = waits_for

    @property
    def active(self) -> bool:
        return self.waits_for is None

    def accept(self, token_id: int) -> None:
        if self.waits_for is not None:
            if token_id == self.waits_for:
                self.waits_for = None
            return
        if not self.matcher.accept_token(token_id):  # sampled under the mask: the mask allowed no token
            raise ValueError(f"{DEAD_END} continues the constraint here (token {token_id} sampled)")


def allowed_tokens(matcher: Any, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the tokens the matcher accepts next."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].bool()


def batch_bitmask(grammars: Sequence[RequestGrammar | None], vocab_size: int) -> torch.Tensor | None:
    """[B, ceil(V / 32)] int32 on the host, all-allowed rows for unconstrained requests; None when no row
    is constrained at this step."""
    if not any(g is not None and g.active for g in grammars):
        return None
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
    for row, grammar in enumerate(grammars):
        if grammar is not None and grammar.active:
            grammar.matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits [B, V] fp32 with disallowed tokens at -inf (xgrammar's kernels)."""
    import xgrammar as xgr

    masked = logits.clone()
    # xgrammar 0.2.9's native CPU kernel writes one float past the logits when V is not a multiple of 32
    # (heap corruption, seen with a 70-token vocabulary); its torch implementation is exact on the CPU.
    backend = "auto" if logits.device.type == "cuda" else "torch_native"
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[-1], backend=backend)
    return masked
