import dataclasses
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RepetitionPenaltyLogitsProcessor

from r1deploy.layers.sampler import Sampler, SamplerOutput, SamplingBatch, apply_penalties, request_generator
from r1deploy.sampling_params import SamplingParams

sampler = Sampler()


def make_batch(
    params: Sequence[SamplingParams],
    vocab_size: int,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        vocab_size,
        "cpu",
        eos_token_ids,
    )


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], **kwargs) -> SamplerOutput:
    return sampler(logits, make_batch(params, logits.shape[1], **kwargs))


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


# Random logits for the filter properties: bounded so softmax stays well-conditioned, with
# duplicates allowed so ties at the top-k / top-p boundary are exercised.
logit_rows = st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=40).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)


def test_greedy_is_argmax_and_output_shapes() -> None:
    logits = random_logits(5, 50)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 5)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (5,)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (5,)
    assert out.top_logprobs is None and out.top_logprobs_ids is None


def test_top_k_1_is_greedy_even_with_high_temperature() -> None:
    logits = random_logits(8, 100, seed=1)
    out = sample(logits, [SamplingParams(temperature=5.0, top_k=1)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_small_temperature_matches_greedy() -> None:
    logits = random_logits(64, 100, seed=2)
    # Widen the top gap to >= 0.05 so that at T=1e-3 the runner-up has odds below e^-50.
    logits.scatter_add_(1, logits.argmax(-1, keepdim=True), torch.full((64, 1), 0.05))
    out = sample(logits, [SamplingParams(temperature=1e-3)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    logits = random_logits(6, 30, seed=3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)] * 3
    for _ in range(10):
        out = sample(logits, params)
        assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))


def test_input_logits_are_not_modified() -> None:
    logits = random_logits(3, 20, seed=4)
    before = logits.clone()
    params = [
        SamplingParams(
            temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, frequency_penalty=0.5
        ),
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(logprobs=3),
    ]
    sample(logits, params, outputs=[[1, 2], [], [3]], eos_token_ids=[0])
    assert torch.equal(logits, before)


# --- filters never let a masked token through -------------------------------------------------

DRAWS = 256  # the row is repeated so one call gives many independent draws


@settings(max_examples=25, deadline=None)
@given(row=logit_rows, k=st.integers(1, 45), temperature=st.floats(0.1, 3.0))
def test_top_k_never_samples_outside_the_top_k(row: torch.Tensor, k: int, temperature: float) -> None:
    out = sample(row.expand(DRAWS, -1), [SamplingParams(temperature=temperature, top_k=k)] * DRAWS)
    kth_largest = row.sort(descending=True).values[min(k, len(row)) - 1]
    assert bool((row[out.token_ids] >= kth_largest).all())  # ties with the k-th logit are kept


@settings(max_examples=25, deadline=None)
@given(row=logit_rows, top_p=st.floats(0.01, 1.0), temperature=st.floats(0.1, 3.0))
def test_top_p_never_samples_outside_the_nucleus(row: torch.Tensor, top_p: float, temperature: float) -> None:
    out = sample(row.expand(DRAWS, -1), [SamplingParams(temperature=temperature, top_p=top_p)] * DRAWS)
    # Reference in float64: a token is in the nucleus when the mass of strictly more likely tokens
    # is below top_p. The 1e-4 slack absorbs float32 cumsum rounding at the boundary.
    probs = (row.double() / temperature).softmax(-1)
    mass_above = torch.stack([probs[probs > p].sum() for p in probs])
    allowed = mass_above < top_p + 1e-4
    assert bool(allowed[out.token_ids].all())


@settings(max_examples=25, deadline=None)
@given(row=logit_rows, min_p=st.floats(0.0, 1.0), temperature=st.floats(0.1, 3.0))
def test_min_p_never_samples_an_unlikely_token(row: torch.Tensor, min_p: float, temperature: float) -> None:
    out = sample(row.expand(DRAWS, -1), [SamplingParams(temperature=temperature, min_p=min_p)] * DRAWS)
    probs = (row.double() / temperature).softmax(-1)
    allowed = probs >= min_p * probs.max() * (1 - 1e-5)
    assert bool(allowed[out.token_ids].all())


@settings(max_examples=20, deadline=None)
@given(
    row=logit_rows,
    k=st.integers(1, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_combined_filters_sample_only_tokens_every_filter_allows(
    row: torch.Tensor, k: int, top_p: float, min_p: float
) -> None:
    out = sample(row.expand(DRAWS, -1), [SamplingParams(top_k=k, top_p=top_p, min_p=min_p)] * DRAWS)
    kth_largest = row.sort(descending=True).values[min(k, len(row)) - 1]
    probs = row.double().softmax(-1)
    # Every filter keeps a subset of the most likely tokens, so each filter's own set bounds the result.
    assert bool((row[out.token_ids] >= kth_largest).all())
    mass_above = torch.stack([probs[probs > p].sum() for p in probs])
    assert bool((mass_above < top_p + 1e-4)[out.token_ids].all())
    assert bool((probs >= min_p * probs.max() * (1 - 1e-5))[out.token_ids].all())


@settings(max_examples=40, deadline=None)
# top_k=1 is greedy: greedy rows skip the filters and take the argmax, so it is tested separately.
@given(
    row=logit_rows,
    k=st.just(0) | st.integers(2, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_each_filter_keeps_exactly_the_right_set(
    row: torch.Tensor, k: int, top_p: float, min_p: float
) -> None:
    # The sampling tests above only show that nothing outside the set is drawn; this also catches
    # filters that drop too much. Each filter is checked on its own, on the processed logits.
    vocab = len(row)
    probs = row.double().softmax(-1)

    kept = Sampler.process(row[None], make_batch([SamplingParams(top_k=k)], vocab))[0].isfinite()
    if k == 0 or k >= vocab:
        assert bool(kept.all())
    else:
        assert torch.equal(kept, row >= row.sort(descending=True).values[k - 1])

    kept = Sampler.process(row[None], make_batch([SamplingParams(top_p=top_p)], vocab))[0].isfinite()
    mass = probs[kept].sum().item()
    assert mass >= top_p - 1e-4  # enough mass ...
    assert mass - probs[kept].min().item() < top_p + 1e-4  # ... and no token more than needed
    if not kept.all():
        assert probs[kept].min() >= probs[~kept].max()  # and the most likely ones

    kept = Sampler.process(row[None], make_batch([SamplingParams(min_p=min_p)], vocab))[0].isfinite()
    ratio = probs / probs.max()
    assert bool(kept[ratio > min_p * (1 + 1e-5)].all()) and not bool(kept[ratio < min_p * (1 - 1e-5)].any())


# --- seeds ----------------------------------------------------------------------------------


def run_steps(
    rows: list[tuple[SamplingParams, list[int]]], target: int, steps: int, vocab: int = 64
) -> list[int]:
    """Decode `steps` steps for a batch; the target row sees the same logits whatever its
    neighbours. Returns the target row's tokens."""
    generators = [request_generator(p.seed, "cpu") for p, _ in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    tokens = []
    for step in range(steps):
        logits = random_logits(len(rows), vocab, seed=100 + step)
        logits[target] = random_logits(1, vocab, seed=1000 + step)[0]
        batch = SamplingBatch.build(
            [p for p, _ in rows],
            [prompt for _, prompt in rows],
            outputs,
            generators,
            vocab,
            "cpu",
            eos_token_ids=[0],
        )
        out = sampler(logits, batch)
        for i, t in enumerate(out.token_ids.tolist()):
            outputs[i].append(t)
        tokens.append(outputs[target][-1])
    return tokens


def test_seeded_request_is_reproducible_across_batch_compositions() -> None:
    target = (SamplingParams(temperature=1.5, top_p=0.95, seed=1234, frequency_penalty=0.3), [5, 6, 7])
    alone = run_steps([target], target=0, steps=8)
    crowded = run_steps(
        [
            (SamplingParams(temperature=1.0), [1, 2]),  # unseeded
            (SamplingParams(temperature=0.8, seed=99, repetition_penalty=1.2), [3]),
            target,
            (SamplingParams(temperature=0.0, min_tokens=4, seed=7), [9]),  # greedy, seeded
            (SamplingParams(temperature=2.0, top_k=3, logprobs=5), []),
        ],
        target=2,
        steps=8,
    )
    assert alone == crowded
    assert alone == run_steps([target], target=0, steps=8)
    other_seed = (SamplingParams(temperature=1.5, top_p=0.95, seed=4321, frequency_penalty=0.3), [5, 6, 7])
    assert run_steps([other_seed], target=0, steps=8) != alone


def test_unseeded_rows_follow_the_global_rng() -> None:
    logits = random_logits(16, 64, seed=5)
    params = [SamplingParams(temperature=1.5)] * 16
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = sample(logits, params).token_ids
        torch.manual_seed(0)
        second = sample(logits, params).token_ids
    assert torch.equal(first, second)


# --- penalties ------------------------------------------------------------------------------


def test_penalties_equal_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0], [1.0, 2.0, 3.0, -1.0, -2.0, 0.5]])
    prompts = [[0, 3, 3], [1]]
    outputs = [[2, 2, 4, 3], [1, 1, 5]]
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.5, presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    expected = logits.clone()
    for b, p in enumerate(params):
        for v in range(6):
            x = expected[b, v].item()
            if v in prompts[b] or v in outputs[b]:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            count = outputs[b].count(v)  # presence/frequency look at the output only
            x -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
            expected[b, v] = x
    batch = make_batch(params, 6, prompts=prompts, outputs=outputs)
    torch.testing.assert_close(apply_penalties(logits, batch), expected)
    # End to end: a greedy request with the same penalties picks the argmax of the penalised logits.
    greedy = [dataclasses.replace(p, temperature=0.0) for p in params]
    out = sample(logits, greedy, prompts=prompts, outputs=outputs)
    assert torch.equal(out.token_ids, expected.argmax(-1))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(3, 40, seed=6)
    prompts = [[1, 2, 3, 3], [10, 11], [0]]
    outputs = [[4, 1], [12, 12, 13], [39, 20, 0]]
    # HF penalises every id in input_ids, i.e. prompt + output.
    expected = torch.cat(
        [
            RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([p + o]), logits[i : i + 1].clone())
            for i, (p, o) in enumerate(zip(prompts, outputs))
        ]
    )
    batch = make_batch([SamplingParams(repetition_penalty=penalty)] * 3, 40, prompts=prompts, outputs=outputs)
    torch.testing.assert_close(apply_penalties(logits, batch), expected)


def test_rows_without_penalties_are_untouched_in_a_penalised_batch() -> None:
    logits = random_logits(2, 10, seed=7)
    batch = make_batch(
        [SamplingParams(), SamplingParams(repetition_penalty=1.5)],
        10,
        prompts=[[1, 2], [1, 2]],
        outputs=[[3], [3]],
    )
    penalised = apply_penalties(logits, batch)
    assert torch.equal(penalised[0], logits[0])
    assert not torch.equal(penalised[1], logits[1])


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_and_top_n_sorted() -> None:
    logits = random_logits(4, 50, seed=8)
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    out = sample(logits, params, prompts=[[1, 2, 3]] * 4, outputs=[[4]] * 4)
    reference = logits.log_softmax(-1)  # raw: before penalties, temperature and filters
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs is not None and out.top_logprobs_ids is not None
    assert out.top_logprobs.shape == out.top_logprobs_ids.shape == (4, 5)  # N = max requested
    torch.testing.assert_close(out.top_logprobs, reference.gather(1, out.top_logprobs_ids))
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    assert torch.equal(out.top_logprobs_ids[:, 0], logits.argmax(-1))


def test_logprobs_zero_gives_empty_top_tensors() -> None:
    out = sample(random_logits(2, 10), [SamplingParams(logprobs=0), SamplingParams()])
    assert out.top_logprobs is not None and out.top_logprobs.shape == (2, 0)


# --- min_tokens -----------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    vocab = 8
    logits = torch.full((1, vocab), -5.0)
    logits[0, 0] = 10.0  # EOS
    logits[0, 5] = 9.0  # stop token
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])]
    early = sample(logits, params, outputs=[[3]], eos_token_ids=[0])
    assert early.token_ids.item() not in (0, 5)
    assert early.logprobs.item() == pytest.approx(logits.log_softmax(-1)[0, early.token_ids.item()].item())
    reached = sample(logits, params, outputs=[[3, 4]], eos_token_ids=[0])
    assert reached.token_ids.item() == 0
    # ignore_eos: EOS does not end the request, so min_tokens leaves it alone (vLLM).
    ignoring = sample(
        logits,
        [SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)],
        outputs=[[]],
        eos_token_ids=[0],
    )
    assert ignoring.token_ids.item() == 0


