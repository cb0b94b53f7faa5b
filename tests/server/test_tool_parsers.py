"""Tool-call parsers on recorded outputs: DeepSeek-V3 / R1-0528's tool-call tokens and the <tool_call> JSON
style, finished and streamed. A stream is fed at every character boundary (one character at a time, and
cut in two at each position): its content and argument deltas must add up to the finished parse."""

from __future__ import annotations

import json

import pytest

from r1deploy.server.tool_parsers import DeepSeekV3ToolParser, HermesToolParser, parser_for
from r1deploy.server.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from r1deploy.server.tool_parsers.stream import ToolCallStream, tool_calls

BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def deepseek_call(name: str, arguments: str) -> str:
    return f"{CALL}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


# Shaped as DeepSeek-V3-0324 / R1-0528 write them (content first or not, one or two calls, nesting, unicode,
# escaped quotes, numbers at the end of a value).
DEEPSEEK_OUTPUTS = [
    (BEGIN + deepseek_call("get_weather", '{"location": "Tokyo", "unit": "celsius"}') + END,
     "", [("get_weather", {"location": "Tokyo", "unit": "celsius"})]),
    ("Let me check both cities." + BEGIN + deepseek_call("get_weather", '{"location": "Paris"}') + "\n"
     + deepseek_call("get_time", '{"tz": "Europe/Rome", "offset": -1.5}') + END,
     "Let me check both cities.", [("get_weather", {"location": "Paris"}),
                                   ("get_time", {"tz": "Europe/Rome", "offset": -1.5})]),
    (BEGIN + deepseek_call("search", '{"query": "say \\"hi\\" \\u00e9t\\u00e9 東京", "filters": {"year": [2023, 2024],'
                                     ' "exact": true, "site": null}, "limit": 10}') + END,
     "", [("search", {"query": 'say "hi" été 東京', "filters": {"year": [2023, 2024], "exact": True, "site": None},
                      "limit": 10})]),
    # An exponent: "1.5e-" parses as 1.5 on the way to 0.0015, so a number's tail must wait.
    (BEGIN + deepseek_call("scale", '{"factor": 1.5e-3, "flag": false}') + END,
     "", [("scale", {"factor": 0.0015, "flag": False})]),
    ("No tool needed: 2 + 2 = 4.", "No tool needed: 2 + 2 = 4.", []),
]
HERMES_OUTPUTS = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>',
     "", [("get_weather", {"city": "Oslo", "days": 3})]),
    (('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "z}"}]}}\n</tool_call>\n<tool_call>\n'
      '{"name": "b", "arguments": {}}\n</tool_call>'), "Sure.\n", [("a", {"x": [1, {"y": "z}"}]}), ("b", {})]),
    ("plain text < not a call", "plain text < not a call", []),
]


def finished(parser, text: str) -> tuple[str, list[tuple[str, object]]]:
    content, calls = parser.parse(text, final=True)
    return content, [(c.name, json.loads(c.arguments_json())) for c in calls]


def streamed(parser, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feed growing text; returns (content, [(name, arguments text)], ids) as a client would assemble them."""
    stream = ToolCallStream(parser)
    content, names, arguments, ids = "", {}, {}, {}
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        delta, deltas = stream.update(text, final=i == len(pieces) - 1)
        content += delta
        for d in deltas:
            if d.id is not None:
                assert d.index not in ids, "a call is opened once"
                ids[d.index], names[d.index] = d.id, d.function.name
            assert d.index in ids, "arguments only after the call was opened"
            arguments[d.index] = arguments.get(d.index, "") + (d.function.arguments or "")
    order = sorted(ids)
    return content, [(names[i], arguments[i]) for i in order], [ids[i] for i in order]


@pytest.mark.parametrize(("parser", "case"), [(DeepSeekV3ToolParser(), c) for c in DEEPSEEK_OUTPUTS]
                         + [(HermesToolParser(), c) for c in HERMES_OUTPUTS])
def test_finished_parse(parser, case) -> None:
    text, content, calls = case
    assert finished(parser, text) == (content, calls)


@pytest.mark.parametrize(("parser", "case"), [(DeepSeekV3ToolParser(), c) for c in DEEPSEEK_OUTPUTS]
                         + [(HermesToolParser(), c) for c in HERMES_OUTPUTS])
def test_stream_split_at_every_character(parser, case) -> None:
    text, content, calls = case
    expected_arguments = [c.arguments_json() for c in parser.parse(text, final=True)[1]]
    expected = (content, [(name, a) for (name, _), a in zip(calls, expected_arguments)])
    by_char = streamed(parser, list(text))
    assert by_char[:2] == expected
    assert [json.loads(a) for _, a in by_char[1]] == [args for _, args in calls]
    for cut in range(len(text) + 1):
        assert streamed(parser, [text[:cut], text[cut:]])[:2] == expected, cut


def test_stream_never_shows_markup_as_content() -> None:
    text = "Checking." + BEGIN + deepseek_call("f", '{"a": 1}') + END
    stream = ToolCallStream(DeepSeekV3ToolParser())
    content = ""
    for end in range(1, len(text) + 1):
        content += stream.update(text[:end], final=False)[0]
        assert "<｜" not in content and content == text[:end][: len(content)]
    assert content == "Checking."


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = BEGIN + deepseek_call("a", "{}") + deepseek_call("b", "{}") + END
    assert [name for name, _ in streamed_limited(text)] == ["a"]


def streamed_limited(text: str) -> list[tuple[str, str]]:
    stream = ToolCallStream(DeepSeekV3ToolParser(), max_calls=1)
    names = []
    for end in range(1, len(text) + 1):
        names += [(d.function.name, d.function.arguments) for d in stream.update(text[:end], end == len(text))[1]
                  if d.id is not None]
    return names


def test_unfinished_or_broken_call_is_text() -> None:
    broken = BEGIN + f"{CALL}function{SEP}f\n```json\n{{not json\n```{CALL_END}" + END
    assert finished(DeepSeekV3ToolParser(), broken) == (broken, [])


def test_forced_parsers() -> None:
    assert finished(NamedFunctionParser("f"), '{"a": [1, 2]}') == ("", [("f", {"a": [1, 2]})])
    assert finished(NamedFunctionParser("f"), '{"a": [1, ') == ('{"a": [1, ', [])  # cut by max_tokens
    required = '[{"name": "f", "parameters": {"a": "x"}}, {"name": "g", "parameters": {}}]'
    assert finished(RequiredCallsParser(), required) == ("", [("f", {"a": "x"}), ("g", {})])
    content, calls, _ = streamed(RequiredCallsParser(), list(required))
    assert content == "" and [(n, json.loads(a)) for n, a in calls] == [("f", {"a": "x"}), ("g", {})]


def test_parser_choice_and_call_ids() -> None:
    assert isinstance(parser_for({BEGIN: 5}), DeepSeekV3ToolParser)
    assert isinstance(parser_for({"<tool_call>": 5}), HermesToolParser)
    calls = tool_calls(DeepSeekV3ToolParser().parse(DEEPSEEK_OUTPUTS[1][0], final=True)[1])
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
