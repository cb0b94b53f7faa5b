"""The <think> splitter: pure split and the incremental stream that must agree with it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1deploy.server.reasoning import ReasoningStream, held_back, split_reasoning, vocab_has_think


@pytest.mark.parametrize(("text", "expected"), [
    ("I think.</think>The answer", ("I think.", "The answer")),  # template opened <think>
    ("<think>I think.</think>The answer", ("I think.", "The answer")),  # model opened it
    ("\n<think>\nhm</think>\n\n42", ("\nhm", "\n\n42")),
    ("still thinking", ("still thinking", None)),  # ran out of tokens inside the thought
    ("<think>still", ("still", None)),
    ("</think>direct", (None, "direct")),
    ("done</think>", ("done", None)),
    ("", (None, None)),
    ("a</think>b</think>c", ("a", "b</think>c")),  # only the first close counts
    ("a <think> b</think>c", ("a <think> b", "c")),  # only a leading <think> is a tag
])
def test_split_reasoning(text: str, expected: tuple[str | None, str | None]) -> None:
    assert split_reasoning(text) == expected


def test_held_back_waits_for_partial_tags() -> None:
    assert held_back("abc</thi") == len("</thi")
    assert held_back("abc<") == 1
    assert held_back("<thi") == 4  # maybe the opening tag
    assert held_back("abc") == 0
    assert held_back("a</think>b</") == 0  # after the close nothing is a tag any more


def _stream(pieces: list[str], enabled: bool = True) -> tuple[str, str]:
    splitter = ReasoningStream(enabled)
    text, reasoning, content = "", "", ""
    for i, piece in enumerate(pieces):
        text += piece
        r, c = splitter.update(text, finished=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def test_stream_splits_across_the_close_tag() -> None:
    splitter = ReasoningStream()
    assert splitter.update("<thi", False) == ("", "")
    assert splitter.update("<think>ponder", False) == ("ponder", "")
    assert splitter.update("<think>ponder</th", False) == ("", "")  # might be the close: wait
    assert splitter.update("<think>ponder</think>ans", False) == ("", "ans")
    assert splitter.update("<think>ponder</think>answer", True) == ("", "wer")


def test_stream_releases_a_false_alarm() -> None:
    splitter = ReasoningStream()
    assert splitter.update("a<", False) == ("a", "")
    assert splitter.update("a<b", False) == ("<b", "")


def test_stream_disabled_is_all_content() -> None:
    assert _stream(["<think>a", "</think>b"], enabled=False) == ("", "<think>a</think>b")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think>", "a", " ", "\n", "b c", "th"]),
                max_size=12),
       st.data())
def test_stream_equals_split_for_any_chunking(parts: list[str], data: st.DataObject) -> None:
    text = "".join(parts)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    reasoning, content = split_reasoning(text)
    assert _stream(pieces) == (reasoning or "", content or "")


def test_vocab_has_think() -> None:
    class Tok:
        def __init__(self, vocab: dict[str, int]) -> None:
            self.vocab = vocab

        def get_vocab(self) -> dict[str, int]:
            return self.vocab

    assert vocab_has_think(Tok({"</think>": 5}))
    assert not vocab_has_think(Tok({"a": 1}))
    assert not vocab_has_think(None)
