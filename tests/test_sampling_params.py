import dataclasses
import math

import pytest

from r1deploy.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.max_tokens, p.min_tokens) == (None, (), (), 16, 0)
    assert (p.ignore_eos, p.logprobs, p.skip_special_tokens) == (False, None, True)
    assert not p.greedy


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.01),
        ("seed", "42"),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop", ""),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 7),
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("ignore_eos", 1),
    ],
)
def test_invalid_value_raises_naming_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=100, max_tokens=None).min_tokens == 100


def test_boundary_values_are_accepted() -> None:
    p = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=-1,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=20,
        max_tokens=None,
        seed=0,
    )
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 0  # -1 and 0 both mean "off"; normalised to one spelling
    assert SamplingParams(logprobs=0).logprobs == 0


def test_stop_is_normalised_to_a_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_frozen_hashable_and_replace_revalidates() -> None:
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop="x", stop_token_ids=(1,)))
    # replace() feeds normalised values back through __post_init__, which must accept them.
    assert dataclasses.replace(p, temperature=0.0).stop == ("x",)
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=0.0)


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        SamplingParams(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-6}, True),  # below vLLM's epsilon: dividing by it would overflow
        ({"top_k": 1}, True),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 0.7, "top_k": 2}, False),
    ],
)
def test_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy
