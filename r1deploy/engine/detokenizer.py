"""Incremental detokenisation and stop strings.

Decoding only the tail (from `prefix_offset`) keeps each step O(1) in the output length; a tail
that ends in U+FFFD is an incomplete multi-byte character and waits for the next token.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1deploy.engine.request import Request


@dataclass
class IncrementalDetokenizer:
    tokenizer: object  # a transformers tokenizer
    skip_special_tokens: bool = True
    prefix_offset: int = 0
    read_offset: int = 0

    def step(self, token_ids: list[int]) -> str:
        """The new text that token_ids[read_offset:] add."""
        decode = self.tokenizer.decode  # type: ignore[attr-defined]
        prefix = decode(token_ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full[len(prefix):]


def find_stop_string(request: Request, new_text_len: int) -> tuple[str, int] | None:
    """The first stop string that the newest text completes, and where it starts in output_text."""
    text = request.output_text
    for stop in request.params.stop:
        # Only a match that ends in the new text is new; look back far enough to catch it.
        start = max(0, len(text) - new_text_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1:
            return stop, index
    return None


def visible_text(request: Request) -> str:
    """Text safe to stream now: while running, hold back what could still become a stop string."""
    if request.status.finished or not request.params.stop:
        return request.output_text
    hold = max(len(s) for s in request.params.stop) - 1
    return request.output_text[: len(request.output_text) - hold] if hold else request.output_text
