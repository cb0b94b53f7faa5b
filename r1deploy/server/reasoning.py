"""Split R1-style output into reasoning (before `</think>`) and content (after it).

R1 templates open `<think>` in the generation prompt, so the output usually starts inside the thought
and only `</think>` appears; older templates let the model write `<think>` itself. Both shapes give the
same split. Rules follow vLLM's deepseek_r1 parser, with one deliberate difference: only a *leading*
`<think>` is stripped, so that the streaming split never has to take back text it already sent.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def _strip_leading_start(text: str) -> str:
    stripped = text.lstrip()
    return stripped[len(THINK_START):] if stripped.startswith(THINK_START) else text


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a finished answer; without `</think>` it is all reasoning (the model ran
    out of tokens while thinking). Empty parts are None, as in the OpenAI message shape."""
    head, found, tail = text.partition(THINK_END)
    reasoning = _strip_leading_start(head)
    return reasoning or None, (tail or None) if found else None


def held_back(text: str) -> int:
    """How many trailing characters of unfinished text might still become a tag, so must wait."""
    if THINK_END in text:
        return 0
    stripped = text.lstrip()
    if THINK_START.startswith(stripped) and stripped != THINK_START:
        return len(text)  # maybe the opening tag, still arriving (or only whitespace before it)
    for size in range(min(len(THINK_END) - 1, len(text)), 0, -1):
        if THINK_END.startswith(text[-size:]):
            return size
    return 0


class ReasoningStream:
    """Turns the engine's cumulative text into (reasoning delta, content delta) per update.

    With enabled=False everything is content. Deltas only ever extend what was sent, because a
    possible tag prefix is held back until the next update disambiguates it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._reasoning_sent = 0
        self._content_sent = 0

    def update(self, text: str, finished: bool) -> tuple[str, str]:
        if not self.enabled:
            reasoning, content = "", text
        else:
            ready = text if finished else text[: len(text) - held_back(text)]
            head, _, tail = ready.partition(THINK_END)
            reasoning, content = _strip_leading_start(head), tail
        reasoning_delta = reasoning[self._reasoning_sent:]
        content_delta = content[self._content_sent:]
        self._reasoning_sent, self._content_sent = len(reasoning), len(content)
        return reasoning_delta, content_delta


def vocab_has_think(tokenizer: object | None) -> bool:
    """The default parser choice: deepseek-r1 when the vocabulary knows `</think>`."""
    if tokenizer is None:
        return False
    return THINK_END in tokenizer.get_vocab()  # type: ignore[attr-defined]
