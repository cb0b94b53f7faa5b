from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from r1deploy.bench import workload
from r1deploy.bench.workload import PromptMaker
from r1deploy.errors import UsageError


class WordTokenizer:
    """One token per whitespace-separated word: exact lengths are checkable by hand."""

    def encode(self, text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def test_token_id_prompts_are_exact_and_seeded() -> None:
    maker = PromptMaker(vocab_size=97)
    a = workload.fixed(maker, 5, 16, 8, random.Random(3))
    b = workload.fixed(maker, 5, 16, 8, random.Random(3))
    assert a == b
    assert all(len(s.prompt_ids or ()) == 16 and s.input_len == 16 and s.output_len == 8 and s.exact for s in a)
    assert all(12 <= t < 72 for s in a for t in s.prompt_ids or ())  # away from special ids at the ends
    assert len({s.prompt_ids for s in a}) == 5  # distinct prompts: no accidental prefix-cache hits


def test_text_prompts_exact_through_tokenizer() -> None:
    maker = PromptMaker(tokenizer=WordTokenizer())
    specs = workload.fixed(maker, 3, 40, 4, random.Random(0))
    assert all(s.exact and s.input_len == 40 and len((s.prompt or "").split()) == 40 for s in specs)
    no_tok = workload.fixed(PromptMaker(), 2, 40, 4, random.Random(0))
    assert all(not s.exact and s.input_len == 40 for s in no_tok)


def test_uniform_ranges() -> None:
    specs = workload.uniform(PromptMaker(vocab_size=1000), 50, (4, 9), (2, 3), random.Random(1))
    assert {s.input_len for s in specs} <= set(range(4, 10)) and {s.output_len for s in specs} <= {2, 3}


def test_prefix_groups_share_prefix() -> None:
    specs = workload.prefix_groups(PromptMaker(vocab_size=1000), 6, 2, 32, 8, 4, random.Random(0))
    ids = [s.prompt_ids or () for s in specs]
    assert all(len(p) == 40 for p in ids)
    assert ids[0][:32] == ids[2][:32] == ids[4][:32] and ids[1][:32] == ids[3][:32]
    assert ids[0][:32] != ids[1][:32] and ids[0][32:] != ids[2][32:]


def test_reasoning_prompts_need_text() -> None:
    specs = workload.reasoning(PromptMaker(), 3, 512, random.Random(0))
    assert all(workload.REASONING_SUFFIX in (s.prompt or "") and s.output_len == 512 for s in specs)
    with pytest.raises(UsageError, match="tokenizer"):
        workload.reasoning(PromptMaker(vocab_size=100), 1, 10, random.Random(0))


def _write(tmp_path: Path, data: object, raw: str | None = None) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    return path


def test_sharegpt_reads_first_turns(tmp_path: Path) -> None:
    data = [{"conversations": [{"from": "human", "value": "hello there"},
                               {"from": "gpt", "value": "one two three four"}]},
            {"conversations": [{"from": "human", "value": "only one turn"}]}]
    specs = workload.sharegpt(PromptMaker(tokenizer=WordTokenizer()), _write(tmp_path, data), 3, None,
                              random.Random(0))
    assert len(specs) == 3  # the one usable conversation, cycled
    assert specs[0].prompt == "hello there" and specs[0].input_len == 2 and specs[0].output_len == 4


@pytest.mark.parametrize(("data", "raw", "message"), [
    (None, "{not json", "not valid JSON"),
    ({"conversations": []}, None, "JSON list"),
    ([{"dialog": []}], None, "no \"conversations\""),
    ([{"conversations": [{"value": 1}, {"value": "x"}]}], None, "string \"value\""),
    ([{"conversations": [{"value": "only"}]}], None, "no conversation"),
])
def test_malformed_sharegpt_is_one_clear_error(tmp_path: Path, data: object, raw: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        workload.load_sharegpt(_write(tmp_path, data, raw))


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        workload.load_sharegpt(tmp_path / "nope.json")
