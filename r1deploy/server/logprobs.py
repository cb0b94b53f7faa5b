"""The engine's per-token logprobs in OpenAI's two shapes (chat `content[]` and legacy completions)."""

from __future__ import annotations

from collections.abc import Sequence

from r1deploy.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenText:
    """Token id -> its text as decoded alone (what OpenAI shows per token), memoised: the same ids recur."""

    def __init__(self, tokenizer: object | None) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tokenizer is None:  # dummy weights: no vocabulary to show
                text = f"token_id:{token_id}"
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)  # type: ignore[attr-defined]
            self._cache[token_id] = text
        return text


def _top(text: TokenText, top: dict[int, float]) -> list[TopLogprob]:
    return [TopLogprob(token=text(t), logprob=lp, bytes=list(text(t).encode())) for t, lp in top.items()]


def chat_logprobs(text: TokenText, token_ids: Sequence[int], logprobs: Sequence[float],
                  top: Sequence[dict[int, float]] | None) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprob(token=text(t), logprob=lp, bytes=list(text(t).encode()),
                     top_logprobs=_top(text, top[i]) if top else [])
        for i, (t, lp) in enumerate(zip(token_ids, logprobs, strict=True))
    ])


def completion_logprobs(text: TokenText, token_ids: Sequence[int], logprobs: Sequence[float],
                        top: Sequence[dict[int, float]] | None, offset: int = 0) -> CompletionLogprobs:
    """`offset` is where the first token's text starts in the choice's text (streams continue it)."""
    tokens = [text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=list(logprobs),
        top_logprobs=[{text(t): lp for t, lp in row.items()} for row in top] if top else None,
        text_offset=offsets,
    )