def test_min_tokens_with_random_sampling_never_emits_eos() -> None:
    logits = torch.zeros(DRAWS, 4)
    logits[:, 1] = 3.0
    out = sample(logits, [SamplingParams(min_tokens=1)] * DRAWS, eos_token_ids=[1])
    assert bool((out.token_ids != 1).all())


# --- distribution ---------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.5, 0), (1.0, 3)])
def test_empirical_distribution_matches_softmax(temperature: float, top_k: int) -> None:
    draws = 20_000
    row = torch.tensor([1.0, 0.0, -0.5, 0.7])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = sample(row.expand(draws, -1), [SamplingParams(temperature=temperature, top_k=top_k)] * draws)
    expected = row / temperature
    if top_k:
        expected = expected.masked_fill(expected < expected.topk(top_k).values[-1], float("-inf"))
    empirical = torch.bincount(out.token_ids, minlength=4).float() / draws
    # Standard error is at most sqrt(0.25 / 20k) ~ 0.0035; 0.015 is > 4 sigma.
    torch.testing.assert_close(empirical, expected.softmax(-1), atol=0.015, rtol=0)


def test_seeded_row_distribution_matches_softmax() -> None:
    # One seeded request over many steps: its own generator must yield correctly distributed draws.
    row = torch.tensor([[0.5, -1.0, 1.5, 0.0]])
    params = [SamplingParams(seed=3)]
    generator = request_generator(3, "cpu")
    batch = make_batch(params, 4, generators=[generator])
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sampler(row, batch).token_ids.item()] += 1
    torch.testing.assert_close(counts / counts.sum(), row[0].softmax(-1), atol=0.03, rtol=0)
